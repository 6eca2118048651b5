"""The replay engine on the real broker, without the operator: resuming after a crash at any
point never sends an event twice within one replay, and the cursor only moves forward."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dataplane_support import make_topology
from dlq_support import fill_dlq, replayed_records, source_of
from kafka_retry.dlq import EventFilter, KafkaAccess, partition_states
from kafka_retry.dlq_replay import Checkpoint, Outcome, Replayer

COUNT = 300


class Crash(Exception):
    """The process died after the broker acknowledged, before the checkpoint was recorded."""


@pytest.mark.parametrize("crash_at", [1, 3])
def test_resume_after_a_crash_sends_nothing_twice(
    kafka_bootstrap: str, make_topic: Callable[..., str], crash_at: int
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, partitions=3)
    fill_dlq(kafka_bootstrap, topo.dlq_topic, COUNT)
    access = KafkaAccess(kafka_bootstrap)
    replayer = Replayer(
        topo, access, replay_id="r-crash", rate=1000, checkpoint_interval=0.05
    )  # fmt: skip
    recorded = [replayer.snapshot()]  # what the operator wrote before sending anything

    def record(cp: Checkpoint) -> None:
        if len(recorded) == crash_at:
            raise Crash
        recorded.append(cp)

    with pytest.raises(Crash):
        replayer.run(recorded[-1], on_checkpoint=record)
    resume_from = recorded[-1]
    assert resume_from.replayed < COUNT

    result = Replayer(topo, access, replay_id="r-crash").run(resume_from)
    assert result.outcome is Outcome.SUCCEEDED and result.checkpoint.replayed == COUNT
    records = replayed_records(kafka_bootstrap, topo.tiers[0].topic, "r-crash", expect=COUNT)
    sources = [source_of(r) for r in records]
    assert len(sources) == COUNT == len(set(sources))
    assert sum(s.waiting for s in partition_states(access, topo.dlq_topic)) == 0


def test_a_filtered_replay_moves_the_cursor_over_its_replayed_prefix_only(
    kafka_bootstrap: str, make_topic: Callable[..., str]
) -> None:
    topo = make_topology(kafka_bootstrap, make_topic, partitions=1)
    fill_dlq(kafka_bootstrap, topo.dlq_topic, 12, keys=1)  # BadOrder at offsets 0, 4 and 8
    access = KafkaAccess(kafka_bootstrap)
    only_bad = EventFilter(error_classes=frozenset({"BadOrder"}))
    first = Replayer(topo, access, replay_id="r-bad", event_filter=only_bad)
    result = first.run(first.snapshot())
    (p,) = result.checkpoint.partitions
    assert (result.checkpoint.replayed, result.checkpoint.skipped) == (3, 9)
    assert (p.cursor, p.next, p.past_cursor) == (1, 12, 2)
    (state,) = partition_states(access, topo.dlq_topic)
    assert (state.head, state.waiting) == (1, 11), "skipped events, and those after, wait"

    # A second filtered replay starts at the cursor; nothing matches, nothing moves back.
    again = Replayer(topo, access, replay_id="r-key", event_filter=EventFilter(
        keys=frozenset({b"no-such-key"})))  # fmt: skip
    result = again.run(again.snapshot())
    assert (result.checkpoint.replayed, result.checkpoint.skipped) == (0, 11)
    assert partition_states(access, topo.dlq_topic)[0].head == 1
