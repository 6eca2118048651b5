"""What a DLQ holds, in aggregate (`kafka-retry dlq stats`), and what a replay of it would do
(`kafka-retry dlq replay --dry-run`): counts by error class, DLQ reason and last tier, and how
old the events are. Pure: the CLI reads the records and prints these."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka_retry.dlq import DlqRecord, EventFilter

# Upper bounds of the age buckets (seconds since the event reached the DLQ), then "older".
AGE_BUCKETS: tuple[tuple[str, int], ...] = (
    ("< 1m", 60),
    ("< 10m", 600),
    ("< 1h", 3600),
    ("< 6h", 6 * 3600),
    ("< 1d", 86400),
    ("< 7d", 7 * 86400),
)
OLDER = ">= 7d"
UNKNOWN = "(unknown)"


@dataclass
class Stats:
    """Counts of one set of DLQ events."""

    events: int = 0
    error_classes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    ages: Counter[str] = field(default_factory=Counter)
    partitions: Counter[int] = field(default_factory=Counter)
    oldest_ms: int | None = None
    newest_ms: int | None = None

    def add(self, record: DlqRecord, now_ms: int) -> None:
        s = record.state
        self.events += 1
        self.error_classes[s.error_class or UNKNOWN] += 1
        self.reasons[s.dlq_reason or UNKNOWN] += 1
        self.tiers[s.tier or "(live lane)"] += 1
        self.partitions[record.partition] += 1
        ts = record.timestamp_ms
        self.ages[age_bucket(None if ts is None else now_ms - ts)] += 1
        if ts is not None:
            self.oldest_ms = ts if self.oldest_ms is None else min(self.oldest_ms, ts)
            self.newest_ms = ts if self.newest_ms is None else max(self.newest_ms, ts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, most frequent first; ages in bucket order."""
        return {
            "events": self.events,
            "errorClasses": _ranked(self.error_classes),
            "reasons": _ranked(self.reasons),
            "tiers": _ranked(self.tiers),
            "ages": [
                {"name": name, "count": self.ages[name]}
                for name in [*(n for n, _ in AGE_BUCKETS), OLDER, UNKNOWN]
                if self.ages[name]
            ],
            "partitions": [{"name": p, "count": n} for p, n in sorted(self.partitions.items())],
        }


def age_bucket(age_ms: int | None) -> str:
    if age_ms is None:
        return UNKNOWN
    for name, bound_s in AGE_BUCKETS:
        if age_ms < bound_s * 1000:
            return name
    return OLDER


def collect(records: Iterable[DlqRecord], now_ms: int) -> Stats:
    stats = Stats()
    for r in records:
        stats.add(r, now_ms)
    return stats


@dataclass
class ReplayPlan:
    """What a replay would do now: the events it would send to the target and those its
    filter would leave waiting."""

    target_tier: str
    target_topic: str
    rate: int | None
    replayed: Stats = field(default_factory=Stats)
    skipped: Stats = field(default_factory=Stats)

    def add(self, record: DlqRecord, event_filter: EventFilter, now_ms: int) -> None:
        (self.replayed if event_filter.matches(record) else self.skipped).add(record, now_ms)

    @property
    def seconds(self) -> float | None:
        """How long the sending would take at the rate limit, at least."""
        return self.replayed.events / self.rate if self.rate else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "targetTier": self.target_tier,
            "targetTopic": self.target_topic,
            "wouldReplay": self.replayed.to_dict(),
            "wouldSkip": self.skipped.events,
            "maxMessagesPerSecond": self.rate,
            "atLeastSeconds": self.seconds,
        }


def _ranked(counter: Counter[str]) -> list[dict[str, Any]]:
    return [
        {"name": k, "count": n} for k, n in sorted(counter.items(), key=lambda x: (-x[1], x[0]))
    ]
