"""A pipeline's `status`, composed from what the operator knows (pure functions).

Inputs: the record of the last reconcile (topics verdict, generation), the latest sample
(lag, DLQ depth), the cluster's health as seen by the sampler, the tier Deployments'
replica counts, and why the pods of tiers that are not ready fail (`pod_troubles`). The
previous status supplies what must not churn: lastTransitionTime of unchanged conditions,
the last known lag and depth while Kafka cannot be measured, and dlq.lastUpdated while the
DLQ does not change. So an unchanged pipeline composes an identical status, and the timer
writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kafka_retry.model import (
    LABEL_TIER,
    LIVE_LANE,
    DlqStatus,
    DrainingStatus,
    LiveLaneStatus,
    RetryPipelineStatus,
    TierStatus,
    TopicsStatus,
)
from kafka_retry.topology_tag import topology_hash
from kafka_retry_operator import conditions as c
from kafka_retry_operator import draining
from kafka_retry_operator.fleet import PipelineRecord
from kafka_retry_operator.sampler import ClusterHealth, Sample
from kafka_retry_operator.topics import KAFKA_UNREACHABLE, tier_retention_ms

INVALID_SPEC = "InvalidSpec"
# Ready=False while the tier workers are stopped and a waiting event is less than this away
# from its tier topic's retention.
EVENTS_AT_RISK = "EventsAtRisk"
AT_RISK_S = 24 * 3600


@dataclass(frozen=True)
class TierWorkers:
    """One tier Deployment's replica counts, as indexed from the cluster."""

    tier: str
    desired: int
    ready: int
    updated: int
    current: bool  # the Deployment's status is of its latest generation
    generation: int = 0  # the Deployment's generation as last seen by the watch


# A container waiting for one of these is starting, not failing.
_STARTING = frozenset({"ContainerCreating", "PodInitializing"})


def pod_troubles(pods: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Tier -> why one of its worker pods fails, from the kubelet's container statuses: the
    last termination (`OOMKilled`, `Error` with its exit code) and what it waits for now
    (`CrashLoopBackOff`, `ImagePullBackOff`...). A Deployment's counts say only "0/1 ready";
    this says why. Pods as the API serves them (camelCase dicts)."""
    found: dict[str, str] = {}
    for pod in pods:
        tier = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_TIER)
        if not tier or tier in found:
            continue
        for s in (pod.get("status") or {}).get("containerStatuses") or []:
            last = (s.get("lastState") or {}).get("terminated") or {}
            waiting = ((s.get("state") or {}).get("waiting") or {}).get("reason")
            parts = []
            if last.get("reason"):
                parts.append(f"last terminated {last['reason']} (exit {last.get('exitCode')})")
            if waiting and waiting not in _STARTING:
                parts.append(f"now {waiting}")
            if parts:
                restarts = int(s.get("restartCount") or 0)
                name = pod["metadata"].get("name")
                found[tier] = f"pod {name} {', '.join(parts)}, {restarts} restarts"
                break
    return found


def pods_to_explain(record: PipelineRecord, workers: Mapping[str, TierWorkers]) -> bool:
    """Whether some stage has fewer ready (or up-to-date) pods than it wants: only then can a
    list of its pods say why (`pod_troubles`). A stage without a Deployment yet, or wanting no
    pods (scaled to 0, suspended), has no pods to explain: at scale, pipelines being created
    must not cost a pods list each per status tick."""
    stages = [t.name for t in record.topology.tiers] + ([LIVE_LANE] if record.live_lane else [])
    for name in stages:
        w = workers.get(name)
        if w is None:
            continue
        want = w.desired if record.replicas is None else record.replicas
        if want > 0 and (w.ready < want or w.updated < want):
            return True
    return False


def workers_verdict(
    record: PipelineRecord,
    workers: Mapping[str, TierWorkers],
    troubles: Mapping[str, str] | None = None,
) -> c.Verdict:
    """WorkersReady over the tiers' Deployments and, with `spec.liveLane`, the live lane's.
    Its reason stays `WorkersNotReady` whatever the pods' trouble (the
    KafkaRetryWorkersNotReady alert keys on it); the message names the trouble."""
    troubles = troubles or {}
    tiers = [t.name for t in record.topology.tiers] + ([LIVE_LANE] if record.live_lane else [])
    behind = []
    for name in tiers:
        w = workers.get(name)
        if w is None:
            behind.append(f"{name}: no Deployment yet")
            continue
        want = w.desired if record.replicas is None else record.replicas  # None: KEDA's call
        if w.generation < record.worker_generations.get(name, 0):  # the watch is behind
            behind.append(f"{name}: rolling out")
        elif not (w.current and w.desired == want and w.ready >= want and w.updated >= want):
            trouble = f" ({troubles[name]})" if name in troubles else ""
            behind.append(f"{name}: {w.ready}/{want} ready, {w.updated} up to date{trouble}")
    if behind:
        ok = len(tiers) - len(behind)
        message = f"{ok}/{len(tiers)} {_stages(record)} ready; " + "; ".join(behind)
        return c.Verdict.of(c.WORKERS_READY, False, "WorkersNotReady", message)
    if record.suspended:
        return c.Verdict.of(c.WORKERS_READY, True, "Suspended", "spec.suspend: scaled to 0")
    if record.replicas == 0:
        return c.Verdict.of(c.WORKERS_READY, True, "ScaledToZero", "spec.workers.replicas is 0")
    per_tier = "as scaled by KEDA" if record.replicas is None else f"x {record.replicas}"
    return c.Verdict.of(
        c.WORKERS_READY, True, "WorkersReady", f"{len(tiers)} {_stages(record)} {per_tier} ready"
    )


def _stages(record: PipelineRecord) -> str:
    """What WorkersReady counts: tiers, or tiers and the live lane."""
    return "tiers and live lane" if record.live_lane else "tiers"


def topics_verdict(record: PipelineRecord, health: ClusterHealth | None) -> c.Verdict:
    """The last reconcile's verdict, unless the cluster has become unreachable since."""
    if record.topics.ok and health is not None and not health.reachable:
        return c.Verdict.of(c.TOPICS_READY, False, KAFKA_UNREACHABLE, health.error)
    return record.topics


