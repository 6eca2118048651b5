"""Units of the data plane that need no broker: offset frontier, client settings, Event
decoding, handler loading, routing, topology sources (and the ConfigMap on the real API)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from kafka_retry import decision, poison, topology_tag
from kafka_retry import headers as h
from kafka_retry.assignment import Assignment
from kafka_retry.classification import Failure
from kafka_retry.client_log import ClientLog
from kafka_retry.decision import DEAD_LETTER, HANDLE, HOLD
from kafka_retry.delay import DelayGate, WindowLimits
from kafka_retry.errors import NonRetriableError, PayloadDecodeError
from kafka_retry.event import Event
from kafka_retry.handlers import HandlerLoadError, load_callable
from kafka_retry.inflight import Call, InFlight
from kafka_retry.kafka_config import (
    client_settings_from_env,
    consumer_config,
    describe,
    incremental_rebalance,
    producer_config,
)
from kafka_retry.model import (
    Classification,
    Handler,
    PythonHandler,
    ResolvedTier,
    Topology,
)
from kafka_retry.offsets import OffsetTracker
from kafka_retry.poison import HeadWatch
from kafka_retry.routing import DEAD_LETTERED, RETRIED, Origin, Router, Stage
from kafka_retry.topology_source import (
    TopologyNotFound,
    configmap_name,
    topology_from_configmap,
    topology_from_env,
    topology_from_file,
)
from kafka_retry.worker import build_worker


def _topology(**kw: Any) -> Topology:
    base: dict[str, Any] = {
        "pipeline": "shop/billing-orders",
        "bootstrap_servers": "127.0.0.1:1",
        "source_topic": "orders",
        "consumer_group": "billing",
        "tiers": [
            ResolvedTier(
                name="retry-1", topic="b.o.retry-1", delay_seconds=30, consumer_group="b.o.retry-1"
            ),
            ResolvedTier(
                name="retry-2", topic="b.o.retry-2", delay_seconds=300, consumer_group="b.o.retry-2"
            ),
        ],
        "dlq_topic": "b.o.dlq",
        "classification": Classification(),
        "handler": Handler(python=PythonHandler(image="x", callable="dataplane_handlers:record")),
    }
    base.update(kw)
    return Topology(**base)


# ---------------------------------------------------------------- offsets


@given(st.integers(1, 40).flatmap(lambda n: st.permutations(list(range(n)))))
def test_frontier_advances_over_the_finished_prefix_only(order: list[int]) -> None:
    tracker = OffsetTracker()
    offsets = [100 + 3 * i for i in range(len(order))]  # gaps, as after compaction
    tickets = [tracker.begin(("t", 0), o) for o in offsets]
    finished: set[int] = set()
    for i in order:
        OffsetTracker.finish(tickets[i])
        finished.add(i)
        prefix = 0
        while prefix in finished:
            prefix += 1
        got = tracker.frontiers([("t", 0)])
        if prefix == 0:
            assert got == []
        else:
            assert got == [("t", 0, offsets[prefix - 1] + 1)]
    assert tracker.in_flight() == 0


def test_late_ack_after_revoke_changes_nothing() -> None:
    tracker = OffsetTracker()
    old = tracker.begin(("t", 0), 5)
    tracker.forget([("t", 0)])
    fresh = tracker.begin(("t", 0), 3)  # re-read from the committed offset after reassign
    OffsetTracker.finish(old)
    assert tracker.take_advanced() == []
    OffsetTracker.finish(fresh)
    assert tracker.take_advanced() == [("t", 0, 4)]
    assert tracker.take_advanced() == []  # reported once


# ---------------------------------------------------------------- client settings


def test_client_settings_from_env() -> None:
    env = {
        "KAFKA_CLIENT_sasl.password": "s3cret",
        "KAFKA_CLIENT_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_CLIENT_": "ignored",
        "OTHER": "x",
    }
    assert client_settings_from_env(env) == {
        "sasl.password": "s3cret",
        "security.protocol": "SASL_SSL",
    }


def test_delivery_guarantee_settings_cannot_be_overridden() -> None:
    extra = {
        "enable.auto.offset.store": True,
        "enable.idempotence": False,
        "acks": "1",
        "group.id": "x",
        "max.poll.interval.ms": 6000,
        "allow.auto.create.topics": True,
    }
    c = consumer_config("b:9092", "grp", extra, pauses_often=True)
    assert c["enable.auto.offset.store"] is False and c["group.id"] == "grp"
    assert c["max.poll.interval.ms"] == 6000
    assert c["queued.max.messages.kbytes"] and c["fetch.queue.backoff.ms"]
    assert incremental_rebalance(c)
    p = producer_config("b:9092", extra)
    assert p["enable.idempotence"] is True and p["acks"] == "all"
    assert p["allow.auto.create.topics"] is False, "our producers never create a topic"
    assert "max.poll.interval.ms" not in p
    kip848 = consumer_config("b:9092", "grp", {"group.protocol": "consumer"})
    assert "partition.assignment.strategy" not in kip848 and incremental_rebalance(kip848)
    assert "session.timeout.ms" not in kip848  # the broker's to set under KIP-848


def test_every_consumer_reads_committed_records_only() -> None:
    """An exactly-once pipeline's aborted forwards must stay invisible to every reader, whatever
    the pipeline's Secret says."""
    c = consumer_config("b:9092", "grp", {"isolation.level": "read_uncommitted"})
    assert c["isolation.level"] == "read_committed"


