"""`spec.delivery: ExactlyOnce` on real parts: tier workers exactly as the operator deploys them
(tests/deployed_support.py), killed with SIGKILL while events stream through them. Each
failed event must reach the next tier once as a read_committed reader sees it; the same run in
`AtLeastOnce` shows the duplicates a kill leaves, so the count can fail."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

import localenv
from dataplane_support import make_topology, topic_maker, wait_for
from deployed_support import TESTS, WorkerPod, deploy_pipeline, records, stream_ids
from dlq_support import fill_dlq
from kafka_retry import headers as h
from kafka_retry.dlq import KafkaAccess, partition_states
from kafka_retry.kafka_config import TRANSACTION_TIMEOUT_MS
from kafka_retry.model import LIVE_LANE


def committed_copies(bootstrap: str, topic: str, ids: set[str], timeout: float) -> Counter[str]:
    """Copies of each event on `topic` as a read_committed reader sees them: read until every id
    in `ids` is there (or `timeout`), then 5 s more so that late duplicates are counted too."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"count-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    copies: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            if settle_until is None and ids <= copies.keys():
                settle_until = now + 5
            if now > (settle_until or deadline):
                break
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    copies[str(json.loads(m.value()).get("id"))] += 1
    finally:
        c.close()
    return copies


def stream_while_killing(
    bootstrap: str, topic: str, pods: list[WorkerPod], seconds: float, rate: int
) -> tuple[list[str], int]:
    """Stream `rate` events/s to `topic` for `seconds`; every 5 s one pod (in turn) is killed
    with SIGKILL and started again at once under its pod name (a container restart)."""
    ids: list[str] = []
    streamer = threading.Thread(target=stream_ids, args=(bootstrap, topic, ids, seconds, rate))
    streamer.start()
    kills = 0
    while streamer.is_alive():
        streamer.join(5)
        if streamer.is_alive():
            victim = pods[kills % len(pods)]
            victim.kill9()
            victim.start()
            kills += 1
    return ids, kills


