"""The handler's deadline in a tier worker: a call that overruns it stops the process.

Python cannot interrupt a call that hangs (a lock, a socket without a timeout, a C
extension), and a worker stuck in one is no use: it would be evicted from its group at
`max.poll.interval.ms` anyway, and its replacement would get the same event. Exiting lets the
restart re-read the event; `poison.py` dead-letters one that keeps doing it. Not for the SDK:
a service's process is the service's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_DEADLINE = 4


class HandlerWatchdog:
    def __init__(self, deadline_s: float, started: Callable[[], float]) -> None:
        """`started()`: `time.perf_counter()` when the call in progress began, 0 if none."""
        self._deadline = deadline_s
        self._started = started
        self._thread = threading.Thread(target=self._watch, name="handler-watchdog", daemon=True)

    def start(self) -> HandlerWatchdog:
        self._thread.start()
        return self

    def _watch(self) -> None:
        tick = min(1.0, self._deadline / 4)
        while True:
            time.sleep(tick)  # sleep-ok: a watchdog thread's tick, never an event's delay
            since = self._started()
            if since and time.perf_counter() - since > self._deadline:
                log.error(
                    "the handler overran its deadline of %gs: stopping so that the event is "
                    "read again after the restart (dead-lettered as poison if it keeps doing "
                    "this)",
                    self._deadline,
                )
                logging.shutdown()
                os._exit(EXIT_DEADLINE)
