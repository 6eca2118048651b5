"""The header contract: what a forwarded event carries, and how it is read back.

A forward copies the event's key, value and original headers byte for byte and appends our own
headers, all named with `PREFIX`, `ORIGINAL_TOPIC` first. Ours are told apart by that position,
not by the prefix alone: they are the `PREFIX` headers from the last `ORIGINAL_TOPIC` on, and
everything before it is the event's own, `kafka-retry.*` headers of an upstream pipeline
included (`ours_start`). On every hop ours are replaced as a set, the event's never touched.
See docs/headers.md.

Headers read back are untrusted: anything can be produced to a retry topic. `parse_headers`
never raises; a value that cannot be read is reported in `ParsedHeaders.problems` (the event
goes to the DLQ with that reason) and absurd numbers are clamped.

`HEADERS` is the contract as one table, a row per header: reading (`HeaderReader`), writing
(`encode_state`, `StageEncoder`) and docs/headers.md follow it, so a header is added as a row
(and its `RetryState` field).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

PREFIX = "kafka-retry."

ORIGINAL_TOPIC = PREFIX + "original-topic"
ORIGINAL_PARTITION = PREFIX + "original-partition"
ORIGINAL_OFFSET = PREFIX + "original-offset"
ORIGINAL_TIMESTAMP = PREFIX + "original-timestamp-ms"
PIPELINE = PREFIX + "pipeline"
CONSUMER_GROUP = PREFIX + "consumer-group"
ATTEMPT = PREFIX + "attempt"
DUE = PREFIX + "due-ms"
TIER = PREFIX + "tier"
FAILED_AT = PREFIX + "failed-at-ms"
ERROR_CLASS = PREFIX + "error-class"
ERROR_MESSAGE = PREFIX + "error-message"
ERROR_STACK = PREFIX + "error-stack"
RETRIABLE = PREFIX + "retriable"
DLQ_REASON = PREFIX + "dlq-reason"
REPLAY_ID = PREFIX + "replay-id"
# On a replayed event only: `<dlq-partition>:<dlq-offset>` it was replayed from, so a resumed
# replay can tell which DLQ events already reached the target (dropped at the next hop).
REPLAY_SOURCE = PREFIX + "replay-source"

# `tier` header value for a failure on the live lane (the source topic).
SOURCE_STAGE = "source"

# `dlq-reason` values.
REASON_NON_RETRIABLE = "non-retriable"
REASON_EXHAUSTED = "retries-exhausted"
REASON_MALFORMED = "malformed-headers"
REASON_TOO_LARGE = "too-large"  # the event with our headers did not fit the next tier
REASON_FORWARD_REFUSED = "forward-refused"  # the next tier refused it (authorization, topic)
REASON_POISON = "poison"  # it stopped the worker on several starts in a row (poison.py)

# Bounds for values read back and written.
MAX_ATTEMPT = 1_000_000
MAX_NUMBER_BYTES = 24  # longer than any int64 in decimal: refuse to parse megabytes of digits
MAX_TEXT_BYTES = 256
MAX_MESSAGE_BYTES = 1024
MAX_STACK_BYTES = 4096
MAX_PROBLEM_VALUE = 40  # how much of a bad value is quoted in the DLQ reason

HeaderList = list[tuple[str, bytes | None]]


@dataclass(slots=True)
class RetryState:
    """Our headers as values. `attempt` counts the processing attempts that failed so far
    (1 after a failure on the live lane); `tier` is the stage where the last failure was.
    Built once per hop on the hot path, so not frozen (that costs more than the rest of the
    bookkeeping); derive a changed copy with `dataclasses.replace`."""

    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    original_timestamp_ms: int | None = None
    pipeline: str | None = None
    consumer_group: str | None = None
    attempt: int | None = None
    due_ms: int | None = None
    tier: str | None = None
    failed_at_ms: int | None = None
    error_class: str | None = None
    error_message: str | None = None
    error_stack: str | None = None
    retriable: bool | None = None
    dlq_reason: str | None = None
    replay_id: str | None = None


TEXT, STRICT, LENIENT, BOOL = "text", "strict", "lenient", "bool"
_INT64 = 2**63 - 1


class Header(NamedTuple):
    """One header of the contract. How it is read back: `TEXT` is cut to `bound` bytes (its
    end kept with `tail`) and decoded with replacement; a `STRICT` integer (it steers the
    event) is malformed when unreadable and clamped to `[0, bound]`; a `LENIENT` one is
    unknown when unreadable or out of range; a `BOOL` is `true`/`false` or unknown. Written:
    texts cut to `bound` the same way, numbers in decimal."""

    name: str
    field: str | None  # its `RetryState` field; None: not ours to read or write per hop
    kind: str
    bound: int  # TEXT: most bytes; STRICT, LENIENT: highest value (the lowest is 0)
    tier_reads: bool  # a tier reads it: it steers the event or reaches its handler or next hop
    written_on: str  # which records carry it (the docs/headers.md column)
    tail: bool = False


_EVERY, _KNOWN = "every forward", "every forward, when known"
# fmt: off
HEADERS: tuple[Header, ...] = (
    Header(ORIGINAL_TOPIC, "original_topic", TEXT, MAX_TEXT_BYTES, True, _EVERY),
    Header(ORIGINAL_PARTITION, "original_partition", LENIENT, 2**31 - 1, True, _EVERY),
    Header(ORIGINAL_OFFSET, "original_offset", LENIENT, _INT64, True, _EVERY),
    Header(ORIGINAL_TIMESTAMP, "original_timestamp_ms", LENIENT, _INT64, True, _KNOWN),
    Header(PIPELINE, "pipeline", TEXT, MAX_TEXT_BYTES, False, _EVERY),
    Header(CONSUMER_GROUP, "consumer_group", TEXT, MAX_TEXT_BYTES, False, _EVERY),
    Header(ATTEMPT, "attempt", STRICT, MAX_ATTEMPT, True, _EVERY),
    Header(DUE, "due_ms", STRICT, _INT64, True, "forwards to a tier"),
    Header(TIER, "tier", TEXT, MAX_TEXT_BYTES, False, _EVERY),
    Header(FAILED_AT, "failed_at_ms", LENIENT, _INT64, False, _EVERY),
    Header(ERROR_CLASS, "error_class", TEXT, MAX_TEXT_BYTES, True, _EVERY),
    Header(ERROR_MESSAGE, "error_message", TEXT, MAX_MESSAGE_BYTES, True, _EVERY),
    Header(ERROR_STACK, "error_stack", TEXT, MAX_STACK_BYTES, False, _EVERY, tail=True),
    Header(RETRIABLE, "retriable", BOOL, 0, False, _EVERY),
    Header(DLQ_REASON, "dlq_reason", TEXT, MAX_TEXT_BYTES, False, "forwards to the DLQ"),
    Header(REPLAY_ID, "replay_id", TEXT, MAX_TEXT_BYTES, True, "replays and later"),
    # Written by the replayer beside the others (dlq_replay.py), dropped at the next hop.
    Header(REPLAY_SOURCE, None, TEXT, MAX_TEXT_BYTES, False, "replays"),
)
# fmt: on
# The rows of `RetryState`'s fields, in its order: the order ours are written in.
STATE_HEADERS = tuple(row for row in HEADERS if row.field is not None)
_BY_NAME = {row.name: row for row in STATE_HEADERS}
# What a tier reads of an event's retry state (`tier_reads`): due time and attempt (the only
# fields that can make it malformed), where it came from, and what its handler and the next
# forward carry on.
TIER_FIELDS = tuple(row.field for row in STATE_HEADERS if row.tier_reads and row.field)
_STATE_VALUES = operator.attrgetter(*(row.field for row in STATE_HEADERS if row.field))


class ParsedHeaders(NamedTuple):
    """An event's headers split into the original ones (in order, untouched) and ours."""

    original: tuple[tuple[str, bytes | None], ...]
    state: RetryState
    problems: tuple[str, ...] = ()

    @property
    def malformed(self) -> bool:
        return bool(self.problems)