def test_exactly_once_workers_commit_offsets_only_in_transactions_under_a_stable_id() -> None:
    exactly_once = _topology().model_copy(update={"delivery": "ExactlyOnce"})
    pod = build_worker(exactly_once, "retry-1", handler=lambda e: None, instance_id="p-r1-0")
    assert pod._consumer_config["enable.auto.commit"] is False
    assert pod._producer_config["transactional.id"] == "kafka-retry.b.o.retry-1.p-r1-0"
    assert pod._producer_config["transaction.timeout.ms"] == 10_000
    again = build_worker(exactly_once, "retry-1", handler=lambda e: None, instance_id="p-r1-0")
    assert again._producer_config["transactional.id"] == pod._producer_config["transactional.id"]
    plain = build_worker(_topology(), "retry-1", handler=lambda e: None, instance_id="p-r1-0")
    assert plain._consumer_config["enable.auto.commit"] is True
    assert "transactional.id" not in plain._producer_config


def test_consumers_rejoin_quickly_and_statically_when_given_an_instance_id() -> None:
    c = consumer_config("b:9092", "grp")
    assert c["session.timeout.ms"] == 10_000 and c["heartbeat.interval.ms"] == 1_000
    assert "group.instance.id" not in c
    static = consumer_config("b:9092", "grp", pauses_often=True, instance_id="billing-r1-0")
    assert static["group.instance.id"] == "billing-r1-0"
    assert "group.instance.id" not in producer_config("b:9092", static)


def test_client_log_keeps_the_first_line_of_a_kind_then_counts() -> None:
    logger = logging.getLogger("test.client_log")
    logger.setLevel(logging.INFO)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger.addHandler(Keep())
    clock = [0.0]
    client = ClientLog(logger, interval_s=60, now=lambda: clock[0])
    for i in range(100):
        clock[0] = i * 0.05
        client.log(logging.ERROR, "FAIL [%s]: connect to 10.0.0.%d failed", "c-1", i % 7)
    client.log(logging.ERROR, "another kind")
    clock[0] = 61.0
    client.log(logging.ERROR, "FAIL [%s]: connect to 10.0.0.%d failed", "c-1", 3)
    assert seen == [
        "FAIL [c-1]: connect to 10.0.0.0 failed",
        "another kind",
        "FAIL [c-1]: connect to 10.0.0.3 failed (99 more like this in the last 61s)",
    ]


def test_secrets_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = {"sasl.password": "hunter2-secret", "sasl.username": "svc"}
    build_worker(_topology(), "retry-1", handler=lambda e: None, client_settings=settings)
    assert "hunter2-secret" not in caplog.text
    assert "sasl.password=<set>" in caplog.text
    assert "hunter2" not in describe({"sasl.password": "hunter2"}, frozenset({"sasl.password"}))


