"""Leader election on a `coordination.k8s.io` Lease: of the operator's replicas, one reconciles.

Why not kopf's peering: peers of equal priority (every replica of one Deployment) only warn
about each other and both keep running, and a higher-priority peer pauses the others only once
its watch event arrives. Here a replica runs kopf only while it holds the Lease, the way
client-go's leader election does it:

- A standby reads the Lease every `retry_period` and takes it over (an update guarded by the
  resourceVersion, so two standbys never both win) once its holder has not renewed it for
  `lease_duration`. Expiry is measured on the standby's own monotonic clock from when it saw
  the record last change, so clocks of different nodes never need to agree.
- The leader renews every `retry_period`. If no renewal succeeded for `renew_deadline`
  (shorter than `lease_duration`), or another holder appears, the process exits at once
  (`os._exit`, no clean-up that could still write): a standby cannot have taken over before
  `lease_duration` since the leader's last renewal, so two operators never reconcile at once.
  The container restarts and becomes a standby.
- On a clean stop (SIGTERM, a rolling update) the leader releases the Lease after kopf has
  stopped, so a standby takes over within `retry_period` instead of `lease_duration`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, got "
                f"{self.retry_period} < {self.renew_deadline} < {self.lease_duration}"
            )

    @property
    def request_timeout(self) -> float:
        """Bound on one Lease request: a hung call still leaves the leader time to notice its
        deadline passed and exit before any standby may take over."""
        return min(self.retry_period, (self.lease_duration - self.renew_deadline) / 2)


def default_identity() -> str:
    """The pod's name (the chart passes it as POD_NAME) plus a per-process suffix, so a
    restarted container is a new candidate."""
    base = os.environ.get("POD_NAME") or os.uname().nodename
    return f"{base}_{uuid.uuid4().hex[:8]}"


def _now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        settings: LeaseSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._leases = client.CoordinationV1Api(api)
        self._clock = clock
        self._observed: tuple[Any, ...] | None = None  # the holder's record as last seen
        self._observed_at = 0.0  # when it last changed, on our clock
        self._renewed_at = 0.0  # start of our last successful renewal, on our clock
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ------------------------------------------------------------------ candidate

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this process holds the Lease (True), or `stop` is set (False)."""
        s = self.settings
        log.info(f"leader election: {s.identity} is a candidate for Lease {s.namespace}/{s.name}")
        reported: str | None = None
        while not stop.is_set():
            started = self._clock()
            holder = self._try_acquire_or_renew()
            if holder == s.identity:
                self._renewed_at = started
                log.info(f"leader election: {s.identity} leads (Lease {s.namespace}/{s.name})")
                return True
            if holder != reported:
                log.info(f"leader election: standby; {holder or 'nobody'} holds the Lease")
                reported = holder
            stop.wait(s.retry_period)
        return False

    # ------------------------------------------------------------------ leader

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew in a background thread; `on_lost(reason)` when leadership cannot be kept."""
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(on_lost,), name="lease-renewer", daemon=True
        )
        self._renewer.start()

    def _renew_loop(self, on_lost: Callable[[str], None]) -> None:
        s = self.settings
        while not self._stop.is_set():
            started = self._clock()
            holder = self._try_acquire_or_renew()
            if self._stop.is_set():
                return
            if holder == s.identity:
                self._renewed_at = started
            elif holder is not None:
                on_lost(f"{holder} holds the Lease now")
                return
            overdue = self._clock() - self._renewed_at
            if overdue >= s.renew_deadline:
                on_lost(f"no renewal of the Lease succeeded for {overdue:.1f}s")
                return
            # Wake for the next renewal, or exactly at the deadline if renewals keep failing.
            next_try = min(started + s.retry_period, self._renewed_at + s.renew_deadline)
            self._stop.wait(max(0.0, next_try - self._clock()))

    def release(self) -> None:
        """Stop renewing and give the Lease up (if still ours), so a standby need not wait for
        it to expire. Call only once this process has stopped reconciling."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.settings.request_timeout + 1)
        s = self.settings
        try:
            lease: Any = self._leases.read_namespaced_lease(
                s.name, s.namespace, _request_timeout=s.request_timeout
            )
            if lease.spec.holder_identity != s.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now()
            self._leases.replace_namespaced_lease(
                s.name, s.namespace, lease, _request_timeout=s.request_timeout
            )
            log.info(f"leader election: {s.identity} released the Lease")
        except Exception as e:  # it expires by itself: a failed release only delays takeover
            log.warning(f"leader election: could not release the Lease ({e}); it will expire")

    # ------------------------------------------------------------------ both

    def _try_acquire_or_renew(self) -> str | None:
        """One round: renew (or take, when free or expired) the Lease. Answers who holds it
        afterwards as far as we know: our identity on success, None when it could not tell."""
        s = self.settings
        now = _now()
        try:
            lease: Any = self._leases.read_namespaced_lease(
                s.name, s.namespace, _request_timeout=s.request_timeout
            )
        except ApiException as e:
            if e.status != 404:
                log.warning(f"leader election: cannot read the Lease: {e.status} {e.reason}")
                return None
            return self._create(now)
        except Exception as e:  # timeouts, connection errors
            log.warning(f"leader election: cannot read the Lease: {e}")
            return None

        spec = lease.spec
        record = (
            spec.holder_identity,
            spec.renew_time,
            spec.acquire_time,
            spec.lease_transitions,
            spec.lease_duration_seconds,
        )
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        holder = spec.holder_identity
        duration = float(spec.lease_duration_seconds or s.lease_duration)
        if holder and holder != s.identity and self._clock() < self._observed_at + duration:
            return str(holder)  # held by a live leader

        if holder != s.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = s.identity
        spec.lease_duration_seconds = int(s.lease_duration)
        spec.renew_time = now
        try:
            # The resourceVersion read above makes this a compare-and-swap: of two candidates
            # updating the same expired Lease, one gets 409 Conflict.
            self._leases.replace_namespaced_lease(
                s.name, s.namespace, lease, _request_timeout=s.request_timeout
            )
        except ApiException as e:
            if e.status != 409:
                log.warning(f"leader election: cannot update the Lease: {e.status} {e.reason}")
            return None
        except Exception as e:
            log.warning(f"leader election: cannot update the Lease: {e}")
            return None
        self._observed, self._observed_at = None, self._clock()
        return s.identity

    def _create(self, now: datetime) -> str | None:
        s = self.settings
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=s.name, namespace=s.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=s.identity,
                lease_duration_seconds=int(s.lease_duration),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            self._leases.create_namespaced_lease(
                s.namespace, body, _request_timeout=s.request_timeout
            )
        except ApiException as e:
            if e.status != 409:  # 409: another candidate created it first
                log.warning(f"leader election: cannot create the Lease: {e.status} {e.reason}")
            return None
        except Exception as e:
            log.warning(f"leader election: cannot create the Lease: {e}")
            return None
        return s.identity
