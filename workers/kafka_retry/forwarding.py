"""Asynchronous produce with delivery tracking: the one writer of tier and DLQ topics.

`send` never blocks on the broker and never flushes. The caller learns what became of a
record, by the token it gave `send`, inside `poll()` or `drain()` on the caller's thread:

- `on_acked(token)`: the record is durable (idempotent producer, acks=all).
- `on_refused(token, topic, headers, error)`: the record will not be taken as it is: it is
  too large, or a permanent error (authorization, a missing topic, an invalid record) lasted
  over `PERMANENT_ATTEMPTS` tries with backoff. The owner answers a `Redirect` (a smaller
  version, another topic), `Refusal.DROP` (nobody waits for it any more) or `Refusal.RETRY`:
  the record is *stuck*, tried again with a growing backoff (at most `MAX_BACKOFF_S`) and
  counted in `stuck` until it is acknowledged.

Any other failure (a timeout, an unreachable broker: librdkafka has retried already) is sent
again with backoff, without limit: its input offset waits meanwhile. A fatal producer error
stops the owner, whose restart re-reads from the last committed offset.

Transactional (`spec.delivery: ExactlyOnce`, a producer with a `transactional.id`): records
are sent inside a transaction that `send` begins and `commit` ends together with the input
offsets. A record the broker fails makes the transaction abortable: it is not sent again
(`abortable` says why); the owner calls `abort` and re-reads from its committed offsets. A
record refused before it was sent (too large for the client) is refused to the owner as
above and changes nothing in the transaction. One the broker refused as too large is kept in
`refused_in_transaction` for the owner, to send elsewhere when its input is read again.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from kafka_retry.client_log import client_log

log = logging.getLogger(__name__)

HeaderList = list[tuple[str, bytes | None]]
Acked = Callable[[Any], None]

PERMANENT_ATTEMPTS = 4  # tries of a record that failed with a permanent error, then refused
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0

# The broker or the client will never take the record as it is.
_TOO_LARGE = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
    }
)
# Errors that a retry in a moment will not fix (an admin may, later).
_PERMANENT = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.POLICY_VIOLATION,
        KafkaError._INVALID_ARG,
    }
)


def too_large(err: KafkaError) -> bool:
    return err.code() in _TOO_LARGE


class Redirect(NamedTuple):
    """What to send instead of a refused record."""

    topic: str
    headers: HeaderList
    token: Any


class Refusal(enum.Enum):
    RETRY = "retry"  # keep trying, with backoff: stuck
    DROP = "drop"  # forget the record (its input is no longer ours to finish)


Refused = Callable[[Any, str, HeaderList, KafkaError], "Redirect | Refusal"]


class _Record:
    """One record in flight, and its own delivery callback: a single object per forward (no
    closure cells, no tuple), as thousands are alive at once between produce and ack."""

    __slots__ = (
        "attempts", "epoch", "forwarder", "headers", "key", "not_before", "stuck", "token",
        "topic", "value",
    )  # fmt: skip

    def __init__(
        self,
        forwarder: Forwarder,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: HeaderList,
        token: object,
    ) -> None:
        self.forwarder = forwarder
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.token = token
        self.attempts = 0  # failed tries
        self.not_before = 0.0
        self.stuck = False
        self.epoch = forwarder._epoch

    def __call__(self, err: KafkaError | None, _msg: Any) -> None:
        forwarder = self.forwarder
        if self.epoch != forwarder._epoch:
            return  # sent in a transaction aborted since: forgotten with it
        forwarder._awaiting -= 1
        if err is None:
            forwarder._in_flight -= 1
            if self.stuck:
                forwarder.stuck -= 1
                log.info("a stuck forward to %s was delivered", self.topic)
            if forwarder._on_acked is not None:
                forwarder._on_acked(self.token)
            return
        forwarder._failed(self, err)


class FatalProducerError(RuntimeError):
    """The producer cannot continue (e.g. an idempotence sequence error, or fenced by a newer
    instance with its transactional id); restart the worker."""


class TransactionAborted(RuntimeError):
    """The transaction could not be committed and was aborted: none of its records and
    offsets count. The owner re-reads from its committed offsets."""


TXN_TIMEOUT_S = 30.0  # longest wait for a transaction call (begin, offsets, commit, abort)
# How long a commit, offsets or abort call keeps being tried on retriable timeouts before the
# producer is given up for a restart: a new producer's init_transactions fences this one and
# aborts what it left open (after a broker restart, an abort was seen timing out for minutes
# with its request stuck in the coordinator connection's queue). init_transactions itself is
# tried for as long as it takes: a broker down at start is waited for, not a crash loop.
TXN_GIVE_UP_S = 2 * TXN_TIMEOUT_S
# One transaction call blocked this long is stuck inside librdkafka past its own timeout
# (watchdog.py): only a process restart gets the worker going again.
TXN_CALL_DEADLINE_S = TXN_GIVE_UP_S


class Forwarder:
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        on_acked: Acked | None = None,
        on_refused: Refused | None = None,
        on_failed_attempt: Callable[[KafkaError], None] | None = None,
        producer: Any = None,
    ) -> None:
        if producer is None:
            producer = Producer(dict(config), logger=client_log())
        self._producer: Any = producer
        # One callback for every record, told which by the token: no callable per record.
        self._on_acked = on_acked
        self._on_refused = on_refused
        self._on_failed_attempt = on_failed_attempt
        self._redo: list[_Record] = []  # failed, waiting for their backoff
        self._refused: list[tuple[_Record, KafkaError]] = []  # for the owner, after poll
        self._in_flight = 0
        self._awaiting = 0  # produced, delivery report not served yet
        self.stuck = 0  # records refused that the owner could not redirect
        self.fatal: KafkaError | None = None
        # Transactional: whether a transaction is open, why it must be aborted, and which one
        # it is (a record's delivery report from an aborted one is ignored).
        self.transactional = "transactional.id" in config
        self.in_transaction = False
        self.abortable: KafkaError | None = None
        # (token, topic, headers, error) of records refused as too large in the transaction.
        self.refused_in_transaction: list[tuple[Any, str, HeaderList, KafkaError]] = []
        self._epoch = 0
        # time.perf_counter() when the transaction call in progress began; 0 between calls.
        self.call_started = 0.0
        if self.transactional:
            self._txn_call(self._producer.init_transactions, TXN_TIMEOUT_S, give_up_s=None)

    @property
    def in_flight(self) -> int:
        """Records sent and not acknowledged yet (including ones waiting to be re-sent)."""
        return self._in_flight

    def wait_s(self, cap: float, ack_wait: float) -> float:
        """How long the owner may block before it must serve this forwarder again:
        `ack_wait` while delivery reports are due, else until the next re-send is due."""
        if self._awaiting:
            return min(cap, ack_wait)
        if self._redo:
            soonest = min(r.not_before for r in self._redo)
            return max(0.0, min(cap, soonest - time.monotonic()))
        return cap

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        token: object = None,
    ) -> None:
        if self.transactional and not self.in_transaction:
            self._txn_call(self._producer.begin_transaction)
            self.in_transaction = True
        self._in_flight += 1
        record = _Record(
            self, topic, key, value, headers if isinstance(headers, list) else list(headers),
            token,
        )  # fmt: skip
        self._produce(record)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports (acks run here), hand refusals to the owner, re-send."""
        self._producer.poll(timeout)
        self._settle()

    def drain(self, timeout: float) -> bool:
        """Wait until every record is acknowledged or `timeout` passes; True when drained."""
        deadline = time.monotonic() + timeout
        while True:
            self._settle()
            if self._in_flight == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._awaiting:
                self._producer.flush(min(left, 0.1))
            else:  # only records waiting for their backoff
                # A shutdown drain waiting out a re-send backoff; no consumer is polled here.
                time.sleep(min(left, self.wait_s(0.1, 0.0)))  # sleep-ok: not an event delay

    def close(self, timeout: float) -> bool:
        return self.drain(timeout)

    def commit(self, finished: Callable[[], list[TopicPartition]], group_metadata: Any) -> None:
        """End the open transaction with the consumer's offsets: `finished()`, asked once
        every record sent in it is acknowledged (their acks finish their inputs). One is begun
        if only offsets move. Raises `TransactionAborted` (aborted: nothing of it counts) or
        `FatalProducerError`."""
        try:
            while self._awaiting and self.abortable is None:
                self._producer.flush(0.1)
                self._settle()
            if self.abortable is not None:
                raise TransactionAborted(f"a forward failed: {self.abortable}")
            offsets = finished()
            if not self.in_transaction and not offsets:
                return
            if not self.in_transaction:
                self._txn_call(self._producer.begin_transaction)
                self.in_transaction = True
            if offsets:
                self._txn_call(
                    self._producer.send_offsets_to_transaction,
                    offsets, group_metadata, TXN_TIMEOUT_S,
                )  # fmt: skip
            self._txn_call(self._producer.commit_transaction, TXN_TIMEOUT_S)
            self.in_transaction = False
        except TransactionAborted as e:
            self.abort()
            raise TransactionAborted(str(e)) from e

    def abort(self) -> None:
        """Abort the open transaction, if any, and forget every record sent in it or waiting
        to be sent: the owner re-reads their inputs."""
        self._epoch += 1
        self._redo.clear()
        self._refused.clear()
        self._in_flight = self._awaiting = self.stuck = 0
        self.abortable = None
        if self.in_transaction:
            self.in_transaction = False
            self._txn_call(self._producer.abort_transaction, TXN_TIMEOUT_S)

    def _txn_call(
        self, call: Callable[..., Any], *args: Any, give_up_s: float | None = TXN_GIVE_UP_S
    ) -> None:
        """A transaction API call: tried again while its error is retriable, for `give_up_s`
        at most; an abortable error raises `TransactionAborted`, a fatal one or too long a
        retry `FatalProducerError`."""
        started = time.monotonic()
        while True:
            self.call_started = time.perf_counter()
            try:
                call(*args)
                return
            except KafkaException as e:
                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if err is None or err.fatal():
                    self.fatal = err
                    raise FatalProducerError(str(e)) from e
                if err.txn_requires_abort():
                    raise TransactionAborted(str(err)) from e
                if not err.retriable():
                    raise FatalProducerError(str(e)) from e
                if give_up_s is not None and time.monotonic() - started >= give_up_s:
                    self.fatal = err
                    raise FatalProducerError(
                        f"{call.__name__} did not complete in {give_up_s:.0f} s: {err}"
                    ) from e
                log.warning("transaction call %s: %s; trying again", call.__name__, err)
            finally:
                self.call_started = 0.0

    def _settle(self) -> None:
        self._raise_if_fatal()
        while self._refused:
            batch, self._refused = self._refused, []
            for record, err in batch:
                self._refuse(record, err)
        if self._redo:
            now = time.monotonic()
            due = [r for r in self._redo if r.not_before <= now]
            if due:
                self._redo = [r for r in self._redo if r.not_before > now]
                for record in due:
                    self._produce(record)
        self._raise_if_fatal()

    def _produce(self, record: _Record) -> None:
        while True:
            try:
                self._producer.produce(
                    record.topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    on_delivery=record,
                )
                self._awaiting += 1
                return
            except BufferError:  # the local queue is full: serve delivery reports, retry
                self._producer.poll(0.05)
            except KafkaException as e:  # refused before it was sent (too large, bad topic)
                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if err is None:
                    raise
                self._failed(record, err, sent=False)
                return

    def _failed(self, record: _Record, err: KafkaError, *, sent: bool = True) -> None:
        """One failed try: fatal, refused (to the owner, after the poll), or later again. In a
        transaction a record that was sent and failed dooms it: `abortable`."""
        if self._on_failed_attempt is not None:
            self._on_failed_attempt(err)
        if err.fatal():
            self.fatal = err
            return
        if sent and self.transactional:
            self._in_flight -= 1
            if err.code() in _TOO_LARGE:
                self.refused_in_transaction.append(
                    (record.token, record.topic, record.headers, err)
                )
            if self.abortable is None:
                log.warning("forward to %s failed in a transaction: aborting it: %s",
                            record.topic, err)  # fmt: skip
                self.abortable = err
            return
        record.attempts += 1
        code = err.code()
        if not record.stuck and (
            code in _TOO_LARGE or (code in _PERMANENT and record.attempts >= PERMANENT_ATTEMPTS)
        ):
            self._refused.append((record, err))
            return
        if record.stuck and (code in _TOO_LARGE or code in _PERMANENT):
            self._refused.append((record, err))  # the owner may drop it by now
            return
        self._later(record)
        log.warning(
            "forward to %s failed (try %d), sending again in %.1fs: %s",
            record.topic, record.attempts, record.not_before - time.monotonic(), err,
        )  # fmt: skip

    def _later(self, record: _Record) -> None:
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(record.attempts - 1, 16))
        record.not_before = time.monotonic() + backoff
        self._redo.append(record)

    def _refuse(self, record: _Record, err: KafkaError) -> None:
        decision = (
            Refusal.RETRY
            if self._on_refused is None
            else self._on_refused(record.token, record.topic, record.headers, err)
        )
        if isinstance(decision, Redirect):
            if record.stuck:
                self.stuck -= 1
                record.stuck = False
            record.topic, record.headers, record.token = decision
            record.attempts = 0
            self._produce(record)
            return
        if decision is Refusal.DROP:
            self._in_flight -= 1
            if record.stuck:
                self.stuck -= 1
            return
        if not record.stuck:
            record.stuck = True
            self.stuck += 1
            log.error(
                "a forward to %s is refused (%s): retrying every %.0fs at most; its input "
                "offset is not committed until it is delivered",
                record.topic, err, MAX_BACKOFF_S,
            )  # fmt: skip
        self._later(record)

    def _raise_if_fatal(self) -> None:
        if self.fatal is not None:
            raise FatalProducerError(str(self.fatal))