# ---------------------------------------------------------------- Event


def _event(value: bytes | None) -> Event:
    return Event(
        key=None,
        value=value,
        headers=(("a", b"1"), ("a", b"2")),
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=None,
        attempt=1,
        tier=None,
        pipeline="p",
        consumer_group="g",
        original_topic="t",
        original_partition=0,
        original_offset=0,
        original_timestamp_ms=None,
    )


def test_event_json_and_decode_errors_are_non_retriable() -> None:
    assert _event(b'{"id": 1}').json() == {"id": 1}
    assert _event(b"x").header("a") == b"2"
    for value in (b"\xff\xfe", b"{not json", None):
        with pytest.raises(PayloadDecodeError) as info:
            _event(value).json()
        assert isinstance(info.value, NonRetriableError)


# ---------------------------------------------------------------- handler loading


def test_load_callable() -> None:
    assert load_callable("json:dumps")({"a": 1}) == '{"a": 1}'  # type: ignore[arg-type]
    assert load_callable("os.path:join.__call__") is not None
    for bad in ("nomodule_xyz:f", "json:no_such_attr", "json", "json:__doc__"):
        with pytest.raises(HandlerLoadError):
            load_callable(bad)


# ---------------------------------------------------------------- routing


def test_routes_through_the_tiers_to_the_dlq() -> None:
    topo = _topology()
    live = Router(topo, Stage.source(topo))
    r = live.route(True, now_ms=1_000)
    assert (r.topic, r.outcome, r.due_ms) == ("b.o.retry-1", RETRIED, 31_000)
    r = live.route(False, now_ms=1_000)
    assert (r.topic, r.outcome, r.dlq_reason) == ("b.o.dlq", DEAD_LETTERED, h.REASON_NON_RETRIABLE)
    first = Router(topo, Stage.tier(topo, "retry-1"))
    assert first.route(True, now_ms=0).due_ms == 300_000
    last = Router(topo, Stage.tier(topo, "retry-2"))
    r = last.route(True, now_ms=0)
    assert (r.topic, r.dlq_reason, r.due_ms) == ("b.o.dlq", h.REASON_EXHAUSTED, None)
    state = last.forward_state(
        origin=Origin("orders", 2, 9, 5),
        prior=h.RetryState(replay_id="rp-1"),
        attempt=3,
        failure=Failure(True, "E", "m", "s"),
        route=r,
        now_ms=7,
    )
    assert state.replay_id == "rp-1" and state.tier == "retry-2" and state.attempt == 3
    assert state.consumer_group == "billing" and state.original_offset == 9


def test_a_refused_forward_is_trimmed_then_dead_lettered_saying_why() -> None:
    topo = _topology()
    router = Router(topo, Stage.tier(topo, "retry-1"))
    r = router.route(True, now_ms=0)
    ours = router.forward_headers(
        (), Origin("orders", 0, 1, 2), h.RetryState(), 2, Failure(True, "E", "m" * 900, "s" * 4000),
        r, 0,
    )  # fmt: skip
    # too large: the same tier, our headers trimmed (the stack dropped, the message cut)
    topic, trimmed, outcome = router.refused(r.topic, ours, "too large", too_large=True) or ()
    assert (topic, outcome) == ("b.o.retry-2", None)
    assert h.is_trimmed(trimmed) and not h.is_trimmed(ours)
    assert len(dict(trimmed)[h.ERROR_MESSAGE]) <= h.MAX_TEXT_BYTES
    # still too large: the DLQ, saying why; refused for another reason: the DLQ at once
    for refused, reason in ((trimmed, h.REASON_TOO_LARGE), (ours, h.REASON_FORWARD_REFUSED)):
        topic, dead, outcome = router.refused(r.topic, refused, "nope", refused is trimmed) or ()
        assert (topic, outcome) == ("b.o.dlq", DEAD_LETTERED)
        parsed = h.parse_headers(dead).state
        assert parsed.dlq_reason == reason and parsed.retriable is False and parsed.due_ms is None
        assert parsed.error_message and parsed.error_message.startswith("b.o.retry-2 refused")
        assert parsed.attempt == 2 and parsed.original_offset == 1
    # refused by the DLQ itself: nowhere left to go
    assert router.refused("b.o.dlq", trimmed, "nope", too_large=True) is None


