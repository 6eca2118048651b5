"""Poison events: an event that stops the process on every try (a handler that hangs past its
deadline, crashes the interpreter or calls `os._exit`) would be re-read after every restart,
forever, and hold up its partition.

A run marks where it starts on a partition: before it hands the first event to the handler,
it commits that event's offset (synchronously, it is already the committed one) with
metadata `kafka-retry-head:<offset>:<starts>` (and the topology tag, topology_tag.py).
Progress is committed as usual afterwards, with only the tag, which clears the mark. A later
run that finds the mark still on the committed offset knows that the run before stopped
there, or after it before its progress was committed. It then handles that partition
carefully: it marks every event before handing it over, so the mark ends up on the event that
stops it, counting the starts. An event marked `POISON_STARTS` times already goes to the DLQ
(`dlq-reason: poison`) instead of the handler. Careful handling ends with the first batch that
completes.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka_retry.offsets import TopicPartitionKey

POISON_STARTS = 3
_MARK = "kafka-retry-head:"


def mark(offset: int, starts: int) -> str:
    return f"{_MARK}{offset}:{starts}"


def starts_at(metadata: str | None, committed: int) -> int:
    """How often the event at `committed` was handed over by runs that then stopped, as the
    committed offset's metadata says (0: no mark, or a mark of another offset)."""
    if not metadata or not metadata.startswith(_MARK):
        return 0
    offset, _, starts = metadata[len(_MARK) :].split(" ", 1)[0].partition(":")
    if offset != str(committed) or not starts.isdigit():
        return 0
    return int(starts)


class HeadWatch:
    """Per assigned partition: what the previous run left, and whether to mark every event.
    On the consumer's thread only."""

    def __init__(self) -> None:
        self._first: dict[TopicPartitionKey, tuple[int, int]] = {}  # (committed, starts)
        self._careful: set[TopicPartitionKey] = set()

    @property
    def watching(self) -> bool:
        """Whether `before_handler` has anything to say (checked per event: cheap)."""
        return bool(self._first or self._careful)

    def assigned(self, tp: TopicPartitionKey, committed: int, metadata: str | None) -> None:
        """`committed` < 0: none yet (a new group; the first mark commits one)."""
        self._first[tp] = (committed, starts_at(metadata, committed) if committed >= 0 else 0)

    def before_handler(self, tp: TopicPartitionKey, offset: int) -> int | None:
        """None: hand the event over. Otherwise the event's starts including this one: more
        than `POISON_STARTS`, dead-letter it; else commit `mark(offset, starts)`, then hand
        it over."""
        first = self._first.pop(tp, None)
        if first is not None:
            committed, starts = first
            if starts and committed == offset:
                self._careful.add(tp)
                return starts + 1
            return 1
        return 1 if tp in self._careful else None

    def careful(self, tp: TopicPartitionKey) -> bool:
        """Whether `tp` is handled carefully (a previous run stopped on it): its marks must be
        durable before the handler runs. A run's first mark otherwise need not wait."""
        return tp in self._careful

    def settled(self) -> None:
        """A batch completed: the run is past whatever stopped the previous ones."""
        self._careful.clear()

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        for tp in tps:
            self._first.pop(tp, None)
            self._careful.discard(tp)
