"""The DLQ replay engine, shared by the operator (a DLQReplay) and `kafka-retry dlq replay
--direct`.

A replay works on a snapshot: per DLQ partition, the waiting events from the head (cursor or
low watermark) to the high watermark at the start; later arrivals wait for the next replay.
Matching events are re-published to the target tier with their key, value and original
headers, our headers kept (last error, origin) except: `attempt` reset to what a first arrival
on that tier carries, `due-ms` now (a replayed event is due at once), `replay-id` set, and
`replay-source` = `<dlq-partition>:<dlq-offset>`. Produce is idempotent (acks=all) through the
data plane's `Forwarder`, in DLQ order, so per-key (and per-partition, with equal partition
counts) order holds on the target.

Checkpoints (every `checkpoint_interval` seconds and at the end) happen only after every sent
event is acknowledged: per DLQ partition `next` (all below replayed or skipped) and `cursor`
(end of the contiguous replayed prefix); per target partition the offset from which events of
this replay may exist that the checkpoint does not cover. At each checkpoint the DLQ cursor
group advances to `cursor`, so depth drops as the replay goes and counts exactly the events
still waiting: a skipped (non-matching) event stops the cursor of its partition, and stays
counted. A resumed replay first scans the target from those offsets for events carrying its
replay id, and does not send them again: no event is replayed twice in one replay.

Exactly-once pipelines (`spec.delivery: ExactlyOnce`): everything sent between two checkpoints
is one Kafka transaction, committed together with the cursor group's offsets, so a replay
killed at any point leaves either the checkpoint's events and cursor or neither. Its producer's
transactional id is the replay's, so a resumed replay aborts what the killed one left open
before it scans the target. A send that fails aborts the transaction (no in-process re-send
that might duplicate a record the broker had written): the replay stops, resumable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, TopicPartition

from kafka_retry import depth
from kafka_retry import headers as h
from kafka_retry.dlq import (
    DlqError,
    DlqReader,
    DlqRecord,
    EventFilter,
    KafkaAccess,
    high_watermarks,
    partition_states,
)
from kafka_retry.forwarding import FatalProducerError, Forwarder, TransactionAborted
from kafka_retry.kafka_config import exactly_once
from kafka_retry.model import (
    EXACTLY_ONCE,
    DLQReplayStatus,
    PartitionOffset,
    ReplayPartition,
    ResolvedTier,
    Topology,
)
from kafka_retry.offset_queries import committed
from kafka_retry.pacing import TokenBucket

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_S = 1.0
BATCH = 500
ACK_TIMEOUT_S = 60.0  # a checkpoint waits this long for the broker to acknowledge
SCAN_BATCH = 1000


class ReplayError(DlqError):
    """The replay cannot continue now; it may be resumed from its last checkpoint."""


class InvalidTarget(DlqError):
    """The target tier does not exist or is not a tier (never the source topic or the DLQ)."""


class Outcome(enum.Enum):
    SUCCEEDED = "Succeeded"  # every event of the snapshot replayed or skipped
    CANCELLED = "Cancelled"  # asked to cancel: what was replayed stays replayed
    INTERRUPTED = "Interrupted"  # asked to stop (shutdown, deletion): resumable


# --------------------------------------------------------------------------- checkpoint


@dataclass
class PartitionProgress:
    partition: int
    start: int  # the head when the replay began
    end: int  # the high watermark when the replay began (exclusive): the snapshot
    next: int  # every offset below is replayed (acknowledged) or skipped
    cursor: int  # end of the contiguous replayed prefix from `start`
    past_cursor: int = 0  # replayed after the first skipped event: still counted in depth

    @property
    def done(self) -> bool:
        return self.next >= self.end

    @property
    def prefix_open(self) -> bool:
        """No event was skipped yet: the cursor may follow `next`."""
        return self.cursor == self.next


@dataclass
class Checkpoint:
    """What a replay persists to resume; see the module docstring."""

    target_topic: str
    partitions: list[PartitionProgress]
    target_scan_from: dict[int, int]
    replayed: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        """Offsets in the snapshot (an upper bound on events: deleted ones leave gaps)."""
        return sum(p.end - p.start for p in self.partitions)

    @property
    def examined(self) -> int:
        return self.replayed + self.skipped

    @property
    def past_cursor(self) -> int:
        return sum(p.past_cursor for p in self.partitions)

    @property
    def done(self) -> bool:
        return all(p.done for p in self.partitions)

    def copy(self) -> Checkpoint:
        return dataclasses.replace(
            self,
            partitions=[dataclasses.replace(p) for p in self.partitions],
            target_scan_from=dict(self.target_scan_from),
        )

    def to_status(self) -> dict[str, object]:
        """The status fields (camelCase) that hold this checkpoint."""
        return DLQReplayStatus(
            target_topic=self.target_topic,
            replayed=self.replayed,
            skipped=self.skipped,
            total=self.total,
            partitions=[
                ReplayPartition(
                    partition=p.partition,
                    start_offset=p.start,
                    end_offset=p.end,
                    next_offset=p.next,
                    cursor_offset=p.cursor,
                    replayed_past_cursor=p.past_cursor,
                )
                for p in self.partitions
            ],
            target_scan_from=[
                PartitionOffset(partition=q, offset=o)
                for q, o in sorted(self.target_scan_from.items())
            ],
        ).model_dump(
            by_alias=True,
            mode="json",
            include={
                "target_topic", "replayed", "skipped", "total", "partitions", "target_scan_from",
            },
        )  # fmt: skip

    @classmethod
    def from_status(cls, status: DLQReplayStatus) -> Checkpoint | None:
        if not status.target_topic or not status.partitions:
            return None
        return cls(
            target_topic=status.target_topic,
            partitions=[
                PartitionProgress(
                    p.partition,
                    p.start_offset,
                    p.end_offset,
                    p.next_offset,
                    p.cursor_offset,
                    p.replayed_past_cursor,
                )
                for p in status.partitions
            ],
            target_scan_from={o.partition: o.offset for o in status.target_scan_from},
            replayed=status.replayed,
            skipped=status.skipped,
        )


# --------------------------------------------------------------------------- the engine


def resolve_target(topology: Topology, tier: str | None) -> tuple[int, ResolvedTier]:
    """(index, tier) that a replay writes to: the named tier, or the first. Raises
    InvalidTarget for an unknown name or a tier whose topic is the source or the DLQ."""
    if tier is None:
        index, target = 0, topology.tiers[0]
    else:
        found = [(i, t) for i, t in enumerate(topology.tiers) if t.name == tier]
        if not found:
            names = ", ".join(t.name for t in topology.tiers)
            raise InvalidTarget(f"pipeline {topology.pipeline} has no tier {tier!r} ({names})")
        index, target = found[0]
    if target.topic in (topology.source_topic, topology.dlq_topic):
        raise InvalidTarget(
            f"tier {target.name}'s topic {target.topic} is the pipeline's source or DLQ topic"
        )
    return index, target


def replay_headers(
    record: DlqRecord, *, replay_id: str, target_index: int, now_ms: int
) -> h.HeaderList:
    """The record's original headers untouched, then ours as described in the module doc."""
    state = dataclasses.replace(
        record.state,
        attempt=target_index + 1,  # failed attempts before tier i: i + 1 on a first arrival
        due_ms=now_ms,
        replay_id=replay_id,
        dlq_reason=None,
    )
    source = f"{record.partition}:{record.offset}".encode("ascii")
    return [*h.build_headers(record.parsed.original, state), (h.REPLAY_SOURCE, source)]


