"""`kafka-retry dlq ...` against the real broker, as a subprocess, without a cluster
(`--topology-file`): list, show, purge, direct replay, and its one-line errors."""

from __future__ import annotations

import bisect
import itertools
import json
import os
import pty
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dataplane_support import make_topology, read_topic
from dlq_support import BIN, cli, error_class, fill_dlq, replayed_records, source_of
from kafka_retry import headers as h
from kafka_retry.dlq import KafkaAccess, partition_states
from kafka_retry.dlq_stats import age_bucket
from kafka_retry.model import Topology

COUNT = 40


@pytest.fixture
def now_ms() -> int:
    """The test's start: the DLQ's newer half is written then (a time taken once per session
    would be more than `--since 10m` ago for a test run late in a long session)."""
    return int(time.time() * 1000)


@pytest.fixture
def dlq_pipeline(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, now_ms: int
) -> tuple[Topology, list[str]]:
    """A pipeline (3 partitions) with COUNT events in its DLQ, its first half one hour older."""
    # Named `billing`, as the commands below call it (its consumer groups stay unique).
    topo = make_topology(kafka_bootstrap, make_topic, partitions=3)
    topo = topo.model_copy(update={"pipeline": "test/billing"})
    path = tmp_path / "topology.json"
    path.write_text(topo.to_json())
    old = now_ms - 3_600_000
    fill_dlq(
        kafka_bootstrap, topo.dlq_topic, COUNT, source_topic=topo.source_topic,
        timestamp_ms=lambda i: old + i if i < COUNT // 2 else now_ms + i,
    )  # fmt: skip
    return topo, ["--topology-file", str(path)]


