"""The operator's /metrics: the collector over the fleet and the sampler's results (pure), and
end to end: a real operator serves a pipeline's DLQ depth and Ready count, and drops the
pipeline's series when it is deleted."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import urllib.request
from typing import Any

import kopf
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataplane_support import produce_ids
from kafka_retry.model import RetryPipelineSpec
from kafka_retry_operator import conditions as c
from kafka_retry_operator import status as st
from kafka_retry_operator.fleet import Fleet, PipelineKey, PipelineRecord
from kafka_retry_operator.metrics import OperatorMetrics
from kafka_retry_operator.sampler import PassStats, Sample
from operator_support import (
    Kubectl,
    OperatorProcess,
    apply,
    cleanup_topics,
    free_port,
    operator,
    pipeline,
    podrunner,
    wait_condition,
    wait_for,
)

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """{(sample name, labels): value} of a /metrics page."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


def with_label(series: Series, key: str, val: str) -> list[str]:
    return sorted(name for name, labels in series if (key, val) in labels)


# --------------------------------------------------------------------------- pure


class FakeSampler:
    def __init__(self) -> None:
        self.samples: dict[PipelineKey, Sample] = {}
        self.stats: PassStats | None = None

    def sample(self, key: PipelineKey) -> Sample | None:
        return self.samples.get(key)

    def last_pass(self) -> PassStats | None:
        return self.stats


def _record(name: str, generation: int = 1) -> PipelineRecord:
    spec = RetryPipelineSpec.model_validate(
        {
            "kafka": {"bootstrapServers": "kafka:9092"},
            "source": {"topic": "orders", "consumerGroup": name},
            "tiers": [
                {"name": "retry-1", "delaySeconds": 30},
                {"name": "retry-2", "delaySeconds": 60},
            ],
            "handler": {"http": {"url": "http://svc/events"}},
        }
    )
    return PipelineRecord(
        key=("shop", name),
        generation=generation,
        topology=spec.topology("shop", name),
        cluster=None,
        replicas=1,
        suspended=False,
        topics=c.Verdict.of(c.TOPICS_READY, True, "TopicsReady"),
    )


def _status(ready: bool, reason: str) -> dict[str, Any]:
    return {"conditions": [{"type": "Ready", "status": str(ready), "reason": reason}]}


def _scrape(metrics: OperatorMetrics) -> Series:
    return parse(generate_latest(metrics.registry).decode())


def test_pipeline_series_follow_the_fleet() -> None:
    fleet, sampler = Fleet(), FakeSampler()
    metrics = OperatorMetrics(fleet, sampler)
    for name in ("a", "b"):
        fleet.put(_record(name))
    sampler.samples[("shop", "a")] = Sample(0.0, {"retry-1": 4, "retry-2": None}, 7, 1_500)
    sampler.samples[("shop", "b")] = Sample(0.0, {"retry-1": 0, "gone-tier": 9}, None)
    metrics.pipeline_status(("shop", "a"), _status(True, "Ready"))
    metrics.pipeline_status(("shop", "b"), _status(False, "WorkersNotReady"))
    sampler.stats = PassStats(duration_s=0.25, pipelines=2, finished_at=1_700_000_000.0)

    s = _scrape(metrics)
    p = "kafka_retry_operator"
    assert value(s, f"{p}_dlq_depth", namespace="shop", pipeline="a") == 7
    assert (
        value(s, f"{p}_dlq_oldest_event_timestamp_seconds", namespace="shop", pipeline="a") == 1.5
    )
    assert value(s, f"{p}_dlq_depth", namespace="shop", pipeline="b") is None  # not measured
    assert value(s, f"{p}_tier_lag", namespace="shop", pipeline="a", tier="retry-1") == 4
    assert value(s, f"{p}_tier_lag", namespace="shop", pipeline="a", tier="retry-2") is None
    assert value(s, f"{p}_tier_lag", namespace="shop", pipeline="b", tier="gone-tier") is None
    assert value(s, f"{p}_pipelines", ready="True") == 1
    assert value(s, f"{p}_pipelines", ready="False") == 1
    assert value(s, f"{p}_pipelines", ready="Unknown") == 0
    ready_b = {"namespace": "shop", "pipeline": "b", "reason": "WorkersNotReady"}
    assert value(s, f"{p}_pipeline_ready", **ready_b) == 0
    assert value(s, f"{p}_status_refresh_duration_seconds") == 0.25
    assert value(s, f"{p}_status_refresh_pipelines") == 2
    assert value(s, f"{p}_status_refresh_timestamp_seconds") == 1_700_000_000.0

    # Deleted (reconciler.finalize removes the record, then the metrics forget the rest).
    fleet.remove(("shop", "a"))
    metrics.forget(("shop", "a"))
    s = _scrape(metrics)
    assert with_label(s, "pipeline", "a") == []
    assert value(s, f"{p}_pipelines", ready="True") == 0
    assert value(s, f"{p}_tier_lag", namespace="shop", pipeline="b", tier="retry-1") == 0


