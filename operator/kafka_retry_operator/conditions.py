"""Status conditions by the Kubernetes API conventions.

Each condition has a type, a status ("True"/"False"/"Unknown"), a CamelCase reason, a human
message and a lastTransitionTime that changes only when the status flips, so a condition
that stays False while its message changes keeps saying since when it has been False.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from kafka_retry.model import Condition

READY = "Ready"
TOPICS_READY = "TopicsReady"
WORKERS_READY = "WorkersReady"
AUTOSCALING = "Autoscaling"  # only with spec.workers.autoscaling; not part of Ready
DRAINING = "Draining"  # topics a spec change left behind are being emptied (not part of Ready)

Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Verdict:
    """One condition's outcome before it is stamped with times."""

    type: str
    status: Status
    reason: str
    message: str = ""

    @classmethod
    def of(cls, type_: str, ok: bool, reason: str, message: str = "") -> Verdict:
        return cls(type_, "True" if ok else "False", reason, message)

    @property
    def ok(self) -> bool:
        return self.status == "True"


def now() -> str:
    """RFC 3339 UTC to the second, as Kubernetes writes times."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready(parts: Sequence[Verdict], ok_reason: str = "Ready", ok_message: str = "") -> Verdict:
    """Ready: True when every part is; otherwise False (or Unknown) with the first failing
    part's reason, and all failing parts' messages."""
    failing = [p for p in parts if not p.ok]
    if not failing:
        return Verdict(READY, "True", ok_reason, ok_message)
    status: Status = "False" if any(p.status == "False" for p in failing) else "Unknown"
    first = next(p for p in failing if p.status == status)
    message = "; ".join(f"{p.type}: {p.message}" if p.message else p.type for p in failing)
    return Verdict(READY, status, first.reason, message)


def stamp(
    verdicts: Iterable[Verdict],
    previous: Iterable[Mapping[str, Any]],
    generation: int | None,
    at: str | None = None,
) -> list[Condition]:
    """Conditions for `verdicts`, keeping each previous lastTransitionTime whose status did
    not change."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    at = at or now()
    result = []
    for v in verdicts:
        old = before.get(v.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == v.status else None
        result.append(
            Condition(
                type=v.type,
                status=v.status,
                reason=v.reason,
                message=v.message,
                last_transition_time=since or at,
                observed_generation=generation,
            )
        )
    return result
