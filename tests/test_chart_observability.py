"""What the chart ships for monitoring: the PrometheusRule's alerts pass `promtool test rules`
(tests/prometheus/alerts-test.yaml), and every metric the alerts and the Grafana dashboard
query is one the code exports, by the name Prometheus sees (`_total`, `_bucket`...)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from chart_support import CHART, Run, one, render

HERE = Path(__file__).resolve().parent
ALERT_TESTS = HERE / "prometheus" / "alerts-test.yaml"
DASHBOARD = CHART / "dashboards" / "kafka-retry-pipeline.json"
ENABLED = {
    "metrics.prometheusRule.enabled": "true",
    "metrics.podMonitor.enabled": "true",
    "metrics.grafanaDashboard.enabled": "true",
    "metrics.serviceMonitor.enabled": "true",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
METRIC = re.compile(r"\b(kafka_retry_[a-z0-9_]+)\b")


def _rules(helm: Run) -> dict[str, Any]:
    rule = one(render(helm, "kro", "ops", ENABLED), "PrometheusRule")
    return dict(rule["spec"])


def _exported(collectors: Iterator[Any]) -> set[str]:
    names = set()
    for family in collectors:
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


class _Measured:
    """The sampler's side of the operator metrics, with one pass done."""

    def sample(self, key: Any) -> None:
        return None

    def last_pass(self) -> Any:
        from kafka_retry_operator.sampler import PassStats

        return PassStats(duration_s=0.1, pipelines=0, finished_at=0.0)


def exported_names() -> set[str]:
    """Every series name the operator and the tier workers expose."""
    import kafka_retry.metrics  # noqa: F401 - registers the workers' metrics
    from kafka_retry_operator.fleet import Fleet
    from kafka_retry_operator.metrics import OperatorMetrics

    operator = OperatorMetrics(Fleet(), _Measured())
    names = _exported(operator.registry.collect())
    names |= _exported(REGISTRY.collect())
    return {n for n in names if n.startswith("kafka_retry")}


def test_alert_rules_pass_their_unit_tests(helm: Run, tmp_path: Path) -> None:
    promtool = os.environ["KRO_PROMTOOL"]
    spec = _rules(helm)
    # Annotations are text for people, checked for syntax by `check rules`; the unit tests are
    # about when which alert fires, with which labels.
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(spec))
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules.write_text(yaml.safe_dump(spec))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    proc = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / ALERT_TESTS.name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    alerts = {r["alert"] for g in spec["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"


def test_alerts_and_dashboard_query_exported_metrics(helm: Run) -> None:
    exported = exported_names()
    assert "kafka_retry_events_total" in exported and "kafka_retry_operator_leader" in exported
    spec = _rules(helm)
    alert_queries = [r["expr"] for g in spec["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    panel_queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if "query" in v
                 and isinstance(v["query"], dict)]  # fmt: skip
    for query in [*alert_queries, *panel_queries, *variables]:
        used = set(METRIC.findall(query))
        assert used, f"no metric of ours in {query!r}"
        assert used <= exported, f"{query!r} names unknown metrics: {used - exported}"
    # Per pipeline: every panel filters on the dashboard's namespace and pipeline.
    for query in panel_queries:
        assert 'namespace="$namespace"' in query and 'pipeline="$pipeline"' in query, query
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"DLQ depth", "Oldest DLQ event age", "Tier lag", "Events by outcome",
            "Handler latency", "Lateness against due time"} <= titles  # fmt: skip


def test_monitoring_objects(helm: Run) -> None:
    """The dashboard ConfigMap carries the JSON and the sidecar's label; the PodMonitor
    selects tier-worker pods in the watched namespaces; the ServiceMonitor keeps the
    operator's `namespace` label; all off by default."""
    docs = render(helm, "kro", "ops", ENABLED)
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    (dashboard,) = configmaps
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kafka-retry-pipeline.json"]) == json.loads(
        DASHBOARD.read_text()
    )
    monitor = one(docs, "PodMonitor")
    from kafka_retry_operator.children import LABEL_MANAGED_BY, LABEL_NAME, pipeline_labels

    worker_labels = pipeline_labels("billing")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        LABEL_NAME: worker_labels[LABEL_NAME],
        LABEL_MANAGED_BY: worker_labels[LABEL_MANAGED_BY],
    }
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    scoped = render(helm, "kro", "ops", {**ENABLED, "rbac.scope": "namespaces",
                                         "watchNamespaces": "{shop,billing}"})  # fmt: skip
    assert one(scoped, "PodMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["billing", "shop"]
    }
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True
    defaults = {d["kind"] for d in render(helm, "kro", "ops")}
    assert defaults.isdisjoint({"PrometheusRule", "PodMonitor", "ServiceMonitor", "ConfigMap"})
