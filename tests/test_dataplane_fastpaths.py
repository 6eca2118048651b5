"""The per-event fast paths agree with the plain reference code they stand in for: a
`HeaderReader` of some fields with `parse_headers`, `Router.forward_headers` with
`build_headers(forward_state(...))`, and a Classifier's per-type shortcut with its full
judgement. (bench/tier_throughput.py measures what they save.)"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kafka_retry import headers as h
from kafka_retry.classification import Classifier, Failure, _safe_stack, qualified_name
from kafka_retry.errors import HttpStatusError, NonRetriableError, RetriableError
from kafka_retry.model import Classification, Handler, PythonHandler, ResolvedTier, Topology
from kafka_retry.routing import Origin, Router, Stage

OUR_KEYS = [
    h.ORIGINAL_TOPIC, h.ORIGINAL_PARTITION, h.ORIGINAL_OFFSET, h.ORIGINAL_TIMESTAMP, h.PIPELINE,
    h.CONSUMER_GROUP, h.ATTEMPT, h.DUE, h.TIER, h.FAILED_AT, h.ERROR_CLASS, h.ERROR_MESSAGE,
    h.ERROR_STACK, h.RETRIABLE, h.DLQ_REASON, h.REPLAY_ID, h.REPLAY_SOURCE, "kafka-retry.x",
]  # fmt: skip
FIELDS = [
    "original_topic", "original_partition", "original_offset", "original_timestamp_ms",
    "pipeline", "consumer_group", "attempt", "due_ms", "tier", "failed_at_ms", "error_class",
    "error_message", "error_stack", "retriable", "dlq_reason", "replay_id",
]  # fmt: skip

values = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()),
    st.sampled_from([b" 7 ", b"+3", b"true", b"FALSE", b"\xff\xfe"]),
    st.binary(min_size=1000, max_size=5000),
)
header_lists = st.lists(
    st.tuples(st.one_of(st.sampled_from(OUR_KEYS), st.sampled_from(["trace", "k"])), values),
    max_size=24,
)


@settings(max_examples=400)
@given(header_lists, st.sets(st.sampled_from(FIELDS)))
def test_a_reader_of_some_fields_reads_them_as_parse_headers_does(
    raw: list[tuple[str, bytes | None]], fields: set[str]
) -> None:
    full = h.parse_headers(raw)
    some = h.HeaderReader(fields | {"attempt", "due_ms"}).parse(raw)
    assert some.original == full.original
    assert some.problems == full.problems
    for name in FIELDS:
        expected = getattr(full.state, name) if name in fields | {"attempt", "due_ms"} else None
        assert getattr(some.state, name) == expected
    # The same layout again takes the kept plan and reads the same.
    assert h.HeaderReader(fields | {"attempt", "due_ms"}).parse(list(raw)) == some


def _topology() -> Topology:
    tiers = [
        ResolvedTier(name=n, topic=f"t.{n}", delay_seconds=d, consumer_group=f"g.{n}")
        for n, d in (("retry-1", 5), ("retry-2", 60))
    ]
    return Topology(
        pipeline="shop/billing",
        bootstrap_servers="127.0.0.1:1",
        source_topic="orders",
        consumer_group="billing",
        tiers=tiers,
        dlq_topic="t.dlq",
        classification=Classification(),
        handler=Handler(python=PythonHandler(image="i", callable="m:f")),
    )


small = st.text(max_size=30)
failures = st.builds(Failure, st.booleans(), small, st.text(max_size=2000), st.text(max_size=6000))
origins = st.builds(
    Origin,
    small,
    st.none() | st.integers(0, 2**31 - 1),
    st.none() | st.integers(0, 2**63 - 1),
    st.none() | st.integers(0, 2**63 - 1),
)


@settings(max_examples=300)
@given(
    st.sampled_from([-1, 0, 1]),
    origins,
    st.none() | small,
    st.integers(0, h.MAX_ATTEMPT),
    failures,
    st.booleans(),
    st.integers(0, 2**50),
    st.lists(st.tuples(small, st.none() | st.binary(max_size=20)), max_size=3),
)
def test_forward_headers_equal_build_headers_of_forward_state(
    stage_index: int,
    origin: Origin,
    replay_id: str | None,
    attempt: int,
    failure: Failure,
    malformed: bool,
    now_ms: int,
    original: list[tuple[str, bytes | None]],
) -> None:
    topo = _topology()
    stage = (
        Stage.source(topo) if stage_index < 0 else Stage.tier(topo, topo.tiers[stage_index].name)
    )
    router = Router(topo, stage)
    route = router.malformed() if malformed else router.route(failure.retriable, now_ms)
    prior = h.RetryState(replay_id=replay_id)
    for _ in range(2):  # the second time from the encoder's kept texts
        fast = router.forward_headers(original, origin, prior, attempt, failure, route, now_ms)
        state = router.forward_state(
            origin=origin, prior=prior, attempt=attempt, failure=failure, route=route,
            now_ms=now_ms,
        )  # fmt: skip
        assert fast == h.build_headers(original, state)


class Custom(Exception):
    pass


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:
        return e


def _chained() -> BaseException:
    try:
        try:
            raise ValueError("inner")
        except ValueError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as e:
        return e


def test_classifying_by_type_agrees_with_the_full_judgement() -> None:
    cases = [
        ConnectionError("c"), ValueError("v"), Custom("x"), HttpStatusError(503),
        HttpStatusError(404), RetriableError("r"), NonRetriableError("n"), TimeoutError(),
        KeyError("k"),
    ]  # fmt: skip
    for rules in (
        Classification(),
        Classification(
            retriable=["ValueError"], non_retriable=["Custom"], unknown_errors="Retriable"
        ),
    ):
        classifier = Classifier(rules)
        for exc in [*(_raise(e) for e in cases), _chained()]:
            expected = Failure(
                Classifier(rules).is_retriable(exc),
                qualified_name(type(exc)),
                str(exc),
                _safe_stack(exc),
            )
            for _ in range(2):  # the second time from what the classifier kept
                assert classifier.classify(exc) == expected
