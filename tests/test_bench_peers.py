"""The pure parts of bench/peers.py (the Spring peer benchmark): reading what both sides'
handlers print, the measures taken from it and a process's CPU from /proc. The benchmark
itself runs the real broker and the real Spring service (`make bench-peers`), never here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from peer_measures import (
    Call,
    Lateness,
    cpu_ticks,
    lateness_ms,
    live_rate,
    parse,
    ratio_rows,
    repeated,
    retried,
    unretried,
)


def test_parse_reads_both_kinds_and_skips_everything_else() -> None:
    assert parse("EV F 17 0 1700000000123456\n") == Call(True, 17, 0, 1700000000123456)
    assert parse("EV H 17 1 1700000002130000") == Call(False, 17, 1, 1700000002130000)
    for other in (
        "READY",
        "2026-11-30T13:04:01.123Z  WARN 1 --- [main] o.a.k.c.NetworkClient : EV F 1 0 2",
        "EV X 1 0 2",
        "EV F 1 0",  # a line torn by a crash
        "EV F one 0 2",
        "",
    ):
        assert parse(other) is None, other


def test_lateness_is_retry_start_minus_failure_plus_delay() -> None:
    calls = [
        Call(True, 1, 0, 1_000_000),
        Call(True, 2, 0, 1_100_000),
        Call(True, 3, 0, 1_200_000),  # not retried yet: left out
        Call(False, 1, 1, 3_050_000),  # 50 ms late
        Call(False, 2, 1, 3_099_000),  # 1 ms early
        Call(False, 9, 1, 3_000_000),  # no failure seen (warm-up): left out
    ]
    assert sorted(lateness_ms(calls, 2)) == [-1.0, 50.0]
    late = Lateness.of(lateness_ms(calls, 2))
    assert (late.count, late.early, late.max_ms, late.min_ms) == (2, 1, 50.0, -1.0)
    assert retried(calls) == 3
    assert retried(calls, first_id=2) == 2
    assert unretried(calls) == 1


def test_an_event_not_retried_by_the_end_counts_at_its_lateness_then() -> None:
    """A side that falls behind must not look punctual: its missing retries are at least as
    late as the end of the run."""
    calls = [
        Call(True, 1, 0, 1_000_000),
        Call(False, 1, 1, 3_010_000),  # 10 ms late
        Call(True, 2, 0, 1_000_000),  # never retried
        Call(True, 3, 0, 9_500_000),  # not due by the end: left out
    ]
    assert sorted(lateness_ms(calls, 2, until_us=10_000_000)) == [10.0, 7000.0]
    late = Lateness.of(lateness_ms(calls, 2, until_us=10_000_000), unretried(calls))
    assert (late.max_ms, late.censored) == (7000.0, 2)


def test_repeated_calls_are_a_second_call_for_an_event_on_the_same_stage() -> None:
    calls = [
        Call(True, 1, 0, 1),
        Call(True, 1, 0, 2),  # the live lane called the handler again for event 1
        Call(False, 1, 1, 3),  # its retry: another stage, not a repeat
        Call(False, 1, 1, 4),  # and the retry again
        Call(False, 2, 0, 5),
    ]
    assert repeated(calls) == 2
    assert retried(calls) == 1  # events, not calls


def test_live_rate_counts_live_lane_calls_over_their_span() -> None:
    calls = [Call(i % 5 == 0, i, 0, 1_000_000 + i * 2_000) for i in range(501)]
    calls.append(Call(False, 0, 1, 99_000_000))  # a retry: not the live lane's
    rate = live_rate(calls)
    assert rate is not None and abs(rate - 501) < 1e-6
    assert live_rate(calls[:1]) is None


def test_cpu_ticks_from_proc_stat() -> None:
    # a command name with spaces and parentheses shifts naive field counting
    stat = "4242 (java (peer) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 40"
    assert cpu_ticks(stat) == 1234 + 567
    own = cpu_ticks(Path(f"/proc/{os.getpid()}/stat").read_text())
    sum(i * i for i in range(2_000_000))  # burn some CPU: the count must move
    assert cpu_ticks(Path(f"/proc/{os.getpid()}/stat").read_text()) > own


def test_ratio_rows_are_ours_over_each_peer() -> None:
    rows = ratio_rows(
        {"p99": 200.0, "cpu": 10.0, "gone": None},
        {"spring": {"p99": 2000.0, "cpu": 50.0, "gone": 1.0}, "tuned": {"p99": 400.0}},
        ["p99", "cpu", "gone"],
    )
    assert rows == [("p99", "0.10", "0.50"), ("cpu", "0.20", "-"), ("gone", "-", "-")]
