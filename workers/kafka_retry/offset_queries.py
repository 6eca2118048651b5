"""Batched offset queries: the Kafka side of lag and DLQ depth, for the operator and the CLI.

Each function asks about many partitions (or groups) with as few admin requests as possible,
and leaves out what failed rather than failing the whole answer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition): hashable, unlike confluent's TopicPartition


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
    # The last stable offset, not the high watermark: what a read_committed reader will see
    # (a forward in an open transaction is not waiting yet, an aborted one never is).
    futures = admin.list_offsets(
        request, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout
    )
    result: dict[TP, int] = {}
    for tp, future in futures.items():
        try:
            result[(tp.topic, tp.partition)] = int(future.result(timeout=timeout).offset)
        except Exception as e:  # one partition's error must not hide the others
            log.debug("list_offsets %s[%d]: %s", tp.topic, tp.partition, e)
    return result


def committed(
    admin: AdminClient,
    groups: Mapping[str, Iterable[TP]],
    timeout: float,
    coordinated: Collection[str] = (),
    metadata: dict[str, dict[TP, str | None]] | None = None,
) -> dict[str, dict[TP, int | None]]:
    """Each group's committed offset (None: none committed) for the given partitions; with
    `metadata`, each committed offset's metadata is put there too (by group, then partition).

    The admin API takes one group per request; all requests are sent before any answer is
    awaited, so a pass costs two round trips, not one per group. A group whose query failed
    is left out.

    Each group is described first, and its offsets asked for only when that worked: librdkafka
    (2.16, issue confluentinc/librdkafka#5040) crashes the process when an admin client's
    offset fetch is answered "not coordinator" or "coordinator not available", as on a broker
    that is starting or moving a group's coordinator. Describing goes through the same
    coordinator lookup without that flaw, so a group whose coordinator is not ready is skipped
    for this pass instead; what remains is a coordinator move between the two requests.
    Groups in `coordinated` (answered since the coordinators last moved, as the caller knows)
    are not described again: at a thousand groups, describing them is most of the cost."""
    ready = set(coordinated) & groups.keys()
    ready |= _coordinator_ready(admin, [g for g in groups if g not in ready], timeout)
    futures = {}
    for group, tps in groups.items():
        if group not in ready:
            continue
        request = [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in tps])]
        futures[group] = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group]
    result: dict[str, dict[TP, int | None]] = {}
    for group, future in futures.items():
        try:
            answer = future.result(timeout=timeout)
        except Exception as e:
            log.debug("list_consumer_group_offsets %s: %s", group, e)
            continue
        answered = [tp for tp in answer.topic_partitions if tp.error is None]
        result[group] = {
            (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in answered
        }
        if metadata is not None:
            metadata[group] = {
                (tp.topic, tp.partition): (tp.metadata if tp.offset >= 0 else None)
                for tp in answered
            }
    return result


def members(admin: AdminClient, groups: Collection[str], timeout: float) -> dict[str, int]:
    """How many members each group has now (0: empty or unknown to the cluster); a group
    whose description failed is left out."""
    if not groups:
        return {}
    found = {}
    for group, future in admin.describe_consumer_groups(
        list(groups), request_timeout=timeout
    ).items():
        try:
            found[group] = len(future.result(timeout=timeout).members)
        except Exception as e:
            log.debug("describe_consumer_groups %s: %s", group, e)
    return found


def _coordinator_ready(admin: AdminClient, groups: list[str], timeout: float) -> set[str]:
    """The groups whose coordinator answered a describe request."""
    if not groups:
        return set()
    ready = set()
    for group, future in admin.describe_consumer_groups(groups, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except Exception as e:
            log.debug("describe_consumer_groups %s: %s", group, e)
            continue
        ready.add(group)
    return ready


def partition_counts(admin: AdminClient, timeout: float) -> dict[str, int]:
    """Every topic of the cluster and its partition count: one metadata request.

    Raises KafkaException when the cluster cannot be reached within `timeout`."""
    metadata = admin.list_topics(timeout=timeout)
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None
    }


# A topic described with one of these is absent, as far as we may know (no describe right).
ABSENT = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED)


def topic_partitions(admin: AdminClient, names: Iterable[str], timeout: float) -> dict[str, int]:
    """The partition count of each of `names` that exists: one metadata request for those
    topics only. Not `partition_counts`: a reconcile asks about its own few topics, and the
    answer for every topic of a cluster grows with every pipeline on it.

    Raises KafkaException when the cluster cannot be reached within `timeout`."""
    names = sorted(set(names))
    if not names:
        return {}
    futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout)
    counts: dict[str, int] = {}
    for name, future in futures.items():
        try:
            counts[name] = len(future.result(timeout=timeout + 5).partitions)
        except KafkaException as e:
            if not (e.args and e.args[0].code() in ABSENT):
                raise
    return counts


def commit(admin: AdminClient, offsets: Mapping[str, Mapping[TP, int]], timeout: float) -> set[str]:
    """Commit each group's offsets through the admin API (no consumer joins the group); all
    groups' requests are in flight together. Answers the groups whose commit failed: Kafka
    refuses one for a group that has members (they commit their own)."""
    futures = {}
    for group, tps in offsets.items():
        if not tps:
            continue
        parts = [TopicPartition(t, p, o) for (t, p), o in sorted(tps.items())]
        request = [ConsumerGroupTopicPartitions(group, parts)]
        futures[group] = admin.alter_consumer_group_offsets(request, request_timeout=timeout)[group]
    failed = set()
    for group, future in futures.items():
        try:
            future.result(timeout=timeout)
        except Exception as e:
            log.debug("alter_consumer_group_offsets %s: %s", group, e)
            failed.add(group)
    return failed


def offsets_retention_s(admin: AdminClient, timeout: float) -> float | None:
    """The cluster's `offsets.retention.minutes` in seconds, as a broker reports it; None
    when no broker answers or describing configs is not allowed."""
    from confluent_kafka.admin import ConfigResource, ResourceType

    try:
        brokers = list(admin.list_topics(timeout=timeout).brokers)
        if not brokers:
            return None
        resource = ConfigResource(ResourceType.BROKER, str(brokers[0]))
        configs = admin.describe_configs([resource], request_timeout=timeout)[resource]
        entry = configs.result(timeout=timeout).get("offsets.retention.minutes")
        return float(entry.value) * 60 if entry is not None and entry.value else None
    except Exception as e:
        log.debug("offsets.retention.minutes: %s", e)
        return None
