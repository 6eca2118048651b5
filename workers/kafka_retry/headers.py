"""The header contract: what a forwarded event carries, and how it is read back.

A forward copies the event's key, value and original headers byte for byte and appends our own
headers, all named with `PREFIX`. On every hop our headers are replaced as a set (any header
with the prefix is ours), the original ones never touched. See docs/headers.md.

Headers read back are untrusted: anything can be produced to a retry topic. `parse_headers`
never raises; a value that cannot be read is reported in `ParsedHeaders.problems` (the event
goes to the DLQ with that reason) and absurd numbers are clamped.
"""

from __future__ import annotations

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


class ParsedHeaders(NamedTuple):
    """An event's headers split into the original ones (in order, untouched) and ours."""

    original: tuple[tuple[str, bytes | None], ...]
    state: RetryState
    problems: tuple[str, ...] = ()

    @property
    def malformed(self) -> bool:
        return bool(self.problems)


def is_ours(key: str) -> bool:
    return key.startswith(PREFIX)


def parse_headers(raw: Iterable[tuple[str, bytes | None]] | None) -> ParsedHeaders:
    """Split and validate; never raises. For repeated keys of ours the last one wins."""
    original: list[tuple[str, bytes | None]] = []
    ours: dict[str, bytes | None] = {}
    for key, value in raw or ():
        if key.startswith(PREFIX):
            ours[key] = value
        else:
            original.append((key, value))
    if not ours:
        return ParsedHeaders(tuple(original), RetryState())
    problems: list[str] = []
    fields: dict[str, Any] = {}
    for key, value in ours.items():
        reader = _READERS.get(key)
        if reader is not None and value is not None:  # unknown keys of ours are dropped
            fields[reader[0]] = reader[1](value, key, problems)
    return ParsedHeaders(tuple(original), RetryState(**fields), tuple(problems))


def encode_state(state: RetryState) -> HeaderList:
    """Our headers for `state`, fields that are None left out, values bounded in size.
    Written out field by field: this runs once per forward."""
    s = state
    out: HeaderList = []
    add = out.append
    if s.original_topic is not None:
        add((ORIGINAL_TOPIC, _enc(s.original_topic, MAX_TEXT_BYTES)))
    if s.original_partition is not None:
        add((ORIGINAL_PARTITION, b"%d" % s.original_partition))
    if s.original_offset is not None:
        add((ORIGINAL_OFFSET, b"%d" % s.original_offset))
    if s.original_timestamp_ms is not None:
        add((ORIGINAL_TIMESTAMP, b"%d" % s.original_timestamp_ms))
    if s.pipeline is not None:
        add((PIPELINE, _enc(s.pipeline, MAX_TEXT_BYTES)))
    if s.consumer_group is not None:
        add((CONSUMER_GROUP, _enc(s.consumer_group, MAX_TEXT_BYTES)))
    if s.attempt is not None:
        add((ATTEMPT, b"%d" % s.attempt))
    if s.due_ms is not None:
        add((DUE, b"%d" % s.due_ms))
    if s.tier is not None:
        add((TIER, _enc(s.tier, MAX_TEXT_BYTES)))
    if s.failed_at_ms is not None:
        add((FAILED_AT, b"%d" % s.failed_at_ms))
    if s.error_class is not None:
        add((ERROR_CLASS, _enc(s.error_class, MAX_TEXT_BYTES)))
    if s.error_message is not None:
        add((ERROR_MESSAGE, _enc(s.error_message, MAX_MESSAGE_BYTES)))
    if s.error_stack is not None:
        add((ERROR_STACK, truncate_utf8(s.error_stack, MAX_STACK_BYTES, keep_tail=True)))
    if s.retriable is not None:
        add((RETRIABLE, b"true" if s.retriable else b"false"))
    if s.dlq_reason is not None:
        add((DLQ_REASON, _enc(s.dlq_reason, MAX_TEXT_BYTES)))
    if s.replay_id is not None:
        add((REPLAY_ID, _enc(s.replay_id, MAX_TEXT_BYTES)))
    return out


def build_headers(original: Sequence[tuple[str, bytes | None]], state: RetryState) -> HeaderList:
    """The headers of a forward: the original ones as they were, then ours."""
    return [*original, *encode_state(state)]


