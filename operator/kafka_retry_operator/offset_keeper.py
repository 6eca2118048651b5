"""Keeps the committed offsets of a pipeline's idle consumer groups from expiring.

Kafka deletes the committed offsets of a group that has no members `offsets.retention.minutes`
after their last commit (7 days by default). Two kinds of a pipeline's groups are idle by
design: its DLQ cursor (`<dlq>.cursor`, committed only by replays), and its tier groups while
the pipeline is suspended or scaled to zero. A lost cursor makes replayed events count as
waiting again, and the next replay sends them again; a lost tier group makes its workers start
over from the topic's start. So, every quarter of the broker's retention, the operator commits
the offsets those groups hold again, unchanged, which restarts their retention.

It does so holding the pipeline's replay lease (`kafka_retry.replay_lease`): a replay moving the
cursor between our read and our write would otherwise be undone. A replay holding the lease
commits the cursor itself, so the refresh just waits for the next status pass. The time of the
last refresh is `status.lastOffsetRefreshTime`, so restarts and a second operator do not
repeat it. A tier group whose workers came back meanwhile has members, and Kafka refuses the
commit; they commit their own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Hashable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka.admin import AdminClient

from kafka_retry import depth
from kafka_retry.model import Topology
from kafka_retry.offset_queries import TP, commit, committed, topic_partitions
from kafka_retry.replay_lease import Lease

log = logging.getLogger(__name__)

LEASE_NAME = "operator:offset-refresh"  # the lease's `replay`: no DLQReplay can be named so
REFRESH_FRACTION = 4  # refresh every quarter of the retention: three chances to miss one
# When the brokers do not say (describing their configs is not allowed): a day, a seventh of
# Kafka's default, so a refresh every 6 hours.
FALLBACK_RETENTION_S = 24 * 3600.0
STATUS_FIELD = "lastOffsetRefreshTime"


class OnePerCluster:
    """At most one refresh in flight per Kafka cluster.

    A refresh makes coordinator-bound admin requests (describe groups, list and alter offsets).
    Fifty pipelines created together would all be due at once and send them together, and
    librdkafka aborts the whole process when such a request fails mid-flight
    (confluentinc/librdkafka#4605; seen here as `eonce->refcnt > 0`). Fewer requests in flight
    make that rarer. A pipeline that finds its cluster busy stays due and tries again at its next
    status pass, so no executor thread ever waits here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[Hashable] = set()

    @contextlib.contextmanager
    def claim(self, cluster: Hashable) -> Iterator[bool]:
        with self._lock:
            mine = cluster not in self._busy
            self._busy.add(cluster)
        try:
            yield mine
        finally:
            if mine:
                with self._lock:
                    self._busy.discard(cluster)


def due(status: Mapping[str, Any], retention_s: float, now: datetime | None = None) -> bool:
    last = status.get(STATUS_FIELD)
    if not isinstance(last, str):
        return True
    try:
        at = datetime.fromisoformat(last)
    except ValueError:
        return True
    return (now or datetime.now(UTC)) - at >= timedelta(seconds=retention_s / REFRESH_FRACTION)


def refresh(
    lease: Lease, admin: AdminClient, topology: Topology, tiers_idle: bool, timeout: float
) -> bool:
    """Commit the idle groups' offsets again; False when a replay holds the lease (or a
    commit failed), so it is tried again at a later pass."""
    if lease.acquire() is not None:
        return False
    done = False
    try:
        topics = [topology.dlq_topic, *(t.topic for t in topology.tiers)]
        counts = topic_partitions(admin, topics, timeout)
        groups: dict[str, list[TP]] = {}

        def add(group: str, topic: str) -> None:
            groups.setdefault(group, []).extend((topic, p) for p in range(counts.get(topic, 0)))

        add(depth.cursor_group(topology.dlq_topic), topology.dlq_topic)
        if tiers_idle:
            for tier in topology.tiers:
                add(tier.consumer_group, tier.topic)
        held = committed(admin, groups, timeout)
        offsets = {
            group: {tp: o for tp, o in tps.items() if o is not None} for group, tps in held.items()
        }
        failed = commit(admin, offsets, timeout)
        cursor = depth.cursor_group(topology.dlq_topic)
        if failed - {cursor}:  # tier workers back: they commit their own
            log.info("%s: groups with members keep their own offsets: %s", lease.pipeline, failed)
        done = cursor in held and cursor not in failed
        return done
    finally:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease.release({STATUS_FIELD: stamp} if done else None)
