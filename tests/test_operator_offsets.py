"""Committed offsets that Kafka would expire: a pipeline's idle groups kept alive by the operator.

Kafka deletes the committed offsets of a group without members `offsets.retention.minutes`
after their last commit (7 days by default). That setting is cluster-wide and read-only, so the
test runs a broker of its own with a one-minute retention (checked every second); the operator
runs at its usual settings and reads the retention from the broker."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

import localenv
from dlq_support import fill_dlq
from kafka_retry import depth
from kafka_retry.model import RetryPipelineSpec
from kafka_retry.offset_queries import committed
from operator_support import (
    Kubectl,
    OperatorProcess,
    apply,
    cleanup_topics,
    get,
    operator,
    pipeline,
    podrunner,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.e2e

RETENTION_S = 60
DAY_MS = 24 * 3600_000


@pytest.fixture(scope="module")
def short_retention_kafka(localenv_up: dict[str, str]) -> Iterator[str]:
    with localenv.extra_kafka(
        "kafka-offsets-1m",
        {"offsets.retention.minutes": "1", "offsets.retention.check.interval.ms": "1000"},
    ) as bootstrap:
        yield bootstrap


def test_idle_groups_keep_their_offsets_past_the_brokers_retention(
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    short_retention_kafka: str,
    unique: str,
) -> None:
    """A suspended pipeline whose DLQ was partly replayed (its cursor committed) and whose
    tier worker had committed before the suspension: past the retention, depth and lag still
    count from those offsets, because the operator commits them again."""
    bootstrap = short_retention_kafka
    admin = AdminClient({"bootstrap.servers": bootstrap})
    source = f"orders-{unique}"
    admin.create_topics([NewTopic(source, 1, 1)])[source].result(timeout=30)
    group = f"svc-{unique}"
    doc = pipeline(
        "kept",
        bootstrap,
        source,
        group,
        tiers=[{"name": "retry-1", "delaySeconds": 1}],
        suspend=True,
    )
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "kept", type_="TopicsReady", timeout=90)
    topology = RetryPipelineSpec.model_validate(doc["spec"]).topology(namespace, "kept")
    tier, dlq = topology.tiers[0], topology.dlq_topic

    fill_dlq(bootstrap, dlq, 5, source_topic=source, group=group)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(4):
        producer.produce(tier.topic, key=b"k", value=f"e{i}".encode())
    assert producer.flush(30) == 0
    worker = Consumer({"bootstrap.servers": bootstrap, "group.id": tier.consumer_group})
    groups = {depth.cursor_group(dlq): [(dlq, 0)], tier.consumer_group: [(tier.topic, 0)]}
    wanted = {depth.cursor_group(dlq): {(dlq, 0): 3}, tier.consumer_group: {(tier.topic, 0): 2}}

    def committed_before() -> bool:
        """A replay passed the first three DLQ events; the tier worker committed 2, then
        stopped. Until read back: a new broker's group coordinator may still be loading."""
        try:
            depth.advance_cursor(admin, dlq, {0: 3})
            worker.commit(offsets=[TopicPartition(tier.topic, 0, 2)], asynchronous=False)
        except KafkaException:
            return False
        return bool(committed(admin, groups, 10) == wanted)

    wait_for(committed_before, 90, "the cursor and the tier group committed", every=1)
    worker.close()

    def measured() -> tuple[Any, Any]:
        status = (get(kubectl, namespace, "rp", "kept") or {}).get("status") or {}
        lag = next((t.get("lag") for t in status.get("tiers") or []), None)
        return (status.get("dlq") or {}).get("depth"), lag

    wait_for(lambda: measured() == (2, 2), 60, "DLQ depth 2 and tier lag 2")
    deadline = time.monotonic() + RETENTION_S * 1.5 + 10
    while time.monotonic() < deadline:
        assert measured() == (2, 2), "an expired offset: depth and lag count from the start"
        time.sleep(2)

    assert committed(admin, groups, 10) == wanted
    status = (get(kubectl, namespace, "rp", "kept") or {})["status"]
    assert status["lastOffsetRefreshTime"].endswith("Z")
    assert "replayLease" not in status, "the refresh gave the lease back"


def test_a_suspended_tiers_events_near_retention_are_shown_at_risk(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    """Suspended, events wait on the tiers only as long as the tier topic keeps them: an event
    that reached retry-1 6.5 days ago (the topic keeps a week) has 12 hours left.

    Tier topics stamp records with the broker's append time, so to hold a record appended
    6.5 days ago the test lets this one record keep its producer's timestamp (the topic's
    `message.timestamp.type` set to CreateTime for it, then back), as Kafka's retention and
    the operator both read a record's stored timestamp."""
    source = make_topic("orders")
    group = f"svc-{unique}"
    topic = f"{group}.{source}.retry-1"
    cleanup_topics.extend([topic, f"{group}.{source}.dlq"])
    one_tier = [{"name": "retry-1", "delaySeconds": 1}]
    apply(kubectl, namespace, pipeline("paused", kafka_bootstrap, source, group, tiers=one_tier))
    wait_condition(kubectl, namespace, "paused", type_="TopicsReady", timeout=90)
    kubectl(
        "patch", "rp", "paused", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    wait_condition(kubectl, namespace, "paused", reason="Suspended", timeout=60)

    sent_ms = int(time.time() * 1000) - 6 * DAY_MS - DAY_MS // 2
    _timestamp_type(kafka_admin, topic, "CreateTime")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, key=b"k", value=b"waiting", timestamp=sent_ms)
    assert producer.flush(30) == 0
    _timestamp_type(kafka_admin, topic, "LogAppendTime")
    risky = wait_condition(
        kubectl, namespace, "paused", status="False", reason="EventsAtRisk", timeout=30
    )
    message = next(c for c in risky["status"]["conditions"] if c["type"] == "Ready")["message"]
    assert "retry-1" in message and "resume the pipeline" in message, message


def _timestamp_type(admin: Any, topic: str, kind: str) -> None:
    entry = ConfigEntry("message.timestamp.type", kind, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