def ours_start(keys: Sequence[str]) -> int:
    """Where our block of headers starts: at the last `ORIGINAL_TOPIC`, which every forward
    writes first, after the event's own headers. A record without one was written by someone
    else straight to a tier: every `PREFIX` header in it is read as ours (and judged)."""
    for i in range(len(keys) - 1, -1, -1):
        if keys[i] == ORIGINAL_TOPIC:
            return i
    return 0


def split(
    headers: Sequence[tuple[str, bytes | None]],
) -> tuple[HeaderList, HeaderList]:
    """(the event's own headers, ours), each in order."""
    start = ours_start([k for k, _ in headers])
    original: HeaderList = []
    ours: HeaderList = []
    for i, (key, value) in enumerate(headers):
        (ours if i >= start and key.startswith(PREFIX) else original).append((key, value))
    return original, ours


def parse_headers(raw: Iterable[tuple[str, bytes | None]] | None) -> ParsedHeaders:
    """Split and validate; never raises. For repeated keys of ours the last one wins."""
    return _READ_ALL.parse(raw)


Reader = Callable[[Sequence[tuple[str, bytes | None]]], "ParsedHeaders"]


class _Plan(NamedTuple):
    """How to read one shape of header layout: the positions of the original headers, and of
    ours with their `HEADERS` row. No original key names: layouts that differ only in what
    the producer named its own headers share a plan (and its compiled reader)."""

    original: tuple[int, ...]
    leading: bool  # the original headers come first, in order (as our forwards write them)
    ours: tuple[tuple[int, Header], ...]  # position, row


