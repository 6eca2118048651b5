"""What `peers.py` computes from what the consumers printed: no Kafka, no processes.

Both sides (ours, in Python, and the Spring peer, in Java) print the same lines from their
handler, so one parser and one set of measures serve both:

    READY
    EV <F|H> <event id> <stage> <epoch microseconds>

F: the call failed (the handler raised), H: handled; stage 0 is the live lane (Spring: the main
topic), 1 the retry tier (Spring: the retry topic). Anything else on a line (a JVM's log) is
not ours and is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import benchlib

# fields of /proc/<pid>/stat after "pid (comm)": utime and stime are the 14th and 15th fields
_UTIME, _STIME = 11, 12


@dataclass(frozen=True)
class Call:
    """One handler call as the handler saw it."""

    failed: bool
    event_id: int
    stage: int
    at_us: int


def parse(line: str) -> Call | None:
    """The call a line reports, or None for any other line (READY, a log line, a torn line)."""
    parts = line.split()
    if len(parts) != 5 or parts[0] != "EV" or parts[1] not in ("F", "H"):
        return None
    try:
        return Call(parts[1] == "F", int(parts[2]), int(parts[3]), int(parts[4]))
    except ValueError:
        return None


def cpu_ticks(stat: str) -> int:
    """User + system CPU of a whole process (every thread) from its /proc/<pid>/stat text, in
    clock ticks. The command name, in parentheses, may hold spaces: fields count after it."""
    fields = stat.rpartition(")")[2].split()
    return int(fields[_UTIME]) + int(fields[_STIME])


def lateness_ms(calls: Iterable[Call], delay_s: float, until_us: int | None = None) -> list[float]:
    """Per event failed on the live lane: its retry's start minus (its failure + the delay), in
    ms; negative is early. An event not retried by `until_us` counts at its lateness then, a
    lower bound (leaving it out would flatter a side that falls behind); without `until_us`,
    or if it was not due yet then, it is left out."""
    failed_at: dict[int, int] = {}
    retried_at: dict[int, int] = {}
    for c in calls:
        if c.stage == 0 and c.failed:
            failed_at[c.event_id] = c.at_us
        elif c.stage == 1:
            retried_at.setdefault(c.event_id, c.at_us)
    delay_us = delay_s * 1e6
    out = []
    for i, failed in failed_at.items():
        if i in retried_at:
            out.append((retried_at[i] - failed - delay_us) / 1000)
        elif until_us is not None and until_us > failed + delay_us:
            out.append((until_us - failed - delay_us) / 1000)
    return out


def unretried(calls: Sequence[Call]) -> int:
    """Events failed on the live lane and not (yet) retried."""
    failed = {c.event_id for c in calls if c.stage == 0 and c.failed}
    return len(failed - {c.event_id for c in calls if c.stage == 1})


def retried(calls: Iterable[Call], first_id: int = 0) -> int:
    """Events from `first_id` on that were handled (or failed) on the retry stage."""
    return len({c.event_id for c in calls if c.stage == 1 and c.event_id >= first_id})


def repeated(calls: Sequence[Call]) -> int:
    """Calls for an event on a stage that had already called the handler for it: a consumer
    that delivers a record again (after a seek, say) makes the handler do its work twice."""
    return len(calls) - len({(c.event_id, c.stage) for c in calls})


def live_rate(calls: Sequence[Call]) -> float | None:
    """Live-lane calls per second from its first to its last (handled or failed: either way the
    live lane is past the event); None for fewer than two."""
    times = [c.at_us for c in calls if c.stage == 0]
    if len(times) < 2 or max(times) == min(times):
        return None
    return len(times) / ((max(times) - min(times)) / 1e6)


@dataclass(frozen=True)
class Lateness:
    count: int
    early: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    min_ms: float | None  # below 0: the earliest retry, how early
    censored: int = 0  # not retried by the end: counted at their lateness then, a lower bound

    @classmethod
    def of(cls, values: Sequence[float], censored: int = 0) -> Lateness:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return cls(
            len(values),
            sum(1 for v in values if v < 0),
            r(benchlib.percentile(values, 50)),
            r(benchlib.percentile(values, 99)),
            r(max(values) if values else None),
            r(min(values) if values else None),
            censored,
        )


def ratio_rows(
    ours: dict[str, float | None], peers: dict[str, dict[str, float | None]], names: Sequence[str]
) -> list[tuple[str, ...]]:
    """One row per measure: ours / each peer's (below 1: ours is lower, i.e. better for costs
    and lateness)."""
    rows = []
    for name in names:
        cells = [benchlib.ratio(ours.get(name), peer.get(name)) for peer in peers.values()]
        rows.append((name, *("-" if c is None else f"{c:.2f}" for c in cells)))
    return rows
