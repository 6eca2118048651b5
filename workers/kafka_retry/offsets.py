"""Which input offsets may be committed: the contiguous frontier of finished events.

An event is finished when its handler succeeded or its forward was acknowledged. Forwards
are acknowledged out of order, so per partition we keep the begun events in consume order and
advance the frontier over the finished prefix only. An event that was never begun (a held
head, or the rest of a batch after it) stops nothing, because nothing after it is begun
either until it is re-read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

TopicPartitionKey = tuple[str, int]


class Ticket:
    """One begun event; `OffsetTracker.finish` marks it done. `forgotten` once its partition
    was revoked: whatever becomes of it changes nothing."""

    __slots__ = ("done", "offset", "partition")

    def __init__(self, partition: _Partition, offset: int) -> None:
        self.partition = partition
        self.offset = offset
        self.done = False

    @property
    def forgotten(self) -> bool:
        return self.partition.forgotten


class _Partition:
    __slots__ = ("advanced", "forgotten", "frontier", "pending", "tp")

    def __init__(self, tp: TopicPartitionKey) -> None:
        self.tp = tp
        self.pending: deque[Ticket] = deque()
        self.frontier: int | None = None  # next offset to consume, i.e. the one to commit
        self.advanced = False
        self.forgotten = False  # revoked or lost: its tickets no longer matter


class OffsetTracker:
    """Per assigned partition; single-threaded like the consumer it serves."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartitionKey, _Partition] = {}

    def begin(self, tp: TopicPartitionKey, offset: int) -> Ticket:
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = _Partition(tp)
        ticket = Ticket(state, offset)
        state.pending.append(ticket)
        return ticket

    @staticmethod
    def finish(ticket: Ticket) -> None:
        """Mark done. A ticket of a partition that was revoked meanwhile changes nothing."""
        ticket.done = True
        state = ticket.partition
        pending = state.pending
        while pending and pending[0].done:
            state.frontier = pending.popleft().offset + 1
            state.advanced = True

    def take_advanced(self) -> list[tuple[str, int, int]]:
        """(topic, partition, offset to commit) for frontiers that moved since the last call."""
        out = []
        for (topic, partition), state in self._partitions.items():
            if state.advanced and state.frontier is not None:
                state.advanced = False
                out.append((topic, partition, state.frontier))
        return out

    def frontiers(self, tps: Iterable[TopicPartitionKey]) -> list[tuple[str, int, int]]:
        out = []
        for tp in tps:
            state = self._partitions.get(tp)
            if state is not None and state.frontier is not None:
                out.append((tp[0], tp[1], state.frontier))
        return out

    def forget(self, tps: Iterable[TopicPartitionKey]) -> None:
        """On revoke/lost: late acknowledgements for these partitions are ignored from now."""
        for tp in tps:
            state = self._partitions.pop(tp, None)
            if state is not None:
                state.forgotten = True

    def settled(self, tp: TopicPartitionKey) -> bool:
        """Every event begun on `tp` is finished: its frontier is the next offset."""
        state = self._partitions.get(tp)
        return state is None or not state.pending

    def in_flight(self) -> int:
        return sum(len(s.pending) for s in self._partitions.values())
