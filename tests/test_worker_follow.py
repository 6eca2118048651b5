"""A tier worker following a new topology without a restart, on the real broker, and saying so
where the operator reads it: the metadata of its group's committed offsets (topology_tag.py),
which the operator's drain gate waits for (draining.behind).

Both delivery guarantees: ExactlyOnce commits offsets through `send_offsets_to_transaction`,
whose metadata must reach the group as a consumer commit's does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

from dataplane_support import (
    FAST_CONSUMER,
    Running,
    make_topology,
    produce_ids,
    read_topic,
    wait_for,
)
from kafka_retry import topology_tag
from kafka_retry.event import Event
from kafka_retry.model import ResolvedTier
from kafka_retry.worker import build_worker

PARTITIONS = 2


def _tags(admin: Any, group: str, topic: str) -> dict[int, tuple[int, str | None]]:
    """Partition -> (committed offset, the topology hash its metadata names)."""
    asked = [
        ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(PARTITIONS)])
    ]
    answer = admin.list_consumer_group_offsets(asked)[group].result(timeout=10)
    return {
        tp.partition: (tp.offset, topology_tag.tag_of(tp.metadata))
        for tp in answer.topic_partitions
    }


def _fail(_event: Event) -> None:
    raise TimeoutError("upstream timed out")  # retriable: on to the next tier


@pytest.mark.parametrize("delivery", ["AtLeastOnce", "ExactlyOnce"])
def test_a_tier_worker_follows_a_new_topology_and_tags_its_partitions(
    delivery: str, kafka_bootstrap: str, kafka_admin: Any, make_topic: Callable[..., str]
) -> None:
    """One worker of tier retry-1 runs while retry-2 is renamed `later`: it forwards the next
    event to `later`, with no restart, and at once commits every partition it holds again
    tagged with the new topology's hash: the one it has committed at its offset, the one
    never committed (no event yet) at its start."""
    before = make_topology(
        kafka_bootstrap, make_topic, tiers=(("retry-1", 1), ("retry-2", 1)), partitions=PARTITIONS
    ).model_copy(update={"delivery": delivery})
    retry_1, retry_2 = before.tiers
    later = ResolvedTier(
        name="later", topic=make_topic("later", PARTITIONS), delay_seconds=1,
        consumer_group=f"{before.consumer_group}.later",
    )  # fmt: skip
    after = before.model_copy(update={"tiers": [retry_1, later]})
    old, new = topology_tag.topology_hash(before), topology_tag.topology_hash(after)
    assert old != new
    worker = build_worker(before, "retry-1", handler=_fail, client_settings=FAST_CONSUMER)
    with Running(worker):
        # Assigned: both partitions tagged, the never committed one at its start.
        wait_for(
            lambda: (
                _tags(kafka_admin, retry_1.consumer_group, retry_1.topic)
                == {0: (0, old), 1: (0, old)}
            ),
            30,
            "both partitions tagged with the topology run",
        )
        produce_ids(kafka_bootstrap, retry_1.topic, ["a"], partition=0)
        assert [r.id for r in read_topic(kafka_bootstrap, retry_2.topic, expect=1)] == ["a"]
        wait_for(
            lambda: _tags(kafka_admin, retry_1.consumer_group, retry_1.topic)[0] == (1, old),
            30,
            "progress committed with the tag",
        )

        worker.follow(after)
        wait_for(
            lambda: (
                _tags(kafka_admin, retry_1.consumer_group, retry_1.topic)
                == {0: (1, new), 1: (0, new)}
            ),
            30,
            "every partition held tagged with the new topology, at the same offsets",
        )
        produce_ids(kafka_bootstrap, retry_1.topic, ["b"], partition=1)
        assert [r.id for r in read_topic(kafka_bootstrap, later.topic, expect=1)] == ["b"]
        wait_for(
            lambda: _tags(kafka_admin, retry_1.consumer_group, retry_1.topic)[1] == (1, new),
            30,
            "progress after the change committed with the new tag",
        )
    assert [r.id for r in read_topic(kafka_bootstrap, retry_2.topic, expect=1)] == ["a"]
    assert worker.stats.assigned == 1, "one assignment: the worker never restarted nor rejoined"
