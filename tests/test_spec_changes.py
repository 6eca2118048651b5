"""Spec changes with events waiting, end to end: a real kube-apiserver, the real Kafka broker,
the operator as a subprocess, tier and drain workers run by hack/podrunner.py, a service's
live lane (the SDK, following the topology ConfigMap) in this process, and the service's HTTP
endpoint that the workers POST to.

Each case fills one tier (or the DLQ) with events, changes the spec while they wait, sends a
second batch through the new topology, and ends when every event is handled or in the DLQ:
none lost, none handled before the due time it was given, and any topic the change left
behind drained (shown in status while it lasts) and its worker removed. The tier workers that
stay follow the change from their mounted ConfigMap: none is restarted or rolled.
"""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from dataplane_support import Running, produce_ids
from http_service_support import RecordingService, now_ms, serving
from kafka_retry import depth
from kafka_retry.model import Topology
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

BATCH = 5
WAIT_S = 12  # the waiting tier's delay: long enough to change the spec meanwhile


@dataclass
class Service(RecordingService):
    """The service's endpoint: fails retriably (503) before attempt `succeed_from`, then
    answers 200; keys starting with `dead-` fail non-retriably (422)."""

    succeed_from: int = 2

    def status(self, key: str, attempt: int) -> int:
        return 422 if key.startswith("dead-") else (200 if attempt >= self.succeed_from else 503)


@pytest.fixture
def service() -> Iterator[Service]:
    with serving(Service()) as svc:
        yield svc


Spec = dict[str, Any]


@dataclass
class Case:
    id: str
    tiers: list[Spec]
    waiting: str  # the tier the first batch waits on when the spec changes
    succeed_from: int  # the attempt the service first answers 200 to
    change: Callable[[Spec], None]
    drained: list[str] = field(default_factory=list)  # tier names whose topics must drain
    dlq_topic: str | None = None  # an explicit DLQ topic, formatted with the test's suffix


def _tiers(*delays: tuple[str, int]) -> list[Spec]:
    return [{"name": n, "delaySeconds": d} for n, d in delays]


def _set_tiers(*delays: tuple[str, int]) -> Callable[[Spec], None]:
    def change(spec: Spec) -> None:
        spec["tiers"] = _tiers(*delays)

    return change


def _grow(spec: Spec) -> None:
    spec["topics"] = {**spec["topics"], "partitions": 2}


def _new_dlq(spec: Spec) -> None:
    spec["dlq"] = {**spec["dlq"], "topic": spec["dlq"]["topic"] + "-new"}


CASES = [
    Case(
        "add-a-tier",
        _tiers(("retry-1", 1), ("retry-2", WAIT_S)),
        "retry-2",
        3,
        _set_tiers(("retry-1", 1), ("retry-2", WAIT_S), ("retry-3", 1)),
    ),
    Case(
        "remove-the-last-tier",
        _tiers(("retry-1", 1), ("retry-2", 1), ("retry-3", WAIT_S)),
        "retry-3",
        4,
        _set_tiers(("retry-1", 1), ("retry-2", 1)),
        drained=["retry-3"],
    ),
    Case(
        "remove-a-middle-tier",
        _tiers(("retry-1", 1), ("retry-2", WAIT_S), ("retry-3", 1)),
        "retry-2",
        3,
        _set_tiers(("retry-1", 1), ("retry-3", 1)),
        drained=["retry-2"],
    ),
    Case(
        "rename-the-first-tier",
        _tiers(("retry-1", WAIT_S), ("retry-2", 1)),
        "retry-1",
        2,
        _set_tiers(("first", WAIT_S), ("retry-2", 1)),
        drained=["retry-1"],
    ),
    Case(  # long enough for the workers to roll and hold the events under the new delay
        "shorten-a-delay",
        _tiers(("retry-1", 3 * WAIT_S), ("retry-2", 1)),
        "retry-1",
        2,
        _set_tiers(("retry-1", 2), ("retry-2", 1)),
    ),
    Case(
        "grow-partitions",
        _tiers(("retry-1", WAIT_S), ("retry-2", 1)),
        "retry-1",
        2,
        _grow,
    ),
    Case(
        "change-the-explicit-dlq-topic",
        _tiers(("retry-1", WAIT_S)),
        "retry-1",
        2,
        _new_dlq,
        dlq_topic="dlq-{unique}",
    ),
]


