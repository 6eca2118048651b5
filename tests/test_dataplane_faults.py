"""The data plane at the edges of its contract, with real worker processes at the settings the
operator deploys (tests/deployed_support.py): restarts, oversize and failing forwards, hung
handlers, hostile records. Each test here failed before the fix it covers."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from dataplane_support import (
    Recorder,
    Running,
    committed_offset,
    produce_ids,
    read_topic,
    wait_for,
)
from deployed_support import TESTS, WorkerPod, deploy_pipeline, free_port, records, stream_ids
from kafka_retry import headers as h
from kafka_retry.errors import RetriableError
from kafka_retry.sdk import RetryingConsumer
from raw_records import RawHeaders, produce_raw


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

        producer = threading.Thread(
            target=stream_ids, args=(kafka_bootstrap, topic, ids, stream_s, rate)
        )
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


def _topic_limit(kafka_admin: Any, topic: str) -> int:
    resource = ConfigResource("TOPIC", topic)
    entries = kafka_admin.describe_configs([resource])[resource].result(timeout=30)
    return int(entries["max.message.bytes"].value)


def _set_topic_limit(kafka_admin: Any, topic: str, limit: int) -> None:
    entry = ConfigEntry(
        "max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource("TOPIC", topic, incremental_configs=[entry])
    for f in kafka_admin.incremental_alter_configs([resource]).values():
        f.result(timeout=30)


def _produce_big(bootstrap: str, topic: str, event_id: str, size: int) -> bytes:
    """An event of `size` bytes (JSON with an id), with one header of its own."""
    head = json.dumps({"id": event_id, "pad": ""}).encode()
    value = head[:-2] + b"x" * (size - len(head)) + head[-2:]
    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10_000_000})
    p.produce(topic, key=event_id.encode(), value=value, headers=[("trace", event_id.encode())])
    assert p.flush(30) == 0
    return value


@pytest.mark.parametrize("delivery", ["AtLeastOnce", "ExactlyOnce"])
def test_a_forward_of_an_event_at_the_source_size_limit_fits_or_reaches_the_dlq(
    delivery: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """An event as large as the source topic accepts, plus our headers, fits the next tier
    (the operator sizes tier and DLQ topics for it, our producers do not refuse it). Where an
    admin made a tier smaller, the event reaches the DLQ whole with `dlq-reason: too-large`,
    and the worker goes on. ExactlyOnce: the refused forward aborts its transaction; the
    event, read again, goes to the DLQ once."""
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", 1), ("retry-2", 1)),
        callable_path="dataplane_handlers:fail_retriably",
        delivery=delivery,
    )
    tier1, tier2 = (t.topic for t in d.topology.tiers)
    size = _topic_limit(kafka_admin, d.topology.source_topic) - 1000  # fits the source
    big = _produce_big(kafka_bootstrap, tier1, "big", size)
    record_file = tmp_path / "handled.jsonl"
    pod = WorkerPod(
        d, "retry-1", f"{d.name}-retry-1-0", tmp_path, {"DP_RECORD_FILE": str(record_file)}
    )
    pod.start()
    try:
        (forwarded,) = read_topic(kafka_bootstrap, tier2, expect=1, timeout=60)
        assert forwarded.value == big and forwarded.header("trace") == "big"
        assert forwarded.header(h.ERROR_STACK), "our headers are all there"

        _set_topic_limit(kafka_admin, tier2, 500_000)  # an admin shrinks the next tier
        big2 = _produce_big(kafka_bootstrap, tier1, "big2", size)
        (dead,) = read_topic(kafka_bootstrap, d.topology.dlq_topic, expect=1, timeout=60)
        assert dead.value == big2 and dead.header("trace") == "big2"
        assert dead.header(h.DLQ_REASON) == h.REASON_TOO_LARGE
        assert tier2 in (dead.header(h.ERROR_MESSAGE) or "")
        assert pod.running() and pod.starts == 1, pod.log.read_text()[-3000:]
    finally:
        pod.stop()


def test_the_live_lane_forwards_an_event_at_the_source_size_limit(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    d = deploy_pipeline(kafka_bootstrap, kafka_admin, make_topic)
    size = _topic_limit(kafka_admin, d.topology.source_topic) - 1000
    big = _produce_big(kafka_bootstrap, d.topology.source_topic, "big", size)
    handler = Recorder(policy=lambda e: (_ for _ in ()).throw(RetriableError("later")))
    consumer = RetryingConsumer(d.topology, handler, use_env=False)
    with Running(consumer):
        (forwarded,) = read_topic(kafka_bootstrap, d.topology.tiers[0].topic, expect=1, timeout=60)
    assert forwarded.value == big and forwarded.header("trace") == "big"
    assert consumer.stats.forwarded == 1


def test_a_forward_refused_by_its_tier_and_by_the_dlq_stalls_loudly_and_recovers(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """The next tier and the DLQ both refuse a forward (here: too large for them, as set by
    an admin). The worker does not spin and does not commit past the event: it says so (not
    ready, `kafka_retry_stuck` 1), backs off, and delivers once the DLQ takes it again."""
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", 1), ("retry-2", 1)),
        callable_path="dataplane_handlers:fail_retriably",
    )
    tier1, tier2 = (t.topic for t in d.topology.tiers)
    dlq_limit = _topic_limit(kafka_admin, d.topology.dlq_topic)
    for topic in (tier2, d.topology.dlq_topic):
        _set_topic_limit(kafka_admin, topic, 2048)
    _produce_big(kafka_bootstrap, tier1, "e0", 4096)
    record_file = tmp_path / "handled.jsonl"
    pod = WorkerPod(
        d, "retry-1", f"{d.name}-retry-1-0", tmp_path, {"DP_RECORD_FILE": str(record_file)}
    )
    pod.start()
    try:
        wait_for(lambda: any(r["id"] == "e0" for r in records(record_file)), 60, "e0 handled")
        wait_for(lambda: pod.get("/readyz")[0] == 503, 30, "the worker says it is stuck")
        time.sleep(10)
        metrics = pod.get("/metrics")[1]
        assert _metric(metrics, "kafka_retry_stuck", d.topology.pipeline) == 1
        tries = _metric(metrics, "kafka_retry_delivery_failures_total", d.topology.pipeline)
        assert 3 <= tries <= 30, f"{tries} tries in about 12 s: a spin, or no retries"
        assert committed_offset(kafka_bootstrap, d.topology.tiers[0].consumer_group, tier1) <= 0
        assert pod.running()

        _set_topic_limit(kafka_admin, d.topology.dlq_topic, dlq_limit)  # the admin fixes it
        (dead,) = read_topic(kafka_bootstrap, d.topology.dlq_topic, expect=1, timeout=60)
        assert dead.header(h.DLQ_REASON) == h.REASON_TOO_LARGE and dead.header("trace") == "e0"
        wait_for(lambda: pod.get("/readyz")[0] == 200, 30, "ready again")
        wait_for(
            lambda: (
                committed_offset(kafka_bootstrap, d.topology.tiers[0].consumer_group, tier1) == 1
            ),
            30,
            "committed past e0",
        )
        assert _metric(pod.get("/metrics")[1], "kafka_retry_stuck", d.topology.pipeline) == 0
    finally:
        pod.stop()


def _metric(text: str, name: str, pipeline: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'pipeline="{pipeline}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {pipeline}")


# ------------------------------------------------------------------------- hostile input

_OURS = [
    h.ORIGINAL_TOPIC, h.ORIGINAL_PARTITION, h.ORIGINAL_OFFSET, h.ORIGINAL_TIMESTAMP, h.PIPELINE,
    h.CONSUMER_GROUP, h.ATTEMPT, h.DUE, h.TIER, h.FAILED_AT, h.ERROR_CLASS, h.ERROR_MESSAGE,
    h.ERROR_STACK, h.RETRIABLE, h.DLQ_REASON, h.REPLAY_ID, h.REPLAY_SOURCE,
]  # fmt: skip
_HOSTILE_VALUES: list[bytes | None] = [
    b"", b"0", b"-1", b"-99999999999999999999", b"9" * 24, b"9" * 25, b"1e9", b" 12 ", b"+7",
    b"\xff\xfe", b"\x00", b"true", b"x" * 70_000, None, "٣".encode(), b"0x10",
]  # fmt: skip


def hostile_records(prefix: str, size_limit: int) -> list[tuple[bytes, bytes, RawHeaders]]:
    """Records whose values carry their id (`{"id": ...}`) and whose headers are hostile."""
    out: list[tuple[bytes, bytes, RawHeaders]] = []

    def add(headers: RawHeaders, size: int = 0) -> None:
        event_id = f"{prefix}{len(out)}"
        value = json.dumps({"id": event_id}).encode()
        if size:
            value = value[:-1] + b', "pad": "' + b"x" * (size - len(value) - 11) + b'"}'
        out.append((event_id.encode(), value, headers))

    # every documented header with hostile values, alone and repeated after a good one
    for name in _OURS:
        for value in _HOSTILE_VALUES:
            add([(b"trace", b"t"), (name.encode(), value)])
        add([(name.encode(), b"1"), (name.encode(), None), (name.encode(), b"\xff")])
    # random header sets
    rng = random.Random(12)
    names = [n.encode() for n in _OURS] + [b"trace", b"content-type", b"kafka-retry.unknown"]
    for _ in range(150):
        headers: list[tuple[bytes, bytes | None]] = []
        for _ in range(rng.randint(0, 40)):
            name = rng.choice(names) if rng.random() < 0.6 else rng.randbytes(8).hex().encode()
            value = None if rng.random() < 0.1 else rng.randbytes(rng.randint(0, 300))
            headers.append((name, value))
        add(headers)
    # header names that are not UTF-8, or hold a NUL byte (read cut at the NUL)
    for i in range(30):
        add(
            [
                (b"a", b"1"),
                (b"bad\xff%d" % i, b"2"),
                (h.ATTEMPT.encode(), b"3"),
                (b"\xc3\x28", None),
            ]
        )
    for name in (h.ATTEMPT, h.DUE, h.ORIGINAL_TOPIC, "trace"):
        add([(name.encode() + b"\x00tail", b"abc"), (b"z", b"1")])
    # records at the size limit, and records of 100,000 headers (beyond: they arrive with none)
    for _ in range(2):
        add([(b"trace", b"big"), (h.DUE.encode(), b"-5")], size=size_limit - 1000)
    # (ours first, so that they are not a prefix of the layout; one name changed each time)
    for k, count in enumerate([99_999] * 12 + [100_000, 100_001]):
        names = (b"%d" % (j if j != k else 10**6 + k) for j in range(count - 1))
        add([(h.ATTEMPT.encode(), b"1"), *((name, None) for name in names)])
    return out


def test_hostile_records_never_stop_a_worker_or_the_sdk(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """The same hostile records on the source topic (the SDK, in a service process) and on a
    tier (a worker process): neither process exits, every record is handled or in the DLQ, and
    peak memory stays bounded."""
    d = deploy_pipeline(kafka_bootstrap, kafka_admin, make_topic, tiers=(("retry-1", 1),))
    limit = _topic_limit(kafka_admin, d.topology.source_topic)
    worker_file, sdk_file = tmp_path / "worker.jsonl", tmp_path / "sdk.jsonl"
    pod = WorkerPod(
        d, "retry-1", f"{d.name}-retry-1-0", tmp_path, {"DP_RECORD_FILE": str(worker_file)}
    )
    topology_file = tmp_path / "topology.json"
    topology_file.write_text(d.topology.to_json())
    sdk_port = free_port()
    sdk_log = (tmp_path / "sdk.log").open("wb")
    sdk = subprocess.Popen(
        [sys.executable, str(TESTS / "sdk_service.py"), str(topology_file), str(sdk_port)],
        env={**pod.env, "DP_RECORD_FILE": str(sdk_file)},
        stdout=sdk_log,
        stderr=subprocess.STDOUT,
    )
    pod.start()
    try:
        wait_for(lambda: pod.ready() and _ready(sdk_port), 60, "the worker and the SDK ready")
        produced: dict[str, set[str]] = {}
        for prefix, topic in (("s", d.topology.source_topic), ("t", d.topology.tiers[0].topic)):
            batch = hostile_records(prefix, limit)
            produce_raw(kafka_bootstrap, topic, batch)
            produced[prefix] = {key.decode() for key, _, _ in batch}
        input_bytes = sum(len(v) + sum(len(n) + len(x or b"") for n, x in hs) for _, v, hs in batch)

        dead: dict[str, str | None] = {}
        reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"r-{d.name}"})
        reader.assign([TopicPartition(d.topology.dlq_topic, 0, 0)])

        def settled() -> bool:
            for m in reader.consume(500, 0.5):
                if m.error() is None:
                    reason = dict(m.headers() or []).get(h.DLQ_REASON)
                    dead[json.loads(m.value())["id"]] = reason and reason.decode()
            handled = {str(r["id"]) for f in (worker_file, sdk_file) for r in records(f)}
            assert pod.running() and sdk.poll() is None, "a process exited"
            return all(ids <= handled | set(dead) for ids in produced.values())

        try:
            wait_for(settled, 300, "every record handled or in the DLQ")
        finally:
            reader.close()
        peaks = {
            name: _peak_rss_mib(pid) for name, pid in (("worker", pod.proc.pid), ("sdk", sdk.pid))
        }  # type: ignore[union-attr]
        reasons = Counter(dead.values())
        print(
            f"{sum(map(len, produced.values()))} hostile records ({input_bytes / 2**20:.1f} MiB "
            f"per stage), DLQ reasons {dict(reasons)}, peak RSS MiB {peaks}"
        )
        # at least the non-UTF-8 names on both lanes; None: a DLQ record of more than 100,000
        # headers (the event's and ours), which librdkafka reads as having none
        assert reasons[h.REASON_MALFORMED] >= 60
        for name, peak in peaks.items():
            assert peak < 400, f"{name}: peak RSS {peak:.0f} MiB"
    finally:
        pod.stop()
        sdk.send_signal(signal.SIGTERM)
        assert sdk.wait(40) == 0, (tmp_path / "sdk.log").read_text()[-3000:]
        sdk_log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_upstream_pipelines_headers_travel_byte_for_byte(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Two services chained: the source records carry the `kafka-retry.*` headers of an
    upstream pipeline. They are the event's own: the live lane and every tier forward them
    unchanged, in front of ours, and never read them as ours."""
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", 1), ("retry-2", 1)),
        callable_path="dataplane_handlers:fail_retriably",
    )
    upstream = [
        ("trace", b"t-1"),
        (h.ORIGINAL_TOPIC, b"upstream-orders"),
        (h.ATTEMPT, b"7"),
        (h.DUE, b"99999999999999"),
        (h.PIPELINE, b"shop/upstream"),
        (h.DLQ_REASON, b"retries-exhausted"),
        ("after", None),
    ]
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(d.topology.source_topic, key=b"u", value=b'{"id": "u"}', headers=upstream)
    assert p.flush(30) == 0
    seen: list[Any] = []

    def fail(event: Any) -> None:
        seen.append(event)
        raise RetriableError("later")

    record_file = tmp_path / "handled.jsonl"
    pod = WorkerPod(
        d, "retry-1", f"{d.name}-retry-1-0", tmp_path, {"DP_RECORD_FILE": str(record_file)}
    )
    pod.start()
    try:
        with Running(RetryingConsumer(d.topology, fail, use_env=False)):
            (second,) = read_topic(kafka_bootstrap, d.topology.tiers[1].topic, expect=1, timeout=60)
    finally:
        pod.stop()
    assert list(seen[0].headers) == upstream  # the handler sees them all
    (first,) = read_topic(kafka_bootstrap, d.topology.tiers[0].topic, expect=1)
    for forwarded, attempt in ((first, "1"), (second, "2")):
        assert forwarded.headers[: len(upstream)] == upstream
        ours = dict(forwarded.headers[len(upstream) :])
        assert ours[h.ORIGINAL_TOPIC] == d.topology.source_topic.encode()
        assert ours[h.ATTEMPT] == attempt.encode()  # ours, not the upstream's 7
    (call,) = records(record_file)
    assert call["attempt"] == 2