@pytest.mark.parametrize("delivery", ["ExactlyOnce", "AtLeastOnce"])
@pytest.mark.parametrize("stage", ["retry-1", LIVE_LANE])
def test_kill_9_forwards_each_failed_event_once_only_with_exactly_once(
    stage: str,
    delivery: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Two workers of a stage (the first tier, or the managed live lane: the SDK's loop) on
    four partitions; every event fails retriably, so each is forwarded to the next tier. One
    worker is killed with SIGKILL every 5 s for 40 s. ExactlyOnce: every event is on the next
    tier exactly once. AtLeastOnce: none is lost, and the kills leave duplicates (what
    exactly-once removes)."""
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", 1), ("retry-2", 3600)),
        partitions=4,
        callable_path="dataplane_handlers:fail_retriably",
        delivery=delivery,
    )
    topics = [d.topology.source_topic, *(t.topic for t in d.topology.tiers)]
    read, forwarded_to = topics[1:3] if stage == "retry-1" else topics[0:2]
    env = {"DP_RECORD_FILE": str(tmp_path / "handled.jsonl")}
    pods = [WorkerPod(d, stage, f"{d.name}-{stage}-{i}", tmp_path, env).start() for i in range(2)]
    try:
        wait_for(lambda: all(p.ready() for p in pods), 60, "both workers ready")
        ids, kills = stream_while_killing(kafka_bootstrap, read, pods, 40.0, 20)
        assert kills >= 6, kills
        copies = committed_copies(kafka_bootstrap, forwarded_to, set(ids), 150)
        for p in pods:
            assert p.running(), p.log.read_text()[-3000:]
    finally:
        for p in pods:
            p.stop()
    lost = set(ids) - copies.keys()
    duplicates = sum(n - 1 for n in copies.values())
    handled = len(records(tmp_path / "handled.jsonl"))
    print(
        f"{stage} {delivery}: {len(ids)} events, {kills} kills, {handled} handler calls: "
        f"{duplicates} duplicate forward(s), lost {len(lost)}"
    )
    assert not lost, sorted(lost)[:5]
    assert copies.keys() == set(ids)
    if delivery == "ExactlyOnce":
        assert duplicates == 0, [(i, n) for i, n in copies.items() if n > 1][:10]
    else:
        assert duplicates > 0, "a kill between forward and commit leaves a duplicate"


def test_a_delay_longer_than_the_transaction_timeout_keeps_no_transaction_open(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A tier whose delay is longer than `transaction.timeout.ms`: its partitions hold events
    for longer than any transaction may stay open, while other events keep arriving. Nothing
    is aborted or fenced (no transaction spans a delay), every event moves on once."""
    delay_s = TRANSACTION_TIMEOUT_MS // 1000 + 5
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", delay_s), ("retry-2", 3600)),
        partitions=2,
        callable_path="dataplane_handlers:fail_retriably",
        delivery="ExactlyOnce",
    )
    first, second = (t.topic for t in d.topology.tiers)
    env = {"DP_RECORD_FILE": str(tmp_path / "handled.jsonl")}
    pod = WorkerPod(d, "retry-1", f"{d.name}-retry-1-0", tmp_path, env).start()
    try:
        wait_for(pod.ready, 60, "the worker ready")
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        ids = []
        # Events over two delays: the first ones are forwarded while later ones are held.
        for i in range(2 * delay_s):
            for j in range(5):
                ids.append(f"e{i}-{j}")
                producer.produce(first, value=json.dumps({"id": ids[-1]}).encode())
            producer.flush(10)
            time.sleep(1)
        copies = committed_copies(kafka_bootstrap, second, set(ids), delay_s + 60)
        assert pod.running(), pod.log.read_text()[-3000:]
        assert pod.ready()
    finally:
        pod.stop()
    log = pod.log.read_text()
    assert copies == Counter(dict.fromkeys(ids, 1)), {i: n for i, n in copies.items() if n != 1}
    for trouble in ("aborted", "fatal", "fenced"):
        assert trouble not in log.lower(), log[-3000:]


@pytest.mark.parametrize("delivery", ["ExactlyOnce", "AtLeastOnce"])
def test_a_replay_killed_again_and_again_sends_each_event_once(
    delivery: str, kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A replay of 600 DLQ events at 150/s in its own process, killed with SIGKILL every
    0.5-2 s and resumed from its last checkpoint until it succeeds: each event is on the
    target tier once as a read_committed reader sees it, and the DLQ is empty."""
    topology = make_topology(kafka_bootstrap, make_topic, partitions=3).model_copy(
        update={"delivery": delivery}
    )
    count = 600
    fill_dlq(kafka_bootstrap, topology.dlq_topic, count)
    topology_file = tmp_path / "topology.json"
    topology_file.write_text(topology.to_json())
    checkpoint = tmp_path / "checkpoint.json"
    argv = [sys.executable, str(TESTS / "replay_process.py"), str(topology_file), "r-kill",
            str(checkpoint), "150"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    rng = random.Random(16)
    kills = 0
    deadline = time.monotonic() + 180
    with (tmp_path / "replay.log").open("ab") as log:
        while True:
            assert time.monotonic() < deadline, (tmp_path / "replay.log").read_text()[-3000:]
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
            try:
                proc.wait(rng.uniform(0.5, 2.0) if kills < 8 else 120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                kills += 1
                continue
            assert proc.returncode == 0, (tmp_path / "replay.log").read_text()[-3000:]
            break
    replayed = committed_replays(kafka_bootstrap, topology.tiers[0].topic, "r-kill")
    duplicates = sum(n - 1 for n in replayed.values())
    print(f"{delivery}: {count} events replayed with {kills} kills: {duplicates} duplicate(s)")
    assert kills >= 4, kills
    assert len(replayed) == count and duplicates == 0, replayed.most_common(5)
    access = KafkaAccess(kafka_bootstrap)
    assert sum(s.waiting for s in partition_states(access, topology.dlq_topic)) == 0


def committed_replays(bootstrap: str, topic: str, replay_id: str) -> Counter[str]:
    """Copies of each replayed DLQ event (by its `replay-source`) as read_committed sees them."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"count-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    copies: Counter[str] = Counter()
    at_end: set[int] = set()
    deadline = time.monotonic() + 60
    try:
        while len(at_end) < len(meta.partitions) and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is not None:
                    at_end.add(m.partition())
                    continue
                headers = dict(m.headers() or [])
                if headers.get(h.REPLAY_ID) == replay_id.encode():
                    copies[(headers.get(h.REPLAY_SOURCE) or b"").decode()] += 1
    finally:
        c.close()
    return copies


@pytest.mark.timeout(600)
def test_a_broker_restart_mid_transaction_loses_and_repeats_nothing(
    localenv_up: dict[str, str], tmp_path: Path
) -> None:
    """An ExactlyOnce tier worker forwarding a stream on a broker of its own, which restarts
    (a clean shutdown and start, as in a rolling restart) while transactions are open: each
    event reaches the next tier once. A worker that exits meanwhile is restarted, as the
    kubelet would."""
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(localenv.extra_kafka("kafka-eos-restart", {}))
        admin = AdminClient({"bootstrap.servers": bootstrap})
        make_topic = stack.enter_context(topic_maker(admin, uuid.uuid4().hex[:8]))
        d = deploy_pipeline(
            bootstrap,
            admin,
            make_topic,
            tiers=(("retry-1", 1), ("retry-2", 3600)),
            partitions=2,
            callable_path="dataplane_handlers:fail_retriably",
            delivery="ExactlyOnce",
        )
        first, second = (t.topic for t in d.topology.tiers)
        env = {"DP_RECORD_FILE": str(tmp_path / "handled.jsonl")}
        pod = WorkerPod(d, "retry-1", f"{d.name}-retry-1-0", tmp_path, env).start()
        done = threading.Event()

        def kubelet() -> None:
            while not done.wait(1):
                if not pod.running():
                    pod.start()

        restarter = threading.Thread(target=kubelet)
        restarter.start()
        try:
            wait_for(pod.ready, 60, "the worker ready")
            ids: list[str] = []
            streamer = threading.Thread(target=stream_ids, args=(bootstrap, first, ids, 30.0, 20))
            streamer.start()
            time.sleep(10)
            localenv.restart_extra_kafka("kafka-eos-restart")
            streamer.join()
            copies = committed_copies(bootstrap, second, set(ids), 180)
        finally:
            done.set()
            restarter.join()
            pod.stop()
    duplicates = {i: n for i, n in copies.items() if n > 1}
    print(f"{len(ids)} events, broker restarted, worker started {pod.starts}x: "
          f"{len(duplicates)} duplicated, {len(set(ids) - copies.keys())} lost")  # fmt: skip
    assert copies.keys() == set(ids), sorted(set(ids) - copies.keys())[:5]
    assert not duplicates, list(duplicates.items())[:10]
