"""The DLQReplay custom resource as the CLI and the operator both see it: building one,
listing a pipeline's replays, and the rule for whose turn it is.

One replay runs per pipeline at a time (they would race on the DLQ cursor): a replay starts
when no other replay of its pipeline is Running and none created before it is still Pending,
and it holds the pipeline's replay lease; the others wait in phase Pending with reason
`WaitingForReplay`, first come first served.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka_retry.model import API_VERSION, GROUP, LABEL_PIPELINE, VERSION, DLQReplaySpec

KIND = "DLQReplay"
PLURAL = "dlqreplays"
PIPELINE_PLURAL = "retrypipelines"
PENDING, RUNNING = "Pending", "Running"
SUCCEEDED, FAILED, CANCELLED = "Succeeded", "Failed", "Cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(frozen=True)
class ReplayRef:
    """What listing needs of one DLQReplay."""

    name: str
    namespace: str
    pipeline: str
    phase: str  # Pending until the operator says otherwise
    created: str  # RFC 3339; compares in time order
    replayed: int
    skipped: int
    total: int  # events in the snapshot (offsets, an upper bound until the replay ends)
    reason: str

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ReplayRef:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        conditions = status.get("conditions") or []
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            pipeline=str(spec.get("pipeline", "")),
            phase=str(status.get("phase") or PENDING),
            created=str(meta.get("creationTimestamp") or ""),
            replayed=_int(status.get("replayed")),
            skipped=_int(status.get("skipped")),
            total=_int(status.get("total")),
            reason=str(conditions[0].get("reason", "")) if conditions else "",
        )


def progress(replayed: int, skipped: int, total: int) -> str:
    """`status.progress`: what was done of the snapshot, naming both kinds of done."""
    return f"{replayed} replayed, {skipped} skipped of {total}"


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def new_replay(namespace: str, spec: DLQReplaySpec, *, name: str | None = None) -> dict[str, Any]:
    """A DLQReplay object; without `name` the API server generates `<pipeline>-replay-xxxxx`."""
    metadata: dict[str, Any] = {"namespace": namespace, "labels": {LABEL_PIPELINE: spec.pipeline}}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = f"{spec.pipeline[:50]}-replay-"
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec.wire()}


def list_replays(api_client: Any, namespace: str, pipeline: str | None = None) -> list[ReplayRef]:
    """The namespace's DLQReplays (of one pipeline), oldest first."""
    return order(ReplayRef.of(obj) for obj in replay_objects(api_client, namespace, pipeline))


def replay_objects(
    api_client: Any, namespace: str, pipeline: str | None = None
) -> list[dict[str, Any]]:
    """The DLQReplay objects themselves, oldest first. Selected by spec, not by label: a
    hand-written replay may have no label."""
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(api_client)
    found = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    objects = [o for o in found.get("items", []) if pipeline is None or _pipeline(o) == pipeline]
    return sorted(objects, key=lambda o: (_meta(o, "creationTimestamp"), _meta(o, "name")))


def _pipeline(obj: dict[str, Any]) -> str:
    return str((obj.get("spec") or {}).get("pipeline", ""))


def _meta(obj: dict[str, Any], field: str) -> str:
    return str((obj.get("metadata") or {}).get(field) or "")


def order(replays: Iterable[ReplayRef]) -> list[ReplayRef]:
    return sorted(replays, key=lambda r: (r.created, r.name))


def blocker(me: str, replays: Sequence[ReplayRef]) -> str | None:
    """The name of the replay that `me` must wait for, or None if it is `me`'s turn (the
    pipeline's replay lease, `kafka_retry.replay_lease`, is then taken)."""
    ours = order(replays)
    for r in ours:
        if r.name != me and r.phase == RUNNING:
            return r.name
    for r in ours:
        if r.name == me:
            return None
        if r.phase == PENDING:
            return r.name
    return None
