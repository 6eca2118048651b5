"""The data plane at the edges of its contract, with real worker processes at the settings the
operator deploys (tests/deployed_support.py): restarts, oversize and failing forwards, hung
handlers, hostile records. Each test here failed before the fix it covers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from dataplane_support import wait_for
from deployed_support import WorkerPod, deploy_pipeline, free_port, records


def test_kill_9_every_5s_for_60s_loses_nothing_and_drains_within_delay_plus_15s(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Two workers on four partitions; one of them is killed with SIGKILL every 5 s for 60 s
    while events stream in, and restarted at once under its pod name (a container restart).
    Nothing is lost, nothing is handled before its due time, and the tier is drained within
    its delay + 15 s of the end of the stream."""
    delay_s = 5
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", delay_s),),
        partitions=4,
        callable_path="dataplane_handlers:record_timing",
    )
    topic = d.topology.tiers[0].topic
    record_file = tmp_path / "handled.jsonl"
    env = {"DP_RECORD_FILE": str(record_file)}
    pods = [
        WorkerPod(d, "retry-1", f"{d.name}-retry-1-{i}", tmp_path, env).start() for i in range(2)
    ]
    try:
        wait_for(lambda: all(p.ready() for p in pods), 60, "both workers ready")
        ids: list[str] = []
        stream_s, rate = 60.0, 20

        def stream() -> None:
            producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < stream_s:
                while len(ids) < elapsed * rate:
                    i = f"e{len(ids)}"
                    producer.produce(topic, key=i.encode(), value=json.dumps({"id": i}).encode())
                    ids.append(i)
                producer.poll(0)
                time.sleep(0.05)
            assert producer.flush(30) == 0

        producer = threading.Thread(target=stream)
        producer.start()
        kills = 0
        while producer.is_alive():
            producer.join(5)
            if producer.is_alive():
                victim = pods[kills % 2]
                victim.kill9()
                victim.start()  # the kubelet restarts the container: same pod name
                kills += 1
        ended = time.time()
        assert kills >= 10, kills

        def handled() -> set[str]:
            return {str(r["id"]) for r in records(record_file)}

        drained_by = ended + delay_s + 15
        try:
            wait_for(lambda: handled() >= set(ids), 150, "every event handled")
        finally:
            rows = records(record_file)
        first_handled: dict[str, int] = {}
        for r in rows:
            first_handled.setdefault(str(r["id"]), int(r["at_ms"]))
        drained_at = max(int(r["at_ms"]) for r in rows) / 1000
        early = [r for r in rows if int(r["at_ms"]) < int(r["timestamp_ms"]) + delay_s * 1000]
        lost = set(ids) - handled()
        print(
            f"{len(ids)} events, {kills} kills: drained {drained_at - ended:.1f}s after the "
            f"stream, {len(rows) - len(first_handled)} duplicate(s), lost {len(lost)}, "
            f"early {len(early)}"
        )
        assert not lost
        assert not early, early[:3]
        assert drained_at <= drained_by, (
            f"drained {drained_at - ended:.1f}s after the stream ended; at most {delay_s + 15}s"
        )
        for p in pods:
            assert p.running(), p.log.read_text()[-3000:]
    finally:
        for p in pods:
            p.stop()


def test_an_unreachable_broker_does_not_flood_the_log(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """librdkafka reports a refused connection many times a second, from every client; a
    worker logs the first of each kind and then a count, not every line."""
    d = deploy_pipeline(kafka_bootstrap, kafka_admin, make_topic)
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    d.topology = d.topology.model_copy(update={"bootstrap_servers": nowhere})
    pod = WorkerPod(d, "retry-1", f"{d.name}-retry-1-0", tmp_path).start()
    try:
        wait_for(lambda: pod.get("/healthz")[0] == 200, 60, "the worker is up")
        time.sleep(10)
        assert pod.running(), pod.log.read_text()[-3000:]
    finally:
        pod.stop()
    lines = [ln for ln in pod.log.read_text().splitlines() if "rdkafka" in ln]
    print(f"{len(lines)} client log lines in ~10 s:", *lines[:6], sep="\n  ")
    assert any(nowhere.split(":")[1] in ln for ln in lines), "the failure is still reported"
    assert len(lines) <= 12, f"{len(lines)} client log lines in ~10 s"
