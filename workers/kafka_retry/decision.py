"""What a stage does with an event it has read: hold it, handle it, or dead-letter it.

Pure: from the event's parsed headers, its record timestamp, the stage's delay and the clock;
no Kafka, so every case is unit-tested (tests/test_dataplane_units.py). The runner carries the
decision out (runner.py), the delay gate keeps held events (delay.py).

On a tier the broker is the clock: tier topics have `message.timestamp.type=LogAppendTime`, so
an event is due one delay after the broker appended it, whatever its headers say
(`headers.effective_due_ms`). Without headers to read, `not_before_ms` says when an event is
due at the earliest: it is held on that alone, its headers read only once it is due.
"""

from __future__ import annotations

from typing import NamedTuple

from kafka_retry import headers as h

HANDLE = 0
HOLD = 1
DEAD_LETTER = 2


class Decision(NamedTuple):
    verdict: int  # HANDLE, HOLD or DEAD_LETTER
    due_ms: int | None = None  # HOLD: until when; HANDLE on a tier: when it was due
    problems: tuple[str, ...] = ()  # DEAD_LETTER: why


_HANDLE_NOW = Decision(HANDLE)


def on_live_lane(parsed: h.ParsedHeaders) -> Decision:
    """Every event is due on arrival; headers that cannot be read keep it from the handler
    (a non-UTF-8 header name: the event goes to the DLQ saying which)."""
    if parsed.problems:
        return Decision(DEAD_LETTER, None, parsed.problems)
    return _HANDLE_NOW


def on_tier(
    parsed: h.ParsedHeaders, timestamp_ms: int | None, delay_ms: int, now_ms: int
) -> Decision:
    """Hold until due, handle, or dead-letter what cannot steer the event (malformed headers,
    an absurd due time)."""
    if parsed.problems:
        return Decision(DEAD_LETTER, None, parsed.problems)
    # The broker's clock first: `effective_due_ms` says the same, with a call more per event.
    due_ms = h.due_by_append_time(timestamp_ms, delay_ms, now_ms)
    if due_ms is None:
        due_ms = h.effective_due_ms(parsed.state.due_ms, None, delay_ms, now_ms)
    if due_ms is None:
        absurd = f"header {h.DUE} is absurd: {parsed.state.due_ms} ms, now {now_ms} ms"
        return Decision(DEAD_LETTER, None, (absurd,))
    # tuple.__new__: a NamedTuple's own __new__ is a Python function, a call per event.
    return tuple.__new__(Decision, (HOLD if due_ms > now_ms else HANDLE, due_ms, ()))


def not_before_ms(timestamp_ms: int | None, delay_ms: int, now_ms: int) -> int:
    """When an event is due at the earliest, from its record timestamp alone (0: read its
    headers now). Exact on a tier topic with broker append times (`effective_due_ms`)."""
    return h.due_by_append_time(timestamp_ms, delay_ms, now_ms) or 0
