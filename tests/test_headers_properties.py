"""Property tests of the header contract: reading untrusted headers never raises, original
headers pass through byte for byte, our headers round-trip, absurd values are clamped."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kafka_retry import headers as h

OUR_KEYS = [
    h.ORIGINAL_TOPIC,
    h.ORIGINAL_PARTITION,
    h.ORIGINAL_OFFSET,
    h.ORIGINAL_TIMESTAMP,
    h.PIPELINE,
    h.CONSUMER_GROUP,
    h.ATTEMPT,
    h.DUE,
    h.TIER,
    h.FAILED_AT,
    h.ERROR_CLASS,
    h.ERROR_MESSAGE,
    h.ERROR_STACK,
    h.RETRIABLE,
    h.DLQ_REASON,
    h.REPLAY_ID,
]

keys = st.one_of(st.sampled_from(OUR_KEYS), st.text(max_size=30), st.just("kafka-retry.other"))
values = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.integers().map(lambda i: str(i).encode()),
    st.binary(min_size=1000, max_size=6000),
)
header_lists = st.lists(st.tuples(keys, values), max_size=25)

small_text = st.text(max_size=40)
sane_state = st.builds(
    h.RetryState,
    original_topic=st.none() | small_text,
    original_partition=st.none() | st.integers(0, 2**31 - 1),
    original_offset=st.none() | st.integers(0, 2**63 - 1),
    original_timestamp_ms=st.none() | st.integers(0, 2**63 - 1),
    pipeline=st.none() | small_text,
    consumer_group=st.none() | small_text,
    attempt=st.none() | st.integers(0, h.MAX_ATTEMPT),
    due_ms=st.none() | st.integers(0, 2**63 - 1),
    tier=st.none() | small_text,
    failed_at_ms=st.none() | st.integers(0, 2**63 - 1),
    error_class=st.none() | small_text,
    error_message=st.none() | st.text(max_size=200),
    error_stack=st.none() | st.text(max_size=500),
    retriable=st.none() | st.booleans(),
    dlq_reason=st.none() | small_text,
    replay_id=st.none() | small_text,
)


@given(header_lists)
def test_parse_never_raises_and_keeps_original_headers_byte_for_byte(
    raw: list[tuple[str, bytes | None]],
) -> None:
    parsed = h.parse_headers(raw)
    assert list(parsed.original) == plain_split(raw)[0]
    state = parsed.state
    if state.attempt is not None:
        assert 0 <= state.attempt <= h.MAX_ATTEMPT
    if state.due_ms is not None:
        assert state.due_ms >= 0
    for text in (state.error_message, state.error_stack, state.tier, state.replay_id):
        assert text is None or len(text) <= h.MAX_STACK_BYTES
    for problem in parsed.problems:
        assert len(problem) < 200  # bad values are quoted, never copied whole


# The rules of docs/headers.md read plainly, one header at a time: the model the compiled
# per-layout readers of `HeaderReader` must agree with.
TEXT_BOUNDS = {
    "original_topic": h.MAX_TEXT_BYTES, "pipeline": h.MAX_TEXT_BYTES,
    "consumer_group": h.MAX_TEXT_BYTES, "tier": h.MAX_TEXT_BYTES,
    "error_class": h.MAX_TEXT_BYTES, "error_message": h.MAX_MESSAGE_BYTES,
    "dlq_reason": h.MAX_TEXT_BYTES, "replay_id": h.MAX_TEXT_BYTES,
}  # fmt: skip
STRICT_INTS = {"attempt": h.MAX_ATTEMPT, "due_ms": 2**63 - 1}
LENIENT_INTS = {
    "original_partition": 2**31 - 1, "original_offset": 2**63 - 1,
    "original_timestamp_ms": 2**63 - 1, "failed_at_ms": 2**63 - 1,
}  # fmt: skip
FIELD_OF = dict(zip(OUR_KEYS, [f.name for f in dataclasses.fields(h.RetryState)], strict=True))


def plain_integer(value: bytes) -> int | None:
    if len(value) > h.MAX_NUMBER_BYTES:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    unsigned = text[1:] if text[:1] in ("+", "-") else text
    return int(text) if unsigned.isdigit() else None


def plain_split(
    raw: list[tuple[str, bytes | None]],
) -> tuple[list[tuple[str, bytes | None]], list[tuple[str, bytes | None]]]:
    """Ours: the prefixed headers from the last `original-topic` on (the first header every
    forward writes); the event's own: everything else, upstream `kafka-retry.*` ones too."""
    marks = [i for i, (k, _) in enumerate(raw) if k == h.ORIGINAL_TOPIC]
    start = marks[-1] if marks else 0
    ours = [(k, v) for i, (k, v) in enumerate(raw) if i >= start and k.startswith(h.PREFIX)]
    original = [(k, v) for i, (k, v) in enumerate(raw) if i < start or not k.startswith(h.PREFIX)]
    return original, ours


