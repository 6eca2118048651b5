"""The Helm chart renders what we promise: lint-clean, both RBAC modes, the ServiceMonitor on
and off, a restricted-security operator pod, worker defaults handed to the operator, CRDs equal
to the generated ones, and manifests the real API server accepts (server-side dry run)."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml

from chart_support import (
    AGGREGATE_LABELS,
    CHART,
    ROOT,
    Manifest,
    Run,
    ensure_service_monitor_crd,
    env_of,
    is_test_object,
    is_user_role,
    kinds,
    one,
    operator_container,
    render,
    to_yaml,
)

README = ROOT / "README.md"
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
    docs = [d for d in render(helm, "kro", "ops") if not is_user_role(d)]
    assert kinds(docs) == [
        ("ClusterRole", None),
        ("ClusterRoleBinding", None),
        ("Deployment", "ops"),
        ("PodDisruptionBudget", "ops"),
        ("Role", "ops"),  # leader election: the Lease
        ("RoleBinding", "ops"),
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
    docs = [d for d in render(helm, "kro", "ops", NAMESPACES) if not is_user_role(d)]
    assert kinds(docs) == [
        ("Deployment", "ops"),
        ("PodDisruptionBudget", "ops"),
        ("Role", "ops"),  # leader election: the Lease
        ("Role", "team-a"),
        ("Role", "team-b"),
        ("RoleBinding", "ops"),
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
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] != "ops"]
    assert roles[0]["rules"] == roles[1]["rules"]
    # The namespaced rules are exactly the cluster-scope rules, just bound per namespace.
    (cluster_role,) = [
        d for d in render(helm, "kro", "ops") if d["kind"] == "ClusterRole" and not is_user_role(d)
    ]
    assert roles[0]["rules"] == cluster_role["rules"]


def test_watch_namespaces_is_refused_under_cluster_scope(helm: Run) -> None:
    """A list of namespaces under cluster scope would be a promise the ClusterRole does not keep:
    the render fails and says what to do instead."""
    proc = helm("template", "kro", str(CHART), "--set", "watchNamespaces={shop}", check=False)
    assert proc.returncode != 0
    assert "watchNamespaces needs rbac.scope=namespaces" in proc.stderr, proc.stderr
    assert "every namespace" in proc.stderr, proc.stderr


def test_user_roles(helm: Run) -> None:
    """Read for view, write for edit and admin; never a status subresource write; off with
    `rbac.aggregateToDefaultRoles=false`. Rendered the same in both scopes."""
    for values in (None, NAMESPACES):
        roles = {d["metadata"]["name"]: d for d in render(helm, "kro", "ops", values)
                 if is_user_role(d)}  # fmt: skip
        view, edit = (
            roles.pop("kro-kafka-retry-operator-view"),
            roles.pop("kro-kafka-retry-operator-edit"),
        )
        assert not roles
        assert {k for k, v in view["metadata"]["labels"].items() if v == "true"} == set(
            AGGREGATE_LABELS
        )
        assert {k for k, v in edit["metadata"]["labels"].items() if v == "true"} == set(
            AGGREGATE_LABELS[1:]
        )
        (read,) = view["rules"]
        assert read["verbs"] == ["get", "list", "watch"]
        (write,) = edit["rules"]
        assert not [r for r in write["resources"] if "/" in r], write
        assert "create" in write["verbs"] and "patch" in write["verbs"]
    off = render(helm, "kro", "ops", {"rbac.aggregateToDefaultRoles": "false"})
    assert not [d for d in off if is_user_role(d)]


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


def test_high_availability(helm: Run) -> None:
    """Two replicas that elect a leader on a Lease the operator may update by name, rolled one
    at a time, under a PDB that selects exactly the operator's pods; one replica without
    election is replaced with Recreate; two without election are refused."""
    docs = render(helm, "kro", "ops")
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    args = operator_container(docs)["args"]
    assert "--leader-election-lease=kro-kafka-retry-operator" in args
    assert {"--lease-duration-seconds=15", "--renew-deadline-seconds=10"} <= set(args)
    env = env_of(operator_container(docs), "ops", pod_name="kro-0")
    assert env["POD_NAMESPACE"] == "ops" and env["POD_NAME"] == "kro-0"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": spec["selector"]}
    (lease_role,) = [d for d in docs if d["kind"] == "Role"]
    assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "resourceNames": ["kro-kafka-retry-operator"], "verbs": ["get", "update"]
            } in lease_role["rules"]  # fmt: skip

    single = {"replicaCount": "1", "operator.leaderElection.enabled": "false"}
    docs = render(helm, "kro", "ops", single)
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in operator_container(docs)["args"] if a.startswith("--leader")]
    assert {d["kind"] for d in docs}.isdisjoint({"PodDisruptionBudget", "Role"})
    proc = helm("template", "kro", str(CHART), "--set", "operator.leaderElection.enabled=false",
                check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "replicaCount > 1 needs operator.leaderElection.enabled" in proc.stderr

    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
              "whenUnsatisfiable": "ScheduleAnyway"}  # fmt: skip
    docs = render(helm, "kro", "ops", None, "--set-json",
                  f"topologySpreadConstraints=[{json.dumps(spread)}]")  # fmt: skip
    (constraint,) = one(docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint == {
        **spread,
        "labelSelector": {"matchLabels": spec["selector"]["matchLabels"]},
    }


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
    assert container["image"] == "kafka-retry-operator@sha256:" + "a" * 64
    assert env_of(container, "ops")["KAFKA_RETRY_WORKER_IMAGE"] == "reg.example/billing:4.5"


def test_every_operator_setting_is_a_chart_value(helm: Run) -> None:
    """Each KAFKA_RETRY_OPERATOR_* setting the operator reads (config.py) is set by a chart
    value, so a platform team tunes it in values.yaml rather than with extraEnv."""
    from kafka_retry_operator import config

    settings = {
        value
        for name, value in vars(config).items()
        if name.startswith("ENV_") and value.startswith("KAFKA_RETRY_OPERATOR_")
    }
    assert "KAFKA_RETRY_OPERATOR_DRAIN_SETTLE" in settings
    env = env_of(operator_container(render(helm, "kro", "ops", {})), "ops")
    assert settings <= env.keys(), sorted(settings - env.keys())
    docs = render(helm, "kro", "ops", {"operator.drainSettleSeconds": "15"})
    assert env_of(operator_container(docs), "ops")["KAFKA_RETRY_OPERATOR_DRAIN_SETTLE"] == "15"


def test_default_image_is_the_one_the_readme_builds(helm: Run) -> None:
    """A plain install runs the image the README's `docker build` names, pulled only if the
    node lacks it; the operator's own fallback for tier workers is the same image."""
    from kafka_retry_operator.config import DEFAULT_WORKER_IMAGE

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    container = operator_container(render(helm, "kro", "ops"))
    expected = f"kafka-retry-operator:{chart['appVersion']}"
    assert container["image"] == expected
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert env_of(container, "ops")["KAFKA_RETRY_WORKER_IMAGE"] == expected
    assert expected == DEFAULT_WORKER_IMAGE
    built = re.findall(r"^docker build -t (\S+) \.$", README.read_text(), re.M)
    assert built == [expected], built