def test_a_stale_ready_cannot_come_back() -> None:
    """A timer tick composed from a record that is no longer the fleet's records nothing."""
    fleet = Fleet()
    metrics = OperatorMetrics(fleet, FakeSampler())
    old = _record("a")
    fleet.put(old)
    metrics.pipeline_status(old.key, _status(True, "Ready"), old)
    fleet.put(_record("a", generation=2))  # a newer reconcile
    metrics.pipeline_status(old.key, _status(False, "KafkaUnreachable"), old)
    assert value(_scrape(metrics), "kafka_retry_operator_pipelines", ready="True") == 1
    fleet.remove(old.key)
    metrics.forget(old.key)
    metrics.pipeline_status(old.key, _status(True, "Ready"), old)  # the tick, after deletion
    assert with_label(_scrape(metrics), "pipeline", "a") == []


def test_reconcile_outcomes_and_replay_phases() -> None:
    metrics = OperatorMetrics(Fleet(), FakeSampler())
    with metrics.reconciling():
        pass
    for error in (kopf.TemporaryError("later"), kopf.PermanentError("bad"), KeyError("bug")):
        with pytest.raises(type(error)), metrics.reconciling():
            raise error
    metrics.replay_phase("u1", "Running")
    metrics.replay_phase("u2", "Running")
    metrics.replay_phase("u3", "Succeeded")
    metrics.replay_phase("u2", "Failed")
    metrics.replay_phase("u3", None)  # deleted
    s = _scrape(metrics)
    results = ("ok", "temporary_error", "permanent_error")
    counts = [value(s, "kafka_retry_operator_reconciles_total", result=r) for r in results]
    assert counts == [1, 2, 1]  # any exception but PermanentError is retried: temporary
    phases = {p: value(s, "kafka_retry_operator_replays", phase=p) for p in ("Running", "Failed")}
    assert phases == {"Running": 1, "Failed": 1}
    assert value(s, "kafka_retry_operator_replays", phase="Succeeded") == 0
    assert "kafka_retry_operator_status_refresh_pipelines" not in {n for n, _ in s}  # no pass yet


def test_serves_http_on_the_given_port() -> None:
    metrics = OperatorMetrics(Fleet(), FakeSampler())
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert value(parse(text), "kafka_retry_operator_pipelines", ready="True") == 0
        assert "process_resident_memory_bytes" in text
        with pytest.raises(OSError):  # the port is taken: the startup handler's error
            OperatorMetrics(Fleet(), FakeSampler()).serve(port, "127.0.0.1")
    finally:
        metrics.close()


# --------------------------------------------------------------------------- end to end


def _scrape_url(url: str) -> Series:
    with urllib.request.urlopen(url, timeout=5) as r:
        return parse(r.read().decode())


@pytest.mark.e2e
def test_operator_serves_pipeline_metrics_and_drops_them_on_delete(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    dlq = f"{group}.{source}.dlq"
    cleanup_topics.extend([f"{group}.{source}.retry-1", dlq])
    doc = pipeline(
        "orders",
        kafka_bootstrap,
        source,
        group,
        tiers=[{"name": "retry-1", "delaySeconds": 1}],
        workers={"replicas": 0},  # the podrunner still plays the deployment controller
    )
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=90)
    produce_ids(kafka_bootstrap, dlq, ["a", "b", "c"])  # three events waiting in the DLQ

    me = {"namespace": namespace, "pipeline": "orders"}

    def measured() -> Series | None:
        s = _scrape_url(operator.metrics_url)
        return s if value(s, "kafka_retry_operator_dlq_depth", **me) == 3 else None

    s = wait_for(measured, 30, "kafka_retry_operator_dlq_depth == 3")
    assert value(s, "kafka_retry_operator_pipelines", ready="True") == 1
    assert value(s, "kafka_retry_operator_pipeline_ready", **me, reason="Ready") == 1
    assert value(s, "kafka_retry_operator_tier_lag", **me, tier="retry-1") == 0
    assert (value(s, "kafka_retry_operator_reconciles_total", result="ok") or 0) >= 1
    assert (value(s, "kafka_retry_operator_status_refresh_pipelines") or 0) >= 1
    assert value(s, "kafka_retry_operator_status_refresh_duration_seconds") is not None

    kubectl("delete", "retrypipeline", "orders", "-n", namespace, "--timeout=60s")

    def gone() -> Series | None:
        s = _scrape_url(operator.metrics_url)
        return None if with_label(s, "pipeline", "orders") else s

    s = wait_for(gone, 30, "the deleted pipeline's series to go")
    assert value(s, "kafka_retry_operator_pipelines", ready="True") == 0
