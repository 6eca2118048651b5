"""DLQ operations without servers: filters, times, pacing, replay headers, checkpoints in
status, turn-taking between replays, and the CLI's argument errors."""

from __future__ import annotations

import bisect
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dlq_support import cli
from kafka_retry import headers as h
from kafka_retry import replay_lease
from kafka_retry import replay_resource as rr
from kafka_retry.dlq import DlqRecord, EventFilter, parse_time, printable
from kafka_retry.dlq_replay import (
    Checkpoint,
    InvalidTarget,
    PartitionProgress,
    replay_headers,
    resolve_target,
)
from kafka_retry.model import (
    Classification,
    DLQReplayStatus,
    Handler,
    HttpHandler,
    ReplayFilter,
    ReplayLease,
    ResolvedTier,
    Topology,
)
from kafka_retry.pacing import TokenBucket


def _record(
    key: bytes | None = b"k1", error_class: str | None = "a.b.BadOrder", ts: int | None = 1000
) -> DlqRecord:
    state = h.RetryState(
        original_topic="orders", attempt=4, tier="retry-2", error_class=error_class,
        dlq_reason=h.REASON_EXHAUSTED, due_ms=5, replay_id="old",
    )  # fmt: skip
    raw = h.build_headers([("trace", b"t1"), ("kafka-retry.unknown", b"x")], state)
    return DlqRecord(2, 17, ts, key, b"{}", tuple(raw), h.parse_headers(raw))


def _topology() -> Topology:
    return Topology(
        pipeline="shop/billing",
        bootstrap_servers="k:9092",
        source_topic="orders",
        consumer_group="billing",
        tiers=[
            ResolvedTier(name="retry-1", topic="b.orders.retry-1", delay_seconds=5,
                         consumer_group="b.r1"),
            ResolvedTier(name="retry-2", topic="orders", delay_seconds=50, consumer_group="b.r2"),
        ],
        dlq_topic="b.orders.dlq",
        classification=Classification(),
        handler=Handler(http=HttpHandler(url="http://svc")),
    )  # fmt: skip


def test_parse_time_rfc3339_and_relative() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == 1714564800000
    assert parse_time("2024-05-01T14:00:00+02:00") == 1714564800000
    assert parse_time("90s", now_ms=100_000) == 10_000
    assert parse_time("2h", now_ms=10_000_000) == 10_000_000 - 7_200_000
    assert parse_time("1w", now_ms=0) == -7 * 86400 * 1000
    for bad in ("yesterday", "2024-05-01T12:00:00", "5y", ""):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_filter_matches_time_key_and_error_class_by_full_or_simple_name() -> None:
    r = _record()
    assert EventFilter().matches(r) and EventFilter().empty
    assert EventFilter(since_ms=1000, until_ms=1001).matches(r)
    assert not EventFilter(since_ms=1001).matches(r)
    assert not EventFilter(until_ms=1000).matches(r), "until is exclusive"
    assert EventFilter(keys=frozenset({b"k0", b"k1"})).matches(r)
    assert not EventFilter(keys=frozenset({b"k0"})).matches(r)
    assert not EventFilter(keys=frozenset({b"k0"})).matches(_record(key=None))
    assert EventFilter(error_classes=frozenset({"BadOrder"})).matches(r)
    assert EventFilter(error_classes=frozenset({"a.b.BadOrder"})).matches(r)
    assert not EventFilter(error_classes=frozenset({"b.BadOrder", "Order"})).matches(r)
    assert not EventFilter(error_classes=frozenset({"X"})).matches(_record(error_class=None))


def test_filter_round_trips_through_the_spec() -> None:
    f = EventFilter(since_ms=1714564800000, keys=frozenset({b"k1"}), error_classes=frozenset({"E"}))
    spec = f.to_spec()
    assert spec == ReplayFilter(since="2024-05-01T12:00:00.000Z", keys=["k1"], error_classes=["E"])
    assert EventFilter.from_spec(spec) == f


