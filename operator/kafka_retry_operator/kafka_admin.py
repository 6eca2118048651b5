"""One Kafka AdminClient per cluster, shared by every pipeline on it (the batched offset
queries it serves are in `kafka_retry.offset_queries`).

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)
# librdkafka's own log lines (connection failures...) go here, not to stderr.
librdkafka_log = logging.getLogger("kafka_retry_operator.librdkafka")

CLIENT_ID = "kafka-retry-operator"


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