# ---------------------------------------------------------------- topology sources


def test_topology_from_env_and_file(tmp_path: Path) -> None:
    topo = _topology()
    assert topology_from_env({"KAFKA_RETRY_TOPOLOGY": topo.to_json()}) == topo
    with pytest.raises(TopologyNotFound):
        topology_from_env({})
    path = tmp_path / "topology.json"
    path.write_text(topo.to_json())
    assert topology_from_file(path) == topo


def test_topology_from_configmap(k8s_api: Any, namespace: str) -> None:
    from kubernetes import client

    topo = _topology(pipeline=f"{namespace}/billing-orders")
    client.CoreV1Api(k8s_api).create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=configmap_name("billing-orders")),
            data={"topology.json": topo.to_json()},
        ),
    )
    assert topology_from_configmap(topo.pipeline, api_client=k8s_api) == topo
    assert topology_from_configmap("billing-orders", namespace, api_client=k8s_api) == topo


def test_worker_cli_reads_a_topology_file_and_rejects_an_unknown_tier(tmp_path: Path) -> None:
    from kafka_retry.cli import main

    path = tmp_path / "topology.json"
    path.write_text(_topology().to_json())
    assert main(["worker", "--tier", "no-such-tier", "--topology-file", str(path)]) == 2
    assert main(["worker", "--tier", "retry-1", "--topology-file", str(tmp_path / "none")]) == 2


def test_poison_marks_count_the_starts_of_the_event_that_stops_the_worker() -> None:
    tp = ("t", 0)
    watch = HeadWatch()
    watch.assigned(tp, -1001, None)  # a new group: the first event is marked once
    assert watch.watching and watch.before_handler(tp, 0) == 1
    assert watch.before_handler(tp, 1) is None and not watch.watching
    # the run stopped with event 0 marked: the next is careful, marking every event
    watch.assigned(tp, 0, poison.mark(0, 1))
    assert [watch.before_handler(tp, o) for o in (0, 1, 2)] == [2, 1, 1]
    watch.settled()  # a batch completed: careful no more
    assert not watch.watching
    # event 2 stopped it: its count grows run by run, past POISON_STARTS it is poison
    for starts in range(1, poison.POISON_STARTS + 1):
        watch.assigned(tp, 2, poison.mark(2, starts))
        assert watch.before_handler(tp, 2) == starts + 1
        watch.forget([tp])
    # a mark of another offset (progress was committed since) counts nothing
    watch.assigned(tp, 5, poison.mark(2, 3))
    assert watch.before_handler(tp, 5) == 1
    assert poison.starts_at("other metadata", 5) == 0
    # A mark also names the topology run (topology_tag.py): both read back.
    tagged = topology_tag.with_tag(poison.mark(2, 2), "abc")
    assert poison.starts_at(tagged, 2) == 2 and topology_tag.tag_of(tagged) == "abc"
    assert topology_tag.with_tag(tagged, "def") == f"{poison.mark(2, 2)} topology=def"
    assert topology_tag.tag_of(poison.mark(2, 2)) is None


# ---------------------------------------------------------------- decision and holding


def _parsed(due_ms: int | None = None, problems: tuple[str, ...] = ()) -> h.ParsedHeaders:
    return h.ParsedHeaders((("trace", b"t"),), h.RetryState(due_ms=due_ms), problems)