class HeaderReader:
    """`parse_headers`, reading only some `fields` of `RetryState` (None: all); our other
    headers are dropped unread, as if unknown. Only `attempt` and `due_ms` can make an event
    malformed, so a reader that includes them judges malformedness the same as a full one.

    Runs once per consumed event. The layout of the headers (which keys in which order)
    repeats from event to event, the producer's own headers and then ours as we write them.
    So a layout's `_Plan` is worked out once, and the first `compiled_kept` plans get a reader
    compiled for them (`_compile`: positions and bounds written in, no loop over the layout);
    later ones, which only odd or hostile producers make, are interpreted (`_interpret`), as
    compiling costs some hundred microseconds. Both follow the rows of `HEADERS`; a test holds
    both to a plain reading of the rules (tests/test_headers_properties.py)."""

    # Untrusted producers can send endless variants of any size: what is kept is bounded in
    # header names (a layout of 100,000 names is 100,000 strings), and layouts longer than
    # `CACHED_LAYOUT_MAX` are neither kept nor compiled (their reading is linear anyway).
    _LAYOUT_NAMES_KEPT = 16_384
    CACHED_LAYOUT_MAX = 64
    COMPILED_KEPT = 32

    def __init__(
        self, fields: Iterable[str] | None = None, *, compiled_kept: int = COMPILED_KEPT
    ) -> None:
        wanted = None if fields is None else frozenset(fields)
        unknown = (wanted or frozenset()) - {row.field for row in STATE_HEADERS}
        if unknown:
            raise ValueError(f"not RetryState fields: {sorted(unknown)}")
        self._rows = {
            k: row for k, row in _BY_NAME.items() if wanted is None or row.field in wanted
        }
        self._compiled_kept = compiled_kept
        self._compiled: dict[_Plan, Reader] = {}
        self._by_layout: dict[tuple[str, ...], Reader] = {}
        self._names_kept = 0  # header names in the keys of `_by_layout`
        self._last: tuple[tuple[str, ...], Reader] = ((), self._reader(()))

    def parse(self, raw: Iterable[tuple[str, bytes | None]] | None) -> ParsedHeaders:
        if not raw:
            return ParsedHeaders((), RetryState())
        if not isinstance(raw, list | tuple):
            raw = list(raw)
        keys = tuple(map(_KEY, raw))
        last_keys, read = self._last
        if keys != last_keys:  # comparing is cheaper than hashing the new key strings
            read = self._by_layout.get(keys) or self._reader(keys)
            self._last = (keys, read)
        return read(raw)

    def _reader(self, keys: tuple[str, ...]) -> Reader:
        plan = self._plan(keys)
        if len(keys) > self.CACHED_LAYOUT_MAX:
            return functools.partial(_interpret, plan)
        read = self._compiled.get(plan)
        if read is None:
            if len(self._compiled) < self._compiled_kept:
                read = self._compiled[plan] = _compile(plan)
            else:
                read = functools.partial(_interpret, plan)
        if self._names_kept + len(keys) > self._LAYOUT_NAMES_KEPT:
            self._by_layout.clear()
            self._names_kept = 0
        self._by_layout[keys] = read
        self._names_kept += len(keys)
        return read

    def _plan(self, keys: tuple[str, ...]) -> _Plan:
        """For the last occurrence of each of our keys (`ours_start`) that this reader reads."""
        original: list[int] = []
        last: dict[str, int] = {}
        start = ours_start(keys)
        for i, key in enumerate(keys):
            if i >= start and key.startswith(PREFIX):
                last[key] = i
            else:
                original.append(i)
        ours = tuple((i, self._rows[key]) for key, i in last.items() if key in self._rows)
        return _Plan(tuple(original), original == list(range(len(original))), ours)


