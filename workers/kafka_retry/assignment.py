"""The partitions a runner holds, and everything it keeps per partition, kept in step.

Per assigned partition: its waiting events and pause (`DelayGate`, on a tier), its offset
frontier (`OffsetTracker`), what the previous runs left on it (`HeadWatch`, poison.py), and
whether it is stalled behind a stuck forward. `assign`, `leaving` and `release` are the only
ways in and out, so nothing outlives its partition: a revoke drains and commits between
`leaving` and `release` (runner.py), a loss only releases. librdkafka keeps a pause across a
revoke and reassignment and cannot say whether a partition is paused, so pauses are tracked
here (and in the gate) and cleared while the partition is still assigned.
Consumer's thread only.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from kafka_retry.delay import DelayGate
from kafka_retry.offsets import OffsetTracker, TopicPartitionKey
from kafka_retry.poison import HeadWatch

log = logging.getLogger(__name__)

COMMITTED_TIMEOUT_S = 10


class Assignment:
    def __init__(self, *, incremental: bool) -> None:
        self._incremental = incremental
        self.gate: DelayGate | None = None  # a tier's, set with its consumer
        self.partitions: set[TopicPartitionKey] = set()
        self.tracker = OffsetTracker()
        self.heads = HeadWatch()
        self.stalled: set[TopicPartitionKey] = set()  # paused while a forward is stuck

    def assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Take `partitions` (an increment, or the whole assignment when rebalances are eager)
        unpaused: they are read from the committed offset, where any held head still is."""
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
            self.partitions.clear()
        if partitions:
            consumer.resume(partitions)
        self.partitions.update((p.topic, p.partition) for p in partitions)
        self._read_heads(consumer, partitions)

    def _read_heads(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """What the previous runs left on these partitions (poison.py); best effort."""
        if not partitions:
            return
        try:
            committed = consumer.committed(partitions, timeout=COMMITTED_TIMEOUT_S)
        except KafkaException as e:
            log.warning("committed offsets unreadable, no poison check this time: %s", e)
            return
        for p in committed:
            if p.error is None:
                self.heads.assigned((p.topic, p.partition), p.offset, p.metadata)

    def leaving(self, tps: list[TopicPartitionKey]) -> None:
        """Revoked or lost next: their waiting events are dropped (the next owner reads them
        again) and the gate's pauses cleared while they are still assigned (a stall's are
        cleared by `assign` if they come back)."""
        if self.gate is not None:
            self.gate.forget(tps)

    def release(self, tps: list[TopicPartitionKey]) -> None:
        """Gone: late acknowledgements for them change nothing."""
        self.tracker.forget(tps)
        self.heads.forget(tps)
        self.partitions.difference_update(tps)
        self.stalled.difference_update(tps)

    def rewind(self, consumer: Any) -> None:
        """A transaction was aborted (exactly-once): nothing since the last commit counts.
        Every assigned partition drops its waiting events and begun tickets and is read
        again from its committed offset (the earliest, none committed yet: a new group).
        Raises KafkaException when the committed offsets are unreadable: a restart re-reads."""
        tps = sorted(self.partitions)
        if self.gate is not None:
            self.gate.forget(tps)
        self.tracker.forget(tps)
        if not tps:
            return
        committed = consumer.committed(
            [TopicPartition(t, p) for t, p in tps], timeout=COMMITTED_TIMEOUT_S
        )
        for p in committed:
            offset = p.offset if p.offset >= 0 else OFFSET_BEGINNING
            consumer.seek(TopicPartition(p.topic, p.partition, offset))
        log.info("rewound %d partition(s) to their committed offsets", len(tps))

    def stall(self, consumer: Any) -> int:
        """Pause every assigned partition (a forward is stuck: nothing after it could be
        committed anyway), except those the gate paused, which it resumes itself."""
        held = self.gate.paused() if self.gate is not None else set()
        self.stalled = self.partitions - held
        consumer.pause([TopicPartition(t, p) for t, p in sorted(self.stalled)])
        return len(self.stalled)

    def unstall(self, consumer: Any) -> None:
        """The stuck forward was delivered: resume what `stall` paused, but not a partition the
        gate paused meanwhile (its windows full)."""
        held = self.gate.paused() if self.gate is not None else set()
        resume = (self.stalled & self.partitions) - held
        consumer.resume([TopicPartition(t, p) for t, p in sorted(resume)])
        self.stalled = set()
