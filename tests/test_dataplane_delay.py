"""The delay consumer on the real broker: long delays without rebalances, and holds that
survive a second worker joining mid-delay."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from dataplane_support import FAST_CONSUMER, Recorder, Running, make_topology, produce_ids, wait_for
from kafka_retry.worker import build_worker


def test_delay_longer_than_max_poll_interval_causes_no_rebalance_or_duplicate(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 8),), partitions=2)
    settings = {
        "max.poll.interval.ms": 6000,
        "session.timeout.ms": 3000,
        "heartbeat.interval.ms": 500,
    }
    handled = Recorder()
    worker = build_worker(topo, "retry-1", handler=handled, client_settings=settings)
    ids = [f"d{i}" for i in range(10)]
    with Running(worker):
        produce_ids(kafka_bootstrap, topo.tiers[0].topic, ids)  # due: timestamp + 8 s
        wait_for(lambda: worker.paused_partitions() == 2, 20, "both partitions held")
        wait_for(lambda: handled.count() >= len(ids), 30, "all events handled")
        wait_for(lambda: worker.paused_partitions() == 0, 5, "no partition left paused")
        # (leaving the group at the end revokes; before that, nothing did)
        assert worker.stats.assigned == 1
        assert worker.stats.revoked == 0 and worker.stats.lost == 0
    assert sorted(handled.ids()) == sorted(ids)  # each exactly once
    for c in handled.calls:
        assert c.due_ms is not None and c.at_ms >= c.due_ms


def test_second_worker_joining_mid_delay_nothing_stuck_nothing_early(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 3),), partitions=4)
    tier = topo.tiers[0].topic
    shared = Recorder()
    first = build_worker(topo, "retry-1", handler=shared, client_settings=FAST_CONSUMER)
    second = build_worker(topo, "retry-1", handler=shared, client_settings=FAST_CONSUMER)
    wave1 = [f"w1-{i}" for i in range(40)]
    wave2 = [f"w2-{i}" for i in range(40)]
    with Running(first):
        produce_ids(kafka_bootstrap, tier, wave1)
        wait_for(lambda: first.paused_partitions() == 4, 20, "the first worker holds all four")
        with Running(second):
            # the join moves some held partitions mid-delay; the new owner re-holds them
            wait_for(lambda: second.stats.assigned >= 1, 20, "the second worker got partitions")
            assert first.stats.revoked >= 1
            produce_ids(kafka_bootstrap, tier, wave2)
            wait_for(lambda: shared.count() >= 80, 30, "both waves handled")
            wait_for(
                lambda: first.paused_partitions() == second.paused_partitions() == 0,
                5,
                "no partition left paused",
            )
    counts = Counter(shared.ids())
    assert sorted(counts) == sorted(wave1 + wave2)
    assert [i for i, n in counts.items() if n > 1] == []  # held heads were never committed past
    for c in shared.calls:
        assert c.due_ms is not None and c.at_ms >= c.due_ms, f"{c.id} handled early"


def test_slow_handler_batch_is_cut_short_before_max_poll_interval(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, tiers=(("retry-1", 1),))
    settings = {
        "max.poll.interval.ms": 3000,
        "session.timeout.ms": 3000,
        "heartbeat.interval.ms": 500,
    }
    handled = Recorder(lambda e: time.sleep(0.5))  # 8 events: 4 s, longer than the interval
    worker = build_worker(topo, "retry-1", handler=handled, client_settings=settings)
    ids = [f"slow{i}" for i in range(8)]
    with Running(worker):
        produce_ids(kafka_bootstrap, topo.tiers[0].topic, ids)
        wait_for(lambda: handled.count() >= len(ids), 30, "all events handled")
        assert worker.stats.revoked == 0 and worker.stats.lost == 0
    assert sorted(handled.ids()) == sorted(ids)  # each exactly once, in spite of the cut