def _interpret(plan: _Plan, raw: Sequence[tuple[str, bytes | None]]) -> ParsedHeaders:
    """The rules of `Header`, one header at a time; a null value is as if missing."""
    if plan.leading:
        original = tuple(raw[: len(plan.original)])
    else:
        original = tuple([raw[i] for i in plan.original])
    state = RetryState()
    problems: list[str] = []
    for i, row in plan.ours:
        value = raw[i][1]
        if value is None:
            continue
        _, field, kind, bound, _, _, tail = row
        assert field is not None  # a plan has only rows of `RetryState` fields
        if kind is TEXT:
            setattr(
                state, field, (value[-bound:] if tail else value[:bound]).decode("utf-8", "replace")
            )
        elif kind is BOOL:
            setattr(state, field, _bool(value))
        else:
            number, problem = _read_int(row, value)
            if number is not None:
                setattr(state, field, number)
            if problem:
                problems.append(problem)
    return tuple.__new__(ParsedHeaders, (original, state, tuple(problems)))


def _compile(plan: _Plan) -> Reader:
    """`_interpret` for one plan, as Python source with its positions and bounds written in
    and plain digits in range read inline: the one generated fast path. Only our own names
    (fields, and header rows by their index in `HEADERS`) and integers go into the source,
    never a received key."""
    if plan.leading:
        body = [f"    original = tuple(raw[:{len(plan.original)}])"]
    else:
        body = [f"    original = ({''.join(f'raw[{i}], ' for i in plan.original)})"]
    body.append("    state = RetryState()")
    body.append("    problems = ()")
    for i, row in plan.ours:
        name, bound = row.field, row.bound
        body.append(f"    value = raw[{i}][1]")
        body.append("    if value is not None:")
        if row.kind is TEXT:
            cut = f"value[-{bound}:]" if row.tail else f"value[:{bound}]"
            body.append(f"        state.{name} = {cut}.decode('utf-8', 'replace')")
        elif row.kind is BOOL:
            body.append(f"        state.{name} = _bool(value)")
        else:
            body += [
                f"        if len(value) <= {MAX_NUMBER_BYTES} and value.isdigit() "
                f"and (number := int(value)) <= {bound}:",
                f"            state.{name} = number",
                "        else:",
                f"            number, problem = _read_int(HEADERS[{HEADERS.index(row)}], value)",
                "            if number is not None:",
                f"                state.{name} = number",
                "            if problem:",
                "                problems += (problem,)",
            ]
    body.append("    return tuple.__new__(ParsedHeaders, (original, state, problems))")
    source = "def read(raw):\n" + "\n".join(body) + "\n"
    namespace: dict[str, object] = {
        "RetryState": RetryState, "ParsedHeaders": ParsedHeaders, "HEADERS": HEADERS,
        "_bool": _bool, "_read_int": _read_int,
    }  # fmt: skip
    exec(compile(source, "<header reader>", "exec"), namespace)
    read: Reader = namespace["read"]  # type: ignore[assignment]
    return read


