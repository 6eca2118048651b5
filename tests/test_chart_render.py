"""The Helm chart renders what we promise: lint-clean, both RBAC modes, the ServiceMonitor on
and off, a restricted-security operator pod, worker defaults handed to the operator, CRDs equal
to the generated ones, and manifests the real API server accepts (server-side dry run)."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest

from chart_support import (
    CHART,
    ROOT,
    Manifest,
    Run,
    ensure_service_monitor_crd,
    env_of,
    kinds,
    one,
    operator_container,
    render,
    to_yaml,
)

NAMESPACES = {"rbac.scope": "namespaces", "watchNamespaces": "{team-b,team-a}"}


# --------------------------------------------------------------------------- offline


def test_helm_lint(helm: Run) -> None:
    for values in (
        [],
        [
            "--set",
            "rbac.scope=namespaces",
            "--set",
            "watchNamespaces={a,b}",
            "--set",
            "metrics.serviceMonitor.enabled=true",
        ],
    ):
        proc = helm("lint", "--strict", str(CHART), *values)
        assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_cluster_scope(helm: Run) -> None:
    docs = render(helm, "kro", "ops")
    assert kinds(docs) == [
        ("ClusterRole", None),
        ("ClusterRoleBinding", None),
        ("Deployment", "ops"),
        ("Service", "ops"),
        ("ServiceAccount", "ops"),
    ]
    args = operator_container(docs)["args"]
    assert "--all-namespaces" in args
    assert not [a for a in args if a.startswith("--namespace")]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kro-kafka-retry-operator", "namespace": "ops"}
    ]


def test_namespaces_scope(helm: Run) -> None:
    docs = render(helm, "kro", "ops", NAMESPACES)
    assert kinds(docs) == [
        ("Deployment", "ops"),
        ("Role", "team-a"),
        ("Role", "team-b"),
        ("RoleBinding", "team-a"),
        ("RoleBinding", "team-b"),
        ("Service", "ops"),
        ("ServiceAccount", "ops"),
    ], "namespaces scope must grant nothing cluster-wide"
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--all-namespaces" not in args
    roles = [d for d in docs if d["kind"] == "Role"]
    assert roles[0]["rules"] == roles[1]["rules"]
    # The namespaced rules are exactly the cluster-scope rules, just bound per namespace.
    assert roles[0]["rules"] == one(render(helm, "kro", "ops"), "ClusterRole")["rules"]


def test_service_monitor_on_and_off(helm: Run) -> None:
    assert "ServiceMonitor" not in {d["kind"] for d in render(helm, "kro", "ops")}
    docs = render(
        helm,
        "kro",
        "ops",
        {"metrics.serviceMonitor.enabled": "true", "metrics.serviceMonitor.labels.release": "prom"},
    )
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    # The Service reaches the container's metrics port, and the operator is told to serve it.
    container = operator_container(docs)
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert env_of(container, "ops")["KAFKA_RETRY_METRICS_PORT"] == str(port)


def test_operator_pod_is_restricted(helm: Run) -> None:
    docs = render(helm, "kro", "ops")
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    container = operator_container(docs)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    # The probe hits the port kopf's --liveness endpoint listens on.
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (liveness,) = [a for a in container["args"] if a.startswith("--liveness=")]
    assert liveness == f"--liveness=http://0.0.0.0:{ports[probe['port']]}{probe['path']}"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_worker_defaults_reach_the_operator(helm: Run) -> None:
    docs = render(
        helm,
        "kro",
        "ops",
        {
            "image.repository": "reg.example/kro",
            "image.tag": "1.2.3",
            "workers.resources.limits.memory": "1Gi",
        },
    )
    env = env_of(operator_container(docs), "ops")
    assert operator_container(docs)["image"] == "reg.example/kro:1.2.3"
    assert env["KAFKA_RETRY_WORKER_IMAGE"] == "reg.example/kro:1.2.3"
    assert env["KAFKA_RETRY_WORKER_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert json.loads(env["KAFKA_RETRY_WORKER_RESOURCES"]) == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "1Gi"},
    }
    worker_sc = json.loads(env["KAFKA_RETRY_WORKER_SECURITY_CONTEXT"])
    assert worker_sc["readOnlyRootFilesystem"] is True
    assert worker_sc["capabilities"] == {"drop": ["ALL"]}
    pod_sc = json.loads(env["KAFKA_RETRY_WORKER_POD_SECURITY_CONTEXT"])
    assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"

    # A separate worker image, and a digest-pinned operator image.
    docs = render(
        helm,
        "kro",
        "ops",
        {
            "image.digest": "sha256:" + "a" * 64,
            "workers.image.repository": "reg.example/billing",
            "workers.image.tag": "4.5",
        },
    )
    container = operator_container(docs)
    assert container["image"].endswith("/kafka-retry-operator@sha256:" + "a" * 64)
    assert env_of(container, "ops")["KAFKA_RETRY_WORKER_IMAGE"] == "reg.example/billing:4.5"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rbac.scope": "everywhere"}, "/rbac/scope"),
        ({"rbac.scope": "namespaces"}, "/watchNamespaces"),
        ({"watchNamespaces": "{Not_A_Namespace}"}, "/watchNamespaces/0"),
        ({"operator.logLevel": "DEBUG"}, "/operator/logLevel"),
        ({"no.such.value": "1"}, "additional properties 'no' not allowed"),
        ({"metrics.port": "0"}, "/metrics/port"),
        (
            {"metrics.serviceMonitor.enabled": "true", "metrics.service.enabled": "false"},
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
    ],
)
def test_values_schema_rejects(helm: Run, values: dict[str, str], message: str) -> None:
    args = [f"--set={k}={v}" for k, v in values.items()]
    proc = helm("template", "kro", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"{values} rendered"
    assert message in proc.stderr, proc.stderr


def _schema_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every value the schema names (free-form maps such as `resources` count as one value)."""
    paths = []
    for key, sub in schema.get("properties", {}).items():
        paths.append((*prefix, key))
        paths += _schema_paths(sub, (*prefix, key))
    return paths


