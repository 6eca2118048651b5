"""The replay rate limit: a token bucket whose promise holds in every 1-second window.

A replay at `rate` events per second protects a downstream that was sized for that rate, so
no window of one second may carry more than `rate` events, whatever happened before it: a
stall (the broker slow to acknowledge a checkpoint, the process descheduled) must not be
followed by a catch-up burst. A schedule anchored at the start (event i at start + i/rate)
does exactly that after a stall; a token bucket does not, because what it saved up is
capped at its size.

The bucket holds at most `burst` tokens, `max(1, rate // 100)` (1% of the rate: a loop
that sends several events per wake-up at high rates, a single event below 200/s), and
refills at `rate - burst + 1` tokens per second. Any half-open window of one second then
allows at most `burst` (saved before it) plus `rate - burst` (refilled within it) events:
`rate`. The steady pace is `rate - burst + 1`, at most 1% below the rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

BURST_FRACTION = 0.01
_EPSILON = 1e-9


def burst_of(rate: int) -> int:
    return max(1, int(rate * BURST_FRACTION))


class TokenBucket:
    """Call `wait_s()` until it answers 0, then `take()` before each event. Without a rate,
    never waits. Starts with one token: the first event goes at once, and a resumed replay
    cannot add a burst to what its previous run sent just before."""

    def __init__(self, rate: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst_of(rate) if rate else 0
        self._fill = float(rate - self.burst + 1) if rate else 0.0
        self._clock = clock
        self._tokens = 1.0
        self._at: float | None = None

    def wait_s(self) -> float:
        """Seconds until a token is there (0: one is)."""
        if not self.rate:
            return 0.0
        self._refill()
        missing = 1.0 - self._tokens
        # Within float error of a whole token: waiting that long would not move the clock.
        return 0.0 if missing <= _EPSILON else missing / self._fill

    def take(self) -> None:
        if self.rate:
            self._refill()
            self._tokens -= 1.0

    def _refill(self) -> None:
        now = self._clock()
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self._fill)
        self._at = now