def _read_int(row: Header, value: bytes) -> tuple[int | None, str | None]:
    """(number, problem) of an integer header that is not plain digits in range. Strict
    headers (they steer the event) are malformed when unreadable and clamped when out of
    range; lenient ones are unknown in both cases."""
    strict = row.kind is STRICT
    number = _digits(value)
    if number is None:
        if strict:
            return None, f"header {row.name} is not a decimal integer: {_quote(value)}"
        return None, None
    if 0 <= number <= row.bound:
        return number, None
    if strict:
        return (0 if number < 0 else row.bound), None
    return None, None


def encode_state(state: RetryState) -> HeaderList:
    """Our headers for `state`, fields that are None left out, values bounded in size."""
    return [
        (row.name, _encode(row, value))
        for row, value in zip(STATE_HEADERS, _STATE_VALUES(state), strict=True)
        if value is not None
    ]


def build_headers(original: Sequence[tuple[str, bytes | None]], state: RetryState) -> HeaderList:
    """The headers of a forward: the original ones as they were, then ours."""
    return [*original, *encode_state(state)]


def _encode(row: Header, value: Any) -> bytes:
    if row.kind is TEXT:
        return truncate_utf8(value, row.bound, keep_tail=row.tail)
    if row.kind is BOOL:
        return b"true" if value else b"false"
    return b"%d" % value


class StageEncoder:
    """Writes our headers for the forwards of one stage, as `encode_state` does. Texts repeat
    from forward to forward (the stage's pipeline, group and name, origin topics, error
    classes, reasons; and the last error's message and stack: an outage fails event after
    event the same way), so each row keeps the headers of its texts and reuses them: up to
    `_SEEN_KEPT` short ones, only the last of those that can be long."""

    __slots__ = ("_kept", "_names")

    _SEEN_KEPT = 256  # texts per header

    def __init__(self) -> None:
        self._names = [row.name for row in STATE_HEADERS]
        # Per row, the headers of its texts by value; None: a number, encoded each time.
        self._kept: list[dict[Any, tuple[str, bytes]] | None] = [
            None if row.kind is STRICT or row.kind is LENIENT else {} for row in STATE_HEADERS
        ]

    def forward(
        self, original: Sequence[tuple[str, bytes | None]], values: Sequence[Any]
    ) -> HeaderList:
        """`build_headers(original, state)` for the `values` of a `RetryState`, in its order."""
        out: HeaderList = list(original)
        add = out.append
        names, kepts = self._names, self._kept
        for i, value in enumerate(values):  # measured faster than zipping rows and values
            if value is not None:
                kept = kepts[i]
                if kept is None:
                    add((names[i], b"%d" % value))
                else:
                    add(kept.get(value) or self._encode(i, value))
        return out

    def _encode(self, i: int, value: Any) -> tuple[str, bytes]:
        row, kept = STATE_HEADERS[i], self._kept[i]
        assert kept is not None
        if len(kept) >= (self._SEEN_KEPT if row.bound <= MAX_TEXT_BYTES else 1):
            kept.clear()
        header = kept[value] = (row.name, _encode(row, value))
        return header


def trimmed(ours: Sequence[tuple[str, bytes | None]]) -> HeaderList:
    """Our headers of a forward that was too large, made small: no stack, the message cut to
    `MAX_TEXT_BYTES`. The event's own key, value and headers are never trimmed."""
    out: HeaderList = []
    for key, value in ours:
        if key == ERROR_STACK:
            continue
        if key == ERROR_MESSAGE and value is not None and len(value) > MAX_TEXT_BYTES:
            value = truncate_utf8(value.decode("utf-8", "replace"), MAX_TEXT_BYTES)
        out.append((key, value))
    return out


def is_trimmed(ours: Sequence[tuple[str, bytes | None]]) -> bool:
    return all(k != ERROR_STACK for k, _ in ours) and all(
        k != ERROR_MESSAGE or v is None or len(v) <= MAX_TEXT_BYTES for k, v in ours
    )


