"""`helm install`, `helm upgrade` with changed values and `helm uninstall` on the real API
server: every object the chart renders exists, an upgrade removes what the new values no longer
render (Roles in a namespace no longer watched, a disabled Service), and uninstall leaves no
orphan anywhere in the cluster; the CRDs stay, as Helm does with a chart's crds/."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml

from chart_support import (
    CHART,
    Run,
    ensure_service_monitor_crd,
    installed_deployment,
    operator_container,
    set_args,
)

# Every kind the chart can render, as `kubectl get` names them.
CHART_KINDS = (
    "serviceaccounts,services,deployments.apps,roles.rbac.authorization.k8s.io,"
    "rolebindings.rbac.authorization.k8s.io,clusterroles.rbac.authorization.k8s.io,"
    "clusterrolebindings.rbac.authorization.k8s.io,servicemonitors.monitoring.coreos.com,"
    "podmonitors.monitoring.coreos.com,prometheusrules.monitoring.coreos.com,configmaps,"
    "poddisruptionbudgets.policy"
)
CRDS = ("retrypipelines.kafkaretry.io", "dlqreplays.kafkaretry.io")


def in_cluster(kubectl: Run, release: str) -> set[tuple[str, str | None, str]]:
    """(kind, namespace, name) of every object of the release, in any namespace."""
    out = kubectl(
        "get",
        CHART_KINDS,
        "--all-namespaces",
        "-o",
        "json",
        "-l",
        f"app.kubernetes.io/instance={release}",
    ).stdout
    return {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in json.loads(out)["items"]
    }


def released(helm: Run, release: str, namespace: str) -> set[tuple[str, str | None, str]]:
    """(kind, namespace, name) of what the release's current manifest declares."""
    manifest = helm("get", "manifest", release, "--namespace", namespace).stdout
    return {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in yaml.safe_load_all(manifest)
        if d
    }


@pytest.fixture
def other_namespace(kubectl: Run, namespace: str) -> Iterator[str]:
    name = f"{namespace}-other"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_install_upgrade_uninstall_leaves_no_orphans(
    helm: Run, kubectl: Run, namespace: str, other_namespace: str, unique: str
) -> None:
    ensure_service_monitor_crd(kubectl)
    release = f"life-{unique}"
    install = {
        "rbac.scope": "namespaces",
        "watchNamespaces": f"{{{namespace},{other_namespace}}}",
        "metrics.serviceMonitor.enabled": "true",
        "metrics.podMonitor.enabled": "true",
        "metrics.prometheusRule.enabled": "true",
        "metrics.grafanaDashboard.enabled": "true",
    }
    # No --wait: there is no kubelet here, so the operator pod never runs.
    helm("install", release, str(CHART), "--namespace", namespace, *set_args(install))
    try:
        first = released(helm, release, namespace)
        assert in_cluster(kubectl, release) == first
        assert {k for k, _, _ in first} == {
            "ServiceAccount",
            "Service",
            "Deployment",
            "Role",
            "RoleBinding",
            "ServiceMonitor",
            "PodMonitor",
            "PrometheusRule",
            "ConfigMap",  # the Grafana dashboard
            "PodDisruptionBudget",
            "ClusterRole",  # for people: aggregated into view/edit/admin
        }
        # Leader election and `helm test` in the release namespace, the rules in each watched one.
        assert {ns for k, ns, _ in first if k == "Role"} == {namespace, other_namespace}
        for crd in CRDS:
            kubectl("get", "crd", crd)

        # Upgrade: cluster-wide instead of two namespaces, no metrics Service or monitor,
        # another log level. What is no longer rendered must be gone from the cluster.
        upgrade = {
            "rbac.scope": "cluster",
            "metrics.service.enabled": "false",
            "metrics.serviceMonitor.enabled": "false",
            "operator.logLevel": "debug",
            "replicaCount": "1",
            "operator.leaderElection.enabled": "false",
            "tests.enabled": "false",
            "rbac.aggregateToDefaultRoles": "false",
        }
        helm("upgrade", release, str(CHART), "--namespace", namespace, *set_args(upgrade))
        second = released(helm, release, namespace)
        assert in_cluster(kubectl, release) == second
        assert {k for k, _, _ in second} == {
            "ServiceAccount",
            "Deployment",
            "ClusterRole",
            "ClusterRoleBinding",
        }
        assert len([k for k, _, _ in second if k == "ClusterRole"]) == 1
        deployment = installed_deployment(kubectl, namespace, release)
        container = operator_container([deployment])
        assert "--all-namespaces" in container["args"]
        assert "--debug" in container["args"]
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", check=False)

    assert in_cluster(kubectl, release) == set(), "helm uninstall left objects behind"
    leftovers = kubectl(
        "get", "secrets", "-n", namespace, "-o", "name", "-l", f"owner=helm,name={release}"
    ).stdout
    assert not leftovers.strip(), f"release records left: {leftovers}"
    # CRDs (and so every user's pipelines) survive an uninstall.
    for crd in CRDS:
        kubectl("get", "crd", crd)