def _json(*args: str) -> Any:
    proc = cli(*args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _depth(bootstrap: str, topo: Topology) -> int:
    return sum(s.waiting for s in partition_states(KafkaAccess(bootstrap), topo.dlq_topic))


def test_list_shows_events_with_their_headers(
    dlq_pipeline: tuple[Topology, list[str]],
) -> None:
    topo, where = dlq_pipeline
    proc = cli("dlq", "list", "billing", *where, "--limit", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "TIME", "PARTITION:OFFSET", "KEY", "ERROR", "MESSAGE", "ATTEMPTS", "ORIGIN"
    ]  # fmt: skip
    assert len(lines) == COUNT + 1
    assert any("BadOrder" in line and "order e0 failed" in line for line in lines)
    assert f"{COUNT} waiting events shown; DLQ depth {COUNT}" in proc.stderr

    events = _json("dlq", "list", "billing", *where, "--limit", "0")
    assert sorted(e["key"] for e in events) == sorted(f"k{i % 13}" for i in range(COUNT))
    by_offset = {e["original"]["offset"]: e for e in events}
    e7 = by_offset[7]
    assert e7["errorClass"] == error_class(7) and e7["errorMessage"] == "order e7 failed"
    assert (e7["attempts"], e7["tier"], e7["dlqReason"]) == (3, "retry-2", h.REASON_EXHAUSTED)
    assert e7["original"]["topic"] == topo.source_topic and e7["waiting"] is True
    headers = {x["key"]: x["value"] for x in e7["headers"]}
    assert headers["trace-id"] == "t7", "the original header is listed"
    assert headers[h.ERROR_CLASS] == error_class(7)
    # Oldest first, and --limit keeps the oldest.
    times = [e["timestamp"] for e in events]
    assert times == sorted(times)
    first = _json("dlq", "list", "billing", *where, "--limit", "5")
    assert [e["original"]["offset"] for e in first] == [0, 1, 2, 3, 4]


def test_list_filters(dlq_pipeline: tuple[Topology, list[str]]) -> None:
    _, where = dlq_pipeline
    bad = _json("dlq", "list", "billing", *where, "--error-class", "BadOrder", "--limit", "0")
    assert sorted(e["original"]["offset"] for e in bad) == list(range(0, COUNT, 4))
    full = _json("dlq", "list", "billing", *where, "--error-class", error_class(1), "--limit", "0")
    assert len(full) == COUNT - len(bad)
    keyed = _json("dlq", "list", "billing", *where, "--key", "k1", "--key", "k2", "--limit", "0")
    assert sorted(e["original"]["offset"] for e in keyed) == [1, 2, 14, 15, 27, 28]
    recent = _json("dlq", "list", "billing", *where, "--since", "10m", "--limit", "0")
    assert sorted(e["original"]["offset"] for e in recent) == list(range(COUNT // 2, COUNT))
    older = _json("dlq", "list", "billing", *where, "--until", "10m", "--key", "k0")
    assert [e["original"]["offset"] for e in older] == [0, 13]
    yaml_out = cli("dlq", "list", "billing", *where, "--key", "k3", "-o", "yaml")
    assert yaml_out.returncode == 0 and "errorClass:" in yaml_out.stdout

    nothing = cli("dlq", "list", "billing", *where, "--key", "no-such-key")
    assert nothing.returncode == 3
    assert "0 matching waiting events shown" in nothing.stderr


def test_show_prints_all_headers_and_the_payload(
    dlq_pipeline: tuple[Topology, list[str]], kafka_bootstrap: str
) -> None:
    topo, where = dlq_pipeline
    first = _json("dlq", "list", "billing", *where, "--limit", "1")[0]
    position = f"{first['partition']}:{first['offset']}"
    proc = cli("dlq", "show", "billing", position, *where)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"Event {position} of {topo.dlq_topic}: waiting" in out
    assert "Error class:    billing.errors.BadOrder" in out
    assert "trace-id: t0" in out and f"{h.DLQ_REASON}: non-retriable" in out
    assert "ReadTimeout: slow" in out, "the stack"
    assert 'Payload (JSON, 12 bytes):\n  {\n    "id": "e0"\n  }' in out
    event = _json("dlq", "show", "billing", position, *where)
    assert event["value"] == '{"id": "e0"}' and event["errorStack"].startswith("Traceback")

    # A binary payload is shown as hex (and base64 in JSON).
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topo.dlq_topic, key=b"\x00\xff", value=bytes(range(20)), partition=2)
    producer.flush(10)
    high = max(s.high for s in partition_states(KafkaAccess(kafka_bootstrap), topo.dlq_topic)
               if s.partition == 2)  # fmt: skip
    shown = cli("dlq", "show", "billing", f"2:{high - 1}", *where)
    assert "Key:            0x00ff" in shown.stdout
    assert "Payload (binary, 20 bytes, hex):\n  0000  00 01 02 03" in shown.stdout
    event = _json("dlq", "show", "billing", f"2:{high - 1}", *where)
    assert event["valueBase64"] == "AAECAwQFBgcICQoLDA0ODxAREhM=" and event["keyBase64"] == "AP8="

    missing = cli("dlq", "show", "billing", "0:100000", *where)
    assert missing.returncode == 3 and "no event at 0:100000" in missing.stderr


def test_purge_before_an_offset_removes_exactly_those_events(
    dlq_pipeline: tuple[Topology, list[str]], kafka_bootstrap: str
) -> None:
    topo, where = dlq_pipeline
    before = {e["original"]["offset"] for e in _json("dlq", "list", "billing", *where,
                                                     "--limit", "0")}  # fmt: skip
    in_p0 = sorted(
        (e for e in _json("dlq", "list", "billing", *where, "--limit", "0") if e["partition"] == 0),
        key=lambda e: e["offset"],
    )
    assert len(in_p0) >= 4

    refused = cli("dlq", "purge", "billing", *where, "--before-offset", "0:3", input="n\n")
    assert refused.returncode == 1 and "Delete 3 event(s)" in refused.stderr
    assert _depth(kafka_bootstrap, topo) == COUNT, "nothing purged without a yes"

    proc = cli("dlq", "purge", "billing", *where, "--before-offset", "0:3", input="y\n")
    assert proc.returncode == 0, proc.stderr
    assert f"purged 3 event(s) from {topo.dlq_topic}; DLQ depth now {COUNT - 3}" in proc.stdout
    after = {e["original"]["offset"] for e in _json("dlq", "list", "billing", *where,
                                                    "--limit", "0")}  # fmt: skip
    assert before - after == {e["original"]["offset"] for e in in_p0[:3]}
    assert _depth(kafka_bootstrap, topo) == COUNT - 3

    # Everything that reached the DLQ more than 10 minutes ago (the older half).
    proc = cli("dlq", "purge", "billing", *where, "--before-time", "10m", "--yes")
    assert proc.returncode == 0, proc.stderr
    left = {e["original"]["offset"] for e in _json("dlq", "list", "billing", *where,
                                                   "--limit", "0")}  # fmt: skip
    assert left == set(range(COUNT // 2, COUNT))
    again = cli("dlq", "purge", "billing", *where, "--before-time", "10m", "--yes")
    assert again.returncode == 3 and "nothing to purge" in again.stderr


def test_direct_replay_with_a_filter_keeps_skipped_events_counted(
    dlq_pipeline: tuple[Topology, list[str]], kafka_bootstrap: str
) -> None:
    topo, where = dlq_pipeline
    target = topo.tiers[0].topic
    proc = cli("dlq", "replay", "billing", *where, "--direct", "--error-class", "BadOrder")
    assert proc.returncode == 0, proc.stderr
    assert "Succeeded: 10 replayed, 30 skipped" in proc.stdout
    replay_id = proc.stdout.split()[0].removeprefix("dlqreplay/")
    records = replayed_records(kafka_bootstrap, target, replay_id, expect=10)
    assert sorted(json.loads(r.value or b"")["id"] for r in records) == sorted(
        f"e{i}" for i in range(0, COUNT, 4)
    )
    for r in records:
        assert r.header(h.ATTEMPT) == "1" and r.header(h.DLQ_REASON) is None
        assert r.header(h.ERROR_CLASS) == "billing.errors.BadOrder", "the last error is kept"
        assert h.split(r.headers)[0][0][0] == "trace-id"
    # Skipped events still wait; replayed ones are behind the cursor only up to the first
    # skipped event of their partition (a contiguous prefix), the rest stay counted.
    states = partition_states(KafkaAccess(kafka_bootstrap), topo.dlq_topic)
    past = sum(s.waiting for s in states) - 30
    assert 0 <= past <= 10
    if past:
        assert f"note: {past} replayed event(s) come after skipped ones" in proc.stderr
    for s in states:
        prefix = [r for r in records if source_of(r)[0] == s.partition and
                  source_of(r)[1] < s.head]  # fmt: skip
        assert len(prefix) == s.head, "the cursor passed only replayed events"

    # An unfiltered replay takes the rest: the DLQ is empty.
    proc = cli("dlq", "replay", "billing", *where, "--direct")
    assert proc.returncode == 0, proc.stderr
    assert _depth(kafka_bootstrap, topo) == 0
    nothing = cli("dlq", "replay", "billing", *where, "--direct")
    assert nothing.returncode == 3 and "nothing matched" in nothing.stderr


def test_errors_are_one_clear_line(
    dlq_pipeline: tuple[Topology, list[str]], kubeconfig: str, namespace: str,
    crds: None,
) -> None:  # fmt: skip
    _, where = dlq_pipeline
    cases = [
        (["dlq", "list", "billing", *where, "--bootstrap-servers", "127.0.0.1:1",
          "--kafka-timeout", "2"], "cannot reach Kafka at 127.0.0.1:1"),
        (["dlq", "replay", "billing", *where, "--direct", "--target-tier", "nope"],
         "has no tier 'nope'"),
        (["dlq", "list", "billing", "--kubeconfig", kubeconfig, "-n", namespace],
         f"RetryPipeline {namespace}/billing not found"),
        (["status", "billing", "--kubeconfig", kubeconfig, "-n", namespace],
         f"RetryPipeline {namespace}/billing not found"),
        (["dlq", "cancel", "nope", "--kubeconfig", kubeconfig, "-n", namespace],
         f"DLQReplay {namespace}/nope not found"),
    ]  # fmt: skip
    for args, message in cases:
        proc = cli(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr == f"kafka-retry: {proc.stderr.removeprefix('kafka-retry: ')}"
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def _one_line_usage_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.args, proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_bad_input_is_a_one_line_usage_error_and_changes_nothing(
    dlq_pipeline: tuple[Topology, list[str]], kafka_bootstrap: str
) -> None:
    topo, where = dlq_pipeline
    p1_end = next(
        s.high for s in partition_states(KafkaAccess(kafka_bootstrap), topo.dlq_topic)
        if s.partition == 1
    )  # fmt: skip
    cases = [
        (["dlq", "list", "billing", *where, "--limit", "-5"], "--limit: must be 0 or more"),
        (["dlq", "list", "billing", *where, "--since", "10m", "--until", "20m"],
         "--since 10m is not before --until 20m: no event can match"),
        (["dlq", "replay", "billing", *where, "--direct", "--since", "1h", "--until", "1h"],
         "is not before --until"),
        (["dlq", "purge", "billing", *where, "--before-offset", "1:9999", "--yes"],
         f"offset 9999 is past the end of partition 1 of {topo.dlq_topic}: its next offset is "
         f"{p1_end} (1:{p1_end} purges the whole partition)"),
        (["dlq", "list", "other", *where],
         "is the topology of pipeline test/billing, not other"),
        (["dlq", "replay", "billing", *where, "--rate", "0"], "--rate: must be at least 1"),
    ]  # fmt: skip
    for args, message in cases:
        assert message in _one_line_usage_error(cli(*args))
    # A missing partition is worded alike by every command that names one.
    missing = f"{topo.dlq_topic} has no partition 7 (partitions 0-2)"
    assert missing in _one_line_usage_error(cli("dlq", "show", "billing", "7:0", *where))
    purge = cli("dlq", "purge", "billing", *where, "--before-offset", "7:1", "--yes")
    assert missing in _one_line_usage_error(purge)
    # Nothing was purged, nothing replayed.
    assert _depth(kafka_bootstrap, topo) == COUNT
    assert all(s.low == 0 for s in partition_states(KafkaAccess(kafka_bootstrap), topo.dlq_topic))


def test_list_into_a_closed_pipe_is_quiet(dlq_pipeline: tuple[Topology, list[str]]) -> None:
    """`kafka-retry dlq list | head`: the reader is gone before the table is written."""
    _, where = dlq_pipeline
    proc = subprocess.Popen(
        [str(BIN / "kafka-retry"), "dlq", "list", "billing", *where, "--limit", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `head` does once it has its lines
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert code == 128 + signal.SIGPIPE, (code, stderr)
    assert stderr == "", "no BrokenPipeError, no summary for a reader that left"


def test_ctrl_c_cancels_a_direct_replay_with_exit_code_130(
    dlq_pipeline: tuple[Topology, list[str]], kafka_bootstrap: str
) -> None:
    topo, where = dlq_pipeline
    proc = subprocess.Popen(
        [str(BIN / "kafka-retry"), "dlq", "replay", "billing", *where, "--direct", "--rate", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    assert "(Ctrl-C cancels)" in proc.stderr.readline()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Cancelled:" in out
    replayed = int(out.split("Cancelled: ")[1].split()[0])
    assert 1 <= replayed < COUNT
    assert _depth(kafka_bootstrap, topo) == COUNT - replayed, "what was replayed stays replayed"


def test_replay_rate_holds_in_every_second_even_after_a_stall(
    kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """`--rate 200`: no 1-second window on the target carries more than 200 events, also
    right after the replaying process was stopped for a second (descheduled, a slow broker),
    when a schedule fixed from the start would send a catch-up burst."""
    rate, count = 200, 1000
    topo = make_topology(kafka_bootstrap, make_topic, partitions=2)
    topo = topo.model_copy(update={"pipeline": "test/billing"})
    path = tmp_path / "topology.json"
    path.write_text(topo.to_json())
    fill_dlq(kafka_bootstrap, topo.dlq_topic, count, source_topic=topo.source_topic)
    proc = subprocess.Popen(
        [str(BIN / "kafka-retry"), "dlq", "replay", "billing", "--topology-file", str(path),
         "--direct", "--rate", str(rate)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    assert "(Ctrl-C cancels)" in proc.stderr.readline()
    time.sleep(1.5)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    assert f"Succeeded: {count} replayed" in out

    sent = sorted(r.timestamp_ms for r in read_topic(kafka_bootstrap, topo.tiers[0].topic,
                                                      expect=count))  # fmt: skip
    assert len(sent) == count
    busiest = max(bisect.bisect_left(sent, t + 1000) - i for i, t in enumerate(sent))
    assert busiest <= rate, f"{busiest} events in one second at --rate {rate}"
    # And the limit is a rate, not a throttle far below it: the stall aside (the longest gap,
    # as long as the process stayed stopped, which a loaded machine stretches), close to it.
    stall_s = max(b - a for a, b in itertools.pairwise(sent)) / 1000
    took_s = (sent[-1] - sent[0]) / 1000 - stall_s
    assert stall_s >= 1.4, f"the stall left no gap ({stall_s:.1f}s)"
    assert took_s < count / rate + 2, f"{count} events took {took_s:.1f}s besides the stall"


def test_stats_counts_by_class_reason_tier_and_age(
    dlq_pipeline: tuple[Topology, list[str]], now_ms: int
) -> None:
    topo, where = dlq_pipeline
    stats = _json("dlq", "stats", "billing", *where)
    assert stats["events"] == COUNT and stats["topic"] == topo.dlq_topic
    assert stats["errorClasses"] == [
        {"name": "requests.exceptions.ReadTimeout", "count": 30},
        {"name": "billing.errors.BadOrder", "count": 10},
    ]
    assert stats["reasons"] == [
        {"name": h.REASON_EXHAUSTED, "count": 30},
        {"name": h.REASON_NON_RETRIABLE, "count": 10},
    ]
    assert stats["tiers"] == [{"name": "retry-2", "count": COUNT}]
    # Half reached the DLQ when this test started, an hour before that.
    age_ms = int(time.time() * 1000) - now_ms
    halves = [age_bucket(age_ms), age_bucket(age_ms + 3_600_000)]
    assert stats["ages"] == [{"name": name, "count": 20} for name in halves]
    table = cli("dlq", "stats", "billing", *where, "--error-class", "BadOrder")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"DLQ {topo.dlq_topic}: 10 matching waiting events")
    assert any(line.split()[:3] == ["billing.errors.BadOrder", "10", "100%"] for line in lines)
    none = cli("dlq", "stats", "billing", *where, "--key", "no-such-key")
    assert none.returncode == 3


def test_replay_dry_run_says_what_would_go_where_and_sends_nothing(
    dlq_pipeline: tuple[Topology, list[str]], kafka_bootstrap: str
) -> None:
    topo, where = dlq_pipeline
    args = ["dlq", "replay", "billing", *where, "--dry-run", "--error-class", "BadOrder"]
    plan = _json(*args, "--rate", "4", "--target-tier", "retry-2")
    assert plan["dryRun"] is True
    assert (plan["targetTier"], plan["targetTopic"]) == ("retry-2", topo.tiers[1].topic)
    assert plan["wouldReplay"]["events"] == 10 and plan["wouldSkip"] == 30
    assert plan["atLeastSeconds"] == 2.5
    text = cli(*args)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(
        f"dry run: would replay 10 event(s) from {topo.dlq_topic} to tier retry-1 "
        f"({topo.tiers[0].topic}); 30 would stay waiting"
    )
    assert _depth(kafka_bootstrap, topo) == COUNT
    for tier in topo.tiers:
        assert read_topic(kafka_bootstrap, tier.topic, expect=0, timeout=5) == []


def test_direct_replay_draws_a_progress_bar_on_a_terminal(
    dlq_pipeline: tuple[Topology, list[str]],
) -> None:
    """On a terminal: a bar redrawn in place with done/total and the counts; the report line
    at the end. (Elsewhere, plain lines: the other tests read those.)"""
    _, where = dlq_pipeline
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "kafka-retry"), "dlq", "replay", "billing", *where, "--direct", "--rate",
         "20"],
        stdin=child, stdout=child, stderr=child, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    os.close(child)
    screen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the process ended and closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=60) == 0, screen.decode(errors="replace")
    os.close(main)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    frames = re.findall(r"Running\s+\S*\s+(\d+)/(\d+)\s+replayed (\d+) · skipped 0", text)
    assert len(frames) >= 2, text[-3000:]
    assert all(int(total) == COUNT for _, total, _ in frames)
    assert len({done for done, _, _ in frames}) >= 2, "redrawn as the replay goes"
    assert re.search(rf"Succeeded\s+\S*\s+{COUNT}/{COUNT}\s+replayed {COUNT}", text), text[-2000:]
    assert f"Succeeded: {COUNT} replayed, 0 skipped" in text
