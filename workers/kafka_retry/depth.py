"""How many events are still waiting: DLQ depth and tier lag, in one place.

DLQ depth counts the events that are still waiting in the DLQ, i.e. not yet replayed or
purged. Kafka keeps replayed events in the DLQ topic, so the depth is measured against a
*cursor*: a consumer group named `<dlq-topic>.cursor` that consumes nothing; whoever replays or
purges events advances its committed offset past them (`advance_cursor`). Per partition:

    head    = max(committed cursor offset, low watermark)   (low watermark without a cursor)
    waiting = max(0, high watermark - head)

and the depth is the sum over partitions. The low watermark moves past events removed by
retention or delete-records, so they are not counted either. A tier's lag is the same formula
with the tier's own consumer group in place of the cursor.

Everything here is usable outside the operator (the `kafka-retry` CLI): `measure_dlq` takes an
AdminClient and the DLQ topic names and answers with batched admin calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from kafka_retry.offset_queries import TP, committed, topic_partitions, watermarks

CURSOR_SUFFIX = ".cursor"


def cursor_group(dlq_topic: str) -> str:
    """The consumer group whose committed offsets mark how far a DLQ has been dealt with."""
    return f"{dlq_topic}{CURSOR_SUFFIX}"


def head(low: int, committed_offset: int | None) -> int:
    """The first offset of a partition still waiting."""
    return low if committed_offset is None else max(committed_offset, low)


def waiting(low: int, high: int, committed_offset: int | None) -> int:
    """Events of one partition still waiting: from its head to its high watermark."""
    return max(0, high - head(low, committed_offset))


@dataclass(frozen=True)
class Backlog:
    """What waits on one topic for one consumer group (or cursor)."""

    total: int
    # Partition -> first waiting offset, for partitions with events waiting.
    heads: Mapping[int, int] = field(default_factory=dict)


def backlog(
    topic: str,
    partitions: int,
    marks: Mapping[TP, tuple[int, int]],
    offsets: Mapping[TP, int | None] | None,
) -> Backlog | None:
    """The backlog of `topic` from batched query results; None if any partition is unknown
    (a partial sum would under-report)."""
    total = 0
    heads: dict[int, int] = {}
    for p in range(partitions):
        if (topic, p) not in marks:
            return None
        low, high = marks[(topic, p)]
        committed_offset = (offsets or {}).get((topic, p))
        n = waiting(low, high, committed_offset)
        total += n
        if n:
            heads[p] = head(low, committed_offset)
    return Backlog(total, heads)


def measure_dlq(
    admin: AdminClient, dlq_topics: Iterable[str], timeout: float = 10.0
) -> dict[str, Backlog]:
    """The depth of each DLQ topic that exists, with one metadata request (for these topics
    only), two `list_offsets` and one cursor query per topic (sent together)."""
    topics = set(dlq_topics)
    counts = topic_partitions(admin, topics, timeout)
    tps = [(t, p) for t, n in counts.items() for p in range(n)]
    marks = watermarks(admin, tps, timeout)
    cursors = committed(
        admin, {cursor_group(t): [tp for tp in tps if tp[0] == t] for t in counts}, timeout
    )
    result: dict[str, Backlog] = {}
    for topic, n in counts.items():
        b = backlog(topic, n, marks, cursors.get(cursor_group(topic)))
        if b is not None:
            result[topic] = b
    return result


def advance_cursor(admin: AdminClient, dlq_topic: str, offsets: Mapping[int, int]) -> None:
    """Mark everything before `offsets[partition]` as dealt with (replayed or purged).

    Uses the admin API, so no consumer joins the cursor group; offsets only move forward is
    the caller's contract (a replay that re-reads from the cursor must not move it back)."""
    partitions = [TopicPartition(dlq_topic, p, o) for p, o in sorted(offsets.items())]
    request = [ConsumerGroupTopicPartitions(cursor_group(dlq_topic), partitions)]
    for future in admin.alter_consumer_group_offsets(request).values():
        future.result()


def peek_timestamps(consumer: Consumer, offsets: Mapping[TP, int], timeout: float) -> dict[TP, int]:
    """The timestamp (ms) of the record at each (topic, partition) offset, or of the next one
    if that offset holds none (a transaction marker). One assign and a few fetches for all;
    partitions that answer nothing within `timeout` are left out."""
    if not offsets:
        return {}
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in offsets.items()])
    found: dict[TP, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(found) < len(offsets) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=len(offsets), timeout=0.2):
                if msg.error() is not None:
                    continue
                key = (str(msg.topic()), int(msg.partition() or 0))
                if key in offsets and key not in found:
                    found[key] = int(msg.timestamp()[1])
    finally:
        consumer.unassign()
    return found
