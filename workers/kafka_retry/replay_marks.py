"""Which waiting DLQ events were replayed already: the marks `dlq list` and `status` show.

A filtered replay cannot move the DLQ cursor past the first event it skipped (docs/dlq.md), so
the events it replayed after that one stay counted as waiting until the events before them are
replayed or purged, and a later replay that matches them sends them again. The replay's own
status says which they are: per DLQ partition, between its `cursorOffset` and `nextOffset`,
the events matching its filter were replayed and the others skipped. So a waiting event in
such a range that matches that replay's filter is marked as replayed by it (by the latest such
replay, if several). Direct replays (`--direct`) keep no status, and mark nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka_retry.dlq import DlqReader, DlqRecord, EventFilter, KafkaAccess, PartitionState
from kafka_retry.model import DLQReplaySpec, DLQReplayStatus


@dataclass(frozen=True)
class ReplayedRange:
    """Offsets [start, end) of one DLQ partition that `replay` examined past its cursor."""

    replay: str
    partition: int
    start: int
    end: int
    event_filter: EventFilter


def replayed_ranges(replays: Iterable[Mapping[str, Any]]) -> list[ReplayedRange]:
    """From DLQReplay objects in creation order: the ranges holding events they replayed
    that their cursor could not pass. Objects that cannot be read are left out."""
    found = []
    for obj in replays:
        try:
            spec = DLQReplaySpec.model_validate(obj.get("spec") or {})
            status = DLQReplayStatus.model_validate(obj.get("status") or {})
            event_filter = EventFilter.from_spec(spec.filter)
        except ValueError:
            continue
        name = str((obj.get("metadata") or {}).get("name", ""))
        for p in status.partitions:
            if p.replayed_past_cursor and p.cursor_offset < p.next_offset:
                found.append(
                    ReplayedRange(name, p.partition, p.cursor_offset, p.next_offset, event_filter)
                )
    return found


def replayed_by(record: DlqRecord, ranges: Sequence[ReplayedRange]) -> str | None:
    """The latest replay that replayed this (still waiting) event, if any."""
    for r in reversed(ranges):
        if (
            r.partition == record.partition
            and r.start <= record.offset < r.end
            and r.event_filter.matches(record)
        ):
            return r.replay
    return None


def count_waiting(
    access: KafkaAccess,
    topic: str,
    states: Sequence[PartitionState],
    ranges: Sequence[ReplayedRange],
) -> dict[str, int]:
    """Waiting events already replayed, by replay: reads only the ranges' waiting part."""
    heads = {s.partition: s.head for s in states}
    spans: dict[int, tuple[int, int]] = {}
    for r in ranges:
        start = max(r.start, heads.get(r.partition, r.end))
        if start < r.end:
            low, high = spans.get(r.partition, (start, r.end))
            spans[r.partition] = (min(low, start), max(high, r.end))
    counts: dict[str, int] = {}
    with DlqReader(access, topic, spans, heads=heads) as reader:
        while not reader.finished:
            for record in reader.poll(1000, 0.2):
                replay = replayed_by(record, ranges) if record.waiting else None
                if replay is not None:
                    counts[replay] = counts.get(replay, 0) + 1
    return counts