def dead_lettered(ours: Sequence[tuple[str, bytes | None]], reason: str, why: str) -> HeaderList:
    """Our headers of a forward redirected to the DLQ: no due time, not retriable, `reason`,
    and `why` ahead of the failure's own message."""
    replaced = {DUE, RETRIABLE, DLQ_REASON, ERROR_MESSAGE}
    message = next((v for k, v in ours if k == ERROR_MESSAGE and v is not None), b"")
    text = why + ("; the failure: " + message.decode("utf-8", "replace") if message else "")
    out = [(k, v) for k, v in ours if k not in replaced]
    out += [
        (ERROR_MESSAGE, truncate_utf8(text, MAX_MESSAGE_BYTES)),
        (RETRIABLE, b"false"),
        (DLQ_REASON, reason.encode()),
    ]
    return out


def effective_due_ms(
    due_ms: int | None, timestamp_ms: int | None, delay_ms: int, now_ms: int
) -> int | None:
    """When an event on a tier with `delay_ms` may be processed; None: absurd, dead-letter it.

    The record timestamp is when the event reached the tier: the broker's append time, as
    tier topics have `message.timestamp.type=LogAppendTime` (the operator sets it). So the
    broker is the clock: an event is due one delay after that, whatever its headers say. A
    `due-ms` can make it neither earlier (a writer skipping the delay) nor later (one delay
    after the append is the latest it can be); nor does a forwarder's clock matter. Only
    without a usable timestamp (a tier topic someone configured otherwise, whose writer's
    clock is more than one delay ahead) does the header say: a due time further than one
    delay ahead is absurd; without either, the event is due now (there is nothing to wait
    for, and waiting on `now + delay` would never end)."""
    by_broker = due_by_append_time(timestamp_ms, delay_ms, now_ms)
    if by_broker is not None:
        return by_broker
    if due_ms is None:
        return now_ms
    if due_ms > now_ms + delay_ms:
        return None
    return due_ms


def due_by_append_time(timestamp_ms: int | None, delay_ms: int, now_ms: int) -> int | None:
    """One delay after the broker appended the event; None without a usable timestamp (none,
    or one more than a delay ahead of `now_ms`: not an append time). A timestamp is the
    append time floored to the millisecond, so it is rounded up: the next millisecond. (Taken
    as it is, an event failed and appended within one millisecond was due up to 1 ms before
    its failure time + the delay: 15% of a 200 events/s stream, tests/test_dataplane_stream.py.)"""
    if timestamp_ms is not None and 0 < timestamp_ms <= now_ms + delay_ms:
        return timestamp_ms + 1 + delay_ms
    return None


def truncate_utf8(text: str, max_bytes: int, *, keep_tail: bool = False) -> bytes:
    """UTF-8 bytes of at most `max_bytes`, cut on a character boundary."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= max_bytes:
        return data
    if max_bytes <= 0:
        return b""
    if keep_tail:
        return data[-max_bytes:].decode("utf-8", errors="ignore").encode("utf-8")
    return data[:max_bytes].decode("utf-8", errors="ignore").encode("utf-8")


def _quote(value: bytes) -> str:
    """A bounded excerpt: at most MAX_PROBLEM_VALUE bytes, and as many characters once escaped
    (a byte can take four, `\\x00`)."""
    shown = repr(value[:MAX_PROBLEM_VALUE])
    if len(shown) > 2 * MAX_PROBLEM_VALUE:
        return shown[: 2 * MAX_PROBLEM_VALUE] + "..."
    return shown + ("..." if len(value) > MAX_PROBLEM_VALUE else "")


def _digits(value: bytes) -> int | None:
    if len(value) > MAX_NUMBER_BYTES:
        return None
    if value.isdigit():  # the common case: what we wrote ourselves
        return int(value)
    try:
        # ASCII whitespace only: str.strip() would also take control bytes such as \x1c.
        text = value.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        return None
    return int(text)


def _bool(value: bytes) -> bool | None:
    text = value.strip().lower()
    if text == b"true":
        return True
    if text == b"false":
        return False
    return None


_READ_ALL = HeaderReader()
_KEY = operator.itemgetter(0)
