"""The local Kafka broker is real: headers, consumer-group rebalances, pause/resume and
transactions behave as a production broker's do."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition


def _consumer(bootstrap: str, group: str, **extra: Any) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **extra,
        }
    )


def _produce(bootstrap: str, topic: str, n: int, partition: int | None = None) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(n):
        kwargs: dict[str, Any] = {"key": f"k{i}", "value": f"v{i}"}
        if partition is not None:
            kwargs["partition"] = partition
        p.produce(topic, **kwargs)
    assert p.flush(30) == 0


def test_produce_consume_with_headers(kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("headers")
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    headers = [("a", b"1"), ("a", b"2"), ("empty", None), ("bin", b"\xff\x00")]
    p.produce(topic, key=b"key", value=b"value", headers=headers)
    assert p.flush(30) == 0

    c = _consumer(kafka_bootstrap, f"g-{uuid.uuid4().hex}")
    c.subscribe([topic])
    msg = None
    deadline = time.monotonic() + 30
    while msg is None and time.monotonic() < deadline:
        m = c.poll(1.0)
        if m is not None and not m.error():
            msg = m
    c.close()
    assert msg is not None
    assert msg.key() == b"key" and msg.value() == b"value"
    # Repeated keys keep their order; a None value survives the round trip.
    assert msg.headers() == headers


def test_two_member_group_rebalances(kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("rebalance", partitions=4)
    group = f"g-{uuid.uuid4().hex}"
    assignments: dict[str, set[int]] = {"a": set(), "b": set()}

    def tracker(name: str) -> dict[str, Any]:
        def on_assign(_c: Consumer, parts: list[TopicPartition]) -> None:
            assignments[name] = {p.partition for p in parts}

        def on_revoke(_c: Consumer, _parts: list[TopicPartition]) -> None:
            assignments[name] = set()

        return {"on_assign": on_assign, "on_revoke": on_revoke}

    a = _consumer(kafka_bootstrap, group, **{"session.timeout.ms": 6000})
    a.subscribe([topic], **tracker("a"))
    deadline = time.monotonic() + 30
    while len(assignments["a"]) < 4 and time.monotonic() < deadline:
        a.poll(0.2)
    assert assignments["a"] == {0, 1, 2, 3}

    b = _consumer(kafka_bootstrap, group, **{"session.timeout.ms": 6000})
    b.subscribe([topic], **tracker("b"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (assignments["a"] and assignments["b"]):
        a.poll(0.1)
        b.poll(0.1)
    final = {name: set(parts) for name, parts in assignments.items()}
    a.close()  # close() revokes, so the assignments were copied first
    b.close()
    # Both members own partitions, and together exactly all four.
    assert final["a"] and final["b"]
    assert final["a"] | final["b"] == {0, 1, 2, 3}
    assert not final["a"] & final["b"]


def test_pause_one_partition_while_polling(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic("pause", partitions=2)
    c = _consumer(kafka_bootstrap, f"g-{uuid.uuid4().hex}")
    c.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    c.pause([TopicPartition(topic, 0)])
    _produce(kafka_bootstrap, topic, 5, partition=0)
    _produce(kafka_bootstrap, topic, 5, partition=1)

    seen: dict[int, int] = {0: 0, 1: 0}
    deadline = time.monotonic() + 20
    while seen[1] < 5 and time.monotonic() < deadline:
        for m in c.consume(num_messages=10, timeout=0.5):
            if not m.error():
                seen[m.partition()] += 1
    assert seen == {0: 0, 1: 5}, "a paused partition delivered while the other flowed"

    c.seek(TopicPartition(topic, 0, 0))  # allowed on a paused, assigned partition
    c.resume([TopicPartition(topic, 0)])
    deadline = time.monotonic() + 20
    while seen[0] < 5 and time.monotonic() < deadline:
        for m in c.consume(num_messages=10, timeout=0.5):
            if not m.error():
                seen[m.partition()] += 1
    c.close()
    assert seen == {0: 5, 1: 5}


def test_transactional_consume_transform_produce(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    src, dst = make_topic("tx-src"), make_topic("tx-dst")
    _produce(kafka_bootstrap, src, 3)
    group = f"g-{uuid.uuid4().hex}"
    c = _consumer(kafka_bootstrap, group)
    c.subscribe([src])
    p = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex}"}
    )
    p.init_transactions(30)

    got: list[Any] = []
    deadline = time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        got += [m for m in c.consume(10, 1.0) if not m.error()]
    assert len(got) == 3

    p.begin_transaction()
    for m in got:
        p.produce(dst, key=m.key(), value=m.value())
    offsets = [TopicPartition(src, 0, got[-1].offset() + 1)]
    p.send_offsets_to_transaction(offsets, c.consumer_group_metadata(), 30)
    p.commit_transaction(30)
    c.close()

    # The group's offset moved with the transaction, and a read_committed reader sees the data.
    committed = _consumer(kafka_bootstrap, group).committed([TopicPartition(src, 0)], timeout=10)
    assert committed[0].offset == 3
    reader = _consumer(
        kafka_bootstrap, f"g-{uuid.uuid4().hex}", **{"isolation.level": "read_committed"}
    )
    reader.subscribe([dst])
    out: list[Any] = []
    deadline = time.monotonic() + 30
    while len(out) < 3 and time.monotonic() < deadline:
        out += [
            m
            for m in reader.consume(10, 1.0)
            if not m.error() or m.error().code() != KafkaError._PARTITION_EOF
        ]
    reader.close()
    assert sorted(m.value() for m in out) == [b"v0", b"v1", b"v2"]
