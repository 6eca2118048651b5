"""One Kafka AdminClient per cluster, shared by every pipeline on it, and the batched offset
queries that lag and DLQ depth are computed from.

A cluster is its bootstrap servers plus the librdkafka settings from the pipeline's Secret
(different credentials are a different client). Pipelines `bind` to a cluster when they are
reconciled and `release` it when deleted or moved; a client no pipeline uses is dropped. The
settings hold credentials: they are kept here only, never logged, and a cluster is named in
logs and status by its bootstrap servers alone.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

log = logging.getLogger(__name__)
# librdkafka's own log lines (connection failures...) go here, not to stderr.
librdkafka_log = logging.getLogger("kafka_retry_operator.librdkafka")

CLIENT_ID = "kafka-retry-operator"

TP = tuple[str, int]  # (topic, partition): hashable, unlike confluent's TopicPartition


@dataclass(frozen=True)
class Cluster:
    bootstrap_servers: str
    settings_digest: str = ""  # sha256 of the Secret's settings; "" without a Secret

    def __str__(self) -> str:
        return self.bootstrap_servers


class InvalidKafkaSettings(ValueError):
    """librdkafka refused the settings; the message names the property, never its value."""


def _digest(settings: Mapping[str, str]) -> str:
    if not settings:
        return ""
    h = hashlib.sha256()
    for key in sorted(settings):
        h.update(key.encode() + b"\0" + settings[key].encode() + b"\0")
    return h.hexdigest()


class AdminRegistry:
    """The shared AdminClients, keyed by cluster, with the pipelines ("owners") using each."""

    def __init__(self, base_config: Mapping[str, Any] | None = None) -> None:
        self._base = {"client.id": CLIENT_ID, "logger": librdkafka_log, **(base_config or {})}
        self._lock = threading.Lock()
        self._configs: dict[Cluster, dict[str, Any]] = {}
        self._admins: dict[Cluster, AdminClient] = {}
        self._owners: dict[str, Cluster] = {}

    def bind(self, owner: str, bootstrap_servers: str, settings: Mapping[str, str]) -> Cluster:
        """The cluster `owner` now uses (creating its client if new); an earlier one it no
        longer uses is released."""
        cluster = Cluster(bootstrap_servers, _digest(settings))
        with self._lock:
            if cluster not in self._admins:
                config = {**settings, **self._base, "bootstrap.servers": bootstrap_servers}
                self._admins[cluster] = _new_admin(config)
                self._configs[cluster] = config
            previous = self._owners.get(owner)
            self._owners[owner] = cluster
            if previous is not None and previous != cluster:
                self._drop_unused(previous)
        return cluster

    def release(self, owner: str) -> None:
        with self._lock:
            cluster = self._owners.pop(owner, None)
            if cluster is not None:
                self._drop_unused(cluster)

    def _drop_unused(self, cluster: Cluster) -> None:
        if cluster not in self._owners.values():
            self._admins.pop(cluster, None)
            self._configs.pop(cluster, None)
            log.info("no pipeline uses Kafka at %s any more: client dropped", cluster)

    def admin(self, cluster: Cluster) -> AdminClient | None:
        with self._lock:
            return self._admins.get(cluster)

    def client_config(self, cluster: Cluster) -> dict[str, Any] | None:
        """The full librdkafka config (with credentials) for another client of `cluster`."""
        with self._lock:
            config = self._configs.get(cluster)
            return dict(config) if config is not None else None

    def clusters(self) -> dict[Cluster, list[str]]:
        """Each cluster in use and the owners using it."""
        with self._lock:
            result: dict[Cluster, list[str]] = {}
            for owner, cluster in self._owners.items():
                result.setdefault(cluster, []).append(owner)
            return result


def _new_admin(config: dict[str, Any]) -> AdminClient:
    try:
        return AdminClient(config)
    except (KafkaException, ValueError, TypeError) as e:
        # Messages like 'Invalid value "x" for configuration property "y"' may quote a secret.
        prop = re.search(r'property "([^"]+)"', str(e))
        name = prop.group(1) if prop else "unknown"
        raise InvalidKafkaSettings(
            f"librdkafka rejected the Kafka settings (property {name!r})"
        ) from None


# --------------------------------------------------------------------------- batched queries


def watermarks(
    admin: AdminClient, partitions: Iterable[TP], timeout: float
) -> dict[TP, tuple[int, int]]:
    """(low, high) watermark of each partition: two `list_offsets` calls for all of them.
    Partitions whose query failed are left out."""
    tps = sorted(set(partitions))
    if not tps:
        return {}
    specs: Any = OffsetSpec  # its factories are untyped upstream
    low = _offsets(admin, tps, specs.earliest(), timeout)
    high = _offsets(admin, tps, specs.latest(), timeout)
    return {tp: (low[tp], high[tp]) for tp in tps if tp in low and tp in high}


def _offsets(admin: AdminClient, tps: Sequence[TP], spec: Any, timeout: float) -> dict[TP, int]:
    request = {TopicPartition(t, p): spec for t, p in tps}
    futures = admin.list_offsets(request, request_timeout=timeout)
    result: dict[TP, int] = {}
    for tp, future in futures.items():
        try:
            result[(tp.topic, tp.partition)] = int(future.result(timeout=timeout).offset)
        except Exception as e:  # one partition's error must not hide the others
            log.debug("list_offsets %s[%d]: %s", tp.topic, tp.partition, e)
    return result


def committed(
    admin: AdminClient, groups: Mapping[str, Iterable[TP]], timeout: float
) -> dict[str, dict[TP, int | None]]:
    """Each group's committed offset (None: none committed) for the given partitions.

    The admin API takes one group per request; all requests are sent before any answer is
    awaited, so a pass costs one round trip, not one per group. A group whose query failed
    is left out."""
    futures = {}
    for group, tps in groups.items():
        request = [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in tps])]
        futures[group] = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group]
    result: dict[str, dict[TP, int | None]] = {}
    for group, future in futures.items():
        try:
            answer = future.result(timeout=timeout)
        except Exception as e:
            log.debug("list_consumer_group_offsets %s: %s", group, e)
            continue
        result[group] = {
            (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
            for tp in answer.topic_partitions
            if tp.error is None
        }
    return result


def partition_counts(admin: AdminClient, timeout: float) -> dict[str, int]:
    """Every topic of the cluster and its partition count: one metadata request.

    Raises KafkaException when the cluster cannot be reached within `timeout`."""
    metadata = admin.list_topics(timeout=timeout)
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None
    }
