"""Helpers for the data-plane tests: topologies on fresh topics, running a consumer loop on a
thread, producing and reading events. Not a test module (no `test_` prefix)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from kafka_retry.event import Event
from kafka_retry.model import (
    Classification,
    Handler,
    HttpHandler,
    PythonHandler,
    ResolvedTier,
    Topology,
)

# Small client timeouts keep joins and leaves quick on the shared broker.
FAST_CONSUMER = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def make_topology(
    bootstrap: str,
    make_topic: Callable[..., str],
    *,
    tiers: Sequence[tuple[str, int]] = (("retry-1", 1), ("retry-2", 2)),
    partitions: int = 1,
    classification: Classification | None = None,
    callable_path: str = "dataplane_handlers:record",
    http_url: str | None = None,
    source_topic: str | None = None,
    group: str | None = None,
) -> Topology:
    group = group or f"svc-{uuid.uuid4().hex[:8]}"
    source = source_topic or make_topic("src", partitions)
    handler = (
        Handler(http=HttpHandler(url=http_url, timeout_seconds=1))
        if http_url
        else Handler(python=PythonHandler(image="test", callable=callable_path))
    )
    return Topology(
        pipeline=f"test/{group}",
        bootstrap_servers=bootstrap,
        source_topic=source,
        consumer_group=group,
        tiers=[
            ResolvedTier(
                name=name,
                topic=make_topic(name, partitions),
                delay_seconds=delay,
                consumer_group=f"{group}.{name}",
            )
            for name, delay in tiers
        ],
        dlq_topic=make_topic("dlq", partitions),
        classification=classification or Classification(),
        handler=handler,
    )


class Runnable(Protocol):
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def ready(self) -> bool: ...


class Running:
    """Run a StageRunner or RetryingConsumer on its own thread for a `with` block."""

    def __init__(self, runner: Runnable, *, wait_ready: bool = True) -> None:
        self.runner = runner
        self.error: BaseException | None = None
        self._wait_ready = wait_ready
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Running:
        self._thread.start()
        if self._wait_ready:
            wait_for(lambda: self.runner.ready() or self.error is not None, 30, "runner ready")
            assert self.error is None, self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.runner.stop()
        self._thread.join(60)
        assert not self._thread.is_alive(), "runner did not stop"
        assert self.error is None, self.error


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]] | None]],
    *,
    partition: int | None = None,
) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, headers in records:
        kwargs: dict[str, Any] = {"key": key, "value": value, "headers": headers or []}
        if partition is not None:
            kwargs["partition"] = partition
        p.produce(topic, **kwargs)
    assert p.flush(30) == 0


def produce_ids(bootstrap: str, topic: str, ids: Iterable[str], **kw: Any) -> None:
    produce(
        bootstrap,
        topic,
        ((i.encode(), json.dumps({"id": i}).encode(), [("trace", i.encode())]) for i in ids),
        **kw,
    )


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    partition: int
    offset: int
    timestamp_ms: int

    def header(self, name: str) -> str | None:
        found = None
        for k, v in self.headers:
            if k == name:
                found = None if v is None else v.decode()
        return found

    @property
    def id(self) -> str:
        return str(json.loads(self.value or b"{}").get("id"))


def read_topic(bootstrap: str, topic: str, *, expect: int, timeout: float = 30) -> list[Record]:
    """Read a topic from the beginning until `expect` records arrived (or fail on timeout),
    then a little longer to see any surplus."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    surplus_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            if surplus_until is None and len(out) >= expect:
                surplus_until = now + 0.5
            if surplus_until is not None and now > surplus_until:
                break
            if now > deadline:
                raise AssertionError(f"{topic}: {len(out)} of {expect} records after {timeout}s")
            for m in c.consume(500, 0.2):
                if m.error():
                    continue
                key, value = m.key(), m.value()
                assert not isinstance(key, str) and not isinstance(value, str)
                headers = cast(list[tuple[str, bytes | None]], m.headers() or [])
                out.append(
                    Record(
                        key, value, headers, m.partition() or 0, m.offset() or 0, m.timestamp()[1]
                    )
                )
    finally:
        c.close()
    return out


def committed_offset(bootstrap: str, group: str, topic: str) -> int:
    """`group`'s committed offset on partition 0 of `topic` (negative: none)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = c.committed([TopicPartition(topic, 0)], timeout=10)
        return int(tp.offset)
    finally:
        c.close()


@dataclass
class Call:
    id: str
    attempt: int
    tier: str | None
    due_ms: int | None
    at_ms: int
    event: Event


@dataclass
class Recorder:
    """An in-process handler that records every call and fails as `policy` says."""

    policy: Callable[[Event], None] = lambda e: None
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: Event) -> None:
        at_ms = int(time.time() * 1000)
        try:
            event_id = str(json.loads(event.value or b"{}").get("id"))
        except ValueError:
            event_id = "<undecodable>"
        with self.lock:
            self.calls.append(Call(event_id, event.attempt, event.tier, event.due_ms, at_ms, event))
        self.policy(event)

    def ids(self) -> list[str]:
        with self.lock:
            return [c.id for c in self.calls]

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


@contextlib.contextmanager
def topic_maker(admin: Any, unique: str) -> Iterator[Callable[..., str]]:
    """`make(base, partitions, config)`: a uniquely named topic on `admin`'s cluster; every
    one made is deleted on the way out (best effort)."""
    from confluent_kafka.admin import NewTopic

    created: list[str] = []

    def make(base: str = "t", partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"{base}-{unique}-{len(created)}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
        )
        futures[name].result(timeout=30)
        created.append(name)
        return name

    try:
        yield make
    finally:
        if created:
            for f in admin.delete_topics(created).values():
                with contextlib.suppress(Exception):  # cleanup is best effort
                    f.result(timeout=30)
