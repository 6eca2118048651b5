"""Helpers for the Helm chart tests (tests/test_chart_*.py): rendering, and reading back what
the chart put in the real API server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kafka-retry-operator"

Run = Callable[..., subprocess.CompletedProcess[str]]
Manifest = dict[str, Any]


def set_args(values: dict[str, str] | None) -> list[str]:
    """`--set k=v` pairs (lists as `{a,b}`, as helm spells them)."""
    args: list[str] = []
    for key, value in (values or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


TEST_COMPONENT = "test"  # app.kubernetes.io/component of the `helm test` objects


def render(
    helm: Run,
    release: str,
    namespace: str,
    values: dict[str, str] | None = None,
    *extra: str,
    tests: bool = False,
) -> list[Manifest]:
    """`helm template` the chart and parse every document (empty ones dropped); the `helm test`
    objects (templates/tests/) only with `tests`."""
    out = helm(
        "template", release, str(CHART), "--namespace", namespace, *set_args(values), *extra
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    return docs if tests else [d for d in docs if not is_test_object(d)]


AGGREGATE_LABELS = tuple(
    f"rbac.authorization.k8s.io/aggregate-to-{role}" for role in ("view", "edit", "admin")
)


def is_user_role(doc: Manifest) -> bool:
    """One of the ClusterRoles for people, aggregated into view/edit/admin (not the operator's)."""
    labels = doc["metadata"].get("labels") or {}
    return doc["kind"] == "ClusterRole" and any(label in labels for label in AGGREGATE_LABELS)


def is_test_object(doc: Manifest) -> bool:
    labels = doc["metadata"].get("labels") or {}
    return bool(labels.get("app.kubernetes.io/component") == TEST_COMPONENT)


def kinds(docs: Iterable[Manifest]) -> list[tuple[str, str | None]]:
    """(kind, namespace) of every document, sorted."""
    return sorted((d["kind"], d["metadata"].get("namespace")) for d in docs)


def one(docs: Iterable[Manifest], kind: str) -> Manifest:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def installed_deployment(kubectl: Run, namespace: str, release: str) -> Manifest:
    """The operator Deployment a release installed, as the API server has it."""
    out = kubectl(
        "get", "deployment", "-n", namespace, "-o", "json",
        "-l", f"app.kubernetes.io/instance={release}",
    ).stdout  # fmt: skip
    return dict(json.loads(out)["items"][0])


def operator_container(docs: Iterable[Manifest]) -> Manifest:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def env_of(container: Manifest, namespace: str, pod_name: str = "pod") -> dict[str, str]:
    """The container's environment as a process would see it (fieldRefs resolved)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name
        else:
            raise AssertionError(f"the test cannot resolve env var {var}")
    return env


def to_yaml(docs: Iterable[Manifest]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


# A minimal ServiceMonitor CRD, with a schema for just the fields the chart renders, so that the
# server-side dry run validates our ServiceMonitor too (with strict field validation, an unknown
# or misspelt field is an error). The Prometheus Operator is not installed here; this CRD is
# applied idempotently and left in place (cluster-scoped, harmless, shared by concurrent runs).
SERVICE_MONITOR_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["selector", "endpoints"],
                                "properties": {
                                    "selector": {
                                        "type": "object",
                                        "properties": {
                                            "matchLabels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            }
                                        },
                                    },
                                    "namespaceSelector": {
                                        "type": "object",
                                        "properties": {
                                            "matchNames": {
                                                "type": "array",
                                                "items": {"type": "string"},
                                            }
                                        },
                                    },
                                    "endpoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "port": {"type": "string"},
                                                "path": {"type": "string"},
                                                "interval": {
                                                    "type": "string",
                                                    "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$",
                                                },
                                                "scrapeTimeout": {
                                                    "type": "string",
                                                    "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$",
                                                },
                                                "honorLabels": {"type": "boolean"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


def _monitoring_crd(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A monitoring.coreos.com CRD with a schema for just the `spec` fields the chart renders
    (the upstream field names and types), so that strict field validation catches a misspelt
    or misplaced field."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.lower(),
                "listKind": f"{kind}List",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec}}},
                }
            ],
        },
    }


_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
POD_MONITOR_CRD = _monitoring_crd("PodMonitor", {
    "type": "object",
    "required": ["selector"],
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": _STRINGS}},
        "namespaceSelector": {"type": "object", "properties": {
            "any": {"type": "boolean"},
            "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "podMetricsEndpoints": {"type": "array", "items": {"type": "object", "properties": {
            "port": {"type": "string"}, "path": {"type": "string"}, "interval": _DURATION}}},
    },
})  # fmt: skip
PROMETHEUS_RULE_CRD = _monitoring_crd("PrometheusRule", {
    "type": "object",
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "rules": {"type": "array", "items": {
                "type": "object", "required": ["expr"],
                "properties": {
                    "alert": {"type": "string"},
                    "expr": {"x-kubernetes-int-or-string": True},
                    "for": _DURATION,
                    "labels": _STRINGS,
                    "annotations": _STRINGS}}}}}}},
})  # fmt: skip


def ensure_service_monitor_crd(kubectl: Run) -> None:
    """The ServiceMonitor, PodMonitor and PrometheusRule CRDs (schemas of what we render)."""
    for crd in (SERVICE_MONITOR_CRD, POD_MONITOR_CRD, PROMETHEUS_RULE_CRD):
        kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd))
        kubectl(
            "wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}",
            "--timeout=30s",
        )  # fmt: skip
