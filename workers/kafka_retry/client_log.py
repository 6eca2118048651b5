"""librdkafka's log lines, rate-limited: an unreachable broker makes every client log the same
connection failure many times a second (measured: about 19 ERROR lines per second per worker).

`ClientLog` is what the data plane's clients get as their `logger` (confluent-kafka calls its
`log(level, fmt, *args)` from `poll()`/`consume()`). Lines that differ only in their numbers
are one kind; the first of a kind is logged, the rest within `interval_s` are counted, and the
next one after that is logged with how many were left out.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

_NUMBERS = re.compile(r"\d+")
SUMMARY_INTERVAL_S = 60.0
_KINDS_KEPT = 256  # distinct kinds remembered; a flood of new kinds only restarts the count


class ClientLog:
    def __init__(
        self, logger: logging.Logger, interval_s: float = SUMMARY_INTERVAL_S, now: Any = None
    ) -> None:
        self._logger = logger
        self._interval = interval_s
        self._now = now or time.monotonic
        self._lock = threading.Lock()
        # kind -> (when it was last logged, lines left out since)
        self._kinds: dict[tuple[int, str], tuple[float, int]] = {}

    def log(self, level: int, msg: str, *args: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = f"{msg} {args}"
        kind = (level, _NUMBERS.sub("#", text)[:300])
        now = self._now()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self._interval:
                self._kinds[kind] = (seen[0], seen[1] + 1)
                return
            if seen is None and len(self._kinds) >= _KINDS_KEPT:
                self._kinds.clear()
            self._kinds[kind] = (now, 0)
        if seen is not None and seen[1]:
            text += f" ({seen[1]} more like this in the last {now - seen[0]:.0f}s)"
        self._logger.log(level, "%s", text)


def client_log() -> ClientLog:
    """The `logger` for one Kafka client of the data plane (logger `kafka_retry.rdkafka`)."""
    return ClientLog(logging.getLogger("kafka_retry.rdkafka"))