def test_tier_decision_holds_handles_or_dead_letters_by_the_broker_clock() -> None:
    delay = 5_000
    # The append time (rounded up to the next ms) + the delay, whatever due-ms says.
    assert decision.on_tier(_parsed(due_ms=0), 1_000, delay, 3_000) == (HOLD, 6_001, ())
    assert decision.on_tier(_parsed(due_ms=10**12), 1_000, delay, 6_001) == (HANDLE, 6_001, ())
    # No usable timestamp: the header decides; too far ahead is absurd.
    assert decision.on_tier(_parsed(due_ms=4_000), None, delay, 3_000) == (HOLD, 4_000, ())
    verdict, _, problems = decision.on_tier(_parsed(due_ms=9_000), None, delay, 3_000)
    assert verdict == DEAD_LETTER and h.DUE in problems[0]
    assert decision.on_tier(_parsed(problems=("bad",)), 1_000, delay, 9_000) == (
        DEAD_LETTER, None, ("bad",),
    )  # fmt: skip
    assert decision.not_before_ms(1_000, delay, 3_000) == 6_001
    assert decision.not_before_ms(None, delay, 3_000) == 0  # read its headers now


def test_live_lane_decision_handles_unless_headers_are_unreadable() -> None:
    assert decision.on_live_lane(_parsed()) == (HANDLE, None, ())
    assert decision.on_live_lane(_parsed(problems=("name",))) == (DEAD_LETTER, None, ("name",))


def test_a_tier_admits_by_its_headers_the_live_lane_by_the_record_alone() -> None:
    """The two stage policies (decision.py): what a record's headers may say on each."""
    topo = _topology()
    tier = decision.policy_for(Stage.tier(topo, "retry-2"))
    lane = decision.policy_for(Stage.source(topo))
    tp, now = ("b.o.retry-2", 0), 400_000
    state = h.RetryState(
        original_topic="orders", original_partition=3, original_offset=7,
        original_timestamp_ms=5, attempt=4,
    )  # fmt: skip
    raw = [("trace", b"t"), *h.encode_state(state)]
    admitted = tier.admit(tier.read(raw), tp, 9, 1_000, now)
    assert admitted[:3] == (HANDLE, 1_000 + 1 + 300_000, ())
    assert (admitted.attempt, admitted.origin) == (5, Origin("orders", 3, 7, 5))
    held = tier.admit(tier.read(raw), tp, 9, 1_000, 1_000)
    assert held[:2] == (HOLD, 301_001)
    # No headers of ours: the tier's position says how often it failed; this record is first.
    plain = tier.admit(tier.read([("trace", b"t")]), tp, 9, 1_000, now)
    assert (plain.verdict, plain.attempt, plain.origin) == (HANDLE, 3, Origin(*tp, 9, 1_000))
    bad = tier.admit(tier.read([(h.ATTEMPT, b"x")]), tp, 9, 1_000, now)
    assert (bad.verdict, bad.attempt) == (DEAD_LETTER, 2)  # the attempts failed so far
    assert h.ATTEMPT in bad.problems[0]
    # The live lane: every header is the event's own, ours too; due now, the first attempt.
    parsed = lane.read(raw)
    assert parsed == (tuple(raw), h.RetryState(), ())
    admitted = lane.admit(parsed, ("orders", 1), 9, 1_000, now)
    assert admitted == (HANDLE, None, (), h.RetryState(), 1, Origin("orders", 1, 9, 1_000))
    unreadable = lane.admit(parsed._replace(problems=("name",)), ("orders", 1), 9, None, now)
    assert unreadable[:3] == (DEAD_LETTER, None, ("name",)) and unreadable.attempt == 0
    assert (tier.holds, tier.drain_outcome, lane.holds, lane.drain_outcome) == (
        True, RETRIED, False, DEAD_LETTERED,
    )  # fmt: skip
    # A new topology: the tier follows its own row; gone or on another topic, it has none.
    assert tier.stage_in(topo) == Stage.tier(topo, "retry-2")
    assert tier.stage_in(_topology(tiers=topo.tiers[:1])) is None
    moved = [topo.tiers[0], topo.tiers[1].model_copy(update={"topic": "elsewhere"})]
    assert tier.stage_in(_topology(tiers=moved)) is None
    assert lane.stage_in(_topology(source_topic="orders-2")).topic == "orders-2"


class _Msg:
    def __init__(self, offset: int, size: int = 100) -> None:
        self.offset, self._value = offset, b"x" * size

    def value(self) -> bytes:
        return self._value

    def key(self) -> None:
        return None