@dataclass(frozen=True)
class ReplayResult:
    outcome: Outcome
    checkpoint: Checkpoint


@dataclass
class _Already:
    """Events this replay sent before a restart, found on the target: DLQ (partition, offset)
    -> (target partition, target offset)."""

    sent: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)


class Replayer:
    """Replays one pipeline's DLQ into one tier. Runs on the calling thread; `should_cancel`
    and `should_stop` are polled between events and while pacing."""

    def __init__(
        self,
        topology: Topology,
        access: KafkaAccess,
        *,
        replay_id: str,
        target_tier: str | None = None,
        event_filter: EventFilter | None = None,
        rate: int | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL_S,
        batch: int = BATCH,
    ) -> None:
        self.topology = topology
        self.replay_id = replay_id
        self.target_index, self.target = resolve_target(topology, target_tier)
        self._access = access
        self.event_filter = event_filter or EventFilter()
        self.rate = rate
        self._interval = checkpoint_interval
        self._batch = batch
        self._cursor_member: Consumer | None = None  # exactly-once: the cursor group's

    def snapshot(self) -> Checkpoint:
        """The scope of a new replay: what waits in the DLQ now."""
        states = partition_states(self._access, self.topology.dlq_topic)
        return Checkpoint(
            target_topic=self.target.topic,
            partitions=[
                PartitionProgress(s.partition, s.head, s.high, s.head, s.head) for s in states
            ],
            target_scan_from=high_watermarks(self._access, self.target.topic),
        )

    def run(
        self,
        checkpoint: Checkpoint,
        *,
        on_checkpoint: Callable[[Checkpoint], None] = lambda _cp: None,
        should_cancel: Callable[[], bool] = lambda: False,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> ReplayResult:
        """Replay from `checkpoint` (a fresh `snapshot()` or one persisted earlier) until the
        snapshot is done, a cancel, or a stop. Raises DlqError (ReplayError) when Kafka fails;
        the last checkpoint handed to `on_checkpoint` is then where to resume from."""
        if checkpoint.target_topic != self.target.topic:
            raise ReplayError(
                f"checkpoint targets {checkpoint.target_topic}, not {self.target.topic}"
            )
        cp = checkpoint.copy()
        # Before the scan: a transactional one fences and aborts what a killed run left open.
        forwarder = self._forwarder()
        try:
            return self._run(cp, forwarder, on_checkpoint, should_cancel, should_stop)
        finally:
            with contextlib.suppress(FatalProducerError):  # reported by the error in flight
                forwarder.close(5.0)
            if self._cursor_member is not None:
                self._cursor_member.close()
                self._cursor_member = None

    def _forwarder(self) -> Forwarder:
        config = self._access.producer_config()
        if self.topology.delivery == EXACTLY_ONCE:
            # The cursor group's offsets go into each transaction, sent as this (never joined)
            # member's: the group has no members, only offsets.
            cursor = self._access.reader_config()
            cursor["group.id"] = depth.cursor_group(self.topology.dlq_topic)
            cursor, config = exactly_once(cursor, config, f"kafka-retry.replay.{self.replay_id}")
            self._cursor_member = Consumer(cursor)
        try:
            return Forwarder(config)
        except (KafkaException, FatalProducerError) as e:
            raise ReplayError(f"replay {self.replay_id} cannot start: {e}") from None

    def _run(
        self,
        cp: Checkpoint,
        forwarder: Forwarder,
        on_checkpoint: Callable[[Checkpoint], None],
        should_cancel: Callable[[], bool],
        should_stop: Callable[[], bool],
    ) -> ReplayResult:
        # Always: a checkpoint may be resumed before any progress was recorded in it. For a
        # fresh snapshot the scan range is empty.
        already = self._already_sent(cp)
        if already.sent:
            log.info("replay %s resumes; %d sent before", self.replay_id, len(already.sent))
        self._advance_cursor(cp)  # repairs a crash between a checkpoint and its cursor commit
        ranges = {p.partition: (p.next, p.end) for p in cp.partitions if not p.done}

        def abort() -> Outcome | None:
            if should_stop():
                return Outcome.INTERRUPTED
            if should_cancel():
                return Outcome.CANCELLED
            return None

        step = _Step(self, cp, already, forwarder, abort)
        try:
            with DlqReader(self._access, self.topology.dlq_topic, ranges) as reader:
                outcome = abort()
                while outcome is None and not reader.finished:
                    for record in reader.poll(self._batch, 0.2):
                        outcome = step.handle(record)
                        if outcome is not None:
                            break
                        if time.monotonic() - step.last_checkpoint >= self._interval:
                            self._checkpoint(cp, forwarder, already, on_checkpoint)
                            step.last_checkpoint = time.monotonic()
                    else:
                        forwarder.poll(0)
                        outcome = abort()
            if outcome is None:
                for p in cp.partitions:  # the rest of each range held no events
                    if p.prefix_open:
                        p.cursor = max(p.cursor, p.end)
                    p.next = max(p.next, p.end)
                outcome = Outcome.SUCCEEDED
            self._checkpoint(cp, forwarder, already, on_checkpoint)
        except (KafkaException, FatalProducerError, TransactionAborted) as e:
            raise ReplayError(f"replay {self.replay_id} stopped: {e}") from None
        return ReplayResult(outcome, cp)

    # ------------------------------------------------------------------ steps

    def send(self, forwarder: Forwarder, record: DlqRecord) -> None:
        headers = replay_headers(
            record,
            replay_id=self.replay_id,
            target_index=self.target_index,
            now_ms=int(time.time() * 1000),
        )
        # Acknowledgements are awaited at checkpoints (`Forwarder.drain`), not one by one.
        forwarder.send(self.target.topic, record.key, record.value, headers)

    def _checkpoint(
        self,
        cp: Checkpoint,
        forwarder: Forwarder,
        already: _Already,
        on_checkpoint: Callable[[Checkpoint], None],
    ) -> None:
        """Everything sent acknowledged, then the cursor, then the caller's record of it.
        Exactly-once: what was sent and the cursor, committed together in one transaction."""
        if self._cursor_member is not None:
            member = self._cursor_member
            moves = self._cursor_moves(cp)
            topic = self.topology.dlq_topic
            forwarder.commit(
                lambda: [TopicPartition(topic, q, o) for q, o in sorted(moves.items())],
                member.consumer_group_metadata(),
            )
        elif not forwarder.drain(ACK_TIMEOUT_S):
            raise ReplayError(
                f"Kafka did not acknowledge {forwarder.in_flight} replayed event(s) "
                f"within {ACK_TIMEOUT_S:.0f}s"
            )
        highs = high_watermarks(self._access, cp.target_topic)
        # Found-on-resume events not yet passed by `next` must stay in a later rescan.
        nexts = {p.partition: p.next for p in cp.partitions}
        already.sent = {
            src: dst for src, dst in already.sent.items() if src[1] >= nexts.get(src[0], 0)
        }
        for q, high in highs.items():
            earliest = [o for tq, o in already.sent.values() if tq == q]
            cp.target_scan_from[q] = min([high, *earliest])
        if self._cursor_member is None:
            self._advance_cursor(cp)
        on_checkpoint(cp.copy())

    def _advance_cursor(self, cp: Checkpoint) -> None:
        """Move the cursor group forward (never back) to each partition's replayed prefix."""
        moves = self._cursor_moves(cp)
        if moves:
            topic = self.topology.dlq_topic
            try:
                depth.advance_cursor(self._access.admin(), topic, moves)
            except KafkaException as e:
                raise ReplayError(f"cannot advance the cursor of {topic}: {e}") from None

    def _cursor_moves(self, cp: Checkpoint) -> dict[int, int]:
        """Per DLQ partition, where the cursor moves: its replayed prefix, if ahead."""
        topic = self.topology.dlq_topic
        group = depth.cursor_group(topic)
        tps = [(topic, p.partition) for p in cp.partitions]
        now = committed(self._access.admin(), {group: tps}, self._access.timeout).get(group)
        if now is None:
            raise ReplayError(f"cannot read the cursor of {topic}")
        return {
            p.partition: p.cursor
            for p in cp.partitions
            if p.cursor > p.start and p.cursor > _or(now.get((topic, p.partition)), -1)
        }

    def _already_sent(self, cp: Checkpoint) -> _Already:
        """Events of this replay on the target after the checkpoint's scan offsets."""
        highs = high_watermarks(self._access, cp.target_topic)
        ranges = {q: (cp.target_scan_from.get(q, 0), high) for q, high in highs.items()}
        found = _Already()
        replay_id = self.replay_id.encode()
        with DlqReader(self._access, cp.target_topic, ranges) as reader:
            while not reader.finished:
                for record in reader.poll(SCAN_BATCH, 0.2):
                    ours = dict(h.split(record.headers)[1])
                    if ours.get(h.REPLAY_ID) != replay_id:
                        continue
                    source = _position(ours.get(h.REPLAY_SOURCE))
                    if source is not None:
                        found.sent[source] = (record.partition, record.offset)
        return found


class _Step:
    """One record at a time: filter, pace, send, and the checkpoint's bookkeeping."""

    def __init__(
        self,
        replayer: Replayer,
        cp: Checkpoint,
        already: _Already,
        forwarder: Forwarder,
        abort: Callable[[], Outcome | None],
    ) -> None:
        self._replayer = replayer
        self._cp = cp
        self._progress = {p.partition: p for p in cp.partitions}
        self._already = already
        self._forwarder = forwarder
        self._abort = abort
        self._bucket = TokenBucket(replayer.rate)
        self.last_checkpoint = time.monotonic()

    def handle(self, record: DlqRecord) -> Outcome | None:
        """Replay or skip `record`; an outcome if asked to stop before it was handled."""
        cp, p = self._cp, self._progress[record.partition]
        if self._replayer.event_filter.matches(record):
            if (record.partition, record.offset) not in self._already.sent:
                outcome = self._pace()
                if outcome is not None:
                    return outcome
                self._replayer.send(self._forwarder, record)
                self._bucket.take()
            cp.replayed += 1
            if p.prefix_open:
                p.cursor = record.offset + 1
            else:
                p.past_cursor += 1
        else:
            cp.skipped += 1  # and the replayed prefix of this partition ends here
        p.next = record.offset + 1
        return None

    def _pace(self) -> Outcome | None:
        """Wait for the next slot, serving delivery reports meanwhile."""
        while (wait := self._bucket.wait_s()) > 0:
            outcome = self._abort()
            if outcome is not None:
                return outcome
            self._forwarder.poll(min(wait, 0.1))
        return None


def _position(value: bytes | None) -> tuple[int, int] | None:
    if value is None or len(value) > 40:
        return None
    try:
        partition, offset = value.decode("ascii").split(":")
        return int(partition), int(offset)
    except ValueError:
        return None


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
