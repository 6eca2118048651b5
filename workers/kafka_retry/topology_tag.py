"""Which topology a worker runs, said where the operator can read it: in the metadata of every
offset the worker commits (`topology=<hash>`).

Tier workers follow topology changes without a restart (topology_follow.py), so no rollout
tells the operator when the last of them has stopped forwarding to a topic the spec left
behind; a drain may end only then (the operator's draining.py). So a worker tags every commit
(stored offsets, transactions' offsets, poison marks) with the hash of the topology it runs,
and `announce`s the change at once when it applies a new one: every partition it holds is
committed again, at the offset it is committed at, with the new tag. A partition whose
committed offset carries the current hash is served by a worker on the current topology; the
operator reads the tags with the group's committed offsets.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import TopicPartition

from kafka_retry.model import Topology

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]
_TAG = "topology="


def topology_hash(topology: Topology) -> str:
    """What a tier worker follows of the topology, hashed. Drains are left out: a drain's start
    or end is a drain worker's business, not a tier's."""
    read = topology.model_copy(update={"draining": []})
    return hashlib.sha256(read.to_json().encode()).hexdigest()[:16]


def with_tag(metadata: str | None, digest: str) -> str:
    """`metadata` (a poison mark, or nothing) tagged with `digest`, any older tag dropped."""
    kept = [part for part in (metadata or "").split() if not part.startswith(_TAG)]
    return " ".join([*kept, f"{_TAG}{digest}"])


def tag_of(metadata: str | None) -> str | None:
    """The topology hash a committed offset's metadata names; None when it names none."""
    for part in (metadata or "").split():
        if part.startswith(_TAG):
            return part[len(_TAG) :]
    return None


def announce(
    consumer: Any,
    tps: Iterable[TopicPartitionKey],
    digest: str,
    frontiers: Mapping[TopicPartitionKey, int],
    *,
    from_earliest: bool,
    timeout: float,
) -> int:
    """Commit each of `tps` again, tagged with `digest`, synchronously; answers how many.

    The offset is the committed one, or the partition's `frontiers` offset when further (only
    finished events: the caller's to say). A partition already committed with `digest` at
    that offset is left alone; one never committed is committed at its low watermark, which
    says nothing is finished when the group starts at the earliest offset (`from_earliest`;
    otherwise it stays untagged, and the operator waits for its first commit). A poison mark
    on the committed offset stays (poison.py)."""
    asked = [TopicPartition(t, p) for t, p in sorted(set(tps))]
    if not asked:
        return 0
    tagged = []
    for c in consumer.committed(asked, timeout=timeout):
        if c.error is not None:
            log.warning("%s[%d]: committed offset unreadable: %s", c.topic, c.partition, c.error)
            continue
        tp = (c.topic, c.partition)
        offset = max(c.offset, frontiers.get(tp, -1))
        if offset < 0:
            if not from_earliest:
                continue
            offset = consumer.get_watermark_offsets(TopicPartition(*tp), timeout=timeout)[0]
        elif offset == c.offset and tag_of(c.metadata) == digest:
            continue
        kept = c.metadata if offset == c.offset else None
        tagged.append(TopicPartition(tp[0], tp[1], offset, metadata=with_tag(kept, digest)))
    if tagged:
        consumer.commit(offsets=tagged, asynchronous=False)
    return len(tagged)
