"""Which topics a spec change left behind, and where their events go (pure functions).

A tier removed or renamed, or a tier or DLQ given another explicit topic, leaves a topic with
events waiting and nobody consuming it. Each such topic *drains*: a drain worker (a
`kafka-retry worker --drain TOPIC` Deployment) holds a tier's events until their original due
time, then forwards them unchanged to the tier now at the removed one's place in the list (or
the last tier); an old DLQ's waiting events go to the new DLQ at once. The previous topics are
read from the pipeline's status (`status.topics`, `status.tiers`, `status.draining`), which
the operator writes after every reconcile, so a restarted operator picks up where it was.

A drain ends when its topic's lag is 0, no sooner than `settle_s` after it began (time for
every service's SDK to follow the new topology) and once the tier workers all run the current
topology (so none still forwards to the old topic). Tier workers follow the topology live, from
their mounted ConfigMap, which the kubelet updates when it gets to it (a minute or two, not
bounded): time is no signal. Each worker tags its committed offsets with the hash of the
topology it runs, and tags every partition it holds as soon as it applies a new one (the
worker's topology_tag.py); `behind` reads those tags. A stage's workers run the current
topology when every partition of its group carries its hash, or when the group has no members
(scaled to zero: a worker that starts reads the current file, and tags what it is assigned).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kafka_retry.depth import cursor_group
from kafka_retry.model import MAX_DELAY_SECONDS, DrainingStage, ResolvedTier, Topology


def follow(topology: Topology, previous: Mapping[str, Any], now: str) -> Topology:
    """The topology with what the previous one leaves behind: drains, and tiers' hold limits."""
    tiers = [_hold_limit(t, previous) for t in topology.tiers]
    return topology.model_copy(update={"tiers": tiers, "draining": plan(topology, previous, now)})


def _hold_limit(tier: ResolvedTier, previous: Mapping[str, Any]) -> ResolvedTier:
    """A tier whose delay was shortened keeps holding the events it had until the due time
    they were given: its hold limit stays the longest delay it has had on this topic."""
    for t in _list(previous.get("tiers")):
        if t.get("name") == tier.name and t.get("topic") == tier.topic:
            longest = max(_int(t.get("delaySeconds"), 0), _int(t.get("holdLimitSeconds"), 0))
            if longest > tier.delay_seconds:
                return tier.model_copy(update={"hold_limit_seconds": longest})
    return tier


def plan(topology: Topology, previous: Mapping[str, Any], now: str) -> list[DrainingStage]:
    """The drains this topology needs, given the status written for the previous one:
    those already under way, plus the topics the previous spec had and this one has not.
    A topic that is back in the spec stops draining."""
    current = {t.topic for t in topology.tiers} | {topology.dlq_topic}
    drains: dict[str, DrainingStage] = {}
    for d in _list(previous.get("draining")):
        topic = str(d.get("topic", ""))
        if topic and topic not in current:
            kind = "dlq" if d.get("kind") == "dlq" else "tier"
            drains[topic] = _stage(
                topology, kind, str(d.get("name", "")), topic,
                _int(d.get("delaySeconds"), 0), _int(d.get("index"), 0), str(d.get("since") or now),
            )  # fmt: skip
    for index, t in enumerate(_list(previous.get("tiers"))):
        topic, name = str(t.get("topic", "")), str(t.get("name", ""))
        if topic and name and topic not in current and topic not in drains:
            delay = _int(t.get("delaySeconds"), MAX_DELAY_SECONDS)
            drains[topic] = _stage(topology, "tier", name, topic, delay, index, now)
    old_dlq = (previous.get("topics") or {}).get("dlq")
    if isinstance(old_dlq, str) and old_dlq and old_dlq not in current and old_dlq not in drains:
        drains[old_dlq] = _stage(topology, "dlq", "dlq", old_dlq, 0, 0, now)
    return list(drains.values())


def _stage(
    topology: Topology, kind: str, name: str, topic: str, delay: int, index: int, since: str
) -> DrainingStage:
    if kind == "dlq":
        group, to = cursor_group(topic), topology.dlq_topic
    else:
        group = f"{topology.consumer_group}.{topology.source_topic}.{name}"
        to = topology.tiers[min(index, len(topology.tiers) - 1)].topic
    return DrainingStage(
        kind="dlq" if kind == "dlq" else "tier", name=name, topic=topic, consumer_group=group,
        delay_seconds=delay, index=index, to=to, since=since,
    )  # fmt: skip


def finished(
    drains: Iterable[DrainingStage],
    lag: Mapping[str, int | None],
    workers_current: bool,
    settle_s: float,
    now: str,
) -> set[str]:
    """Topics whose drain is over: measured empty, settled, and no old worker left."""
    if not workers_current:
        return set()
    return {
        d.topic
        for d in drains
        if lag.get(d.topic) == 0 and (_parse(now) - _parse(d.since)).total_seconds() >= settle_s
    }


@dataclass(frozen=True)
class Following:
    """What a stage's consumer group shows of the topology its workers run (sampler.py)."""

    members: int
    tags: Mapping[int, str | None]  # partition -> topology hash on its committed offset


def behind(stages: Mapping[str, Following | None], current: str) -> list[str]:
    """The stages whose workers may not all run the topology hashed `current`, each with why
    (for the Draining message); empty when all do. A stage not measured counts as behind."""
    found = []
    for name, f in stages.items():
        if f is None:
            found.append(f"{name}: not measured yet")
        elif f.members and (old := sorted(p for p, tag in f.tags.items() if tag != current)):
            found.append(f"{name}: partitions {_ranges(old)} of {len(f.tags)} not yet")
    return found


def _ranges(partitions: list[int]) -> str:
    shown = ",".join(map(str, partitions[:8]))
    return shown + (f",... ({len(partitions)})" if len(partitions) > 8 else "")


def _parse(stamp: str) -> datetime:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return datetime.now(UTC)  # unreadable: counts as just begun


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _list(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []
