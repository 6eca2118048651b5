"""Events through the live lane, the tiers and the DLQ, on the real broker.

Delays are 1-2 s; assertions are about order and the due times in the events, never about
how long something took."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from dataplane_support import (
    FAST_CONSUMER,
    Recorder,
    Running,
    make_topology,
    produce,
    produce_ids,
    read_topic,
    wait_for,
)
from kafka_retry import headers as h
from kafka_retry.errors import NonRetriableError, RetriableError
from kafka_retry.event import Event
from kafka_retry.sdk import RetryingConsumer
from kafka_retry.worker import build_worker


def _always_retriable(event: Event) -> None:
    raise RetriableError("upstream is down")


def test_retriable_failure_travels_tiers_to_dlq_never_early(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1), ("retry-2", 2)))
    live, tier1, tier2 = (
        Recorder(_always_retriable),
        Recorder(_always_retriable),
        Recorder(_always_retriable),
    )
    sdk = RetryingConsumer(topo, live, extra_config=FAST_CONSUMER, use_env=False)
    w1 = build_worker(topo, "retry-1", handler=tier1, client_settings=FAST_CONSUMER)
    w2 = build_worker(topo, "retry-2", handler=tier2, client_settings=FAST_CONSUMER)
    with Running(sdk), Running(w1), Running(w2):
        produce_ids(kafka_bootstrap, topo.source_topic, ["a", "b"])
        dlq = read_topic(kafka_bootstrap, topo.dlq_topic, expect=2)

    assert sorted(r.id for r in dlq) == ["a", "b"]
    assert sorted(live.ids()) == sorted(tier1.ids()) == sorted(tier2.ids()) == ["a", "b"]
    for r in dlq:
        # key, value and the original header are carried unchanged
        assert r.key == r.id.encode()
        assert json.loads(r.value or b"") == {"id": r.id}
        assert h.split(r.headers)[0] == [("trace", r.id.encode())]
        assert r.header(h.ORIGINAL_TOPIC) == topo.source_topic
        assert r.header(h.ORIGINAL_PARTITION) == "0"
        assert r.header(h.ORIGINAL_OFFSET) in ("0", "1")
        assert r.header(h.ORIGINAL_TIMESTAMP) is not None
        assert r.header(h.CONSUMER_GROUP) == topo.consumer_group
        assert r.header(h.PIPELINE) == topo.pipeline
        assert r.header(h.ATTEMPT) == "3"
        assert r.header(h.TIER) == "retry-2"
        assert r.header(h.ERROR_CLASS) == "kafka_retry.errors.RetriableError"
        assert r.header(h.ERROR_MESSAGE) == "upstream is down"
        assert "RetriableError" in (r.header(h.ERROR_STACK) or "")
        assert r.header(h.RETRIABLE) == "true"
        assert r.header(h.DLQ_REASON) == h.REASON_EXHAUSTED
        assert r.header(h.DUE) is None
        # our headers appear once each: replaced on every hop, not accumulated
        ours = [k for k, _ in h.split(r.headers)[1]]
        assert len(ours) == len(set(ours))

    live_at = {c.id: c.at_ms for c in live.calls}
    for c in tier1.calls:
        assert c.attempt == 2 and c.tier == "retry-1"
        assert c.due_ms is not None and c.due_ms >= live_at[c.id] + 1000
        assert c.at_ms >= c.due_ms, "tier 1 processed an event before it was due"
        assert c.event.original_topic == topo.source_topic
        assert c.event.last_error_class == "kafka_retry.errors.RetriableError"
    t1_at = {c.id: c.at_ms for c in tier1.calls}
    for c in tier2.calls:
        assert c.attempt == 3 and c.tier == "retry-2"
        assert c.due_ms is not None and c.due_ms >= t1_at[c.id] + 2000
        assert c.at_ms >= c.due_ms, "tier 2 processed an event before it was due"


def test_success_on_second_attempt_never_reaches_dlq(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))
    live = Recorder(_always_retriable)
    tier1 = Recorder()  # succeeds
    sdk = RetryingConsumer(topo, live, extra_config=FAST_CONSUMER, use_env=False)
    w1 = build_worker(topo, "retry-1", handler=tier1, client_settings=FAST_CONSUMER)
    with Running(sdk), Running(w1):
        produce_ids(kafka_bootstrap, topo.source_topic, ["x1", "x2", "x3"])
        wait_for(lambda: tier1.count() >= 3, 30, "tier 1 handled 3 events")
        assert w1.stats.handled == 3
    assert sorted(tier1.ids()) == ["x1", "x2", "x3"]
    assert all(c.attempt == 2 for c in tier1.calls)
    assert read_topic(kafka_bootstrap, topo.dlq_topic, expect=0) == []


def test_non_retriable_goes_straight_to_dlq(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))

    def policy(event: Event) -> None:
        if event.json()["id"] == "bad":
            raise NonRetriableError("invalid order")

    live = Recorder(policy)
    sdk = RetryingConsumer(topo, live, extra_config=FAST_CONSUMER, use_env=False)
    with Running(sdk):
        produce_ids(kafka_bootstrap, topo.source_topic, ["ok1", "bad", "ok2"])
        dlq = read_topic(kafka_bootstrap, topo.dlq_topic, expect=1)
        wait_for(lambda: sdk.stats.handled == 2, 10, "two successes")
    assert [r.id for r in dlq] == ["bad"]
    r = dlq[0]
    assert r.header(h.DLQ_REASON) == h.REASON_NON_RETRIABLE
    assert r.header(h.RETRIABLE) == "false"
    assert r.header(h.ATTEMPT) == "1"
    assert r.header(h.TIER) == h.SOURCE_STAGE
    assert r.header(h.ORIGINAL_OFFSET) == "1"
    assert read_topic(kafka_bootstrap, topo.tiers[0].topic, expect=0) == []


def test_live_lane_keeps_consuming_while_failed_events_wait(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 3),))
    first_failed = threading.Event()

    def policy(event: Event) -> None:
        if event.json()["id"] == "e0":
            first_failed.set()
            raise RetriableError("try later")

    live, tier1 = Recorder(policy), Recorder()
    sdk = RetryingConsumer(topo, live, extra_config=FAST_CONSUMER, use_env=False)
    w1 = build_worker(topo, "retry-1", handler=tier1, client_settings=FAST_CONSUMER)
    with Running(sdk), Running(w1):
        produce_ids(kafka_bootstrap, topo.source_topic, ["e0"])
        wait_for(first_failed.is_set, 20, "e0 failed on the live lane")
        produce_ids(kafka_bootstrap, topo.source_topic, [f"e{i}" for i in range(1, 21)])
        wait_for(lambda: tier1.count() >= 1, 30, "e0 retried on tier 1")
    retried_at = tier1.calls[0].at_ms
    live_after = [c for c in live.calls if c.id != "e0"]
    assert len(live_after) == 20
    # every later live event was handled before the failed one's retry came due
    assert all(c.at_ms <= retried_at for c in live_after)
    assert tier1.ids() == ["e0"]
    assert tier1.calls[0].at_ms >= (tier1.calls[0].due_ms or 0)


def test_two_pipelines_on_one_source_do_not_affect_each_other(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    source = make_topic("shared-src")
    failing = make_topology(kafka_bootstrap, make_topic, source_topic=source)
    healthy = make_topology(kafka_bootstrap, make_topic, source_topic=source)
    bad, good = Recorder(_always_retriable), Recorder()
    ids = [f"o{i}" for i in range(30)]
    with (
        Running(RetryingConsumer(failing, bad, extra_config=FAST_CONSUMER, use_env=False)),
        Running(RetryingConsumer(healthy, good, extra_config=FAST_CONSUMER, use_env=False)),
    ):
        produce_ids(kafka_bootstrap, source, ids)
        wait_for(lambda: good.count() >= 30 and bad.count() >= 30, 30, "both handled all")
        failing_tier = read_topic(kafka_bootstrap, failing.tiers[0].topic, expect=30)
    assert sorted(good.ids()) == sorted(ids)
    assert len(good.ids()) == 30  # nothing twice
    assert sorted(r.id for r in failing_tier) == sorted(ids)
    for topic in (*[t.topic for t in healthy.tiers], healthy.dlq_topic):
        assert read_topic(kafka_bootstrap, topic, expect=0) == []


def test_malformed_headers_and_undecodable_payloads_go_to_dlq_and_worker_continues(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))

    def needs_json(event: Event) -> None:
        event.json()

    tier1 = Recorder(needs_json)
    w1 = build_worker(topo, "retry-1", handler=tier1, client_settings=FAST_CONSUMER)
    tier_topic = topo.tiers[0].topic
    good_headers: list[tuple[str, bytes | None]] = [
        (h.ATTEMPT, b"1"),
        (h.ORIGINAL_TOPIC, topo.source_topic.encode()),
    ]
    cases: list[tuple[str, bytes, list[tuple[str, bytes | None]]]] = [
        ("attempt-text", b'{"id": "m1"}', [(h.ATTEMPT, b"one")]),
        ("due-binary", b'{"id": "m2"}', [(h.DUE, b"\xff\xfe\x00")]),
        ("due-huge-digits", b'{"id": "m3"}', [(h.DUE, b"9" * 5000)]),
        ("not-json", b"\xff not json", good_headers),
        ("negative-attempt", b'{"id": "m5"}', [(h.ATTEMPT, b"-12")]),  # clamped, handled
        ("due-far-future", b'{"id": "m6"}', [(h.DUE, b"99999999999999")]),  # clamped, handled
        ("good", b'{"id": "m7"}', good_headers),
    ]
    with Running(w1):
        produce(
            kafka_bootstrap,
            tier_topic,
            ((name.encode(), value, hdrs) for name, value, hdrs in cases),
        )
        dlq = read_topic(kafka_bootstrap, topo.dlq_topic, expect=4)
        wait_for(lambda: w1.stats.handled >= 3, 20, "the well-formed events handled")
    by_key = {(r.key or b"").decode(): r for r in dlq}
    assert sorted(by_key) == ["attempt-text", "due-binary", "due-huge-digits", "not-json"]
    for name in ("attempt-text", "due-binary", "due-huge-digits"):
        r = by_key[name]
        assert r.header(h.DLQ_REASON) == h.REASON_MALFORMED
        assert r.header(h.ERROR_CLASS) == "kafka_retry.MalformedHeaders"
        assert r.header(h.RETRIABLE) == "false"
    assert h.ATTEMPT in (by_key["attempt-text"].header(h.ERROR_MESSAGE) or "")
    assert h.DUE in (by_key["due-binary"].header(h.ERROR_MESSAGE) or "")
    bad_json = by_key["not-json"]
    assert bad_json.value == b"\xff not json"
    assert bad_json.header(h.ERROR_CLASS) == "kafka_retry.errors.PayloadDecodeError"
    assert bad_json.header(h.DLQ_REASON) == h.REASON_NON_RETRIABLE
    handled = {c.id: c for c in tier1.calls if c.id in ("m5", "m6", "m7")}
    assert sorted(handled) == ["m5", "m6", "m7"]
    assert handled["m5"].attempt == 1  # -12 clamped to 0 failed attempts
    # a due time far in the future is clamped to the record's timestamp + the tier delay
    m6 = handled["m6"]
    assert m6.due_ms is not None and m6.due_ms < 99999999999999
    assert m6.at_ms >= m6.due_ms
