"""Following a pipeline's topology while running: the operator rewrites the ConfigMap when the
spec changes (a tier added, removed or renamed, a delay or a DLQ topic changed), and a live
service must forward to the new first tier without a restart.

A `TopologyFollower` re-reads the topology every `interval_s` on a daemon thread (the
ConfigMap through the API, or a file such as a mounted ConfigMap) and hands a changed one to
`StageRunner.follow`, which applies it on the consumer's thread between batches. A read that
fails is logged and tried again at the next interval; the last topology stays in force.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka_retry.model import Topology

log = logging.getLogger(__name__)

# How often a follower re-reads; the operator lets a drained topic settle for longer
# (KAFKA_RETRY_OPERATOR_DRAIN_SETTLE, 60 s) before it stops draining it.
DEFAULT_INTERVAL_S = 10.0


class TopologyFollower:
    def __init__(
        self,
        read: Callable[[], Topology],
        on_change: Callable[[Topology], None],
        current: Topology,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._read = read
        self._on_change = on_change
        self._current = current
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TopologyFollower:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="topology", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> bool:
        """Read once; True when the topology changed (and was handed on)."""
        try:
            new = self._read()
        except Exception as e:  # the API or file briefly unavailable: keep the last one
            log.warning("cannot re-read the topology of %s: %s", self._current.pipeline, e)
            return False
        if new == self._current:
            return False
        self._current = new
        self._on_change(new)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()