def test_the_broker_is_the_clock_of_a_tier(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Tier topics stamp records with the broker's append time. An event is handled no
    earlier than that + the tier's delay, whatever a writer's headers or clock say: `due-ms: 0`
    with an old timestamp does not skip the delay, and a forward from a host whose clock is
    ahead by more than the delay is not dead-lettered."""
    delay_s = 3
    d = deploy_pipeline(
        kafka_bootstrap,
        kafka_admin,
        make_topic,
        tiers=(("retry-1", delay_s),),
        callable_path="dataplane_handlers:record_timing",
    )
    topic = d.topology.tiers[0].topic
    record_file = tmp_path / "handled.jsonl"
    pod = WorkerPod(
        d, "retry-1", f"{d.name}-retry-1-0", tmp_path, {"DP_RECORD_FILE": str(record_file)}
    )
    pod.start()
    try:
        wait_for(pod.ready, 60, "the worker ready")
        now_ms = int(time.time() * 1000)
        ahead_ms = now_ms + 60_000  # a forwarder whose clock is a minute fast
        cases = {
            "skip": (1, [(h.DUE, b"0")]),  # a writer that wants to skip the delay
            "fast-clock": (ahead_ms, [(h.DUE, b"%d" % (ahead_ms + delay_s * 1000))]),
            "far": (now_ms, [(h.DUE, b"%d" % (now_ms + 10**9))]),  # clamped
        }
        p = Producer({"bootstrap.servers": kafka_bootstrap})
        for event_id, (timestamp, headers) in cases.items():
            value = json.dumps({"id": event_id}).encode()
            p.produce(topic, value=value, headers=headers, timestamp=timestamp)
        assert p.flush(30) == 0
        wait_for(lambda: len(records(record_file)) >= len(cases), 60, "every event handled")
    finally:
        pod.stop()
    for r in records(record_file):
        appended = int(r["timestamp_ms"])
        assert abs(appended - now_ms) < 30_000, f"{r['id']}: not the broker's append time"
        assert r["at_ms"] >= appended + delay_s * 1000, f"{r['id']} handled early"
        assert r["at_ms"] <= appended + delay_s * 1000 + 10_000, f"{r['id']} held too long"


def test_an_event_that_hangs_or_crashes_its_handler_goes_to_the_dlq_as_poison(
    kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A handler call that overruns its deadline stops the worker (exit 4); one that ends the
    process does so itself. Restarted each time (as the kubelet does), the worker sends an
    event that stopped it on 3 starts in a row to the DLQ with `dlq-reason: poison`, and the
    events behind it are handled."""
    handler = {"python": {"image": "t", "callable": "dataplane_handlers:hang_or_crash"}}
    handler["python"]["timeoutSeconds"] = 2  # type: ignore[index]
    d = deploy_pipeline(kafka_bootstrap, kafka_admin, make_topic, handler=handler)
    produce_ids(kafka_bootstrap, d.topology.tiers[0].topic, ["e0", "hang", "e1", "crash", "e2"])
    record_file = tmp_path / "handled.jsonl"
    pod = WorkerPod(
        d, "retry-1", f"{d.name}-retry-1-0", tmp_path, {"DP_RECORD_FILE": str(record_file)}
    )
    pod.start()
    exits: list[int | None] = []

    def settled() -> bool:
        if not pod.running():  # the kubelet restarts the container
            exits.append(pod.proc.returncode if pod.proc else None)
            pod.start()
        handled = {r["id"] for r in records(record_file) if r["outcome"] == "handled"}
        return handled >= {"e0", "e1", "e2"}

    try:
        wait_for(settled, 180, "the events behind the poison ones handled")
        dead = read_topic(kafka_bootstrap, d.topology.dlq_topic, expect=2, timeout=30)
    finally:
        pod.stop()
    assert sorted(r.id for r in dead) == ["crash", "hang"]
    for r in dead:
        assert r.header(h.DLQ_REASON) == h.REASON_POISON
        assert "stopped 3 times" in (r.header(h.ERROR_MESSAGE) or "")
    assert 4 in exits and 1 in exits, exits  # the deadline, and the crash
    started = Counter(r["id"] for r in records(record_file) if r["outcome"] == "started")
    assert started["hang"] <= 4 and started["crash"] <= 4, started