class _Consumer:
    """What the gate asks of the consumer, recorded (the real thing: tests/test_dataplane_*)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []

    def pause(self, tps: list[Any]) -> None:
        self.calls.append(("pause", [(t.topic, t.partition) for t in tps]))

    def resume(self, tps: list[Any]) -> None:
        self.calls.append(("resume", [(t.topic, t.partition) for t in tps]))

    def offsets_for_times(self, tps: list[Any], timeout: float) -> list[Any]:
        return tps


def test_waiting_events_are_taken_in_order_as_they_fall_due_never_sought() -> None:
    consumer = _Consumer()
    gate = DelayGate(consumer)
    a, b = ("t", 0), ("t", 1)
    for offset, due in ((0, 1_000), (1, 1_010), (2, 1_050)):
        gate.hold(a, due, _Msg(offset))
    gate.hold(b, 5_000, _Msg(0))
    assert gate.waiting(a) and len(gate) == 2 and gate.poll_timeout(900, 1.0) == 0.1
    gate.pause_idle(900)  # b's head is due in 4.1 s: no fetching meanwhile; a's is near
    assert consumer.calls == [("pause", [b])]
    assert [m.offset for _, m in gate.take_due(1_010)] == [0, 1]
    assert gate.take_due(1_020) == []  # takes are at least TAKE_EVERY_MS apart
    assert [(tp, m.offset) for tp, m in gate.take_due(5_000)] == [(a, 2), (b, 0)]
    assert consumer.calls[-1] == ("resume", [b]) and len(gate) == 0 and gate.events == 0


def test_full_windows_pause_until_half_empty_and_forget_resumes() -> None:
    consumer = _Consumer()
    gate = DelayGate(consumer, WindowLimits(max_events=4, max_bytes=10**9))
    a = ("t", 0)
    for offset in range(4):
        gate.hold(a, 1_000 + offset, _Msg(offset))
    assert consumer.calls == [("pause", [a])] and gate.paused() == {a}
    assert [m.offset for _, m in gate.take_due(1_001)] == [0, 1]  # down to half: resumed
    assert consumer.calls[-1] == ("resume", [a]) and gate.paused() == set()
    gate.pause_idle(0)  # head due in over a second
    gate.forget([a])  # revoked: dropped, and librdkafka's pause cleared
    assert consumer.calls[-1] == ("resume", [a]) and len(gate) == 0 and gate.bytes == 0
    by_bytes = DelayGate(consumer, WindowLimits(max_events=100, max_bytes=3 * (100 + 512)))
    for offset in range(3):
        by_bytes.hold(a, 1_000, _Msg(offset))
    assert by_bytes.paused() == {a}


class _AssigningConsumer(_Consumer):
    def incremental_assign(self, tps: list[Any]) -> None:
        self.calls.append(("assign", [(t.topic, t.partition) for t in tps]))

    def committed(self, tps: list[Any], timeout: float) -> list[Any]:
        return []


def test_a_stall_leaves_the_gates_pauses_to_the_gate_and_a_release_forgets_everything() -> None:
    consumer = _AssigningConsumer()
    parts = Assignment(incremental=True)
    parts.gate = DelayGate(consumer, WindowLimits(max_events=1, max_bytes=10**9))
    a, b = ("t", 0), ("t", 1)
    parts.assign(consumer, [TopicPartition(*a), TopicPartition(*b)])
    parts.tracker.begin(a, 0)
    assert parts.stall(consumer) == 2 and consumer.calls[-1] == ("pause", [a, b])
    parts.gate.hold(b, 10**15, _Msg(0))  # the windows fill while stalled: the gate pauses b
    parts.unstall(consumer)
    assert consumer.calls[-1] == ("resume", [a]) and parts.gate.paused() == {b}
    parts.leaving([a, b])
    parts.release([a, b])
    assert not parts.partitions and not parts.stalled and len(parts.gate) == 0
    assert parts.tracker.in_flight() == 0


# --------------------------------------------------------------------------- concurrent calls


def test_in_flight_bounds_calls_per_partition_and_by_key() -> None:
    """`InFlight` starts a call only when its partition has a free slot and (by key) its key
    none in flight; `started()` (the deadline watchdog's view) is the oldest running call's
    start, 0 when none runs; outcomes come back on the caller's thread, failures included."""
    gates = {n: threading.Event() for n in range(4)}
    running: list[int] = []

    def handler(event: Event) -> None:
        running.append(event.offset)
        gates[event.offset].wait(10)
        if event.offset == 2:
            raise ValueError("bad data")

    done: list[tuple[int, str | None]] = []
    caller = threading.get_ident()

    def on_done(call: Call) -> None:
        assert threading.get_ident() == caller
        done.append((call.event.offset, type(call.error).__name__ if call.error else None))

    calls = InFlight(handler, 2, by_key=True, on_done=on_done)
    tp = ("t", 0)
    ev = {n: dataclasses.replace(_event(None), offset=n) for n in range(4)}
    assert calls.started() == 0.0
    calls.submit(tp, b"a", ev[0], None)
    calls.submit(tp, b"b", ev[1], None)
    deadline = time.monotonic() + 10
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(running) == [0, 1]
    assert calls.started() > 0
    gates[1].set()
    calls.submit(tp, b"c", ev[2], None)  # the partition was full: waits for offset 1's outcome
    assert done == [(1, None)]
    gates[2].set()
    gates[0].set()
    calls.submit(tp, b"a", ev[3], None)  # key a: waits for offset 0's outcome
    assert (0, None) in done
    gates[3].set()
    calls.settle()
    assert sorted(done) == [(0, None), (1, None), (2, "ValueError"), (3, None)]
    assert calls.calls == 0 and calls.started() == 0.0
    calls.close()


def test_a_transaction_call_timing_out_again_and_again_is_given_up_for_a_restart() -> None:
    """An abort whose retriable timeouts never end (seen after a broker restart) must not hold
    the worker forever: after its budget it is fatal, so the process restarts and the new
    producer's init_transactions fences this one."""
    from confluent_kafka import KafkaError, KafkaException

    from kafka_retry.forwarding import FatalProducerError, Forwarder

    class Stuck:
        calls = 0

        def init_transactions(self, timeout: float) -> None:
            pass

        def abort_transaction(self, timeout: float) -> None:
            Stuck.calls += 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))

    forwarder = Forwarder({"transactional.id": "t"}, producer=Stuck())
    forwarder.in_transaction = True
    with pytest.raises(FatalProducerError, match="did not complete"):
        forwarder._txn_call(Stuck().abort_transaction, 0.01, give_up_s=0.05)
    assert Stuck.calls >= 2, "retried before giving up"
    assert forwarder.fatal is not None, "shutdown must not try the transaction again"


