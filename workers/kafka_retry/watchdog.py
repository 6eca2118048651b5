"""Deadlines in a tier worker's process: a call that overruns its deadline stops the process.

Python cannot interrupt a call that hangs (a lock, a socket without a timeout, a C
extension), and a worker stuck in one is no use: it would be evicted from its group at
`max.poll.interval.ms` anyway, and its replacement would get the same event. Exiting lets the
restart re-read from the committed offsets. Two calls are watched:

- the handler's: `poison.py` dead-letters an event whose call keeps doing this;
- a transaction API call's (ExactlyOnce): librdkafka can block in one far past the timeout it
  was given, for good, after a broker restart (`send_offsets_to_transaction` waiting on a
  coordinator request that is never retried: librdkafka#5456, #5511). The restart's producer
  fences this one with the same transactional id, and the transaction it left open is aborted.

Not for the SDK: a service's process is the service's (`StageRunner.alive()` goes false).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

log = logging.getLogger(__name__)

EXIT_DEADLINE = 4  # the handler overran its deadline
EXIT_TRANSACTION_STUCK = 5  # a transaction API call blocked past its deadline


class Watch(NamedTuple):
    what: str  # for the log line: "the handler"
    deadline_s: float
    started: Callable[[], float]  # time.perf_counter() when the call in progress began; 0: none
    exit_code: int
    why: str  # what the restart does about it, for the log line


class Watchdog:
    def __init__(self, watches: Sequence[Watch]) -> None:
        self._watches = tuple(watches)
        self._tick = min(1.0, *(w.deadline_s / 4 for w in self._watches))
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)  # sleep-ok: a watchdog thread's tick, never an event's delay
            for w in self._watches:
                since = w.started()
                if since and time.perf_counter() - since > w.deadline_s:
                    log.error("%s overran its deadline of %gs: stopping %s", w.what,
                              w.deadline_s, w.why)  # fmt: skip
                    logging.shutdown()
                    os._exit(w.exit_code)