def plain_parse(raw: list[tuple[str, bytes | None]], fields: set[str]) -> h.ParsedHeaders:
    original_list, ours = plain_split(raw)
    original = tuple(original_list)
    last: dict[str, bytes | None] = {}
    for key, value in ours:
        if key in FIELD_OF:
            last[key] = value
    state, problems = h.RetryState(), []
    for key, value in last.items():
        name = FIELD_OF[key]
        if value is None or name not in fields:
            continue
        if name == "error_stack":
            setattr(state, name, value[-h.MAX_STACK_BYTES :].decode("utf-8", "replace"))
        elif name in TEXT_BOUNDS:
            setattr(state, name, value[: TEXT_BOUNDS[name]].decode("utf-8", "replace"))
        elif name == "retriable":
            word = value.strip().lower()
            state.retriable = True if word == b"true" else False if word == b"false" else None
        else:
            number = plain_integer(value)
            high = STRICT_INTS.get(name) or LENIENT_INTS[name]
            if name in STRICT_INTS and number is None:
                problems.append(f"header {key} is not a decimal integer: {h._quote(value)}")
            elif name in STRICT_INTS:
                setattr(state, name, min(max(number or 0, 0), high))
            elif number is not None and 0 <= number <= high:
                setattr(state, name, number)
    return h.ParsedHeaders(original, state, tuple(problems))


ALL_FIELDS = set(FIELD_OF.values())


@settings(max_examples=500)
@given(header_lists, st.sets(st.sampled_from(sorted(ALL_FIELDS))))
@example([(h.ERROR_STACK, b"head" + b"x" * 5000 + b"tail"), ("theirs", b"1")], ALL_FIELDS)
@example([(h.ERROR_MESSAGE, b"y" * 2000), (h.ATTEMPT, b" -7 "), (h.DUE, b"x")], ALL_FIELDS)
def test_compiled_readers_agree_with_a_plain_reading_of_the_rules(
    raw: list[tuple[str, bytes | None]], fields: set[str]
) -> None:
    assert h.parse_headers(raw) == plain_parse(raw, ALL_FIELDS)
    expected = plain_parse(raw, fields)
    for compiled_kept in (h.HeaderReader.COMPILED_KEPT, 0):  # compiled, then interpreted
        reader = h.HeaderReader(fields, compiled_kept=compiled_kept)
        assert reader.parse(raw) == expected
        assert reader.parse(list(raw)) == expected  # the kept reader, once more
        # The same shape under other names of the producer's own headers: the same plan.
        renamed = [(f"x-{k}", v) if not k.startswith(h.PREFIX) else (k, v) for k, v in raw]
        assert reader.parse(renamed) == plain_parse(renamed, fields)


@given(sane_state, small_text, header_lists)
def test_our_headers_round_trip_and_replace_previous_ones(
    state: h.RetryState, origin: str, raw: list[tuple[str, bytes | None]]
) -> None:
    state.original_topic = origin  # every forward says where the event came from, first
    original = h.parse_headers(raw).original
    forwarded = h.build_headers(original, state)
    again = h.parse_headers(forwarded)
    assert again.problems == ()
    assert again.original == original
    assert again.state == state
    ours = [k for k, _ in h.split(forwarded)[1]]
    assert len(ours) == len(set(ours))


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_attempt_numbers_are_clamped(n: int) -> None:
    parsed = h.parse_headers([(h.ATTEMPT, str(n).encode())])
    if len(str(n)) <= h.MAX_NUMBER_BYTES:
        assert parsed.problems == ()
        assert parsed.state.attempt == max(0, min(h.MAX_ATTEMPT, n))
    else:
        assert parsed.malformed


@given(st.binary(max_size=40).filter(lambda b: not b.strip().lstrip(b"+-").isdigit()))
@example(b"\x1c0")  # a control byte Python's str.strip() counts as whitespace (found by CI)
def test_non_numeric_attempt_or_due_is_malformed(value: bytes) -> None:
    for key in (h.ATTEMPT, h.DUE):
        parsed = h.parse_headers([(key, value)])
        assert parsed.malformed
        assert key in parsed.problems[0]