def test_values_are_typed_and_documented() -> None:
    """Every value of values.yaml is in values.schema.json, and every value the schema names
    has a comment right above its line in values.yaml."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    documented: dict[tuple[str, ...], bool] = {}
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        key = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if key:
            indent = len(key[1])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key[2]))
            documented[tuple(k for _, k in stack)] = previous.startswith("#")
        if line.strip():
            previous = line.strip()
    wanted = [p for p in _schema_paths(schema) if p != ("global",)]
    top_level = {p[0] for p in documented}
    assert top_level <= set(schema["properties"]), top_level - set(schema["properties"])
    missing = [".".join(p) for p in wanted if p not in documented]
    assert not missing, f"in the schema but not in values.yaml: {missing}"
    undocumented = [".".join(p) for p in wanted if not documented[p]]
    assert not undocumented, f"values.yaml has no comment above: {undocumented}"


def test_chart_crds_are_the_generated_ones() -> None:
    generated = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert generated, "crds/ is empty: run `make crds`"
    assert shipped.keys() == generated.keys(), "run `make chart-crds` (or `make crds`)"
    for name in generated:
        assert shipped[name] == generated[name], f"chart crds/{name} is stale: run `make crds`"


# --------------------------------------------------------------------------- API server


def _dry_run(kubectl: Run, docs: list[Manifest]) -> subprocess.CompletedProcess[str]:
    # Server-side apply: no client-side last-applied bookkeeping (whose warnings would hide
    # real ones); forcing conflicts is harmless in a dry run.
    return kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=chart-test",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=to_yaml(docs),
        check=False,
    )


@pytest.fixture
def second_namespace(kubectl: Run, namespace: str) -> Any:
    name = f"{namespace}-b"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_server_dry_run_both_scopes_with_service_monitor(
    helm: Run, kubectl: Run, namespace: str, second_namespace: str, unique: str
) -> None:
    ensure_service_monitor_crd(kubectl)
    release = f"dry-{unique}"
    for values in (
        {"metrics.serviceMonitor.enabled": "true"},
        {"rbac.scope": "namespaces", "watchNamespaces": f"{{{namespace},{second_namespace}}}"},
    ):
        docs = render(helm, release, namespace, values, "--include-crds")
        proc = _dry_run(kubectl, docs)
        assert proc.returncode == 0, f"{values}: {proc.stderr}"
        assert "Warning" not in proc.stderr, proc.stderr
        created = proc.stdout.count("(server dry run)")
        assert created == len(docs), proc.stdout


def test_pods_pass_restricted_pod_security(
    helm: Run, kubectl: Run, namespace: str, unique: str
) -> None:
    """The operator pod and a tier-worker pod with the chart's defaults are admitted by the
    API server's Pod Security admission at the `restricted` level (enforced, server dry run)."""
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    docs = render(helm, f"psa-{unique}", namespace)
    template = one(docs, "Deployment")["spec"]["template"]
    operator_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "operator", "namespace": namespace, **template["metadata"]},
        "spec": template["spec"],
    }
    env = env_of(operator_container(docs), namespace)
    worker_pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "worker", "namespace": namespace},
        "spec": {
            "securityContext": json.loads(env["KAFKA_RETRY_WORKER_POD_SECURITY_CONTEXT"]),
            "containers": [
                {
                    "name": "worker",
                    "image": env["KAFKA_RETRY_WORKER_IMAGE"],
                    "command": ["kafka-retry", "worker"],
                    "resources": json.loads(env["KAFKA_RETRY_WORKER_RESOURCES"]),
                    "securityContext": json.loads(env["KAFKA_RETRY_WORKER_SECURITY_CONTEXT"]),
                }
            ],
        },
    }
    # The ServiceAccount must exist for the operator pod to be admitted.
    kubectl("apply", "-f", "-", input=to_yaml([one(docs, "ServiceAccount")]))
    for pod in (operator_pod, worker_pod):
        proc = _dry_run(kubectl, [pod])
        assert proc.returncode == 0, f"{pod['metadata']['name']}: {proc.stderr}"

    # Control: the same admission refuses a pod that drops the restricted settings.
    loose = json.loads(json.dumps(worker_pod))
    loose["spec"]["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    proc = _dry_run(kubectl, [loose])
    assert proc.returncode != 0 and "restricted" in proc.stderr, proc.stderr
