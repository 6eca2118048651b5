"""Measures tier lag and DLQ depth of every pipeline, one batched pass per Kafka cluster.

A background thread wakes every interval (or soon after a reconcile asks it to) and, for each
cluster in use, asks the shared AdminClient for: all topics' partition counts (one metadata
request), the low and high watermarks of every tier and DLQ partition of every pipeline on
that cluster (two `list_offsets` calls), and the committed offsets of every tier group and
DLQ cursor group (one request per group, all in flight at once). The oldest waiting DLQ
event's timestamp is read by a small consumer, only for partitions whose head moved. Kopf's
per-pipeline timers then read the results from memory: the API server and Kafka see one
pass, however many pipelines there are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException

from kafka_retry import depth
from kafka_retry.offset_queries import TP, committed, partition_counts, watermarks
from kafka_retry_operator.fleet import Fleet, PipelineKey, PipelineRecord
from kafka_retry_operator.kafka_admin import (
    AdminRegistry,
    Cluster,
)

log = logging.getLogger(__name__)

PEEK_GROUP = "kafka-retry-operator.peek"  # never joined nor committed: assign() only
COALESCE_S = 0.3  # a burst of reconciles (50 new pipelines) gets one pass, not fifty


@dataclass(frozen=True)
class Sample:
    taken_at: float  # wall-clock seconds
    tier_lag: Mapping[str, int | None] = field(default_factory=dict)
    dlq_depth: int | None = None
    dlq_oldest_ms: int | None = None


@dataclass(frozen=True)
class PassStats:
    """The last full pass over every cluster (exported as operator metrics)."""

    duration_s: float
    pipelines: int  # measured in it (those bound to a cluster)
    finished_at: float  # wall-clock seconds


@dataclass(frozen=True)
class ClusterHealth:
    reachable: bool
    error: str = ""


class Sampler:
    def __init__(
        self, fleet: Fleet, admins: AdminRegistry, interval: float, timeout: float
    ) -> None:
        self._fleet = fleet
        self._admins = admins
        self._interval = interval
        self._timeout = timeout
        self._lock = threading.Lock()
        self._samples: dict[PipelineKey, Sample] = {}
        self._health: dict[Cluster, ClusterHealth] = {}
        self._peekers: dict[Cluster, Consumer] = {}
        self._peeked: dict[TP, tuple[int, int]] = {}  # (topic, partition) -> (offset, ts)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sampler")
        self._last_pass: PassStats | None = None
        self.passes = 0

    # ------------------------------------------------------------------ reading

    def sample(self, key: PipelineKey) -> Sample | None:
        with self._lock:
            return self._samples.get(key)

    def health(self, cluster: Cluster | None) -> ClusterHealth | None:
        if cluster is None:
            return None
        with self._lock:
            return self._health.get(cluster)

    def last_pass(self) -> PassStats | None:
        with self._lock:
            return self._last_pass

    def forget(self, key: PipelineKey) -> None:
        with self._lock:
            self._samples.pop(key, None)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for consumer in self._peekers.values():
            consumer.close()
        self._peekers.clear()

    def wake(self) -> None:
        """Measure soon (after a reconcile), not at the next interval."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._wake.wait(self._interval):
                self._stop.wait(COALESCE_S)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_once()
            except Exception:  # the loop must outlive any one bad pass
                log.exception("sampling pass failed")

    def run_once(self) -> None:
        """One pass over every cluster in use; clusters are measured in parallel."""
        started = time.monotonic()
        records = self._fleet.records()
        by_cluster: dict[Cluster, list[PipelineRecord]] = {}
        for record in records:
            if record.cluster is not None:
                by_cluster.setdefault(record.cluster, []).append(record)
        with self._lock:  # a pass in flight when a pipeline was deleted may have re-added it
            for key in self._samples.keys() - {r.key for r in records}:
                del self._samples[key]
        for gone in set(self._peekers) - set(by_cluster):
            self._peekers.pop(gone).close()
        futures = [self._pool.submit(self._measure, c, rs) for c, rs in by_cluster.items()]
        for f in futures:
            f.result()
        stats = PassStats(
            duration_s=time.monotonic() - started,
            pipelines=sum(len(rs) for rs in by_cluster.values()),
            finished_at=time.time(),
        )
        with self._lock:
            self._last_pass = stats
        self.passes += 1

    def _measure(self, cluster: Cluster, records: list[PipelineRecord]) -> None:
        admin = self._admins.admin(cluster)
        if admin is None:
            return
        started = time.monotonic()
        try:
            counts = partition_counts(admin, self._timeout)
        except KafkaException as e:
            with self._lock:
                error = f"cannot reach Kafka at {cluster}: {e}"
                self._health[cluster] = ClusterHealth(False, error)
            return
        tps: set[TP] = set()
        groups: dict[str, set[TP]] = {}
        for r in records:
            for tier in r.topology.tiers:
                parts = _partitions(tier.topic, counts)
                tps.update(parts)
                groups.setdefault(tier.consumer_group, set()).update(parts)
            parts = _partitions(r.topology.dlq_topic, counts)
            tps.update(parts)
            groups.setdefault(depth.cursor_group(r.topology.dlq_topic), set()).update(parts)
        marks = watermarks(admin, tps, self._timeout)
        offsets = committed(admin, {g: sorted(p) for g, p in groups.items() if p}, self._timeout)

        now = time.time()
        samples: dict[PipelineKey, Sample] = {}
        heads: dict[TP, int] = {}
        dlq_heads: dict[PipelineKey, list[TP]] = {}
        for r in records:
            lag: dict[str, int | None] = {}
            for tier in r.topology.tiers:
                lag[tier.name] = _total(tier.topic, counts, marks, offsets, tier.consumer_group)
            dlq = r.topology.dlq_topic
            backlog = _backlog(dlq, counts, marks, offsets, depth.cursor_group(dlq))
            if backlog is not None:
                for p, offset in backlog.heads.items():
                    heads[(dlq, p)] = offset
                dlq_heads[r.key] = [(dlq, p) for p in backlog.heads]
            samples[r.key] = Sample(now, lag, backlog.total if backlog else None, None)
        stamps = self._oldest(cluster, heads)
        with self._lock:
            for key, s in samples.items():
                found = [stamps[tp] for tp in dlq_heads.get(key, []) if tp in stamps]
                oldest = min(found) if found else None
                self._samples[key] = Sample(s.taken_at, s.tier_lag, s.dlq_depth, oldest)
            self._health[cluster] = ClusterHealth(True)
        log.debug(
            "sampled %d pipelines, %d partitions on %s in %.2fs",
            len(records),
            len(tps),
            cluster,
            time.monotonic() - started,
        )

    def _oldest(self, cluster: Cluster, heads: Mapping[TP, int]) -> dict[TP, int]:
        """Timestamps of the DLQ heads: cached per (partition, offset), peeked when moved."""
        stale = {tp: o for tp, o in heads.items() if self._peeked.get(tp, (-1, 0))[0] != o}
        if stale:
            try:
                found = depth.peek_timestamps(self._peeker(cluster), stale, self._timeout / 2)
            except KafkaException as e:
                log.warning("cannot read DLQ heads on %s: %s", cluster, e)
                found = {}
            for tp, ts in found.items():
                self._peeked[tp] = (stale[tp], ts)
        return {
            tp: self._peeked[tp][1]
            for tp, o in heads.items()
            if self._peeked.get(tp, (-1, 0))[0] == o
        }

    def _peeker(self, cluster: Cluster) -> Consumer:
        consumer = self._peekers.get(cluster)
        if consumer is None:
            config = self._admins.client_config(cluster) or {"bootstrap.servers": str(cluster)}
            config.update(
                {
                    "group.id": PEEK_GROUP,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "fetch.wait.max.ms": 100,
                }
            )
            consumer = Consumer(config)
            self._peekers[cluster] = consumer
        return consumer


def _partitions(topic: str, counts: Mapping[str, int]) -> Iterable[TP]:
    return [(topic, p) for p in range(counts.get(topic, 0))]


def _backlog(
    topic: str,
    counts: Mapping[str, int],
    marks: Mapping[TP, tuple[int, int]],
    offsets: Mapping[str, Mapping[TP, int | None]],
    group: str,
) -> depth.Backlog | None:
    """None when unknown: the topic is missing, or a watermark or the group's offsets could
    not be read (a guess would under- or over-report)."""
    if topic not in counts or group not in offsets:
        return None
    return depth.backlog(topic, counts[topic], marks, offsets[group])


def _total(
    topic: str,
    counts: Mapping[str, int],
    marks: Mapping[TP, tuple[int, int]],
    offsets: Mapping[str, Mapping[TP, int | None]],
    group: str,
) -> int | None:
    b = _backlog(topic, counts, marks, offsets, group)
    return b.total if b is not None else None
