"""Holding a tier's partitions until their head event is due, with pause/seek/resume.

A tier has one fixed delay, so on each partition the head is the event due first: when it is
not due yet, the partition is paused and its position moved back to the head; when the time
comes it is sought to the head again and resumed, and the head is re-read and re-checked.
The consumer keeps polling meanwhile (with `poll_timeout`), so a delay of any length never
trips `max.poll.interval.ms`.

librdkafka cannot say whether a partition is paused and keeps a pause across a revoke and
reassignment, so holds are tracked here and dropped, with a resume, on revoke or loss; the
new owner re-reads the uncommitted head from the committed offset and holds it again.
Must be used from the consumer's thread only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from kafka_retry.offsets import TopicPartitionKey

log = logging.getLogger(__name__)

WAKE_TIMEOUT_S = 0.25  # bound on the wake-up request's round trip; it only speeds things up


@dataclass(slots=True)
class Hold:
    offset: int
    due_ms: int


class DelayGate:
    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self._held: dict[TopicPartitionKey, Hold] = {}
        # Partitions just resumed, and the offset their first message must have.
        self._expect: dict[TopicPartitionKey, int] = {}
        self._reseek: set[TopicPartitionKey] = set()  # already re-held once for a skip

    def __len__(self) -> int:
        return len(self._held)

    def is_held(self, tp: TopicPartitionKey) -> bool:
        return tp in self._held

    def admits(self, tp: TopicPartitionKey, offset: int) -> bool:
        """Whether a consumed message may be processed: not if its partition is held (the rest
        of a batch behind a held head, re-read after it), nor if it is the first message of a
        just-resumed partition and skipped past the head (see `check_resumed`). Per event."""
        if tp in self._held:
            return False
        return not self._expect or self.check_resumed(tp, offset)

    def hold(self, tp: TopicPartitionKey, offset: int, due_ms: int) -> None:
        """Pause `tp` with `offset` as its head. Messages of `tp` already in hand are dropped
        by the caller (`is_held`); they are re-read after the head."""
        self._consumer.pause([TopicPartition(tp[0], tp[1])])
        self._consumer.seek(TopicPartition(tp[0], tp[1], offset))
        self._held[tp] = Hold(offset, due_ms)

    def release_due(self, now_ms: int) -> int:
        """Seek to the head and resume every partition whose head is due; returns how many."""
        due = [(tp, h) for tp, h in self._held.items() if h.due_ms <= now_ms]
        if not due:
            return 0
        for tp, h in due:
            self._consumer.seek(TopicPartition(tp[0], tp[1], h.offset))
            del self._held[tp]
            self._expect[tp] = h.offset
        resumed = [TopicPartition(tp[0], tp[1]) for tp, _ in due]
        self._consumer.resume(resumed)
        self._wake_fetcher(resumed)
        return len(due)

    def _wake_fetcher(self, resumed: list[TopicPartition]) -> None:
        """Make librdkafka fetch the resumed partitions now. It acts on a resume only at its
        broker thread's next turn: when an outstanding fetch returns (fetch.wait.max.ms at
        most) or, with every partition paused and so no fetch outstanding, after idling for
        up to a second; measured, that was most of a tier's lateness (p99 ~1 s at 1k/s). A
        request to the partitions' leaders (a latest-offset lookup, one round trip) wakes their
        broker threads, which then fetch: the first message after a resume arrives in a few
        ms. Only a nudge: if it fails or times out, the fetch still comes at the next turn."""
        try:
            self._consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, -1) for tp in resumed],
                timeout=WAKE_TIMEOUT_S,
            )
        except KafkaException as e:
            log.debug("fetcher wake-up after resume failed (harmless): %s", e)

    def check_resumed(self, tp: TopicPartitionKey, offset: int) -> bool:
        """False if a just-resumed partition's first message skipped past its head (a seek that
        did not take): the caller must not process it; the head is held again, due now. A
        second skip in a row is accepted: the head is gone (retention), not skipped by us."""
        expected = self._expect.pop(tp, None)
        if expected is None:
            return True
        if offset > expected and tp not in self._reseek:
            self.hold(tp, expected, 0)
            self._reseek.add(tp)
            return False
        self._reseek.discard(tp)
        return True

    def poll_timeout(self, now_ms: int, cap_s: float) -> float:
        """Seconds until the next head is due, at most `cap_s`: bounded, never a spin."""
        if not self._held:
            return cap_s
        wait_ms = min(h.due_ms for h in self._held.values()) - now_ms
        return max(0.0, min(cap_s, wait_ms / 1000.0))

    def forget(self, tps: list[TopicPartitionKey], *, resume: bool) -> None:
        """On revoke/lost: drop holds and clear librdkafka's pause flag while still assigned."""
        held = [tp for tp in tps if tp in self._held]
        for tp in tps:
            self._held.pop(tp, None)
            self._expect.pop(tp, None)
            self._reseek.discard(tp)
        if resume and held:
            self._consumer.resume([TopicPartition(tp[0], tp[1]) for tp in held])

    def expects(self) -> bool:
        return bool(self._expect)
