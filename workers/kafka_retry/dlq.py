"""A pipeline's dead-letter queue as typed records: which events wait, reading and filtering
them, and purging them with Kafka's delete-records.

"Waiting" is the control plane's definition, reused from `kafka_retry.depth` rather
than restated: per partition, the events from max(committed offset of the cursor group
`<dlq>.cursor`, low watermark) up to the high watermark. A replay advances the cursor over
the events it replayed (see `dlq_replay`); a purge moves the low watermark and leaves the
cursor alone. docs/dlq.md tells the whole story.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from kafka_retry import depth
from kafka_retry import headers as h
from kafka_retry.kafka_config import consumer_config, producer_config
from kafka_retry.model import ReplayFilter
from kafka_retry.offset_queries import committed, watermarks

log = logging.getLogger(__name__)
# librdkafka's own lines (connection refused, ...) go here, so a CLI can keep them off stderr.
librdkafka_log = logging.getLogger("kafka_retry.dlq.rdkafka")

READER_GROUP = "kafka-retry.dlq-reader"  # assign() only: never joined, never committed
DEFAULT_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 30.0  # a read that gets nothing at all for this long is a Kafka problem


class DlqError(Exception):
    """An expected failure; its message is one line fit for a person on call."""


class KafkaUnavailable(DlqError):
    pass


class TopicNotFound(DlqError):
    pass


class InvalidRequest(DlqError):
    """The request names a partition or offset the DLQ does not have (a usage error)."""


def _no_partition(topic: str, partition: int, count: int) -> InvalidRequest:
    return InvalidRequest(f"{topic} has no partition {partition} (partitions 0-{count - 1})")


def kafka_reason(e: BaseException) -> str:
    """The short reason of a Kafka error (librdkafka's `str()` repeats codes and names)."""
    err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
    return err.str() if err is not None else str(e)


class KafkaAccess:
    """How to reach one pipeline's Kafka: bootstrap servers plus librdkafka settings (the
    pipeline's Secret or `KAFKA_CLIENT_*`). The settings may hold credentials: they are only
    passed to clients, never logged or printed. An existing AdminClient (the operator's
    shared one) may be handed in; otherwise one is made on first use."""

    def __init__(
        self,
        bootstrap_servers: str,
        settings: Mapping[str, Any] | None = None,
        *,
        admin: AdminClient | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout = timeout
        self._settings: dict[str, Any] = {"logger": librdkafka_log, **(settings or {})}
        self._admin = admin

    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(
                {**self._settings, "bootstrap.servers": self.bootstrap_servers}
            )
        return self._admin

    def reader_config(self) -> dict[str, Any]:
        extra = {
            **self._settings,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
        }
        return consumer_config(self.bootstrap_servers, READER_GROUP, extra)

    def producer_config(self) -> dict[str, Any]:
        return producer_config(self.bootstrap_servers, self._settings)

    def unreachable(self, e: BaseException) -> KafkaUnavailable:
        return KafkaUnavailable(
            f"cannot reach Kafka at {self.bootstrap_servers}: {kafka_reason(e)}"
        )


# --------------------------------------------------------------------------- what waits


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One DLQ partition now: its watermarks and the cursor group's committed offset."""

    partition: int
    low: int
    high: int
    cursor: int | None

    @property
    def head(self) -> int:
        """The first offset still waiting."""
        return depth.head(self.low, self.cursor)

    @property
    def waiting(self) -> int:
        return depth.waiting(self.low, self.high, self.cursor)


def partition_count(access: KafkaAccess, topic: str) -> int:
    try:
        metadata = access.admin().list_topics(topic, timeout=access.timeout)
    except KafkaException as e:
        raise access.unreachable(e) from None
    found = metadata.topics.get(topic)
    error = found.error if found is not None else None
    if found is None or (error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        raise TopicNotFound(f"topic {topic} does not exist")
    if error is not None:
        raise KafkaUnavailable(f"topic {topic}: {error.str()}")
    return len(found.partitions)


def partition_states(access: KafkaAccess, topic: str) -> list[PartitionState]:
    """Every partition of the DLQ with what waits in it; raises rather than answer for only
    some partitions (a partial answer would under-report)."""
    n = partition_count(access, topic)
    tps = [(topic, p) for p in range(n)]
    admin = access.admin()
    marks = watermarks(admin, tps, access.timeout)
    group = depth.cursor_group(topic)
    cursors = committed(admin, {group: tps}, access.timeout).get(group)
    if len(marks) != n or cursors is None:
        raise KafkaUnavailable(f"cannot read the offsets of {topic} at {access.bootstrap_servers}")
    return [
        PartitionState(p, marks[(topic, p)][0], marks[(topic, p)][1], cursors.get((topic, p)))
        for p in range(n)
    ]


def depth_of(states: Sequence[PartitionState]) -> int:
    return sum(s.waiting for s in states)


def high_watermarks(access: KafkaAccess, topic: str) -> dict[int, int]:
    n = partition_count(access, topic)
    marks = watermarks(access.admin(), [(topic, p) for p in range(n)], access.timeout)
    if len(marks) != n:
        raise KafkaUnavailable(f"cannot read the offsets of {topic} at {access.bootstrap_servers}")
    return {p: high for (_, p), (_, high) in marks.items()}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """One DLQ event: the record as stored plus our headers read back (untrusted, so parsed
    with `headers.parse_headers`, which never raises)."""

    partition: int
    offset: int
    timestamp_ms: int | None  # when the event reached the DLQ
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]  # all of them, in stored order
    parsed: h.ParsedHeaders
    waiting: bool = True  # False: replayed already (behind the cursor), still retained

    @property
    def state(self) -> h.RetryState:
        return self.parsed.state

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def to_dict(self, *, payload: bool = False) -> dict[str, Any]:
        """JSON-ready, camelCase like the API; bytes as text when printable, else base64."""
        s = self.state
        out: dict[str, Any] = {
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": rfc3339(self.timestamp_ms),
            "waiting": self.waiting,
            **_bytes_field("key", self.key),
            "errorClass": s.error_class,
            "errorMessage": s.error_message,
            "attempts": s.attempt,
            "tier": s.tier,
            "dlqReason": s.dlq_reason,
            "retriable": s.retriable,
            "replayId": s.replay_id,
            "failedAt": rfc3339(s.failed_at_ms),
            "original": {
                "topic": s.original_topic,
                "partition": s.original_partition,
                "offset": s.original_offset,
                "timestamp": rfc3339(s.original_timestamp_ms),
            },
            "consumerGroup": s.consumer_group,
            "pipeline": s.pipeline,
            "headers": [{"key": k, **_bytes_field("value", v)} for k, v in self.headers],
        }
        if self.parsed.problems:
            out["headerProblems"] = list(self.parsed.problems)
        if s.error_stack is not None and payload:
            out["errorStack"] = s.error_stack
        if payload:
            out.update(_bytes_field("value", self.value))
        return out


def printable(data: bytes) -> str | None:
    """The bytes as text if they are UTF-8 a person can read, else None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if all(ch.isprintable() or ch in "\n\r\t" for ch in text):
        return text
    return None


def _bytes_field(name: str, data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {name: None}
    text = printable(data)
    if text is not None:
        return {name: text}
    return {f"{name}Base64": base64.b64encode(data).decode("ascii")}


def rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _record(msg: Any, head: int | None) -> DlqRecord:
    try:
        raw = list(msg.headers() or [])
    except Exception as e:  # undecodable header names: keep the event readable
        raw = []
        parsed = h.ParsedHeaders((), h.RetryState(), (f"unreadable headers: {e}",))
    else:
        parsed = h.parse_headers(raw)
    ts_type, ts = msg.timestamp()
    offset = msg.offset()
    return DlqRecord(
        partition=msg.partition(),
        offset=offset,
        timestamp_ms=ts if ts_type != 0 and ts >= 0 else None,
        key=msg.key(),
        value=msg.value(),
        headers=tuple(raw),
        parsed=parsed,
        waiting=head is None or offset >= head,
    )


class DlqReader:
    """Reads offset ranges `partition -> (start, end)` of a topic, each partition in order,
    stopping at each range's end: events that arrive while reading are left for later.

    A range whose start was deleted meanwhile (retention, a purge) continues at the new low
    watermark. `heads` (the cursor position per partition) sets each record's `waiting`."""

    def __init__(
        self,
        access: KafkaAccess,
        topic: str,
        ranges: Mapping[int, tuple[int, int]],
        *,
        heads: Mapping[int, int] | None = None,
        stall_timeout: float = STALL_TIMEOUT_S,
    ) -> None:
        self.topic = topic
        self._access = access
        self._ends = {p: end for p, (start, end) in ranges.items() if start < end}
        self._heads = dict(heads or {})
        self._stall = stall_timeout
        self._consumer: Any = None
        if self._ends:
            self._consumer = Consumer(access.reader_config())
            self._consumer.assign(
                [TopicPartition(topic, p, ranges[p][0]) for p in sorted(self._ends)]
            )
        self._open = set(self._ends)
        self._last_activity = time.monotonic()

    @property
    def finished(self) -> bool:
        return not self._open

    def open_partitions(self) -> set[int]:
        return set(self._open)

    def poll(self, max_records: int, timeout: float) -> list[DlqRecord]:
        """Up to `max_records` records in range, in per-partition order."""
        if not self._open:
            return []
        try:
            messages = self._consumer.consume(max_records, timeout)
        except KafkaException as e:
            raise self._access.unreachable(e) from None
        out: list[DlqRecord] = []
        for msg in messages:
            p = msg.partition()
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._last_activity = time.monotonic()
                    self._close(p)
                elif err.fatal():
                    raise KafkaUnavailable(f"reading {self.topic}: {err.str()}")
                else:
                    log.debug("reading %s: %s", self.topic, err.str())
                continue
            self._last_activity = time.monotonic()
            if p not in self._open:
                continue
            offset = msg.offset()
            end = self._ends[p]
            if offset >= end:
                self._close(p)
                continue
            out.append(_record(msg, self._heads.get(p)))
            if offset + 1 >= end:
                self._close(p)
        if self._open and time.monotonic() - self._last_activity > self._stall:
            raise KafkaUnavailable(
                f"no data from Kafka at {self._access.bootstrap_servers} for "
                f"{self._stall:.0f}s while reading {self.topic}"
            )
        return out

    def _close(self, partition: int) -> None:
        if partition in self._open:
            self._open.discard(partition)
            self._consumer.pause([TopicPartition(self.topic, partition)])

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._open.clear()

    def __enter__(self) -> DlqReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_event(access: KafkaAccess, topic: str, partition: int, offset: int) -> DlqRecord | None:
    """The record at `partition:offset`, or None if there is none (deleted, out of range)."""
    states = {s.partition: s for s in partition_states(access, topic)}
    state = states.get(partition)
    if state is None:
        raise _no_partition(topic, partition, len(states))
    if not state.low <= offset < state.high:
        return None
    with DlqReader(
        access, topic, {partition: (offset, offset + 1)}, heads={partition: state.head}
    ) as r:
        while not r.finished:
            for record in r.poll(1, 0.5):
                return record if record.offset == offset else None
    return None


# --------------------------------------------------------------------------- filters

_RELATIVE = re.compile(r"^(\d+)(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Epoch ms of an RFC 3339 time (`2024-05-01T12:00:00Z`) or of a duration ago (`90s`,
    `15m`, `2h`, `7d`, `1w`). Raises ValueError with a readable message."""
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - int(match.group(1)) * _UNIT_S[match.group(2)] * 1000
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 time or a duration like 30m, 2h, 7d: {text!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"time needs a zone, e.g. {text}Z: {text!r}")
    return int(parsed.timestamp() * 1000)


def error_class_matches(actual: str | None, wanted: str) -> bool:
    """By fully qualified or simple name, as classification rules match."""
    if actual is None:
        return False
    return actual == wanted or actual.rsplit(".", 1)[-1] == wanted


@dataclass(frozen=True)
class EventFilter:
    """Which DLQ events a list or a replay selects; empty selects all. Times are when the
    event reached the DLQ (its record timestamp), `until` exclusive."""

    since_ms: int | None = None
    until_ms: int | None = None
    keys: frozenset[bytes] = field(default_factory=frozenset)
    error_classes: frozenset[str] = field(default_factory=frozenset)

    @property
    def empty(self) -> bool:
        return (
            self.since_ms is None
            and self.until_ms is None
            and not self.keys
            and not self.error_classes
        )

    def matches(self, record: DlqRecord) -> bool:
        ts = record.timestamp_ms if record.timestamp_ms is not None else record.state.failed_at_ms
        if self.since_ms is not None and (ts is None or ts < self.since_ms):
            return False
        if self.until_ms is not None and (ts is None or ts >= self.until_ms):
            return False
        if self.keys and record.key not in self.keys:
            return False
        return not self.error_classes or any(
            error_class_matches(record.state.error_class, c) for c in self.error_classes
        )

    @classmethod
    def from_spec(cls, spec: ReplayFilter) -> EventFilter:
        """Raises ValueError for a time that cannot be read."""
        return cls(
            since_ms=parse_time(spec.since) if spec.since else None,
            until_ms=parse_time(spec.until) if spec.until else None,
            keys=frozenset(k.encode() for k in spec.keys),
            error_classes=frozenset(spec.error_classes),
        )

    def to_spec(self) -> ReplayFilter:
        return ReplayFilter(
            since=rfc3339(self.since_ms),
            until=rfc3339(self.until_ms),
            keys=sorted(k.decode() for k in self.keys),
            error_classes=sorted(self.error_classes),
        )


# --------------------------------------------------------------------------- purge


@dataclass(frozen=True, slots=True)
class PurgeCut:
    """Delete-records of one partition: everything before `before`."""

    partition: int
    low: int
    head: int
    high: int
    before: int

    @property
    def removed(self) -> int:
        return max(0, self.before - self.low)

    @property
    def waiting_removed(self) -> int:
        """Of the removed events, those still waiting (the rest had been replayed)."""
        return max(0, self.before - self.head)


def plan_purge(
    access: KafkaAccess,
    topic: str,
    *,
    before_time_ms: int | None = None,
    before_offsets: Mapping[int, int] | None = None,
) -> list[PurgeCut]:
    """What a purge would delete, per partition with something to delete: everything up to
    now (no option), the events that reached the DLQ before a time, or the events before
    given offsets (other partitions untouched; an offset past a partition's end is refused
    rather than read as "all of it"). Never beyond the current high watermark."""
    states = partition_states(access, topic)
    by_partition = {s.partition: s for s in states}
    if before_offsets is not None:
        unknown = sorted(set(before_offsets) - set(by_partition))
        if unknown:
            raise _no_partition(topic, unknown[0], len(states))
        for p, offset in sorted(before_offsets.items()):
            high = by_partition[p].high
            if offset > high:
                raise InvalidRequest(
                    f"offset {offset} is past the end of partition {p} of {topic}: its next "
                    f"offset is {high} ({p}:{high} purges the whole partition)"
                )
        targets = dict(before_offsets)
    elif before_time_ms is not None:
        targets = _offsets_for_time(access, topic, states, before_time_ms)
    else:
        targets = {s.partition: s.high for s in states}
    cuts = []
    for p, offset in sorted(targets.items()):
        s = by_partition[p]
        before = min(max(offset, s.low), s.high)
        if before > s.low:
            cuts.append(PurgeCut(p, s.low, s.head, s.high, before))
    return cuts


def _offsets_for_time(
    access: KafkaAccess, topic: str, states: Sequence[PartitionState], ms: int
) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is at or after `ms` (the high
    watermark if none is)."""
    request = {TopicPartition(topic, s.partition): OffsetSpec.for_timestamp(ms) for s in states}
    highs = {s.partition: s.high for s in states}
    out: dict[int, int] = {}
    try:
        futures = access.admin().list_offsets(request, request_timeout=access.timeout)
        for tp, future in futures.items():
            offset = int(future.result(timeout=access.timeout).offset)
            out[tp.partition] = offset if offset >= 0 else highs[tp.partition]
    except KafkaException as e:
        raise access.unreachable(e) from None
    return out


def purge(access: KafkaAccess, topic: str, cuts: Sequence[PurgeCut]) -> int:
    """Delete-records for `cuts`; returns how many events were removed. The cursor needs no
    change: a head below the new low watermark counts from the low watermark."""
    if not cuts:
        return 0
    request = [TopicPartition(topic, c.partition, c.before) for c in cuts]
    lows = {c.partition: c.low for c in cuts}
    removed = 0
    try:
        futures = access.admin().delete_records(
            request, request_timeout=access.timeout, operation_timeout=access.timeout
        )
        for tp, future in futures.items():
            result = future.result(timeout=access.timeout)
            removed += max(0, int(result.low_watermark) - lows[tp.partition])
    except KafkaException as e:
        raise DlqError(f"delete-records on {topic} failed: {kafka_reason(e)}") from None
    return removed
