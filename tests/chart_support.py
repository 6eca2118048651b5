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


def render(
    helm: Run, release: str, namespace: str, values: dict[str, str] | None = None, *extra: str
) -> list[Manifest]:
    """`helm template` the chart and parse every document (empty ones dropped)."""
    out = helm(
        "template", release, str(CHART), "--namespace", namespace, *set_args(values), *extra
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


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


def env_of(container: Manifest, namespace: str) -> dict[str, str]:
    """The container's environment as a process would see it (fieldRefs resolved)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
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


def ensure_service_monitor_crd(kubectl: Run) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "--timeout=30s",
    )
