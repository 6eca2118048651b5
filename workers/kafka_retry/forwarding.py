"""Asynchronous produce with delivery tracking: the one writer of tier and DLQ topics.

`send` never blocks on the broker and never flushes; the caller learns that a record is
durable (idempotent producer, acks=all) through `on_acked(token)`, with the token it gave
`send`, inside `poll()` or `drain()` on the caller's thread. A record whose delivery failed is
sent again (its input offset stays unstored meanwhile); a fatal producer error stops the owner,
whose restart re-reads from the last committed offset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from kafka_retry.client_log import client_log

log = logging.getLogger(__name__)

Acked = Callable[[Any], None]


class _Record:
    """One record in flight, and its own delivery callback: a single object per forward (no
    closure cells, no tuple), as thousands are alive at once between produce and ack."""

    __slots__ = ("forwarder", "headers", "key", "token", "topic", "value")

    def __init__(
        self,
        forwarder: Forwarder,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        token: object,
    ) -> None:
        self.forwarder = forwarder
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.token = token

    def __call__(self, err: KafkaError | None, _msg: Any) -> None:
        forwarder = self.forwarder
        if err is None:
            forwarder._in_flight -= 1
            if forwarder._on_acked is not None:
                forwarder._on_acked(self.token)
            return
        if forwarder._on_failed_attempt is not None:
            forwarder._on_failed_attempt(err)
        if err.fatal():
            forwarder.fatal = err
            return
        log.warning("forward to %s failed, sending again: %s", self.topic, err)
        forwarder._redo.append(self)


class FatalProducerError(RuntimeError):
    """The producer cannot continue (e.g. an idempotence sequence error); restart the worker."""


class Forwarder:
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        on_acked: Acked | None = None,
        on_failed_attempt: Callable[[KafkaError], None] | None = None,
        producer: Any = None,
    ) -> None:
        if producer is None:
            producer = Producer(dict(config), logger=client_log())
        self._producer: Any = producer
        # One callback for every record, told which by the token: no callable per record.
        self._on_acked = on_acked
        self._on_failed_attempt = on_failed_attempt
        self._redo: list[_Record] = []
        self._in_flight = 0
        self.fatal: KafkaError | None = None

    @property
    def in_flight(self) -> int:
        """Records sent and not acknowledged yet (including ones waiting to be re-sent)."""
        return self._in_flight

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
        token: object = None,
    ) -> None:
        self._in_flight += 1
        record = _Record(
            self, topic, key, value, headers if isinstance(headers, list) else list(headers),
            token,
        )  # fmt: skip
        self._produce(record)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports (acks run here) and re-send failed records."""
        self._producer.poll(timeout)
        self._resend()
        self._raise_if_fatal()

    def drain(self, timeout: float) -> bool:
        """Wait until every record is acknowledged or `timeout` passes; True when drained."""
        deadline = time.monotonic() + timeout
        while True:
            self._resend()
            remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
            self._raise_if_fatal()
            if remaining == 0 and not self._redo:
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self, timeout: float) -> bool:
        return self.drain(timeout)

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
                return
            except BufferError:  # the local queue is full: serve delivery reports, retry
                self._producer.poll(0.05)
            except KafkaException as e:
                err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
                if err is not None and err.fatal():
                    self.fatal = err
                    self._raise_if_fatal()
                raise

    def _resend(self) -> None:
        while self._redo:
            batch, self._redo = self._redo, []
            for record in batch:
                self._produce(record)

    def _raise_if_fatal(self) -> None:
        if self.fatal is not None:
            raise FatalProducerError(str(self.fatal))
