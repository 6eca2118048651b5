"""The one-replay-per-pipeline lease, recorded on the RetryPipeline's status.

Replays of one pipeline would race on its DLQ cursor, so one runs at a time. Who runs is
recorded in the API, not in a process's memory: `status.replayLease` of the RetryPipeline names
the replay (a DLQReplay, or `direct:<id>` for `kafka-retry dlq replay --direct`) and the
process running it, and expires `leaseDurationSeconds` after its last renewal. So the lock
survives an operator restart (the resumed replay takes it back: at once after a clean stop,
which releases it, or once it expires after a crash), holds between two operators, and the
operator's replays and the CLI's direct ones see each other.

Every write is a compare-and-swap on the lease alone: a JSON patch whose first operation tests
that `status.replayLease` is still what was read. The operator's status refresh writes the
same status every few seconds; those writes must not make a renewal or a release fail (a
release that failed left the lease in place until it expired). A failed test (422) means
someone changed the lease first, so it is read and judged again. A holder renews it every
`RENEW_EVERY_S`. Expiry compares the renewal time with this machine's clock, as Kubernetes
Lease clients do: clocks are assumed to agree within a few seconds (NTP).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka_retry.model import GROUP, VERSION, ReplayLease

PIPELINE_PLURAL = "retrypipelines"
LEASE_DURATION_S = 15
RENEW_EVERY_S = 5
DIRECT_PREFIX = "direct:"
_WRITE_ATTEMPTS = 5
LEASE_PATH = "/status/replayLease"
JSON_PATCH = "application/json-patch+json"


class PipelineNotFound(Exception):
    """The RetryPipeline whose lease was asked for does not exist."""


class LeaseLost(Exception):
    """Someone else holds the lease now (ours expired before it was renewed)."""

    def __init__(self, holder: ReplayLease) -> None:
        super().__init__(f"the replay lease was taken by {describe(holder)}")
        self.holder = holder


def identity(kind: str) -> str:
    """This process, as a lease holder: `<kind>/<host>/<pid>` (a pod's host is its name)."""
    return f"{kind}/{socket.gethostname()}/{os.getpid()}"


def describe(lease: ReplayLease) -> str:
    return f"replay {lease.replay} ({lease.holder}, renewed {lease.renew_time})"


def expired(lease: ReplayLease, now: datetime | None = None) -> bool:
    try:
        renewed = datetime.fromisoformat(lease.renew_time)
    except ValueError:
        return True  # unreadable: nobody can be renewing it
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=UTC)
    deadline = renewed + timedelta(seconds=lease.lease_duration_seconds)
    return (now or datetime.now(UTC)) >= deadline


def held(obj: Mapping[str, Any], now: datetime | None = None) -> ReplayLease | None:
    """The pipeline object's unexpired lease, if any."""
    lease = _lease_of(obj)
    return lease if lease is not None and not expired(lease, now) else None


def _raw(obj: Mapping[str, Any]) -> Any:
    return (obj.get("status") or {}).get("replayLease")


def _lease_of(obj: Mapping[str, Any]) -> ReplayLease | None:
    raw = _raw(obj)
    if not isinstance(raw, dict):
        return None
    try:
        return ReplayLease.model_validate(raw)
    except ValueError:
        return None  # malformed by hand: treated as absent, the next write replaces it


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Lease:
    """One replay's claim on one pipeline's lease, made through the API server."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        pipeline: str,
        replay: str,
        holder: str,
        duration_s: int = LEASE_DURATION_S,
    ) -> None:
        from kubernetes import client

        self._custom: Any = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.pipeline = pipeline
        self.replay = replay
        self.holder = holder
        self.duration_s = duration_s

    def ours(self, lease: ReplayLease | None) -> bool:
        return lease is not None and (lease.replay, lease.holder) == (self.replay, self.holder)

    def acquire(self) -> ReplayLease | None:
        """Take the lease, or renew it if ours: None when done, else the lease that another
        replay holds."""
        for _ in range(_WRITE_ATTEMPTS):
            obj = self._read()
            current = _lease_of(obj)
            now = datetime.now(UTC)
            if current is not None and not self.ours(current) and not expired(current, now):
                return current
            taken = current.acquire_time if current is not None and self.ours(current) else None
            lease = ReplayLease(
                replay=self.replay,
                holder=self.holder,
                acquire_time=taken or _stamp(now),
                renew_time=_stamp(now),
                lease_duration_seconds=self.duration_s,
            )
            if self._write(obj, lease):
                return None
        raise RuntimeError(f"RetryPipeline {self.pipeline}: status changed on every write")

    def renew(self) -> None:
        other = self.acquire()
        if other is not None:
            raise LeaseLost(other)

    def release(self, status: Mapping[str, Any] | None = None) -> None:
        """Give the lease up if it is still ours (a deleted pipeline has none to give up),
        writing `status` fields in the same write."""
        for _ in range(_WRITE_ATTEMPTS):
            try:
                obj = self._read()
            except PipelineNotFound:
                return
            if not self.ours(_lease_of(obj)) or self._write(obj, None, status):
                return

    def _read(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self._custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PIPELINE_PLURAL, self.pipeline
            )
        except ApiException as e:
            if e.status == 404:
                raise PipelineNotFound(f"RetryPipeline {self.namespace}/{self.pipeline}") from None
            raise
        return obj

    def _write(
        self,
        obj: dict[str, Any],
        lease: ReplayLease | None,
        status: Mapping[str, Any] | None = None,
    ) -> bool:
        """Compare-and-swap on the lease as read; False when someone changed it first."""
        from kubernetes.client.exceptions import ApiException

        if "status" in obj:  # (a missing lease tests equal to null)
            ops: list[dict[str, Any]] = [{"op": "test", "path": LEASE_PATH, "value": _raw(obj)}]
        else:  # a pipeline never reconciled: nothing written yet but by us
            version = obj["metadata"]["resourceVersion"]
            ops = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": version},
                {"op": "add", "path": "/status", "value": {}},
            ]
        for key, value in (status or {}).items():
            ops.append({"op": "add", "path": f"/status/{key}", "value": value})
        if lease is not None:
            ops.append({"op": "add", "path": LEASE_PATH, "value": lease.wire()})
        elif _raw(obj) is not None:
            ops.append({"op": "remove", "path": LEASE_PATH})
        try:
            self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PIPELINE_PLURAL, self.pipeline, ops,
                _content_type=JSON_PATCH,
            )  # fmt: skip
        except ApiException as e:
            if e.status in (409, 422):  # 422: the test failed (409: the resourceVersion)
                return False
            if e.status == 404:
                raise PipelineNotFound(f"RetryPipeline {self.namespace}/{self.pipeline}") from None
            raise
        return True
