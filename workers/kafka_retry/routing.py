"""Where a failed event goes next and what our headers say about it.

A stage is the live lane (index -1, the source topic) or a tier. A retriable failure moves to
the next tier, due after that tier's delay; a failure on the last tier, a non-retriable one or
an event with malformed headers goes to the DLQ with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kafka_retry import headers as h
from kafka_retry.classification import Failure
from kafka_retry.model import Topology

SUCCEEDED = "succeeded"
RETRIED = "retried"
DEAD_LETTERED = "dead_lettered"
MALFORMED = "malformed"
OUTCOMES = (SUCCEEDED, RETRIED, DEAD_LETTERED, MALFORMED)


@dataclass(frozen=True, slots=True)
class Stage:
    index: int  # -1: the live lane
    name: str  # `headers.SOURCE_STAGE` or the tier's name
    topic: str
    consumer_group: str
    delay_ms: int  # 0 on the live lane; a tier's hold limit (ResolvedTier.hold_limit_ms)

    @property
    def is_tier(self) -> bool:
        return self.index >= 0

    @classmethod
    def source(cls, topology: Topology, consumer_group: str | None = None) -> Stage:
        group = consumer_group or topology.consumer_group
        return cls(-1, h.SOURCE_STAGE, topology.source_topic, group, 0)

    @classmethod
    def tier(cls, topology: Topology, name: str) -> Stage:
        t = topology.tier(name)
        index = topology.tiers.index(t)
        return cls(index, t.name, t.topic, t.consumer_group, t.hold_limit_ms())


class Route(NamedTuple):
    topic: str
    outcome: str  # RETRIED, DEAD_LETTERED or MALFORMED
    due_ms: int | None
    dlq_reason: str | None


class Origin(NamedTuple):
    """Where the event was first consumed: carried unchanged from hop to hop."""

    topic: str
    partition: int | None
    offset: int | None
    timestamp_ms: int | None


class Router:
    def __init__(self, topology: Topology, stage: Stage) -> None:
        self._topology = topology
        self._stage = stage
        dlq = topology.dlq_topic
        self._non_retriable = Route(dlq, DEAD_LETTERED, None, h.REASON_NON_RETRIABLE)
        self._malformed = Route(dlq, MALFORMED, None, h.REASON_MALFORMED)
        self._poison = Route(dlq, DEAD_LETTERED, None, h.REASON_POISON)
        self._next_topic, is_dlq = topology.next_topic(stage.index)
        self._exhausted = Route(dlq, DEAD_LETTERED, None, h.REASON_EXHAUSTED) if is_dlq else None
        self._next_delay_ms = 0 if is_dlq else topology.tiers[stage.index + 1].delay_seconds * 1000
        self._encoder = h.StageEncoder()
        self._pipeline = topology.pipeline
        self._group = self._stage_group()

    def route(self, retriable: bool, now_ms: int) -> Route:
        if not retriable:
            return self._non_retriable
        if self._exhausted is not None:
            return self._exhausted
        # tuple.__new__: a NamedTuple's own __new__ is a Python function, a call per event.
        return tuple.__new__(Route, (self._next_topic, RETRIED, now_ms + self._next_delay_ms, None))

    def malformed(self) -> Route:
        return self._malformed

    def poison(self) -> Route:
        return self._poison

    def refused(
        self, topic: str, ours: Sequence[tuple[str, bytes | None]], error: str, too_large: bool
    ) -> tuple[str, h.HeaderList, str | None] | None:
        """Where a forward goes that `topic` refused, with our headers `ours`: (topic, our new
        headers, new outcome or None for the same). Too large: first the same topic with our
        own headers trimmed (never the event's); then the DLQ, saying why. None when it was
        the DLQ that refused: nowhere left to go."""
        if too_large and not h.is_trimmed(ours):
            return topic, h.trimmed(ours), None
        if topic == self._topology.dlq_topic:
            return None
        reason = h.REASON_TOO_LARGE if too_large else h.REASON_FORWARD_REFUSED
        why = f"{topic} refused the forward: {error}"
        return (
            self._topology.dlq_topic,
            h.dead_lettered(h.trimmed(ours), reason, why),
            DEAD_LETTERED,
        )

    def forward_state(
        self,
        *,
        origin: Origin,
        prior: h.RetryState,
        attempt: int,
        failure: Failure,
        route: Route,
        now_ms: int,
    ) -> h.RetryState:
        """Our headers for the forward; `attempt` is the attempt that just failed."""
        return h.RetryState(
            original_topic=origin.topic,
            original_partition=origin.partition,
            original_offset=origin.offset,
            original_timestamp_ms=origin.timestamp_ms,
            pipeline=self._pipeline,
            consumer_group=self._group,
            attempt=attempt,
            due_ms=route.due_ms,
            tier=self._stage.name,
            failed_at_ms=now_ms,
            error_class=failure.error_class,
            error_message=failure.message,
            error_stack=failure.stack,
            retriable=failure.retriable,
            dlq_reason=route.dlq_reason,
            replay_id=prior.replay_id,
        )

    def forward_headers(
        self,
        original: Sequence[tuple[str, bytes | None]],
        origin: Origin,
        prior: h.RetryState,
        attempt: int,
        failure: Failure,
        route: Route,
        now_ms: int,
    ) -> h.HeaderList:
        """`build_headers(original, forward_state(...))`, the way the per-event path wants it:
        no intermediate `RetryState` (its values in order instead), repeated texts encoded once
        (`StageEncoder`)."""
        return self._encoder.forward(original, (
            origin.topic, origin.partition, origin.offset, origin.timestamp_ms, self._pipeline,
            self._group, attempt, route.due_ms, self._stage.name, now_ms, failure.error_class,
            failure.message, failure.stack, failure.retriable, route.dlq_reason, prior.replay_id,
        ))  # fmt: skip

    def _stage_group(self) -> str:
        """The service's group on the source topic, whose failures these are."""
        return self._topology.consumer_group if self._stage.is_tier else self._stage.consumer_group