@pytest.mark.parametrize("rate", [1, 7, 100, 500, 5000])
def test_token_bucket_never_exceeds_the_rate_in_any_second(rate: int) -> None:
    """A sender that stalls now and then (a slow checkpoint, the process descheduled) never
    puts more than `rate` events into any 1-second window, and keeps close to the rate."""
    now = [100.0]
    bucket = TokenBucket(rate, clock=lambda: now[0])
    sent: list[float] = []
    stalls = {rate * 2: 1.7, rate * 4: 0.3, rate * 5: 5.0}  # after that many events
    while len(sent) < rate * 8:
        wait = bucket.wait_s()
        if wait > 0:
            now[0] += wait
            continue
        bucket.take()
        sent.append(now[0])
        now[0] += stalls.get(len(sent), 0.0)
    busiest = max(bisect.bisect_left(sent, t + 1.0 - 1e-9) - i for i, t in enumerate(sent))
    assert busiest <= rate
    pace = (rate * 2 - 1) / (sent[rate * 2 - 1] - sent[0])  # before the first stall
    assert pace >= 0.98 * rate
    assert bucket.burst == max(1, rate // 100)


def test_token_bucket_without_a_rate_never_waits() -> None:
    bucket = TokenBucket(None)
    for _ in range(1000):
        assert bucket.wait_s() == 0
        bucket.take()


def test_replay_headers_keep_originals_reset_attempt_and_mark_the_replay() -> None:
    r = _record()
    headers = replay_headers(r, replay_id="rp-1", target_index=0, now_ms=12345)
    assert headers[0] == ("trace", b"t1"), "original headers first, untouched"
    parsed = h.parse_headers(headers)
    # An upstream's header under our prefix is the event's own (docs/headers.md): kept.
    assert parsed.original == (("trace", b"t1"), ("kafka-retry.unknown", b"x"))
    s = parsed.state
    assert (s.attempt, s.due_ms, s.replay_id, s.dlq_reason) == (1, 12345, "rp-1", None)
    assert (s.original_topic, s.error_class, s.tier) == ("orders", "a.b.BadOrder", "retry-2")
    assert dict(headers)[h.REPLAY_SOURCE] == b"2:17"
    assert headers[1] == ("kafka-retry.unknown", b"x")
    again = replay_headers(r, replay_id="rp-1", target_index=1, now_ms=1)
    assert h.parse_headers(again).state.attempt == 2, "what a first arrival on tier 2 carries"


def test_target_is_a_tier_never_the_source_or_unknown() -> None:
    topo = _topology()
    assert resolve_target(topo, None)[1].name == "retry-1"
    with pytest.raises(InvalidTarget, match="no tier 'retry-9'"):
        resolve_target(topo, "retry-9")
    with pytest.raises(InvalidTarget, match="source or DLQ"):
        resolve_target(topo, "retry-2")  # its topic is the source topic


def test_checkpoint_round_trips_through_status() -> None:
    cp = Checkpoint(
        "b.orders.retry-1",
        [PartitionProgress(0, 5, 100, 40, 30, 7), PartitionProgress(1, 0, 0, 0, 0)],
        {0: 12, 1: 3},
        replayed=30,
        skipped=5,
    )
    assert cp.total == 95 and cp.examined == 35 and cp.past_cursor == 7 and not cp.done
    status = DLQReplayStatus.model_validate({"phase": "Running", **cp.to_status()})
    assert status.total == 95
    assert Checkpoint.from_status(status) == cp
    assert Checkpoint.from_status(DLQReplayStatus()) is None
    assert PartitionProgress(0, 0, 9, 4, 4).prefix_open
    assert not PartitionProgress(0, 0, 9, 4, 2).prefix_open


def _ref(name: str, phase: str, created: str, pipeline: str = "p") -> rr.ReplayRef:
    return rr.ReplayRef(name, "ns", pipeline, phase, created, 0, 0, 0, "")


def test_one_replay_per_pipeline_first_come_first_served() -> None:
    a = _ref("a", "Succeeded", "2024-01-01T00:00:00Z")
    b = _ref("b", "Running", "2024-01-01T00:00:01Z")
    c = _ref("c", "Pending", "2024-01-01T00:00:02Z")
    d = _ref("d", "Pending", "2024-01-01T00:00:03Z")
    assert rr.blocker("c", [a, b, c, d]) == "b"
    assert rr.blocker("d", [a, c, d]) == "c"
    assert rr.blocker("c", [a, c, d]) is None
    assert rr.blocker("b", [a, b, c, d]) is None


def test_a_lease_expires_its_duration_after_its_last_renewal() -> None:
    lease = ReplayLease(
        replay="r",
        holder="operator/h/1",
        acquire_time="2024-01-01T00:00:00.000000Z",
        renew_time="2024-01-01T00:00:10.000000Z",
        lease_duration_seconds=15,
    )
    at = datetime(2024, 1, 1, 0, 0, 24, 999_000, tzinfo=UTC)
    assert not replay_lease.expired(lease, at)
    assert replay_lease.expired(lease, at + timedelta(milliseconds=1))
    obj = {"status": {"replayLease": lease.wire()}}
    assert replay_lease.held(obj, at) == lease
    assert replay_lease.held(obj, at + timedelta(seconds=1)) is None
    assert replay_lease.held({"status": {"replayLease": {"replay": "r"}}}) is None  # malformed
    assert replay_lease.expired(lease.model_copy(update={"renew_time": "yesterday"}))


def test_printable_payloads() -> None:
    assert printable(b'{"a": "\xc3\xa9"}') == '{"a": "é"}'
    assert printable(b"line\nnext\ttab") == "line\nnext\ttab"
    assert printable(b"\x00\x01") is None
    assert printable(b"\xff") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "show", "p", "12", "--topology-file", "/nonexistent"], "PARTITION:OFFSET"),
        (["dlq", "list", "p", "--since", "soon", "--topology-file", "/x"], "RFC 3339"),
        (["dlq", "list", "p", "--topology-file", "/nonexistent"], "cannot read the topology"),
        (["dlq", "replay", "p", "--rate", "0", "--topology-file", "/x"], "--rate"),
    ],
)
def test_cli_usage_errors_are_one_line(args: list[str], message: str) -> None:
    proc = cli(*args)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_speaks_to_users_under_the_name_it_was_called_by() -> None:
    """`kafka-retry --help` describes the tool, not its code; run by kubectl as the plugin it
    calls itself `kubectl retry`; `make help` shows the commands as they are typed."""
    import os
    import shutil
    import subprocess

    from dlq_support import BIN

    top = cli("--help")
    assert top.returncode == 0
    assert top.stdout.startswith("usage: kafka-retry ")
    assert "add_parser" not in top.stdout and "registers itself" not in top.stdout
    assert "exit codes: 0 done, 1 error, 2 usage, 3 nothing matched" in top.stdout
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl ships with the machine"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    plugin = subprocess.run(
        [kubectl, "retry", "dlq", "list", "--help"], capture_output=True, text=True, env=env
    )
    assert plugin.returncode == 0, plugin.stderr
    assert plugin.stdout.startswith("usage: kubectl retry dlq list "), plugin.stdout[:200]
    wrong = subprocess.run([kubectl, "retry", "dlq", "list", "--limit", "-1", "p"],
                           capture_output=True, text=True, env=env)  # fmt: skip
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("kubectl retry dlq list: argument --limit: must be 0 or more")
    root = Path(__file__).resolve().parent.parent
    targets = subprocess.run(["make", "--no-print-directory", "help"], cwd=root,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert 'eval "$(make -s env)"' in targets and "$$" not in targets
