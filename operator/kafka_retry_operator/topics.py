"""A pipeline's retry and DLQ topics in Kafka: planned from the spec, created when missing,
grown when the spec asks for more partitions, never shrunk and never deleted on update.

`ensure` never raises for what a user or an admin can fix (an unreachable cluster, a topic
that exists with settings we cannot use, fewer partitions asked than exist); it answers with
a `TopicsVerdict` that becomes the TopicsReady condition, and says whether a retry can help.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from kafka_retry.model import RetryPipelineSpec, Topology
from kafka_retry.offset_queries import topic_partitions

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
# A tier topic keeps events well past their delay: the longer of a week and twice the delay
# plus a day, so a worker outage of a day never loses a delayed event to retention.
MIN_TIER_RETENTION_MS = 7 * DAY_MS
# Room for our headers on a forward (at most about 7 KiB: see kafka_retry.headers), so that an
# event the source topic accepted always fits its tier and DLQ topics.
FORWARD_HEADROOM_BYTES = 64 * 1024


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    replication_factor: int | None
    config: Mapping[str, str]


def tier_retention_ms(delay_seconds: int) -> int:
    return max(MIN_TIER_RETENTION_MS, 2 * delay_seconds * 1000 + DAY_MS)


def plan(spec: RetryPipelineSpec, topology: Topology) -> list[TopicPlan]:
    """The topics the pipeline needs: one per tier, then the DLQ (never the source)."""
    rf = spec.topics.replication_factor
    n = spec.topics.partitions
    plans = [
        TopicPlan(
            t.topic,
            n,
            rf,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(tier_retention_ms(t.delay_seconds)),
                # The broker stamps each record as it appends it: a tier's delay counts from
                # that, never from a writer's clock or headers (kafka_retry.headers).
                "message.timestamp.type": "LogAppendTime",
            },
        )
        for t in topology.tiers
    ]
    plans.append(
        TopicPlan(
            topology.dlq_topic,
            n,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(spec.dlq.retention_hours * 3600_000)},
        )
    )
    return plans


class Retry(Enum):
    NONE = "none"  # converged, or nothing will change until the spec changes
    LATER = "later"  # a retry with backoff may succeed (Kafka down, topic being created...)


@dataclass(frozen=True)
class TopicsVerdict:
    ready: bool
    reason: str
    message: str
    retry: Retry = Retry.NONE
    # Whether the topics are usable by workers (all exist), even if not all is as asked.
    usable: bool = False
    created: Sequence[str] = field(default_factory=tuple)
    grown: Sequence[str] = field(default_factory=tuple)


# Reasons, most important first: the condition shows the first that applies.
KAFKA_UNREACHABLE = "KafkaUnreachable"
TOPIC_CONFLICT = "TopicConflict"
TOPIC_CREATION_FAILED = "TopicCreationFailed"
PARTITION_DECREASE_REFUSED = "PartitionDecreaseRefused"
SOURCE_TOPIC_NOT_FOUND = "SourceTopicNotFound"
TOPICS_READY = "TopicsReady"


def unreachable(bootstrap_servers: str, timeout: float, error: object) -> TopicsVerdict:
    return TopicsVerdict(
        False,
        KAFKA_UNREACHABLE,
        f"cannot reach Kafka at {bootstrap_servers} within {timeout:g}s: {_short(error)}",
        Retry.LATER,
    )


def sized(plans: Sequence[TopicPlan], source_max_message_bytes: int) -> list[TopicPlan]:
    """`plans` with room for the source's largest event plus our headers."""
    limit = str(source_max_message_bytes + FORWARD_HEADROOM_BYTES)
    return [replace(p, config={**p.config, "max.message.bytes": limit}) for p in plans]


def ensure(
    admin: AdminClient,
    plans: Sequence[TopicPlan],
    source_topic: str,
    bootstrap_servers: str,
    timeout: float,
) -> TopicsVerdict:
    """Create missing topics, grow partitions, align the configs we own; report the rest."""
    try:
        existing = topic_partitions(admin, [source_topic, *(p.name for p in plans)], timeout)
    except KafkaException as e:
        return unreachable(bootstrap_servers, timeout, e)
    if source_topic not in existing:
        # Likely a typo: nothing named after it is created (under `Retain` it would outlive
        # the pipeline). Checked again with backoff until the topic exists.
        return TopicsVerdict(
            False,
            SOURCE_TOPIC_NOT_FOUND,
            f"source topic {source_topic} does not exist (the operator never creates it); "
            "no retry or DLQ topic and no worker is created until it does",
            Retry.LATER,
        )
    source_limit = _max_message_bytes(admin, source_topic, timeout)
    if source_limit is not None:
        plans = sized(plans, source_limit)

    problems: dict[str, list[str]] = {}
    missing = [p for p in plans if p.name not in existing]
    created, failed = _create(admin, missing, timeout)
    for name, error in failed.items():
        problems.setdefault(TOPIC_CREATION_FAILED, []).append(f"cannot create {name}: {error}")

    present = [p for p in plans if p.name in existing]
    for name, problem in _conflicts(admin, present, timeout).items():
        problems.setdefault(TOPIC_CONFLICT, []).append(f"{name}: {problem}")

    grow = [p for p in present if existing[p.name] < p.partitions]
    grown, grow_failed = _grow(admin, grow, timeout)
    for name, error in grow_failed.items():
        problems.setdefault(TOPIC_CREATION_FAILED, []).append(f"cannot grow {name}: {error}")
    for p in present:
        if existing[p.name] > p.partitions:
            problems.setdefault(PARTITION_DECREASE_REFUSED, []).append(
                f"{p.name} has {existing[p.name]} partitions and spec.topics.partitions asks "
                f"{p.partitions}: partitions can only grow"
            )
    usable = not (problems.keys() & {TOPIC_CREATION_FAILED, TOPIC_CONFLICT})
    for reason in (TOPIC_CONFLICT, TOPIC_CREATION_FAILED, PARTITION_DECREASE_REFUSED):
        if reason in problems:
            # A refused decrease waits for the spec to change; everything else may heal.
            retry = Retry.NONE if reason == PARTITION_DECREASE_REFUSED else Retry.LATER
            message = "; ".join(m for ms in problems.values() for m in ms)
            return TopicsVerdict(False, reason, message, retry, usable, created, grown)
    message = f"{len(plans)} topics ready"
    if created or grown:
        message += f" (created {len(created)}, grown {len(grown)})"
    return TopicsVerdict(True, TOPICS_READY, message, Retry.NONE, True, created, grown)