_STUCK_CALL = """
import sys, threading, time
from kafka_retry.forwarding import Forwarder
from kafka_retry.watchdog import EXIT_TRANSACTION_STUCK, Watch, Watchdog

class Producer:  # librdkafka#5456: send_offsets_to_transaction can block past its timeout
    def init_transactions(self, timeout): pass
    def send_offsets_to_transaction(self, offsets, metadata, timeout):
        if sys.argv[1] == "stuck":
            threading.Event().wait()

forwarder = Forwarder({"transactional.id": "t"}, producer=Producer())
Watchdog([Watch("a transaction call", 0.5, lambda: forwarder.call_started,
                EXIT_TRANSACTION_STUCK, "for a restart")]).start()
forwarder._txn_call(Producer().send_offsets_to_transaction, [], None, 0.1)
time.sleep(1.5)  # returned: the watchdog must not fire between calls
"""


@pytest.mark.parametrize("call", ["stuck", "returns"])
def test_a_transaction_call_blocked_past_its_deadline_stops_the_process(call: str) -> None:
    """A transaction call that never returns (inside librdkafka, past its own timeout) stops
    the worker's process for a restart, whose producer fences the stuck one; one that returns
    is not watched any more."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _STUCK_CALL, call], capture_output=True, text=True, timeout=60
    )
    if call == "stuck":
        assert done.returncode == 5, done.stderr
        assert "a transaction call overran its deadline of 0.5s" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
