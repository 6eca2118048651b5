"""Which Kubernetes Events a pipeline's changes deserve (pure functions; handlers post them).

Events mark transitions, never levels: a status pass that finds the DLQ deeper than before
says nothing new when it was not empty already (the depth is in status and on /metrics, where
alerts belong), so a busy DLQ does not post an Event per pass. Transitions compare the status
written before with the one composed now, so a restarted operator repeats none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kafka_retry_operator.conditions import WORKERS_READY

# Reasons, documented in docs/operator.md.
TOPICS_CREATED = "TopicsCreated"
TOPICS_GROWN = "TopicsGrown"
WORKERS_BECAME_READY = "WorkersReady"
DLQ_GREW = "DLQGrew"  # from empty to not empty
DLQ_EMPTIED = "DLQEmptied"


@dataclass(frozen=True)
class Announcement:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def topics_changed(created: Sequence[str], grown: Sequence[str]) -> list[Announcement]:
    """After a reconcile: the topics it created or gave more partitions."""
    out = []
    if created:
        out.append(Announcement("Normal", TOPICS_CREATED, f"created topics {', '.join(created)}"))
    if grown:
        out.append(Announcement("Normal", TOPICS_GROWN, f"added partitions to {', '.join(grown)}"))
    return out


def status_changed(
    previous: Mapping[str, Any], new: Mapping[str, Any], dlq_topic: str
) -> list[Announcement]:
    """Between the status written before and the one composed now."""
    out = []
    was, now = _condition(previous, WORKERS_READY), _condition(new, WORKERS_READY)
    if now.get("status") == "True" and was.get("status") != "True":
        out.append(Announcement("Normal", WORKERS_BECAME_READY, str(now.get("message") or "ready")))
    before = (previous.get("dlq") or {}).get("depth") or 0
    after = (new.get("dlq") or {}).get("depth")
    if after is not None and after > 0 and before == 0:
        out.append(
            Announcement(
                "Warning",
                DLQ_GREW,
                f"{after} event(s) now wait in the DLQ {dlq_topic}, which was empty "
                "(kafka-retry dlq list shows them)",
            )
        )
    elif after == 0 and before > 0:
        out.append(Announcement("Normal", DLQ_EMPTIED, f"no event waits in the DLQ {dlq_topic}"))
    return out


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == kind:
            return c
    return {}
