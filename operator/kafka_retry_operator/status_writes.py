"""The status each pipeline was last written by this operator, remembered for a while.

A handler sees a pipeline as of its last watch event. At scale the watch runs behind the
writes by more than a status interval (500 pipelines on two busy cores: the event loop decodes
thousands of watch events), so a status timer would find its own last write missing, write
the same status again, and announce the same transition (WorkersReady, DLQGrew) again: 20
status writes and 5 Events per pipeline where 3 and 2 were due, each write one more watch
event to fall behind on. Compared with what was last written instead, an unchanged pipeline
writes nothing. A write is remembered for `ttl_s` only: one that was lost (a failed patch) or
undone by someone else is made again after that.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from kafka_retry_operator.fleet import PipelineKey


class StatusWrites:
    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._last: dict[PipelineKey, tuple[float, Mapping[str, Any]]] = {}

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
