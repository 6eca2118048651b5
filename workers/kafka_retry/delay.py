"""Holding a tier's partitions until their head event is due, reading each event once.

A tier has one delay, so on each partition the events fall due in order. Fetched events that
are not due yet wait in their partition's window (a FIFO, in offset order) and are taken from
it as they fall due; the consumer's position stays after the last of them, so nothing is
fetched twice. Before, a head that was not due paused the partition, sought back to it and
dropped the rest of the batch, and under a steady stream each event was fetched and decoded
again at every release (bench/tier_stream.py).

A partition is paused (never sought: `resume()` goes on after its window) while
- its head is due more than `IDLE_PAUSE_MS` ahead: a tier with nothing due soon sends no
  fetch requests while it waits, as before; resumed when the head is due; or
- the windows are full (`WindowLimits`, for the whole worker), until they are down to half.

Memory: at most `max_events` events and `max_bytes` of their keys and values (plus
`EVENT_OVERHEAD` each, for the message object and its headers), and one consumed batch on top.
The consumer keeps polling meanwhile (`poll_timeout`: until the next head is due, capped), so
a delay of any length never trips `max.poll.interval.ms`. librdkafka keeps a pause across a
revoke and reassignment and cannot say whether a partition is paused: pauses are tracked here
and cleared, with the windows, on revoke or loss; the new owner re-reads from the committed
offset. Offsets are not this module's business: a waiting event is not begun, so nothing
after it is committed (offsets.py). Must be used from the consumer's thread only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from kafka_retry.offsets import TopicPartitionKey

log = logging.getLogger(__name__)

WAKE_TIMEOUT_S = 0.25  # bound on the wake-up request's round trip; it only speeds things up
IDLE_PAUSE_MS = 250  # a head due further ahead than this pauses its partition
# Due events are taken at most this often: under a steady stream one falls due every few
# microseconds to milliseconds, and a loop turn for each costs more than handling it. The
# price is lateness: at most this much, for the first event of each take.
TAKE_EVERY_MS = 50
EVENT_OVERHEAD = 512  # bytes counted per waiting event besides its key and value
DEFAULT_MAX_EVENTS = 20_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class WindowLimits:
    """How much the worker keeps fetched ahead of due time, over all its partitions."""

    max_events: int = DEFAULT_MAX_EVENTS
    max_bytes: int = DEFAULT_MAX_BYTES


class DelayGate:
    def __init__(self, consumer: Any, limits: WindowLimits | None = None) -> None:
        self._consumer = consumer
        self._limits = limits or WindowLimits()
        # Partitions with events waiting: (due ms, message), in offset order.
        self._windows: dict[TopicPartitionKey, deque[tuple[int, Any]]] = {}
        self._paused: set[TopicPartitionKey] = set()
        self._full = False  # some partitions are paused for the limits
        self._next_take_ms = 0
        self.events = 0
        self.bytes = 0

    def __len__(self) -> int:
        """Partitions holding a head that is not due yet."""
        return len(self._windows)

    def waiting(self, tp: TopicPartitionKey) -> bool:
        """Whether `tp` has events waiting: a newer one of `tp` must wait behind them. Per event."""
        return tp in self._windows

    def hold(self, tp: TopicPartitionKey, due_ms: int, msg: Any) -> None:
        """Keep `msg`, the newest of `tp` so far, until `due_ms`."""
        window = self._windows.get(tp)
        if window is None:
            window = self._windows[tp] = deque()
        window.append((due_ms, msg))
        self.events += 1
        self.bytes += _size(msg)
        if self._at_limits() and tp not in self._paused:
            self._full = True
            self._pause(tp)

    def hold_again(self, tp: TopicPartitionKey, due_ms: int, msg: Any) -> None:
        """Put back a head just taken (`take_due`) that is due later than its timestamp said."""
        window = self._windows.get(tp)
        if window is None:
            window = self._windows[tp] = deque()
        window.appendleft((due_ms, msg))
        self.events += 1
        self.bytes += _size(msg)

    def take_due(self, now_ms: int) -> list[tuple[TopicPartitionKey, Any]]:
        """Take the waiting events that are due, each partition's in order; a partition paused
        for its head is resumed as the head falls due (unless the windows are full)."""
        due: list[tuple[TopicPartitionKey, Any]] = []
        if now_ms < self._next_take_ms:
            return due
        self._next_take_ms = now_ms + TAKE_EVERY_MS
        resume = []
        for tp, window in list(self._windows.items()):
            if window[0][0] > now_ms:
                continue
            if tp in self._paused and not self._full:
                resume.append(tp)
            while window and window[0][0] <= now_ms:
                msg = window.popleft()[1]
                self.events -= 1
                self.bytes -= _size(msg)
                due.append((tp, msg))
            if not window:
                del self._windows[tp]
        if self._full and not self._above_half():
            self._full = False
            resume += [tp for tp in self._paused if self._due_soon(tp, now_ms)]
        if resume:
            self._resume(resume)
        return due

    def pause_idle(self, now_ms: int) -> None:
        """Pause the partitions whose head is due more than `IDLE_PAUSE_MS` ahead."""
        for tp, window in self._windows.items():
            if window[0][0] - now_ms > IDLE_PAUSE_MS and tp not in self._paused:
                self._pause(tp)

    def poll_timeout(self, now_ms: int, cap_s: float) -> float:
        """Seconds until the next head is due, at most `cap_s`: bounded, never a spin."""
        if not self._windows:
            return cap_s
        due_ms = min(w[0][0] for w in self._windows.values())
        wait_ms = max(due_ms, self._next_take_ms) - now_ms
        return max(0.0, min(cap_s, wait_ms / 1000.0))

    def paused(self) -> set[TopicPartitionKey]:
        return set(self._paused)

    def forget(self, tps: list[TopicPartitionKey]) -> None:
        """On revoke/lost: drop the windows (the next owner re-reads them) and clear
        librdkafka's pause flag while the partitions are still assigned."""
        paused = [TopicPartition(tp[0], tp[1]) for tp in tps if tp in self._paused]
        for tp in tps:
            self._paused.discard(tp)
            window = self._windows.pop(tp, None)
            if window is not None:
                self.events -= len(window)
                self.bytes -= sum(_size(m) for _, m in window)
        if paused:
            self._consumer.resume(paused)
        if self._full and not self._above_half():
            self._full = False
            now_ms = int(time.time() * 1000)
            self._resume([tp for tp in self._paused if self._due_soon(tp, now_ms)])

    def _at_limits(self) -> bool:
        limits = self._limits
        return self.events >= limits.max_events or self.bytes >= limits.max_bytes

    def _above_half(self) -> bool:
        limits = self._limits
        return 2 * self.events > limits.max_events or 2 * self.bytes > limits.max_bytes

    def _due_soon(self, tp: TopicPartitionKey, now_ms: int) -> bool:
        window = self._windows.get(tp)
        if not window:
            return True
        return window[0][0] - now_ms <= IDLE_PAUSE_MS

    def _pause(self, tp: TopicPartitionKey) -> None:
        self._consumer.pause([TopicPartition(tp[0], tp[1])])
        self._paused.add(tp)

    def _resume(self, tps: list[TopicPartitionKey]) -> None:
        self._paused.difference_update(tps)
        resumed = [TopicPartition(tp[0], tp[1]) for tp in tps]
        self._consumer.resume(resumed)
        self._wake_fetcher(resumed)

    def _wake_fetcher(self, resumed: list[TopicPartition]) -> None:
        """Make librdkafka fetch the resumed partitions now. It acts on a resume only at its
        broker thread's next turn: when an outstanding fetch returns (fetch.wait.max.ms at
        most) or, with every partition paused and so no fetch outstanding, after idling for
        up to a second. A request to the partitions' leaders (a latest-offset lookup, one
        round trip) wakes their broker threads, which then fetch. Only a nudge: if it fails
        or times out, the fetch still comes at the next turn."""
        try:
            self._consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, -1) for tp in resumed],
                timeout=WAKE_TIMEOUT_S,
            )
        except KafkaException as e:
            log.debug("fetcher wake-up after resume failed (harmless): %s", e)


def _size(msg: Any) -> int:
    """What a waiting message is counted at: its key and value, and `EVENT_OVERHEAD`."""
    return len(msg.value() or b"") + len(msg.key() or b"") + EVENT_OVERHEAD
