"""Measures tier lag and DLQ depth of every pipeline, one batched pass per Kafka cluster, each
cluster on its own schedule.

Every cluster in use has a thread of its own that wakes every interval (or soon after a
reconcile of one of its pipelines asks it to) and asks the cluster's shared AdminClient for:
all topics' partition counts (one metadata request), the low and high watermarks of every tier
and DLQ partition of every pipeline on it (two `list_offsets` calls), and the committed offsets
of every tier group and DLQ cursor group (one request per group, all in flight at once). The
oldest waiting DLQ event's timestamp is read by a small consumer, only for partitions whose
head moved. Kopf's per-pipeline timers then read the results from memory: the API server and
Kafka see one pass per cluster, however many pipelines there are.

An unreachable cluster costs its own thread the Kafka timeout per pass and marks its own
pipelines `KafkaUnreachable`; no other cluster's pass waits for it. The work is bounded per
cluster: one pass in flight, started at most once per interval (a burst of wake-ups is one
pass), every admin call bounded by the timeout; an unreachable cluster is asked for its
metadata only. A thread per cluster is in proportion to what the cluster's AdminClient already
runs (librdkafka's main thread and one per broker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient

from kafka_retry import depth
from kafka_retry.model import LIVE_LANE, DrainingStage
from kafka_retry.offset_queries import (
    TP,
    committed,
    members,
    offsets_retention_s,
    topic_partitions,
    watermarks,
)
from kafka_retry.topology_tag import tag_of
from kafka_retry_operator.draining import Following
from kafka_retry_operator.fleet import Fleet, PipelineKey, PipelineRecord
from kafka_retry_operator.kafka_admin import (
    AdminRegistry,
    Cluster,
)

log = logging.getLogger(__name__)

PEEK_GROUP = "kafka-retry-operator.peek"  # never joined nor committed: assign() only
OFFSETS_TOPIC = "__consumer_offsets"  # its partitions' leaders are the group coordinators
COALESCE_S = 0.3  # a burst of reconciles (50 new pipelines) gets one pass, not fifty


@dataclass(frozen=True)
class Sample:
    taken_at: float  # wall-clock seconds
    tier_lag: Mapping[str, int | None] = field(default_factory=dict)
    dlq_depth: int | None = None
    dlq_oldest_ms: int | None = None
    # Of a suspended (or scaled to zero) pipeline: each tier's oldest waiting event (ms).
    tier_oldest_ms: Mapping[str, int] = field(default_factory=dict)
    drain_lag: Mapping[str, int | None] = field(default_factory=dict)  # by draining topic
    live_lag: int | None = None  # with spec.liveLane: the source group's, on the source topic
    # While a drain runs: each stage's group, as it shows the topology its workers run (None:
    # not measured). Only then: the drain's end waits for it (draining.behind).
    following: Mapping[str, Following | None] = field(default_factory=dict)


@dataclass(frozen=True)
class PassStats:
    """A cluster's last pass, or all clusters' last passes as one (operator metrics)."""

    duration_s: float
    pipelines: int  # measured in it (those bound to a cluster)
    finished_at: float  # wall-clock seconds


@dataclass(frozen=True)
class ClusterHealth:
    reachable: bool
    error: str = ""
    offsets_retention_s: float | None = None  # the brokers' offsets.retention.minutes


class Sampler:
    """The per-cluster sampling threads and what they measured, read by the status timers."""

    def __init__(
        self, fleet: Fleet, admins: AdminRegistry, interval: float, timeout: float
    ) -> None:
        self._fleet = fleet
        self.admins = admins
        self.interval = interval
        self.timeout = timeout
        self._lock = threading.Lock()
        self._samples: dict[PipelineKey, Sample] = {}
        self._health: dict[Cluster, ClusterHealth] = {}
        self._passes: dict[Cluster, PassStats] = {}
        self._clusters: dict[Cluster, _ClusterLoop] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        """The clusters' last passes as one: the slowest duration, the pipelines measured,
        and the oldest end (it stops moving when any cluster's sampling stops)."""
        with self._lock:
            passes = list(self._passes.values())
        if not passes:
            return None
        return PassStats(
            duration_s=max(p.duration_s for p in passes),
            pipelines=sum(p.pipelines for p in passes),
            finished_at=min(p.finished_at for p in passes),
        )

    def forget(self, key: PipelineKey) -> None:
        with self._lock:
            self._samples.pop(key, None)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """The supervisor: keeps one sampling thread per cluster in use."""
        self._thread = threading.Thread(target=self._supervise, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            loops = list(self._clusters.values())
            self._clusters.clear()
        for loop in loops:
            loop.stop()
        for loop in loops:
            loop.join(self.timeout + 5)

    def wake(self, cluster: Cluster | None = None, key: PipelineKey | None = None) -> None:
        """Measure soon (after a reconcile or a replay), not at the next interval: pipeline
        `key` of `cluster`, all of `cluster`'s, or every cluster's with None. A cluster not
        sampled yet gets its thread now (whose first pass measures all its pipelines)."""
        with self._lock:
            loop = self._clusters.get(cluster) if cluster is not None else None
        if loop is not None:
            loop.wake(key)
        else:
            self._wake.set()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._sync(wake_all=woken)
            except Exception:  # the supervisor must outlive any one bad step
                log.exception("sampler supervision failed")

    def _sync(self, wake_all: bool) -> None:
        """Start a thread for each cluster newly in use, stop those of clusters no longer in
        use, and drop samples of pipelines no longer in the fleet."""
        records = self._fleet.records()
        in_use = {r.cluster for r in records if r.cluster is not None}
        with self._lock:
            for key in self._samples.keys() - {r.key for r in records}:
                del self._samples[key]
            gone = [self._clusters.pop(c) for c in set(self._clusters) - in_use]
            for loop in gone:
                self._health.pop(loop.cluster, None)
                self._passes.pop(loop.cluster, None)
            new = [_ClusterLoop(self, c) for c in in_use - set(self._clusters)]
            self._clusters.update((loop.cluster, loop) for loop in new)
            woken = list(self._clusters.values()) if wake_all else []
        for loop in gone:
            loop.stop()
        for loop in new:
            loop.start()
        for loop in woken:
            loop.wake()

    # ------------------------------------------------------------------ one cluster

    def _records(self, cluster: Cluster) -> list[PipelineRecord]:
        return [r for r in self._fleet.records() if r.cluster == cluster]

    def _unreachable(self, cluster: Cluster, error: str, stats: PassStats) -> None:
        with self._lock:
            if cluster in self._clusters:
                self._health[cluster] = ClusterHealth(False, error)
                self._passes[cluster] = stats

    def _measured(
        self,
        cluster: Cluster,
        samples: Mapping[PipelineKey, Sample],
        stats: PassStats | None,
        offsets_retention_s: float | None,
    ) -> None:
        """Store a pass's results: only for pipelines still on this cluster (one deleted or
        moved during the pass is not brought back). A pass over some pipelines (no `stats`)
        leaves the cluster's health and pass statistics to the full passes."""
        current = {r.key for r in self._records(cluster)}
        with self._lock:
            for key, sample in samples.items():
                if key in current:
                    self._samples[key] = sample
            if cluster in self._clusters and stats is not None:
                self._health[cluster] = ClusterHealth(True, "", offsets_retention_s)
                self._passes[cluster] = stats


class _ClusterLoop:
    """One cluster's sampling thread, with its own peek consumer and head-timestamp cache."""

    def __init__(self, sampler: Sampler, cluster: Cluster) -> None:
        self.cluster = cluster
        self._sampler = sampler
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._asked = threading.Lock()
        self._pending: set[PipelineKey] | None = set()  # to measure soon; None: all
        self._peeker: Consumer | None = None
        self._peeked: dict[TP, tuple[int, int]] = {}  # (topic, partition) -> (offset, ts)
        self._retention_s: float | None = None  # read once, at the first pass that answers
        self._retention_read = False
        # Groups whose coordinator answered (see `committed`), while the coordinators stay put.
        self._coordinated: set[str] = set()
        self._coordinators: object = None
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{cluster}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self, key: PipelineKey | None = None) -> None:
        with self._asked:
            if key is None:
                self._pending = None
            elif self._pending is not None:
                self._pending.add(key)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        """A full pass every interval; in between, a pass over just the pipelines that asked
        (a new or changed pipeline is measured within a second, not an interval: a burst of
        1,000 new pipelines must not cost 1,000 passes over the whole cluster)."""
        next_full = 0.0
        try:
            while not self._stop.is_set():
                self._wake.clear()
                with self._asked:
                    pending, self._pending = self._pending, set()
                try:
                    if pending is None or time.monotonic() >= next_full:
                        next_full = time.monotonic() + self._sampler.interval
                        self.run_once()
                    elif pending:
                        self.run_once(pending)
                except Exception:  # the loop must outlive any one bad pass
                    log.exception("sampling pass on %s failed", self.cluster)
                if self._wake.wait(max(0.0, next_full - time.monotonic())):
                    self._stop.wait(COALESCE_S)  # a burst of reconciles gets one pass
        finally:
            if self._peeker is not None:
                self._peeker.close()

    def run_once(self, only: Collection[PipelineKey] | None = None) -> None:
        """A pass over all the cluster's pipelines, or `only` these (not counted as a pass in
        the metrics, and an unreachable cluster is left to the next full pass to report)."""
        sampler, cluster, timeout = self._sampler, self.cluster, self._sampler.timeout
        admin = sampler.admins.admin(cluster)
        records = sampler._records(cluster)
        if only is not None:
            records = [r for r in records if r.key in only]
        if admin is None or not records:
            return
        started = time.monotonic()
        try:
            if only is None:
                counts = self._metadata(admin, timeout)
            else:
                counts = topic_partitions(admin, _topics(records), timeout)
        except KafkaException as e:
            self._coordinated.clear()
            if only is None:
                stats = PassStats(time.monotonic() - started, 0, time.time())
                sampler._unreachable(cluster, f"cannot reach Kafka at {cluster}: {e}", stats)
            return
        if not self._retention_read:
            self._retention_s = offsets_retention_s(admin, timeout)
            self._retention_read = True
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
            for d in r.topology.draining:
                parts = _partitions(d.topic, counts)
                tps.update(parts)
                groups.setdefault(d.consumer_group, set()).update(parts)
            if r.live_lane:
                parts = _partitions(r.topology.source_topic, counts)
                tps.update(parts)
                groups.setdefault(r.topology.consumer_group, set()).update(parts)
        marks = watermarks(admin, tps, timeout)
        asked = {g: sorted(p) for g, p in groups.items() if p}
        absent = _absent(admin, asked, timeout)
        present = {g: p for g, p in asked.items() if g not in absent}
        metadata: dict[str, dict[TP, str | None]] = {}
        offsets = committed(admin, present, timeout, self._coordinated, metadata)
        self._coordinated.update(offsets)
        offsets.update({g: dict.fromkeys(asked[g]) for g in absent})  # none committed
        metadata.update({g: dict.fromkeys(asked[g]) for g in absent})
        # Whom a drain waits for: each stage's group, its members and tags (draining.py).
        staged = {r.key: _stages(r) for r in records if r.topology.draining}
        gated = {group for stages in staged.values() for _, group, _ in stages}
        sizes = members(admin, gated - absent, timeout) | dict.fromkeys(gated & absent, 0)

        now = time.time()
        tiers: dict[PipelineKey, dict[str, depth.Backlog | None]] = {}
        dlqs: dict[PipelineKey, depth.Backlog | None] = {}
        drains: dict[PipelineKey, list[tuple[DrainingStage, depth.Backlog | None]]] = {}
        live: dict[PipelineKey, depth.Backlog | None] = {}
        heads: dict[TP, int] = {}
        for r in records:
            tiers[r.key] = {
                t.name: _backlog(t.topic, counts, marks, offsets, t.consumer_group)
                for t in r.topology.tiers
            }
            dlq = r.topology.dlq_topic
            dlqs[r.key] = _backlog(dlq, counts, marks, offsets, depth.cursor_group(dlq))
            drains[r.key] = [
                (d, _backlog(d.topic, counts, marks, offsets, d.consumer_group))
                for d in r.topology.draining
            ]
            if r.live_lane:
                live[r.key] = _backlog(
                    r.topology.source_topic, counts, marks, offsets, r.topology.consumer_group
                )
            heads.update(_heads(dlq, dlqs[r.key]))
            if r.replicas == 0:  # events wait on the tiers: how old the oldest are
                for t in r.topology.tiers:
                    heads.update(_heads(t.topic, tiers[r.key][t.name]))
        stamps = self._oldest(heads)

        def oldest(topic: str, backlog: depth.Backlog | None) -> int | None:
            found = [stamps[tp] for tp in _heads(topic, backlog) if tp in stamps]
            return min(found) if found else None

        samples: dict[PipelineKey, Sample] = {}
        for r in records:
            dlq_backlog = dlqs[r.key]
            tier_oldest = {}
            if r.replicas == 0:
                tier_oldest = {
                    t.name: oldest(t.topic, tiers[r.key][t.name]) for t in r.topology.tiers
                }
            samples[r.key] = Sample(
                now,
                {name: b.total if b else None for name, b in tiers[r.key].items()},
                dlq_backlog.total if dlq_backlog else None,
                oldest(r.topology.dlq_topic, dlq_backlog),
                {name: ms for name, ms in tier_oldest.items() if ms is not None},
                {d.topic: b.total if b else None for d, b in drains[r.key]},
                b.total if (b := live.get(r.key)) else None,
                {
                    name: _following(topic, counts, sizes.get(group), metadata.get(group))
                    for name, group, topic in staged.get(r.key, [])
                },
            )
        duration = time.monotonic() - started
        full = PassStats(duration, len(records), time.time()) if only is None else None
        sampler._measured(cluster, samples, full, self._retention_s)
        log.debug(
            "sampled %d pipelines, %d partitions on %s in %.2fs",
            len(records),
            len(tps),
            cluster,
            duration,
        )

    def _metadata(self, admin: AdminClient, timeout: float) -> dict[str, int]:
        """Every topic's partition count; and whether the group coordinators may have moved
        since the last pass (the brokers, or the leaders of `__consumer_offsets`, whose
        partitions' leaders are the coordinators), in which case every group is described
        again before its offsets are asked for (see `committed`)."""
        metadata = admin.list_topics(timeout=timeout)
        internal = metadata.topics.get(OFFSETS_TOPIC)
        coordinators: object = None
        if internal is not None and internal.error is None:
            brokers = sorted((b.id, b.host, b.port) for b in metadata.brokers.values())
            leaders = sorted((p.id, p.leader) for p in internal.partitions.values())
            coordinators = (tuple(brokers), tuple(leaders))
        if coordinators is None or coordinators != self._coordinators:
            self._coordinated.clear()  # unknown (not visible to us) counts as moved
        self._coordinators = coordinators
        return {n: len(t.partitions) for n, t in metadata.topics.items() if t.error is None}

    def _oldest(self, heads: Mapping[TP, int]) -> dict[TP, int]:
        """Timestamps of the DLQ heads: cached per (partition, offset), peeked when moved."""
        stale = {tp: o for tp, o in heads.items() if self._peeked.get(tp, (-1, 0))[0] != o}
        if stale:
            timeout = self._sampler.timeout / 2
            try:
                found = depth.peek_timestamps(self._consumer(), stale, timeout)
            except KafkaException as e:
                log.warning("cannot read DLQ heads on %s: %s", self.cluster, e)
                found = {}
            for tp, ts in found.items():
                self._peeked[tp] = (stale[tp], ts)
        return {
            tp: self._peeked[tp][1]
            for tp, o in heads.items()
            if self._peeked.get(tp, (-1, 0))[0] == o
        }

    def _consumer(self) -> Consumer:
        if self._peeker is None:
            admins = self._sampler.admins
            config = admins.client_config(self.cluster) or {"bootstrap.servers": str(self.cluster)}
            config.update(
                {
                    "group.id": PEEK_GROUP,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "fetch.wait.max.ms": 100,
                    "isolation.level": "read_committed",
                }
            )
            self._peeker = Consumer(config)
        return self._peeker


def _absent(admin: AdminClient, groups: Collection[str], timeout: float) -> set[str]:
    """Of `groups`, those the cluster does not know (never committed to, or expired): nothing
    committed, so nothing to ask. One ListGroups request per broker instead of one offset
    fetch per group: a DLQ's cursor group exists only once its DLQ was purged or replayed, a
    tier's only once its workers ran (at 1,000 pipelines, 2,000 fetches a pass). A group
    that commits just after the list is read at the next pass. When any broker does not
    answer, no group is taken for absent."""
    if not groups:
        return set()
    try:
        listed = admin.list_consumer_groups(request_timeout=timeout).result(timeout=timeout)
    except Exception as e:
        log.debug("list_consumer_groups: %s", e)
        return set()
    if listed.errors:
        return set()
    return set(groups) - {g.group_id for g in listed.valid}


def _stages(r: PipelineRecord) -> list[tuple[str, str, str]]:
    """(name, group, topic) of each stage whose workers follow the topology live."""
    found = [(t.name, t.consumer_group, t.topic) for t in r.topology.tiers]
    if r.live_lane:
        found.append((LIVE_LANE, r.topology.consumer_group, r.topology.source_topic))
    return found


def _following(
    topic: str,
    counts: Mapping[str, int],
    group_members: int | None,
    metadata: Mapping[TP, str | None] | None,
) -> Following | None:
    """A stage's group as the drain gate reads it; None when not measured (the topic, the
    group's members or its committed offsets unknown)."""
    if topic not in counts or group_members is None or metadata is None:
        return None
    tags = {p: tag_of(metadata.get((topic, p))) for p in range(counts[topic])}
    return Following(group_members, tags)


def _topics(records: Iterable[PipelineRecord]) -> set[str]:
    """The tier, DLQ and draining topics of `records`, and the source topic of a live lane."""
    found: set[str] = set()
    for r in records:
        found.update(t.topic for t in r.topology.tiers)
        found.add(r.topology.dlq_topic)
        found.update(d.topic for d in r.topology.draining)
        if r.live_lane:
            found.add(r.topology.source_topic)
    return found


def _partitions(topic: str, counts: Mapping[str, int]) -> Iterable[TP]:
    return [(topic, p) for p in range(counts.get(topic, 0))]


def _heads(topic: str, backlog: depth.Backlog | None) -> dict[TP, int]:
    return {(topic, p): offset for p, offset in backlog.heads.items()} if backlog else {}


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