def _status(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    return (get(kubectl, namespace, "rp", "orders") or {}).get("status") or {}


def _lag(kubectl: Kubectl, namespace: str, tier: str) -> int | None:
    for t in _status(kubectl, namespace).get("tiers") or []:
        if t.get("name") == tier:
            return t.get("lag")  # type: ignore[no-any-return]
    return None


def _keys(bootstrap: str, topic: str) -> set[str]:
    """The keys of every event now on `topic` (read to its end)."""
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False}
    )
    try:
        parts = [
            TopicPartition(topic, p)
            for p in c.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        keys: set[str] = set()
        left = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    keys.add((m.key() or b"").decode())
                    if m.offset() + 1 >= ends[m.partition()]:
                        left.discard(m.partition())
        return keys
    finally:
        c.close()


def _deployment_names(kubectl: Kubectl, namespace: str) -> list[str]:
    return sorted(kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout.split())


def _pods(podrunner: Any, namespace: str, deployments: list[str]) -> dict[str, Any]:
    """Each Deployment's pods as the podrunner runs them: names, process ids, restarts."""
    return {
        d: sorted((p.name, tuple(p.pids), p.restarts) for p in podrunner.pods(namespace, d))
        for d in deployments
    }


def _staying(case: Case, spec: Spec) -> list[str]:
    """The tier Deployments the change keeps (same tier name, same topic)."""
    after = json.loads(json.dumps(spec))
    case.change(after)
    kept = {t["name"] for t in after["tiers"]}
    return [f"orders-{t['name']}" for t in spec["tiers"] if t["name"] in kept]


def _tier_generations(kubectl: Kubectl, namespace: str) -> dict[str, int]:
    """The tier workers' Deployments (not the drains') and their generations."""
    found = json.loads(kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)
    return {
        d["metadata"]["name"]: d["metadata"]["generation"]
        for d in found["items"]
        if "-drain-" not in d["metadata"]["name"]
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_spec_change_with_events_waiting(
    case: Case,
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    k8s_api: Any,
    cleanup_topics: list[str],
    service: Service,
) -> None:
    service.succeed_from = case.succeed_from
    source = make_topic("orders")
    group = f"svc-{unique}"
    prefix = f"{group}.{source}"
    doc = pipeline(
        "orders",
        kafka_bootstrap,
        source,
        group,
        tiers=case.tiers,
        handler={"http": {"url": service.url, "timeoutSeconds": 5}},
        classification={"nonRetriable": ["ValueError"]},
    )
    if case.dlq_topic:
        doc["spec"]["dlq"]["topic"] = case.dlq_topic.format(unique=unique)
    spec = doc["spec"]
    cleanup_topics.extend(f"{prefix}.{n}" for n in ("retry-1", "retry-2", "retry-3", "first"))
    dlq = f"{prefix}.dlq"
    cleanup_topics.append(dlq)
    if case.dlq_topic:
        cleanup_topics.extend([spec["dlq"]["topic"], spec["dlq"]["topic"] + "-new"])
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=120)

    from kafka_retry.sdk import RetryingConsumer

    failed_at: dict[str, int] = {}

    def live_lane(event: Any) -> None:
        key = event.key.decode()
        failed_at.setdefault(key, now_ms())
        if key.startswith("dead-"):
            raise ValueError("bad data")  # non-retriable: straight to the DLQ
        raise TimeoutError("upstream timed out")

    sdk = RetryingConsumer.from_configmap(
        f"{namespace}/orders",
        live_lane,
        api_client=k8s_api,
        follow_interval_s=1.0,
        extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
    )
    first = [f"a-{i}" for i in range(BATCH)]
    dead = [f"dead-{i}" for i in range(BATCH)] if case.dlq_topic else []
    second = [f"b-{i}" for i in range(BATCH)]
    with Running(sdk):
        produce_ids(kafka_bootstrap, source, first + dead)
        wait_for(
            lambda: _lag(kubectl, namespace, case.waiting) == BATCH,
            60,
            f"the first batch waiting on {case.waiting}",
        )
        if dead:
            wait_for(
                lambda: (_status(kubectl, namespace).get("dlq") or {}).get("depth") == BATCH,
                60,
                "the dead events in the DLQ",
            )
        staying = _staying(case, spec)
        pods_before = _pods(podrunner, namespace, staying)
        assert all(pods_before.values()), pods_before
        generations_before = _tier_generations(kubectl, namespace)
        case.change(spec)
        apply(kubectl, namespace, doc)
        wait_condition(kubectl, namespace, "orders", timeout=90)
        rolled = _tier_generations(kubectl, namespace)
        published = Topology.from_json(
            (get(kubectl, namespace, "configmap", "orders-topology") or {})["data"]["topology.json"]
        )
        wait_for(lambda: sdk.topology == published, 30, "the SDK following the new topology")
        produce_ids(kafka_bootstrap, source, second)

        seen_draining: list[dict[str, Any]] = []

        def all_done() -> bool:
            drains = _status(kubectl, namespace).get("draining") or []
            seen_draining.extend(drains)
            done = service.handled() | _keys(kafka_bootstrap, spec["dlq"].get("topic") or dlq)
            return done >= set(first + second + dead)

        longest = max(t["delaySeconds"] for t in case.tiers)
        wait_for(all_done, longest + 90, "every event handled or in the DLQ", every=1.0)

    calls = service.snapshot()
    # None early: every attempt at or after the due time its event was given, and the first
    # batch's attempts on (or drained from) the waiting tier no sooner than its delay allowed.
    early = [c for c in calls if c.due_ms is not None and c.at_ms < c.due_ms]
    assert not early, early
    waiting_delay = next(t["delaySeconds"] for t in case.tiers if t["name"] == case.waiting)
    for c in calls:
        if c.key in first and c.status == 200:
            earliest = failed_at[c.key] + waiting_delay * 1000
            assert c.at_ms >= earliest, (c, "handled before the waiting tier's delay")
    # Each event handled once (at least once is the guarantee; a drain adds no duplicates
    # here, where nothing crashes).
    succeeded = [c.key for c in calls if c.status == 200]
    assert sorted(succeeded) == sorted(set(succeeded)), "an event was handled twice"
    dead_lettered = _keys(kafka_bootstrap, spec["dlq"].get("topic") or dlq)
    assert not set(succeeded) & dead_lettered, "an event both handled and dead-lettered"

    # The change's leftovers drained, shown in status, and their workers removed.
    drained_topics = {f"{prefix}.{n}" for n in case.drained}
    old_dlq = case.dlq_topic.format(unique=unique) if case.dlq_topic else None
    if old_dlq:
        drained_topics.add(old_dlq)
    assert drained_topics <= {d["topic"] for d in seen_draining}, seen_draining
    wait_for(
        lambda: (
            not _status(kubectl, namespace).get("draining")
            and not [n for n in _deployment_names(kubectl, namespace) if "-drain-" in n]
        ),
        60,
        "drains finished and their workers removed",
    )
    conditions = {c["type"]: c for c in _status(kubectl, namespace)["conditions"]}
    assert conditions["Draining"]["status"] == "False", conditions["Draining"]
    # A drain's end is no change for the tier workers: they are not rolled (restarted) again.
    assert _tier_generations(kubectl, namespace) == rolled
    # Nor was the change itself: the tiers that stay kept their pods, which followed it live.
    assert {d: rolled[d] for d in staying} == {d: generations_before[d] for d in staying}
    assert _pods(podrunner, namespace, staying) == pods_before
    if old_dlq:
        # The dead-lettered events moved to the new DLQ, where the depth counts them.
        new_dlq = spec["dlq"]["topic"]
        measured = depth.measure_dlq(kafka_admin, [old_dlq, new_dlq])
        assert (measured[old_dlq].total, measured[new_dlq].total) == (0, BATCH)
        wait_for(
            lambda: (_status(kubectl, namespace).get("dlq") or {}).get("depth") == BATCH,
            30,
            "status.dlq.depth of the new DLQ",
        )


def _draining_condition(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    conditions = _status(kubectl, namespace).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Draining"), {})


def test_a_drain_ends_only_once_the_tier_workers_follow_the_new_topology(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    k8s_api: Any,
    cleanup_topics: list[str],
    service: Service,
) -> None:
    """Tier workers follow a mounted ConfigMap, which the kubelet rewrites when it gets to it
    (a minute or more, not bounded). Here the podrunner holds the old file back: a removed
    middle tier's topic is empty and settled, yet its drain waits, saying for whom, as long as
    retry-1's worker still runs the old topology (and would forward to the removed topic).
    Once the file is rewritten, the worker follows (no restart), the drain ends, and events go
    retry-1 -> retry-3 -> DLQ, none to the removed tier's topic."""
    service.succeed_from = 99  # every attempt fails retriably: through every tier to the DLQ
    source = make_topic("orders")
    group = f"svc-{unique}"
    prefix = f"{group}.{source}"
    doc = pipeline(
        "orders", kafka_bootstrap, source, group,
        tiers=_tiers(("retry-1", 1), ("retry-2", 1), ("retry-3", 1)),
        handler={"http": {"url": service.url, "timeoutSeconds": 5}},
    )  # fmt: skip
    cleanup_topics.extend(f"{prefix}.{n}" for n in ("retry-1", "retry-2", "retry-3", "dlq"))
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=120)
    staying = ["orders-retry-1", "orders-retry-3"]
    pods_before = _pods(podrunner, namespace, staying)
    assert all(pods_before.values()), pods_before
    generations = _tier_generations(kubectl, namespace)

    podrunner.configmap_sync_s = 3600.0  # the kubelet is slow today: the next sync is the last
    time.sleep(podrunner.tick + 2.5)
    doc["spec"]["tiers"] = _tiers(("retry-1", 1), ("retry-3", 1))
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=90)
    removed = f"{prefix}.retry-2"
    wait_for(
        lambda: (
            [(d["topic"], d.get("lag")) for d in _status(kubectl, namespace).get("draining") or []]
            == [(removed, 0)]
        ),
        60,
        "the removed tier draining, measured empty",
    )
    # Well past the settle time (3 s here), the drain waits for retry-1's worker.
    time.sleep(15)
    (drain,) = _status(kubectl, namespace)["draining"]
    assert (drain["topic"], drain["lag"]) == (removed, 0)
    message = _draining_condition(kubectl, namespace)["message"]
    assert "waiting for workers to follow the new topology: retry-1: partitions 0" in message

    podrunner.sync_volumes()  # the kubelet gets to it
    wait_for(
        lambda: not _status(kubectl, namespace).get("draining"),
        60,
        "the drain ended once the workers followed",
    )
    assert _draining_condition(kubectl, namespace)["status"] == "False"
    keys = [f"late-{i}" for i in range(BATCH)]
    produce_ids(kafka_bootstrap, source, keys)
    from kafka_retry.sdk import RetryingConsumer

    def live_lane(event: Any) -> None:
        raise TimeoutError("upstream timed out")

    sdk = RetryingConsumer.from_configmap(
        f"{namespace}/orders", live_lane, api_client=k8s_api, follow_interval_s=1.0,
        extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
    )  # fmt: skip
    with Running(sdk):
        wait_for(
            lambda: _keys(kafka_bootstrap, f"{prefix}.dlq") >= set(keys),
            90,
            "the events through retry-1 and retry-3 to the DLQ",
        )
    assert not _keys(kafka_bootstrap, removed), "an event reached the removed tier's topic"
    attempts = sorted((c.key, c.tier) for c in service.snapshot())
    assert attempts == sorted((k, t) for k in keys for t in ("retry-1", "retry-3")), attempts
    assert _pods(podrunner, namespace, staying) == pods_before, "a tier worker restarted"
    assert {d: _tier_generations(kubectl, namespace)[d] for d in staying} == {
        d: generations[d] for d in staying
    }
