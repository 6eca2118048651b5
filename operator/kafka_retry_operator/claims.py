"""Which Kafka names each pipeline claims, so no two pipelines share a retry topic or group.

Two RetryPipelines (in any watched namespace) whose resolved retry or DLQ topics, tier groups
or DLQ cursor group coincide on one cluster would consume each other's events, and one's
`deletionPolicy: Delete` would delete the other's topics. The older pipeline (by creation
time, then namespace and name) keeps the names; the younger gets a condition and creates
nothing. The service's own group on the source topic is claimed too, but only against
derived groups: two services may share a group on different topics, which is theirs to
decide.

The claims of every pipeline are a kopf index (`handlers.pipeline_claims`), which kopf fills
before any handler runs, so a restarted operator decides the same way whatever the order in
which it resumes pipelines. A cluster is known by its bootstrap servers as written (sorted,
lower-case): two spellings of one cluster's brokers are not recognised as one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from kafka_retry.depth import cursor_group
from kafka_retry.model import RetryPipelineSpec, Topology

Kind = Literal["topic", "group"]
# (cluster, kind, name)
ClaimKey = tuple[str, Kind, str]


@dataclass(frozen=True, order=True)
class Claimant:
    """A pipeline holding a name; ordered by age, so `min` is the one that keeps it."""

    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text)
    namespace: str
    name: str
    exclusive: bool  # False: the service's own source group, shared with services only


def cluster_of(bootstrap_servers: str) -> str:
    return ",".join(sorted({s.strip().lower() for s in bootstrap_servers.split(",") if s.strip()}))


def topic_keys(spec: RetryPipelineSpec, topology: Topology) -> list[ClaimKey]:
    """The pipeline's retry and DLQ topics, as claims."""
    cluster = cluster_of(spec.kafka.bootstrap_servers)
    return [(cluster, "topic", t) for t in [*(t.topic for t in topology.tiers), topology.dlq_topic]]


def claims(spec: RetryPipelineSpec, topology: Topology) -> dict[ClaimKey, bool]:
    """Every name the pipeline needs to itself (True) or uses as the service does (False)."""
    cluster = cluster_of(spec.kafka.bootstrap_servers)
    owned: dict[ClaimKey, bool] = dict.fromkeys(topic_keys(spec, topology), True)
    for t in topology.tiers:
        owned[(cluster, "group", t.consumer_group)] = True
    owned[(cluster, "group", cursor_group(topology.dlq_topic))] = True
    owned.setdefault((cluster, "group", topology.consumer_group), False)
    return owned


def older_overlaps(
    me: Claimant, mine: Mapping[ClaimKey, bool], index: Mapping[ClaimKey, Iterable[Claimant]]
) -> dict[tuple[str, str], list[str]]:
    """Older pipelines sharing a name with this one: (namespace, name) -> the names."""
    found: dict[tuple[str, str], list[str]] = {}
    for key, exclusive in mine.items():
        for other in index.get(key, ()):
            if (other.namespace, other.name) == (me.namespace, me.name):
                continue
            if not (exclusive or other.exclusive) or other > me:
                continue
            found.setdefault((other.namespace, other.name), []).append(f"{key[1]} {key[2]}")
    return found


def held_by_others(
    me: tuple[str, str], names: Iterable[ClaimKey], index: Mapping[ClaimKey, Iterable[Claimant]]
) -> set[str]:
    """Of `names`, those another pipeline claims too: never ours to delete."""
    return {key[2] for key in names if any((c.namespace, c.name) != me for c in index.get(key, ()))}


def describe(overlaps: Mapping[tuple[str, str], list[str]]) -> str:
    parts = [f"{ns}/{name} ({', '.join(sorted(what))})" for (ns, name), what in overlaps.items()]
    return (
        "retry or DLQ topics or groups already used by older pipeline(s) "
        + "; ".join(sorted(parts))
        + ": this pipeline creates nothing until they no longer overlap (change "
        "source.consumerGroup, or name the tier and DLQ topics)"
    )