def test_non_utf8_text_headers_are_read_with_replacement() -> None:
    parsed = h.parse_headers([(h.ERROR_CLASS, b"\xff\xfeBoom"), (h.RETRIABLE, b"maybe")])
    assert parsed.problems == ()
    assert parsed.state.error_class is not None and parsed.state.error_class.endswith("Boom")
    assert parsed.state.retriable is None


def test_repeated_keys_last_wins_and_null_value_means_missing() -> None:
    parsed = h.parse_headers([(h.ATTEMPT, b"2"), (h.ATTEMPT, b"5"), (h.DUE, b"1"), (h.DUE, None)])
    assert parsed.state.attempt == 5
    assert parsed.state.due_ms is None


@settings(max_examples=300)
@given(
    due=st.none() | st.integers(0, 2**63 - 1),
    ts=st.none() | st.integers(-(2**40), 2**45),
    delay_ms=st.integers(1000, 7 * 24 * 3600 * 1000),
    now_ms=st.integers(0, 2**44),
)
def test_effective_due_is_bounded(
    due: int | None, ts: int | None, delay_ms: int, now_ms: int
) -> None:
    result = h.effective_due_ms(due, ts, delay_ms, now_ms)
    ts_usable = ts is not None and 0 < ts <= now_ms + delay_ms
    if ts_usable:
        assert ts is not None
        # the broker's append time (rounded up to the next ms) + the delay, whatever the
        # header says
        assert result == ts + 1 + delay_ms
    elif due is None:
        assert result == now_ms
    elif due > now_ms + delay_ms:
        assert result is None  # absurd, and nothing to clamp it to: dead-letter
    else:
        assert result == due


@given(st.text(max_size=300), st.integers(0, 200), st.booleans())
def test_truncate_utf8_keeps_valid_utf8_within_the_limit(
    text: str, limit: int, keep_tail: bool
) -> None:
    out = h.truncate_utf8(text, limit, keep_tail=keep_tail)
    assert len(out) <= limit
    decoded = out.decode("utf-8")
    full = text.encode("utf-8")
    if len(full) <= limit:
        assert out == full
    elif keep_tail:
        assert full.endswith(out)
    else:
        assert full.startswith(out)
    assert isinstance(decoded, str)


def test_long_error_values_are_bounded_on_write() -> None:
    state = h.RetryState(error_message="m" * 10_000, error_stack="frame\n" * 5000 + "END")
    encoded = dict(h.encode_state(state))
    assert len(encoded[h.ERROR_MESSAGE] or b"") == h.MAX_MESSAGE_BYTES
    stack = encoded[h.ERROR_STACK] or b""
    assert len(stack) == h.MAX_STACK_BYTES and stack.endswith(b"END")  # the tail is kept


def test_hostile_layouts_cost_a_bounded_amount_of_memory() -> None:
    """Records of 20,000 header names, one changed each time: no layout that large is kept or
    compiled, so memory does not grow with their number (it reached gigabytes)."""
    reader = h.HeaderReader(("attempt", "due_ms"))
    tracemalloc.start()
    try:
        for k in range(40):
            raw = [(h.ATTEMPT, b"1")] + [
                (f"n{j}" if j != k else f"x{k}", None) for j in range(20_000)
            ]
            assert reader.parse(raw).state.attempt == 1
            del raw
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 4 * 2**20, f"{kept / 2**20:.1f} MiB kept after 40 hostile layouts"


def test_the_header_table_is_the_contract_docs_and_retry_state_follow() -> None:
    """`HEADERS` is the one source: docs/headers.md lists its rows in order with the records
    that carry them, and `RetryState` has a field per row that has one, in the same order."""
    docs = (Path(__file__).parents[1] / "docs" / "headers.md").read_text()
    rows = [
        line.strip("| ").split(" | ")
        for line in docs.splitlines()
        if line.startswith("| `kafka-retry.")
    ]
    listed = [(cells[0].strip("`"), cells[-1]) for cells in rows]
    assert listed == [(row.name, row.written_on) for row in h.HEADERS]
    fields = [f.name for f in dataclasses.fields(h.RetryState)]
    assert fields == [row.field for row in h.HEADERS if row.field is not None]