def compose(
    record: PipelineRecord,
    sample: Sample | None,
    health: ClusterHealth | None,
    workers: Mapping[str, TierWorkers],
    previous: Mapping[str, Any],
    at: str | None = None,
    now_s: float | None = None,
    drain_settle_s: float = 0.0,
    troubles: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    at = at or c.now()
    topics = topics_verdict(record, health)
    workers_ready = workers_verdict(record, workers, troubles)
    waiting = _workers_behind(record, sample) if record.topology.draining else []
    drains = _draining(
        record, sample, workers_ready.ok and not waiting, previous, at, drain_settle_s
    )
    suspended = record.suspended and topics.ok and workers_ready.ok
    kept, at_risk = _retention(record, sample, time.time() if now_s is None else now_s)
    ready = c.ready(
        [topics, workers_ready],
        ok_reason="Suspended" if suspended else "Ready",
        ok_message=f"tier workers stopped; events wait on their tiers{kept}" if suspended else "",
    )
    if ready.ok and at_risk:
        ready = c.Verdict(c.READY, "False", EVENTS_AT_RISK, at_risk)
    verdicts = [ready, topics, workers_ready, _draining_verdict(drains, waiting)]
    if record.autoscaling is not None:
        verdicts.append(record.autoscaling)
    conditions = c.stamp(verdicts, _list(previous.get("conditions")), record.generation, at)
    old_tiers = {t.get("name"): t for t in _list(previous.get("tiers"))}
    tiers = []
    for t in record.topology.tiers:
        lag = sample.tier_lag.get(t.name) if sample else None
        if lag is None:
            lag = old_tiers.get(t.name, {}).get("lag")
        w = workers.get(t.name)
        tiers.append(
            TierStatus(
                name=t.name,
                topic=t.topic,
                lag=lag,
                ready_replicas=w.ready if w else 0,
                delay_seconds=t.delay_seconds,
                hold_limit_seconds=t.hold_limit_seconds,
            )
        )
    composed = RetryPipelineStatus(
        observed_generation=record.generation,
        conditions=conditions,
        topics=TopicsStatus(
            source=record.topology.source_topic,
            tiers=[t.topic for t in record.topology.tiers],
            dlq=record.topology.dlq_topic,
        ),
        tiers=tiers,
        live_lane=_live_lane(record, sample, workers, previous.get("liveLane")),
        dlq=_dlq(sample, previous.get("dlq"), at),
        draining=drains,
        tier_count=len(tiers),
    ).wire()
    # A merge patch keeps what it does not name: a live lane removed from the spec is nulled.
    return composed if record.live_lane else {**composed, "liveLane": None}


def _live_lane(
    record: PipelineRecord,
    sample: Sample | None,
    workers: Mapping[str, TierWorkers],
    previous: Any,
) -> LiveLaneStatus | None:
    """Beside the tiers: its readiness and the source group's lag (the last known lag while
    Kafka cannot be measured)."""
    if not record.live_lane:
        return None
    lag = sample.live_lag if sample else None
    if lag is None and isinstance(previous, Mapping):
        lag = previous.get("lag")
    w = workers.get(LIVE_LANE)
    return LiveLaneStatus(
        topic=record.topology.source_topic,
        consumer_group=record.topology.consumer_group,
        lag=lag,
        ready_replicas=w.ready if w else 0,
    )


def _retention(record: PipelineRecord, sample: Sample | None, now_s: float) -> tuple[str, str]:
    """For tiers whose workers are stopped: until when Kafka keeps their oldest waiting event
    (a note for the Suspended message), and a message when that is less than a day away."""
    if record.replicas or sample is None or not sample.tier_oldest_ms:
        return "", ""
    tiers = {t.name: t for t in record.topology.tiers}
    deletions = {
        name: (ms + tier_retention_ms(tiers[name].delay_seconds)) / 1000
        for name, ms in sample.tier_oldest_ms.items()
        if name in tiers
    }
    if not deletions:
        return "", ""
    tier = min(deletions, key=lambda name: deletions[name])
    when = _rfc3339(int(deletions[tier] * 1000))
    oldest = _rfc3339(sample.tier_oldest_ms[tier])
    if deletions[tier] - now_s > AT_RISK_S:
        return f"; the oldest (on {tier}, from {oldest}) is kept until {when}", ""
    return "", (
        f"tier workers stopped: the oldest waiting event on {tier} (from {oldest}) reaches "
        f"its topic's retention at {when}, and Kafka deletes it; resume the pipeline"
    )


def _draining(
    record: PipelineRecord,
    sample: Sample | None,
    workers_current: bool,
    previous: Mapping[str, Any],
    at: str,
    settle_s: float,
) -> list[DrainingStatus]:
    """The drains still under way: those of the last reconcile, less the finished ones (the
    timer asks for a reconcile, which removes their workers)."""
    lag = sample.drain_lag if sample else {}
    done = draining.finished(record.topology.draining, lag, workers_current, settle_s, at)
    old = {d.get("topic"): d for d in _list(previous.get("draining"))}
    return [
        DrainingStatus(
            kind=d.kind,
            name=d.name,
            topic=d.topic,
            to=d.to,
            since=d.since,
            lag=lag[d.topic] if lag.get(d.topic) is not None else old.get(d.topic, {}).get("lag"),
            delay_seconds=d.delay_seconds,
            index=d.index,
        )
        for d in record.topology.draining
        if d.topic not in done
    ]


def _workers_behind(record: PipelineRecord, sample: Sample | None) -> list[str]:
    """The stages whose workers may still run an older topology (draining.behind)."""
    following = sample.following if sample else {}
    stages = [t.name for t in record.topology.tiers] + ([LIVE_LANE] if record.live_lane else [])
    current = topology_hash(record.topology)
    return draining.behind({s: following.get(s) for s in stages}, current)


def _draining_verdict(drains: list[DrainingStatus], behind: list[str]) -> c.Verdict:
    if not drains:
        return c.Verdict.of(c.DRAINING, False, "NothingToDrain")
    what = "; ".join(
        f"{d.name} ({d.topic}) to {d.to}: {'?' if d.lag is None else d.lag} events" for d in drains
    )
    if behind:
        what += "; waiting for workers to follow the new topology: " + "; ".join(behind)
    return c.Verdict.of(c.DRAINING, True, "Draining", what)


def finished_drains(record: PipelineRecord, previous: Mapping[str, Any]) -> bool:
    """Whether the stored status has dropped a drain that the last reconcile still runs: time
    for a reconcile to remove its worker."""
    shown = {d.get("topic") for d in _list(previous.get("draining"))}
    return any(d.topic not in shown for d in record.topology.draining)


def _dlq(sample: Sample | None, previous: Any, at: str) -> DlqStatus | None:
    old = previous if isinstance(previous, Mapping) else {}
    if sample is None or sample.dlq_depth is None:
        return DlqStatus.model_validate(old) if old else None
    oldest = _rfc3339(sample.dlq_oldest_ms) if sample.dlq_oldest_ms is not None else None
    same = old.get("depth") == sample.dlq_depth and old.get("oldestTimestamp") == oldest
    return DlqStatus(
        depth=sample.dlq_depth,
        oldest_timestamp=oldest,
        last_updated=old.get("lastUpdated") if same and old.get("lastUpdated") else at,
    )


def invalid(
    message: str, generation: int | None, previous: Mapping[str, Any], at: str | None = None
) -> dict[str, Any]:
    """The status of a spec that cannot be parsed: only conditions and observedGeneration."""
    verdicts = [
        c.Verdict(c.READY, "False", INVALID_SPEC, message),
        c.Verdict(c.TOPICS_READY, "Unknown", INVALID_SPEC, "spec is invalid"),
        c.Verdict(c.WORKERS_READY, "Unknown", INVALID_SPEC, "spec is invalid"),
    ]
    return RetryPipelineStatus(
        observed_generation=generation,
        conditions=c.stamp(verdicts, _list(previous.get("conditions")), generation, at),
    ).wire()


def differs(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether writing `new` would change anything (keys absent from `new` are not ours)."""
    return any(previous.get(k) != v for k, v in new.items())


def merge_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `previous` into `new` for the keys of `new`: a field we no
    longer set inside one of our objects (`dlq.oldestTimestamp` once the DLQ is empty) is
    removed with a null, since a merge patch keeps what it does not name."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        old = previous.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            patch[key] = {**dict.fromkeys(old.keys() - value.keys()), **value}
        else:
            patch[key] = value
    return patch


def _list(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