def _crd_upgrade_commands(text: str) -> list[str]:
    return [
        " ".join(line.split("#")[0].split())
        for line in text.splitlines()
        if "kubectl apply" in line and "crds/" in line and "--server-side" in line
    ]


def test_notes_and_readme_agree_on_upgrading_crds(helm: Run) -> None:
    """The install notes and the README's "Upgrading CRDs" give the same command, one that
    takes the CRDs' fields over from Helm (server-side apply with --force-conflicts)."""
    notes = helm("install", "kro", str(CHART), "--namespace", "ops", "--dry-run=client").stdout
    readme = README.read_text().split("### Upgrading CRDs", 1)[1].split("\n## ", 1)[0]
    (from_notes,) = _crd_upgrade_commands(notes.split("NOTES:", 1)[1])
    (from_readme,) = _crd_upgrade_commands(readme)
    expected = "kubectl apply --server-side --force-conflicts -f {}crds/"
    assert from_notes == expected.format("<chart>/"), from_notes
    assert from_readme == expected.format(""), from_readme
    assert "helm test kro -n ops --logs" in notes


def test_helm_test_objects(helm: Run) -> None:
    """`helm test` runs a pod whose labels no operator selector matches, as a ServiceAccount
    bound to a Role that can read the operator Deployment and list RetryPipelines, no more."""
    docs = [d for d in render(helm, "kro", "ops", tests=True) if is_test_object(d)]
    assert kinds(docs) == [
        ("Pod", "ops"),
        ("Role", "ops"),
        ("RoleBinding", "ops"),
        ("ServiceAccount", "ops"),
    ]
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    operator = render(helm, "kro", "ops")
    selector = one(operator, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert one(docs, "Role")["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": [one(operator, "Deployment")["metadata"]["name"]],
            "verbs": ["get"],
        },
        {"apiGroups": ["kafkaretry.io"], "resources": ["retrypipelines"], "verbs": ["list"]},
    ]
    assert not [d for d in render(helm, "kro", "ops", {"tests.enabled": "false"}, tests=True)
                if is_test_object(d)]  # fmt: skip


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
        {
            "metrics.serviceMonitor.enabled": "true",
            "metrics.podMonitor.enabled": "true",
            "metrics.prometheusRule.enabled": "true",
            "metrics.grafanaDashboard.enabled": "true",
        },
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
