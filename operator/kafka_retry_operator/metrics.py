"""The operator's Prometheus metrics, served on /metrics from the kopf startup handler.

Per-pipeline series are read at scrape time from what the operator keeps anyway: the fleet
(which pipelines exist), the sampler's latest batched pass (tier lag, DLQ depth) and the Ready
condition the status handlers last composed. Nothing is measured twice, and a pipeline's series
go when its fleet record goes (deletion), with no label removal to forget. Labels are bounded:
namespace, pipeline and tier at most, never anything per event.

A registry of its own, not prometheus_client's global one, so that whatever else the process
imports cannot leak series onto this endpoint (and tests get a fresh one per instance).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import kopf
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kafka_retry.replay_resource import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED
from kafka_retry_operator.conditions import READY
from kafka_retry_operator.fleet import Fleet, PipelineKey, PipelineRecord
from kafka_retry_operator.sampler import PassStats, Sample

log = logging.getLogger(__name__)

PREFIX = "kafka_retry_operator"
READY_STATES = ("True", "False", "Unknown")
RESULTS = ("ok", "temporary_error", "permanent_error")
REPLAY_PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
# 1 on the replica that reconciles; a standby (standby.py) serves 0.
LEADER_METRIC = f"{PREFIX}_leader"
LEADER_HELP = "1 on the operator replica that holds the leader Lease and reconciles, else 0."


class Measurements(Protocol):
    """What the metrics read from the sampler."""

    def sample(self, key: PipelineKey) -> Sample | None: ...

    def last_pass(self) -> PassStats | None: ...


class OperatorMetrics:
    def __init__(self, fleet: Fleet, measurements: Measurements) -> None:
        self.registry = CollectorRegistry()
        self._fleet = fleet
        self._measurements = measurements
        self._lock = threading.Lock()
        self._ready: dict[PipelineKey, tuple[str, str]] = {}  # -> (status, reason)
        self._replays: dict[str, str] = {}  # DLQReplay uid -> phase
        self._reconciles = Counter(
            f"{PREFIX}_reconciles",
            "RetryPipeline reconciles by result: ok, temporary_error (retried with back-off), "
            "permanent_error (waits for a spec change).",
            ["result"],
            registry=self.registry,
        )
        for result in RESULTS:
            self._reconciles.labels(result)  # every result present from the start, at 0
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # memory, CPU, open files of the operator
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._server: WSGIServer | None = None

    # ------------------------------------------------------------------ feeding

    @contextlib.contextmanager
    def reconciling(self) -> Iterator[None]:
        """Counts the outcome of the reconcile run inside; kopf retries any exception other
        than a PermanentError, so those count as temporary."""
        try:
            yield
        except kopf.PermanentError:
            self._reconciles.labels("permanent_error").inc()
            raise
        except Exception:
            self._reconciles.labels("temporary_error").inc()
            raise
        self._reconciles.labels("ok").inc()

    def pipeline_status(
        self, key: PipelineKey, status: Mapping[str, Any], record: PipelineRecord | None = None
    ) -> None:
        """Remember the Ready condition of a status just composed for the pipeline. With the
        `record` it was composed from, only while that is still the fleet's record: a timer
        tick racing a deletion or a newer reconcile must not bring back a stale Ready."""
        ready: Mapping[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == READY), {}
        )
        value = (str(ready.get("status") or "Unknown"), str(ready.get("reason") or ""))
        with self._lock:  # held across the check: `forget` follows the fleet's removal
            if record is None or self._fleet.get(key) is record:
                self._ready[key] = value

    def forget(self, key: PipelineKey) -> None:
        """The pipeline is gone: drop the last of its series (the rest follow the fleet)."""
        with self._lock:
            self._ready.pop(key, None)

    def replay_phase(self, uid: str, phase: str | None) -> None:
        """A DLQReplay's phase as last seen; None: it was deleted."""
        with self._lock:
            if phase is None:
                self._replays.pop(uid, None)
            else:
                self._replays[uid] = phase

    # ------------------------------------------------------------------ serving

    def serve(self, port: int, address: str) -> None:
        """Serve /metrics on a daemon thread; an address in use is the caller's OSError."""
        self._server, _thread = start_http_server(port, address, registry=self.registry)
        log.info("serving metrics on http://%s:%d/metrics", address, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------ reading

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            ready = dict(self._ready)
            replays = Tally(self._replays.values())

        yield GaugeMetricFamily(LEADER_METRIC, LEADER_HELP, value=1)

        by_state = GaugeMetricFamily(
            f"{PREFIX}_pipelines",
            "RetryPipelines by the status of their Ready condition.",
            labels=["ready"],
        )
        counts = Tally(status for status, _ in ready.values())
        for state in (*READY_STATES, *sorted(set(counts) - set(READY_STATES))):
            by_state.add_metric([state], counts[state])
        yield by_state

        per_pipeline = GaugeMetricFamily(
            f"{PREFIX}_pipeline_ready",
            "1 when the pipeline's Ready condition is True, else 0; `reason` is the condition's.",
            labels=["namespace", "pipeline", "reason"],
        )
        for (namespace, name), (status, reason) in sorted(ready.items()):
            per_pipeline.add_metric([namespace, name, reason], 1 if status == "True" else 0)
        yield per_pipeline

        depth = GaugeMetricFamily(
            f"{PREFIX}_dlq_depth",
            "Events waiting in the pipeline's DLQ (after its cursor), as last measured.",
            labels=["namespace", "pipeline"],
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_dlq_oldest_event_timestamp_seconds",
            "Timestamp of the oldest event waiting in the pipeline's DLQ.",
            labels=["namespace", "pipeline"],
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_tier_lag",
            "Events waiting on a tier topic for the tier's workers, as last measured.",
            labels=["namespace", "pipeline", "tier"],
        )
        for record in sorted(self._fleet.records(), key=lambda r: r.key):
            sample = self._measurements.sample(record.key)
            if sample is None:
                continue
            labels = list(record.key)
            if sample.dlq_depth is not None:
                depth.add_metric(labels, sample.dlq_depth)
            if sample.dlq_oldest_ms is not None:
                oldest.add_metric(labels, sample.dlq_oldest_ms / 1000)
            for tier in record.topology.tiers:  # not a removed tier's leftover in the sample
                tier_lag = sample.tier_lag.get(tier.name)
                if tier_lag is not None:
                    lag.add_metric([*labels, tier.name], tier_lag)
        yield from (depth, oldest, lag)

        last = self._measurements.last_pass()
        if last is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_status_refresh_duration_seconds",
                "Duration of the slowest cluster's last batched pass measuring lag and DLQ depth.",
                value=last.duration_s,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_status_refresh_pipelines",
                "Pipelines measured in the clusters' last batched passes.",
                value=last.pipelines,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_status_refresh_timestamp_seconds",
                "When the least recent of the clusters' last passes ended (alert when it stops "
                "moving).",
                value=last.finished_at,
            )

        by_phase = GaugeMetricFamily(
            f"{PREFIX}_replays",
            "DLQReplays in the watched namespaces by phase.",
            labels=["phase"],
        )
        for phase in (*REPLAY_PHASES, *sorted(set(replays) - set(REPLAY_PHASES))):
            by_phase.add_metric([phase], replays[phase])
        yield by_phase


class _Collector(Collector):
    def __init__(self, metrics: OperatorMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()
