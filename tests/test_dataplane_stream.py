"""A tier fed by a steady stream, on the real broker with the topics configured as the operator
configures them (broker append times): each event is fetched once, not again at every release
of a held partition, and none is handled, or said to be due, before the time it was written
plus the delay, to the sub-millisecond."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer, Producer

from dataplane_support import Running, wait_for
from deployed_support import deploy_pipeline
from kafka_retry import runner
from kafka_retry.event import Event
from kafka_retry.worker import build_worker

DELAY_S = 2
RATE = 200  # events per second, over two partitions


class CountingConsumer(Consumer):  # type: ignore[misc]
    """The worker's consumer, counting the messages it returns."""

    delivered: ClassVar[int] = 0

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        messages = super().consume(*args, **kwargs)
        CountingConsumer.delivered += sum(1 for m in messages if m.error() is None)
        return messages


def _stream(bootstrap: str, topic: str, n: int, rate: int) -> dict[str, float]:
    """`n` events at `rate` per second; each one's wall-clock time just before it was sent
    (so before the broker appended it)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    sent: dict[str, float] = {}
    start = time.monotonic()
    for i in range(n):
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        event_id = f"s{i}"
        sent[event_id] = time.time()
        producer.produce(topic, b'{"id": "%s"}' % event_id.encode(), event_id.encode())
        producer.poll(0)
    assert producer.flush(30) == 0
    return sent


def _run_stream(
    bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], n: int
) -> tuple[dict[str, float], dict[str, tuple[float, int | None]]]:
    deployed = deploy_pipeline(
        bootstrap, kafka_admin, make_topic, tiers=(("retry-1", DELAY_S),), partitions=2
    )
    handled: dict[str, tuple[float, int | None]] = {}
    lock = threading.Lock()

    def note(event: Event) -> None:
        started = time.time()
        with lock:
            handled[(event.key or b"").decode()] = (started, event.due_ms)

    worker = build_worker(deployed.topology, "retry-1", handler=note)
    with Running(worker):
        sent = _stream(bootstrap, deployed.topology.tiers[0].topic, n, RATE)
        wait_for(lambda: len(handled) >= n, DELAY_S + 30, "every event handled")
    assert sorted(handled) == sorted(sent)
    return sent, handled


def test_a_steady_stream_is_fetched_once_not_at_every_release(
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "Consumer", CountingConsumer)
    CountingConsumer.delivered = 0
    n = RATE * 3
    _run_stream(kafka_bootstrap, kafka_admin, make_topic, n)
    # Before the windows: a held partition sought back to its head and dropped the rest of
    # each batch, 6 deliveries per event at this rate (55 at 1,000 events/s).
    assert CountingConsumer.delivered <= 1.2 * n


def test_no_event_is_due_or_handled_before_it_was_written_plus_the_delay(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str]
) -> None:
    sent, handled = _run_stream(kafka_bootstrap, kafka_admin, make_topic, RATE * 2)
    delay_ms = DELAY_S * 1000
    # Append times are whole milliseconds, floored: before the due time was rounded up, an
    # event written in the same millisecond as its append was due up to 1 ms early.
    said_early = [i for i, (_, due) in handled.items() if (due or 0) < sent[i] * 1000 + delay_ms]
    started_early = [i for i, (at, _) in handled.items() if at < sent[i] + DELAY_S]
    assert said_early == [] and started_early == []