def _create(
    admin: AdminClient, plans: Sequence[TopicPlan], timeout: float
) -> tuple[list[str], dict[str, str]]:
    if not plans:
        return [], {}
    new = [
        NewTopic(
            p.name,
            num_partitions=p.partitions,
            replication_factor=p.replication_factor or -1,
            config=dict(p.config),
        )
        for p in plans
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    # One that exists already was created meanwhile (by a reconcile of the same pipeline): fine.
    return _settle(futures, timeout, "created", KafkaError.TOPIC_ALREADY_EXISTS)


def _grow(
    admin: AdminClient, plans: Sequence[TopicPlan], timeout: float
) -> tuple[list[str], dict[str, str]]:
    if not plans:
        return [], {}
    futures = admin.create_partitions(
        [NewPartitions(p.name, p.partitions) for p in plans],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    return _settle(futures, timeout, "grew")


def _settle(
    futures: Mapping[str, Any], timeout: float, verb: str, tolerated: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """(topics done, topics failed with why) of an admin call's futures; a `tolerated` error
    code counts as neither."""
    done: list[str] = []
    failed: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 5)
            done.append(name)
            log.info("%s topic %s", verb, name)
        except KafkaException as e:
            if tolerated is not None and e.args and e.args[0].code() == tolerated:
                continue
            failed[name] = _short(e)
        except Exception as e:
            failed[name] = _short(e)
    return done, failed


def _conflicts(admin: AdminClient, plans: Sequence[TopicPlan], timeout: float) -> dict[str, str]:
    """Existing topics whose settings make them unusable; configs we own (retention) that
    differ are aligned instead."""
    if not plans:
        return {}
    resources = {ConfigResource("TOPIC", p.name): p for p in plans}
    futures = admin.describe_configs(list(resources), request_timeout=timeout)
    conflicts: dict[str, str] = {}
    align: list[ConfigResource] = []
    for resource, future in futures.items():
        wanted = resources[resource]
        try:
            entries = future.result(timeout=timeout)
        except Exception as e:
            conflicts[wanted.name] = f"cannot read its configuration: {_short(e)}"
            continue
        actual = {k: v.value for k, v in entries.items()}
        if "compact" in str(actual.get("cleanup.policy", "delete")):
            conflicts[wanted.name] = (
                f"exists with cleanup.policy={actual['cleanup.policy']}; retry and DLQ topics "
                "need cleanup.policy=delete (compaction would drop events with the same key)"
            )
            continue
        changes = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in wanted.config.items()
            if actual.get(k) != v
        ]
        if changes:
            align.append(ConfigResource("TOPIC", wanted.name, incremental_configs=changes))
    if align:
        for resource, future in admin.incremental_alter_configs(align).items():
            try:
                future.result(timeout=timeout)
                log.info("aligned the configuration of topic %s", resource.name)
            except Exception as e:
                conflicts[resource.name] = f"cannot update its configuration: {_short(e)}"
    return conflicts


def _max_message_bytes(admin: AdminClient, topic: str, timeout: float) -> int | None:
    """The largest record `topic` accepts (its `max.message.bytes`, or the broker's default);
    None if it cannot be read now (the next reconcile tries again)."""
    resource = ConfigResource("TOPIC", topic)
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(
            timeout=timeout
        )
        return int(entries["max.message.bytes"].value)
    except Exception as e:
        log.warning("cannot read max.message.bytes of %s: %s", topic, _short(e))
        return None


def delete(admin: AdminClient, names: Iterable[str], timeout: float) -> dict[str, str]:
    """Delete topics; answers the ones that could not be deleted (missing ones are fine)."""
    names = sorted(set(names))
    if not names:
        return {}
    futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    failed: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 5)
            log.info("deleted topic %s", name)
        except KafkaException as e:
            if e.args and e.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            failed[name] = _short(e)
        except Exception as e:
            failed[name] = _short(e)
    return failed


def _short(error: object) -> str:
    """A KafkaError's own text, not its repr."""
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        return str(error.args[0].str())
    return str(error)
