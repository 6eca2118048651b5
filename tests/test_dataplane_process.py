"""`kafka-retry worker` as a real process, started the way the operator's Deployment starts it:
command `kafka-retry worker --tier <name>`, the topology in $KAFKA_RETRY_TOPOLOGY, client
settings as KAFKA_CLIENT_*, metrics and probes on $KAFKA_RETRY_METRICS_PORT."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dataplane_support import committed_offset, make_topology, produce_ids, read_topic, wait_for
from http_service_support import RecordingService, serving
from kafka_retry import headers as h
from kafka_retry.model import LIVE_LANE, Handler, HttpHandler, Topology

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_command() -> list[str]:
    script = Path(sys.executable).parent / "kafka-retry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kafka_retry.cli"]


@contextmanager
def worker_process(
    topo: Topology, tier: str, record_file: Path, port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "KAFKA_RETRY_TOPOLOGY": topo.to_json(),
        "KAFKA_RETRY_METRICS_PORT": str(port),
        # As the operator deploys it: its client defaults, and static membership under the pod's
        # name (a container restarted by the kubelet keeps it).
        "KAFKA_RETRY_INSTANCE_ID": f"{tier}-worker-0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "DP_RECORD_FILE": str(record_file),
    }
    role = ["--live"] if tier == LIVE_LANE else ["--tier", tier]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*_worker_command(), "worker", *role], env=env, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by kill -9: redone after restart
            out.append(json.loads(line))
    return out


def _handled(path: Path) -> list[str]:
    return [str(r["id"]) for r in _records(path) if r["outcome"] == "handled"]


def test_kill_9_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),), partitions=2)
    record_file, log = tmp_path / "handled.jsonl", tmp_path / "worker.log"
    ids = [f"k{i}" for i in range(600)]
    port = _free_port()

    def produce_slowly() -> None:
        for start in range(0, len(ids), 50):
            produce_ids(kafka_bootstrap, topo.tiers[0].topic, ids[start : start + 50])
            time.sleep(0.1)

    producer = threading.Thread(target=produce_slowly)
    with worker_process(topo, "retry-1", record_file, port, log) as proc:
        producer.start()
        wait_for(lambda: len(_records(record_file)) >= 100, 60, "the worker is mid-stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    killed_at = len(_records(record_file))
    producer.join(60)
    assert killed_at < len(ids), "the worker finished before the kill; not mid-stream"

    expected_dlq = {i for i in ids if i.endswith("7")}
    with worker_process(topo, "retry-1", record_file, port, log):
        wait_for(
            lambda: set(_handled(record_file)) >= set(ids) - expected_dlq,
            90,
            "every good event handled after the restart",
        )
        dlq = read_topic(kafka_bootstrap, topo.dlq_topic, expect=len(expected_dlq), timeout=60)

    handled = Counter(_handled(record_file))
    dead = Counter(r.id for r in dlq)
    assert set(handled) | set(dead) == set(ids), "an event was lost"
    assert set(dead) == expected_dlq
    for r in dlq:
        assert r.header(h.DLQ_REASON) == h.REASON_NON_RETRIABLE
    duplicates = sum(n - 1 for n in handled.values()) + sum(n - 1 for n in dead.values())
    # at-least-once: a kill -9 may repeat what was handled since the last commit, not more
    assert duplicates <= killed_at, f"{duplicates} duplicates"
    print(f"kill -9 after {killed_at} records: {duplicates} duplicate(s), 0 lost")


@dataclasses.dataclass
class HangingService(RecordingService):
    """The first call of `k5` gets no answer until `release` is set (then a 503 that nobody
    reads any more); every other call 200 at once."""

    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    k5_calls: int = 0

    def status(self, key: str, attempt: int) -> int:
        if key == "k5":
            with self.lock:
                self.k5_calls += 1
                first = self.k5_calls == 1
            if first:
                self.release.wait(60)
                return 503
        return 200


def test_kill_9_with_calls_in_flight_loses_nothing(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """The managed live lane (`worker --live`) at maxInFlight 8: k5's call hangs while the 34
    events after it are answered. The group's committed offset reaches k5's (5) and stays
    there, never past the unfinished call; kill -9, restart: k5 is handled, nothing is lost."""
    log = tmp_path / "worker.log"
    ids = [f"k{i}" for i in range(40)]
    with serving(HangingService()) as svc:
        topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))
        http = HttpHandler(url=svc.url, timeout_seconds=60, max_in_flight=8)
        topo = topo.model_copy(update={"handler": Handler(http=http)})
        group, source = topo.consumer_group, topo.source_topic
        produce_ids(kafka_bootstrap, source, ids)
        with worker_process(topo, LIVE_LANE, tmp_path / "unused", _free_port(), log) as proc:
            wait_for(lambda: len(svc.handled()) == 39, 60, "every event but k5 answered")
            wait_for(
                lambda: committed_offset(kafka_bootstrap, group, source) == 5, 30, "commit at k5"
            )
            time.sleep(2.5)  # sleep-ok: two more auto-commit intervals (1 s) pass
            assert committed_offset(kafka_bootstrap, group, source) == 5, "committed past k5"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert "k5" not in svc.handled()
        svc.release.set()  # the killed worker's call ends (503, recorded, never read)
        with worker_process(topo, LIVE_LANE, tmp_path / "unused", _free_port(), log):
            wait_for(lambda: "k5" in svc.handled(), 60, "k5 handled after the restart")
            wait_for(
                lambda: committed_offset(kafka_bootstrap, group, source) == 40, 30, "commit at 40"
            )
        handled = Counter(c.key for c in svc.snapshot() if c.status == 200)
    assert set(handled) == set(ids), "an event was lost"
    assert read_topic(kafka_bootstrap, topo.dlq_topic, expect=0, timeout=5) == []
    # at-least-once: only what came after the unfinished call is handled again
    assert all(handled[i] == 1 for i in ids[:5]), handled
    print(f"kill -9 with k5 in flight: {sum(handled.values()) - 40} handled twice, 0 lost")


def test_sigterm_drains_commits_and_exits_zero(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))
    record_file, log = tmp_path / "handled.jsonl", tmp_path / "worker.log"
    ids = [f"s{i}" for i in range(20)]  # s7 and s17 go to the DLQ
    port = _free_port()
    with worker_process(topo, "retry-1", record_file, port, log) as proc:
        wait_for(lambda: _get(port, "/readyz")[0] == 200, 30, "/readyz")
        assert _get(port, "/healthz")[0] == 200
        produce_ids(kafka_bootstrap, topo.tiers[0].topic, ids)
        wait_for(lambda: len(_records(record_file)) >= 20, 30, "all events handled")
        status, metrics = _get(port, "/metrics")
        assert status == 200
        assert "kafka_retry_events_total" in metrics
        assert 'outcome="succeeded"' in metrics
        assert "kafka_retry_lateness_seconds_bucket" in metrics
        assert "kafka_retry_handler_duration_seconds_bucket" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    assert len(read_topic(kafka_bootstrap, topo.dlq_topic, expect=2)) == 2

    # A successor starts where the first committed: nothing is handled twice.
    produce_ids(kafka_bootstrap, topo.tiers[0].topic, ["after"])
    with worker_process(topo, "retry-1", record_file, port, log) as proc:
        wait_for(lambda: "after" in _handled(record_file), 30, "the successor handled 'after'")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    counts = Counter(str(r["id"]) for r in _records(record_file))
    assert sorted(counts) == sorted([*ids, "after"])
    assert max(counts.values()) == 1


def test_suspended_pipeline_worker_idles_and_exits_zero(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))
    topo = topo.model_copy(update={"suspend": True})
    record_file, log = tmp_path / "handled.jsonl", tmp_path / "worker.log"
    produce_ids(kafka_bootstrap, topo.tiers[0].topic, ["waits"])
    port = _free_port()
    with worker_process(topo, "retry-1", record_file, port, log) as proc:
        wait_for(lambda: _get(port, "/readyz")[0] == 200, 30, "/readyz")
        assert _get(port, "/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert _records(record_file) == []
    assert "suspended" in log.read_text()


def test_unknown_tier_and_missing_handler_exit_with_config_codes(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))
    record_file, log = tmp_path / "r", tmp_path / "worker.log"
    with worker_process(topo, "nope", record_file, _free_port(), log) as proc:
        assert proc.wait(30) == 2
    broken = make_topology(
        kafka_bootstrap, make_topic, tiers=(("retry-1", 1),), callable_path="no_such_mod:handle"
    )
    with worker_process(broken, "retry-1", record_file, _free_port(), log) as proc:
        assert proc.wait(30) == 3
    assert "no_such_mod" in log.read_text()
