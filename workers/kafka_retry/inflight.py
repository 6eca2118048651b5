"""Concurrent handler calls, bounded per partition (`handler.http.maxInFlight`).

A network handler spends its time waiting: at 20 ms a call, one call at a time caps a
partition at 50 events/s. Here the consumer's thread starts each event's call on a pool
thread and acts on the outcomes as they come back (`serve`), in whatever order the calls
finish. Offsets stay the runner's business: it begins each event's ticket in consume order
before the call, so a partition's frontier (`OffsetTracker`) still only moves over the
finished prefix, never past a call in flight.

Which calls may start is decided on the consumer's thread, from counts updated when an
outcome is served (not when a pool thread finishes): a slot is free only once its outcome was
acted on. `submit` waits (serving outcomes) until the event's partition has a free slot and,
with key ordering, no call of the same key is in flight. Every call starts at once on a
thread of its own (threads are reused; there are at most `per_partition` times the assigned
partitions), so the longest wait is one handler deadline, as with one call at a time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kafka_retry.event import Event
from kafka_retry.handlers import HandlerFn
from kafka_retry.offsets import TopicPartitionKey

# Threads are created only when no idle one is left; `submit` bounds how many calls run.
_NO_THREAD_CAP = 1 << 16


class Call:
    """One event's handler call; `error` is what it raised (None: it succeeded)."""

    __slots__ = ("context", "error", "event", "key", "seconds", "tp")

    def __init__(self, tp: TopicPartitionKey, key: Hashable, event: Event, context: Any) -> None:
        self.tp = tp
        self.key = key
        self.event = event
        self.context = context  # the runner's: what it needs to finish or forward the event
        self.error: BaseException | None = None
        self.seconds = 0.0


class InFlight:
    def __init__(
        self,
        handler: HandlerFn,
        per_partition: int,
        *,
        by_key: bool,
        on_done: Callable[[Call], None],
    ) -> None:
        """`on_done(call)` runs on the consumer's thread, inside `serve`, `submit` or
        `settle`, once per call."""
        self._handler = handler
        self._limit = per_partition
        self._by_key = by_key
        self._on_done = on_done
        self._pool = ThreadPoolExecutor(_NO_THREAD_CAP, thread_name_prefix="handler")
        self._done: queue.SimpleQueue[Call] = queue.SimpleQueue()
        # The consumer thread's view: calls not yet served, per partition and by key.
        self._per_partition: Counter[TopicPartitionKey] = Counter()
        self._keys: set[Hashable] = set()
        self.calls = 0
        # perf_counter() at each running call's start, for the deadline watchdog's thread.
        self._running: dict[int, float] = {}
        self._running_lock = threading.Lock()

    def submit(self, tp: TopicPartitionKey, key: Hashable, event: Event, context: Any) -> None:
        """Start `event`'s call, once its partition has a free slot and (by key) no call of
        `key` is in flight; outcomes that come back meanwhile are acted on. A None key waits
        for no other."""
        ordered = self._by_key and key is not None
        while self._per_partition[tp] >= self._limit or (ordered and key in self._keys):
            self._serve_one(None)
        self._per_partition[tp] += 1
        if ordered:
            self._keys.add(key)
        self.calls += 1
        self._pool.submit(self._call, Call(tp, key if ordered else None, event, context))

    def serve(self, timeout_s: float = 0) -> None:
        """Act on every outcome that is back, waiting up to `timeout_s` for the first."""
        if self.calls and self._serve_one(timeout_s):
            while self._serve_one(0):
                pass

    def settle(self, tp: TopicPartitionKey | None = None) -> None:
        """Wait until no call (of `tp`, or at all) is in flight, acting on each outcome."""
        while (self._per_partition[tp] if tp is not None else self.calls) > 0:
            self._serve_one(None)

    def started(self) -> float:
        """`time.perf_counter()` when the oldest running call began; 0 if none runs. Safe from
        any thread (the deadline watchdog's)."""
        with self._running_lock:
            return min(self._running.values(), default=0.0)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _call(self, call: Call) -> None:
        """On a pool thread. Whatever the handler raises becomes the call's outcome."""
        me = threading.get_ident()
        started = time.perf_counter()
        with self._running_lock:
            self._running[me] = started
        try:
            self._handler(call.event)
        except BaseException as e:  # handed to the consumer's thread
            call.error = e
        finally:
            call.seconds = time.perf_counter() - started
            with self._running_lock:
                del self._running[me]
            self._done.put(call)

    def _serve_one(self, timeout_s: float | None) -> bool:
        """Act on one outcome: waiting up to `timeout_s` for it (None: until one is back)."""
        try:
            call = self._done.get(timeout=timeout_s) if timeout_s != 0 else self._done.get_nowait()
        except queue.Empty:
            return False
        self.calls -= 1
        self._per_partition[call.tp] -= 1
        if not self._per_partition[call.tp]:
            del self._per_partition[call.tp]
        if call.key is not None:
            self._keys.discard(call.key)
        if call.error is not None and not isinstance(call.error, Exception):
            raise call.error  # SystemExit, KeyboardInterrupt: as if the consumer's thread ran it
        self._on_done(call)
        return True
