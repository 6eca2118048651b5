"""What a stage does with an event it has read: hold it, handle it, or dead-letter it.

Pure: from the event's parsed headers, its record timestamp, the stage's delay and the clock;
no Kafka, so every case is unit-tested (tests/test_dataplane_units.py). The runner carries the
decision out (runner.py), the delay gate keeps held events (delay.py). A stage's policy
(`TierPolicy`, `LiveLanePolicy`) is all that differs between a tier and the live lane: how
headers are read, the decision, and the attempt and origin an admitted event carries.

On a tier the broker is the clock: tier topics have `message.timestamp.type=LogAppendTime`, so
an event is due one delay after the broker appended it, whatever its headers say
(`headers.effective_due_ms`). Without headers to read, `not_before_ms` says when an event is
due at the earliest: it is held on that alone, its headers read only once it is due.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from kafka_retry import headers as h
from kafka_retry.model import Topology
from kafka_retry.routing import DEAD_LETTERED, RETRIED, Origin, Stage

HANDLE = 0
HOLD = 1
DEAD_LETTER = 2


class Decision(NamedTuple):
    verdict: int  # HANDLE, HOLD or DEAD_LETTER
    due_ms: int | None = None  # HOLD: until when; HANDLE on a tier: when it was due
    problems: tuple[str, ...] = ()  # DEAD_LETTER: why


_HANDLE_NOW = Decision(HANDLE)
NO_STATE = h.RetryState()  # never written to: the live lane's "no prior failure"


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


class Admission(NamedTuple):
    """What a stage makes of an event it has read (`Policy.admit`)."""

    verdict: int  # HANDLE, HOLD or DEAD_LETTER
    due_ms: int | None  # HOLD: until when; HANDLE on a tier: when it was due
    problems: tuple[str, ...]  # DEAD_LETTER: why
    prior: h.RetryState  # the failures before this stage, as far as the headers may say
    attempt: int  # HANDLE: the attempt in progress; DEAD_LETTER: the attempts failed so far
    origin: Origin  # where the event was first consumed


class TierPolicy:
    """A tier: events are due one delay after the broker appended them (held until then, by
    the runner's `DelayGate`), and our headers say how often they failed before and where
    they came from. Only what steers the event or reaches its handler or next forward is
    read (`headers.TIER_FIELDS`)."""

    holds = True  # events wait for their due time
    drain_outcome = RETRIED  # a drain worker's forward moves the event on to its next tier

    def __init__(self, stage: Stage) -> None:
        self.tier_name: str | None = stage.name
        self._topic = stage.topic
        self.read = h.HeaderReader(h.TIER_FIELDS).parse
        self.follow(stage)

    def follow(self, stage: Stage) -> None:
        self.delay_ms = stage.delay_ms
        self._failed_before = stage.index + 1  # failed attempts when a header does not say

    def stage_in(self, topology: Topology) -> Stage | None:
        """This tier in a new topology; None when it is gone or reads another topic (the
        operator replaces its workers)."""
        try:
            stage = Stage.tier(topology, self.tier_name or "")
        except KeyError:
            return None
        return stage if stage.topic == self._topic else None

    def admit(
        self,
        parsed: h.ParsedHeaders,
        tp: tuple[str, int],
        offset: int,
        timestamp_ms: int | None,
        now_ms: int,
    ) -> Admission:
        verdict, due_ms, problems = on_tier(parsed, timestamp_ms, self.delay_ms, now_ms)
        prior = parsed.state
        failed = prior.attempt if prior.attempt is not None else self._failed_before
        attempt = failed if verdict == DEAD_LETTER else min(failed, h.MAX_ATTEMPT) + 1
        # tuple.__new__: a NamedTuple's own __new__ is a Python function, a call per event.
        if prior.original_topic:
            origin = tuple.__new__(
                Origin,
                (
                    prior.original_topic,
                    prior.original_partition,
                    prior.original_offset,
                    prior.original_timestamp_ms,
                ),
            )
        else:  # an event produced straight to a tier: it was first consumed here
            origin = tuple.__new__(Origin, (tp[0], tp[1], offset, timestamp_ms))
        return tuple.__new__(Admission, (verdict, due_ms, problems, prior, attempt, origin))


class LiveLanePolicy:
    """The live lane (the source topic): every event is due on arrival and has not failed
    before; every header is the event's own, `kafka-retry.*` ones too (those of an upstream
    pipeline), kept byte for byte and never trusted."""

    holds = False
    delay_ms = 0
    drain_outcome = DEAD_LETTERED  # a stage of no tier drains an old DLQ: dead letters
    tier_name: str | None = None

    def __init__(self, stage: Stage) -> None:
        self._group = stage.consumer_group

    def follow(self, stage: Stage) -> None:
        pass

    def stage_in(self, topology: Topology) -> Stage:
        return Stage.source(topology, self._group)

    @staticmethod
    def read(raw: Sequence[tuple[str, bytes | None]] | None) -> h.ParsedHeaders:
        return tuple.__new__(h.ParsedHeaders, (tuple(raw) if raw else (), NO_STATE, ()))

    @staticmethod
    def admit(
        parsed: h.ParsedHeaders,
        tp: tuple[str, int],
        offset: int,
        timestamp_ms: int | None,
        now_ms: int,
    ) -> Admission:
        verdict, _, problems = on_live_lane(parsed)
        origin = tuple.__new__(Origin, (tp[0], tp[1], offset, timestamp_ms))
        attempt = 0 if verdict == DEAD_LETTER else 1
        return tuple.__new__(Admission, (verdict, None, problems, NO_STATE, attempt, origin))


Policy = TierPolicy | LiveLanePolicy


def policy_for(stage: Stage) -> Policy:
    return TierPolicy(stage) if stage.is_tier else LiveLanePolicy(stage)
