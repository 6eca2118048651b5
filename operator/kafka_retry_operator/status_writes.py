"""The status each pipeline was last written by this operator, remembered for a while.

A handler sees a pipeline as of its last watch event. At scale the watch runs behind the
writes by more than a status interval (500 pipelines on two busy cores: the event loop decodes
thousands of watch events), so a status timer would find its own last write missing, write
the same status again, and announce the same transition (WorkersReady, DLQGrew) again: 20
status writes and 5 Events per pipeline where 3 and 2 were due, each write one more watch
event to fall behind on. Compared with what was last written instead, an unchanged pipeline
writes nothing. A write is remembered for `ttl_s` only: one that was lost (a failed patch) or
undone by someone else is made again after that.

A reconcile writes status too, composed before its children are applied and written after
its handler returns. A timer tick in between would write a newer status that the reconcile's
then undoes (Ready, not Ready, Ready again: each announced): while a reconcile's write is
not seen, the timer leaves status alone (`settling`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from kafka_retry_operator.fleet import PipelineKey


class StatusWrites:
    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._last: dict[PipelineKey, tuple[float, Mapping[str, Any]]] = {}
        self._reconciles: dict[PipelineKey, float] = {}  # -> when the last one began

    @contextlib.contextmanager
    def reconciling(self, key: PipelineKey, now: float) -> Iterator[None]:
        """Around a reconcile, which writes status (kopf patches it after the handler)."""
        with self._lock:
            self._reconciles[key] = now
        try:
            yield
        except BaseException:
            with self._lock:  # failed before writing status: nothing to wait for
                last = self._last.get(key)
                if last is None or last[0] < now:
                    self._reconciles.pop(key, None)
            raise

    def settling(self, key: PipelineKey, stored: Mapping[str, Any], now: float) -> bool:
        """Whether a reconcile of the pipeline is under way, or its status write does not show
        in `stored` yet (for `ttl_s` at most). A status timer composing meanwhile would write
        a status that the reconcile's write, composed earlier and applied later, undoes: the
        workers Ready, then not, then Ready again, announced twice."""
        with self._lock:
            began = self._reconciles.get(key)
            if began is None:
                return False
            last = self._last.get(key)
            if now - began <= self._ttl:
                if last is None or last[0] < began:
                    return True  # not written yet
                if any(stored.get(k) != v for k, v in last[1].items()):
                    return True  # written, not seen yet
            del self._reconciles[key]
            return False

    def previous(
        self, key: PipelineKey, stored: Mapping[str, Any], now: float
    ) -> Mapping[str, Any]:
        """The pipeline's status as far as we know: `stored` (as the handler's watch event
        shows it) with the fields we wrote last, if we wrote them less than `ttl_s` ago."""
        with self._lock:
            last = self._last.get(key)
        if last is None or now - last[0] > self._ttl:
            return stored
        return {**stored, **last[1]}

    def wrote(self, key: PipelineKey, status: Mapping[str, Any], now: float) -> None:
        with self._lock:
            self._last[key] = (now, status)

    def forget(self, key: PipelineKey) -> None:
        with self._lock:
            self._last.pop(key, None)
            self._reconciles.pop(key, None)