def effective_due_ms(
    due_ms: int | None, timestamp_ms: int | None, delay_ms: int, now_ms: int
) -> int | None:
    """When an event on a tier with `delay_ms` may be processed; None: absurd, dead-letter it.

    The record timestamp is the forward time, so a tier's event is never due later than
    timestamp + delay: a larger header is clamped to that. Without a usable timestamp, a due
    time further than one delay ahead is absurd; without either, the event is due now (there
    is nothing to wait for, and waiting on `now + delay` would never end)."""
    if timestamp_ms is not None and 0 < timestamp_ms <= now_ms + delay_ms:
        latest = timestamp_ms + delay_ms
        return latest if due_ms is None else min(due_ms, latest)
    if due_ms is None:
        return now_ms
    if due_ms > now_ms + delay_ms:
        return None
    return due_ms


def _enc(text: str, limit: int) -> bytes:
    data = text.encode("utf-8", errors="replace")
    return data if len(data) <= limit else truncate_utf8(text, limit)


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
    shown = repr(value[:MAX_PROBLEM_VALUE])
    return shown + ("..." if len(value) > MAX_PROBLEM_VALUE else "")


def _digits(value: bytes) -> int | None:
    if len(value) > MAX_NUMBER_BYTES:
        return None
    if value.isdigit():  # the common case: what we wrote ourselves
        return int(value)
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        return None
    return int(text)


def _strict_int(value: bytes, key: str, low: int, high: int, problems: list[str]) -> int | None:
    """Fields that steer the pipeline: unreadable means malformed; out of range is clamped."""
    number = _digits(value)
    if number is None:
        problems.append(f"header {key} is not a decimal integer: {_quote(value)}")
        return None
    return max(low, min(high, number))


def _lenient_int(value: bytes, low: int, high: int) -> int | None:
    """Informational fields: unreadable or out of range means unknown."""
    number = _digits(value)
    if number is None or not low <= number <= high:
        return None
    return number


def _text(value: bytes, limit: int, *, keep_tail: bool = False) -> str:
    if len(value) > limit:
        value = value[-limit:] if keep_tail else value[:limit]
    return value.decode("utf-8", errors="replace")


def _bool(value: bytes) -> bool | None:
    text = value.strip().lower()
    if text == b"true":
        return True
    if text == b"false":
        return False
    return None


_Reader = tuple[str, Callable[[bytes, str, list[str]], object]]
_INT64 = 2**63 - 1


def _lenient(low: int, high: int) -> Callable[[bytes, str, list[str]], object]:
    return lambda v, _k, _p: _lenient_int(v, low, high)


def _strict(low: int, high: int) -> Callable[[bytes, str, list[str]], object]:
    return lambda v, k, p: _strict_int(v, k, low, high, p)


def _texts(limit: int, keep_tail: bool = False) -> Callable[[bytes, str, list[str]], object]:
    return lambda v, _k, _p: _text(v, limit, keep_tail=keep_tail)


# header → (RetryState field, reader); and the order and size bound in which they are written.
_READERS: dict[str, _Reader] = {
    ORIGINAL_TOPIC: ("original_topic", _texts(MAX_TEXT_BYTES)),
    ORIGINAL_PARTITION: ("original_partition", _lenient(0, 2**31 - 1)),
    ORIGINAL_OFFSET: ("original_offset", _lenient(0, _INT64)),
    ORIGINAL_TIMESTAMP: ("original_timestamp_ms", _lenient(0, _INT64)),
    PIPELINE: ("pipeline", _texts(MAX_TEXT_BYTES)),
    CONSUMER_GROUP: ("consumer_group", _texts(MAX_TEXT_BYTES)),
    ATTEMPT: ("attempt", _strict(0, MAX_ATTEMPT)),
    DUE: ("due_ms", _strict(0, _INT64)),
    TIER: ("tier", _texts(MAX_TEXT_BYTES)),
    FAILED_AT: ("failed_at_ms", _lenient(0, _INT64)),
    ERROR_CLASS: ("error_class", _texts(MAX_TEXT_BYTES)),
    ERROR_MESSAGE: ("error_message", _texts(MAX_MESSAGE_BYTES)),
    ERROR_STACK: ("error_stack", _texts(MAX_STACK_BYTES, keep_tail=True)),
    RETRIABLE: ("retriable", lambda v, _k, _p: _bool(v)),
    DLQ_REASON: ("dlq_reason", _texts(MAX_TEXT_BYTES)),
    REPLAY_ID: ("replay_id", _texts(MAX_TEXT_BYTES)),
}
