"""The chart's RBAC is enough, and no more, proven on the real API server.

Enough: the chart is installed, a token is minted for its ServiceAccount, and the operator
process runs with exactly the command, args and environment of the chart's Deployment, but
with that token as its only credential. It reconciles a real pipeline against the local Kafka
to Ready: topics created, topology ConfigMap and tier Deployment written, finalizer, status.

No more: requests the chart does not grant are refused, both by the API server's own access
review for the ServiceAccount and by a real request with its token (403).

The live run uses `rbac.scope=namespaces` (the test's namespace only): a cluster-wide operator
would also reconcile other tests' pipelines on this shared API server. Cluster scope is proven
with access reviews alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import localenv
from chart_support import (
    CHART,
    Run,
    env_of,
    installed_deployment,
    operator_container,
    set_args,
)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_i(kubectl: Run, sa: str, *args: str) -> bool:
    """The API server's own answer (SubjectAccessReview through impersonation)."""
    proc = kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {args}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


@dataclass
class Installed:
    release: str
    namespace: str
    service_account: str
    deployment: dict[str, Any]

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def _install(
    helm: Run, kubectl: Run, release: str, namespace: str, values: dict[str, str]
) -> Installed:
    helm("install", release, str(CHART), "--namespace", namespace, *set_args(values))
    deployment = installed_deployment(kubectl, namespace, release)
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    return Installed(release, namespace, sa, deployment)


@pytest.fixture
def installed(helm: Run, kubectl: Run, namespace: str, unique: str) -> Iterator[Installed]:
    release = f"rbac-{unique}"
    values = {
        "rbac.scope": "namespaces",
        "watchNamespaces": f"{{{namespace}}}",
        "operator.statusIntervalSeconds": "2",
        "operator.maxBackoffSeconds": "5",
    }
    yield _install(helm, kubectl, release, namespace, values)
    helm("uninstall", release, "--namespace", namespace, "--wait", check=False)


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    health_url: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def operator(installed: Installed, kubectl: Run, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The chart's operator container, run as a local process with the ServiceAccount's token."""
    token = kubectl(
        "create",
        "token",
        installed.service_account,
        "-n",
        installed.namespace,
        "--duration=1h",
    ).stdout.strip()
    kubeconfig = tmp_path / "operator.kubeconfig"
    localenv.write_kubeconfig(kubeconfig, token, installed.service_account, installed.namespace)

    container = operator_container([installed.deployment])
    health_port = _free_port()
    args = [
        re.sub(
            r"^--liveness=http://0\.0\.0\.0:\d+/", f"--liveness=http://127.0.0.1:{health_port}/", a
        )
        for a in container["args"]
    ]
    env = {
        **env_of(container, installed.namespace),
        # What a pod has and a bare process lacks: the image's PATH and HOME, and credentials
        # (here a kubeconfig with the ServiceAccount token, not the mounted token file).
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "KUBECONFIG": str(kubeconfig),
        "PYTHONUNBUFFERED": "1",
        "KAFKA_RETRY_METRICS_PORT": str(_free_port()),
    }
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*container["command"], *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    running = OperatorProcess(proc, log, f"http://127.0.0.1:{health_port}/healthz")
    try:
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(
    what: str, check: Callable[[], Any], operator: OperatorProcess, timeout: float = 60
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if operator.proc.poll() is not None:
            pytest.fail(
                f"the operator exited ({operator.proc.returncode}):\n{operator.text()[-4000:]}"
            )
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"{what} within {timeout:.0f}s; operator log:\n{operator.text()[-4000:]}")


def _pipeline(name: str, bootstrap: str, source: str, group: str) -> dict[str, Any]:
    return {
        "apiVersion": "kafkaretry.io/v1alpha1",
        "kind": "RetryPipeline",
        "metadata": {"name": name},
        "spec": {
            # The Secret is read with the operator's token (a harmless librdkafka setting).
            "kafka": {"bootstrapServers": bootstrap, "secretRef": {"name": "kafka-client"}},
            "source": {"topic": source, "consumerGroup": group},
            "tiers": [{"name": "retry-1", "delaySeconds": 5}],
            "topics": {"partitions": 1, "deletionPolicy": "Delete"},
            "handler": {"http": {"url": "http://127.0.0.1:9/events"}},
            # No kubelet here: zero replicas, so "workers ready" needs no running pod.
            "workers": {"replicas": 0},
        },
    }


def _play_deployment_controller(kubectl: Run, namespace: str, name: str) -> None:
    """Write the status kube-controller-manager's deployment controller (not run here) writes
    for a Deployment of zero replicas. Done with the admin credential, not the operator's."""
    deployment = json.loads(
        kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout
    )
    assert deployment["spec"]["replicas"] == 0
    status = {"status": {"observedGeneration": deployment["metadata"]["generation"], "replicas": 0}}
    kubectl(
        "patch",
        "deployment",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def _check_worker_deployment(kubectl: Run, installed: Installed, name: str) -> None:
    """The tier Deployment the operator wrote follows the chart's worker defaults, and its pod
    is admitted at the `restricted` Pod Security level (enforced, server-side dry run)."""
    ns = installed.namespace
    chart_env = env_of(operator_container([installed.deployment]), ns)
    deployment = json.loads(kubectl("get", "deployment", name, "-n", ns, "-o", "json").stdout)
    template = deployment["spec"]["template"]
    (worker,) = template["spec"]["containers"]
    assert worker["image"] == chart_env["KAFKA_RETRY_WORKER_IMAGE"]
    assert worker["imagePullPolicy"] == chart_env["KAFKA_RETRY_WORKER_IMAGE_PULL_POLICY"]
    assert worker["resources"] == json.loads(chart_env["KAFKA_RETRY_WORKER_RESOURCES"])

    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-probe",
            "namespace": ns,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    }
    proc = kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert proc.returncode == 0, f"the operator's worker pod is not restricted: {proc.stderr}"


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c.get("type") == kind:
            return dict(c)
    return {}


def test_operator_reconciles_with_only_the_charts_rbac(
    installed: Installed,
    operator: OperatorProcess,
    kubectl: Run,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    ns = installed.namespace

    # kopf's liveness endpoint, at the port and path the chart's probe uses.
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(operator.health_url, timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    _wait("the liveness endpoint answered 200", healthy, operator)

    source = make_topic("orders")
    name = f"orders-{unique}"
    pipeline = _pipeline(name, kafka_bootstrap, source, f"billing-{unique}")
    kubectl(
        "create",
        "secret",
        "generic",
        "kafka-client",
        "-n",
        ns,
        "--from-literal=client.id=kro-rbac-test",
    )
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pipeline))

    def get() -> dict[str, Any]:
        out = kubectl("get", "retrypipeline", name, "-n", ns, "-o", "json").stdout
        return dict(json.loads(out))

    deployment = f"{name}-retry-1"

    def deployment_written() -> bool:
        return kubectl("get", "deployment", deployment, "-n", ns, check=False).returncode == 0

    _wait("the operator wrote the tier Deployment", deployment_written, operator)
    _check_worker_deployment(kubectl, installed, deployment)
    _play_deployment_controller(kubectl, ns, deployment)

    ready = _wait(
        "the pipeline became Ready",
        lambda: _condition(get(), "Ready").get("status") == "True" and get(),
        operator,
        timeout=90,
    )
    assert _condition(ready, "TopicsReady")["status"] == "True"
    topics = ready["status"]["topics"]
    existing = kafka_admin.list_topics(timeout=10).topics
    for topic in [*topics["tiers"], topics["dlq"]]:
        assert topic in existing, f"{topic} not created in Kafka"
    assert "kafkaretry.io/finalizer" in ready["metadata"].get("finalizers", [])
    configmaps = kubectl("get", "configmaps", "-n", ns, "-o", "name").stdout
    assert name in configmaps, configmaps

    # A DLQReplay of the (empty) DLQ runs to Succeeded: the replay reads its pipeline, lists
    # the pipeline's other replays and writes progress to status, all with the same token.
    replay = {
        "apiVersion": "kafkaretry.io/v1alpha1",
        "kind": "DLQReplay",
        "metadata": {"name": f"replay-{unique}"},
        "spec": {"pipeline": name},
    }
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(replay))

    def replay_phase() -> str:
        out = kubectl("get", "dlqreplay", f"replay-{unique}", "-n", ns, "-o", "json").stdout
        return str(json.loads(out).get("status", {}).get("phase", ""))

    _wait("the DLQReplay succeeded", lambda: replay_phase() == "Succeeded", operator)
    kubectl("delete", "dlqreplay", f"replay-{unique}", "-n", ns, "--wait=false")
    _wait(
        "the DLQReplay was finalized and deleted",
        lambda: kubectl("get", "dlqreplay", f"replay-{unique}", "-n", ns, check=False).returncode,
        operator,
    )

    # Deleting the pipeline runs the finalizer (deletionPolicy Delete) with the same token.
    kubectl("delete", "retrypipeline", name, "-n", ns, "--wait=false")
    _wait(
        "the pipeline was finalized and deleted",
        lambda: kubectl("get", "retrypipeline", name, "-n", ns, check=False).returncode != 0,
        operator,
    )

    # Nothing the operator did was refused: the rules cover every call it made.
    refused = [
        line for line in operator.text().splitlines() if re.search(r"\b403\b|[Ff]orbidden", line)
    ]
    assert not refused, (
        "the operator was refused (kopf's namespace/CRD scans need "
        "settings.scanning.disabled = True in the operator):\n"
        + "\n".join(line[:300] for line in refused[:6])
    )


def test_namespaces_scope_denies_everything_else(
    installed: Installed, kubectl: Run, namespace: str, tmp_path: Path
) -> None:
    ns, sa = namespace, installed.user
    # kubectl resolves `scaledobjects.keda.sh` through discovery: KEDA's CRD must be served.
    for plural in ("scaledobjects", "triggerauthentications"):
        keda = Path(os.environ["KRO_KEDA_CRDS"]) / f"keda.sh_{plural}.yaml"
        kubectl("apply", "--server-side", "-f", str(keda))
        kubectl("wait", "--for=condition=Established", f"crd/{plural}.keda.sh", "--timeout=60s")
    granted = [
        ("list", "retrypipelines.kafkaretry.io", "-n", ns),
        ("watch", "retrypipelines.kafkaretry.io", "-n", ns),
        ("get", "retrypipelines.kafkaretry.io", "-n", ns),
        ("patch", "retrypipelines.kafkaretry.io", "-n", ns),
        ("patch", "retrypipelines.kafkaretry.io", "--subresource=status", "-n", ns),
        ("get", "dlqreplays.kafkaretry.io", "-n", ns),
        ("list", "dlqreplays.kafkaretry.io", "-n", ns),
        ("patch", "dlqreplays.kafkaretry.io", "--subresource=status", "-n", ns),
        ("watch", "deployments.apps", "-n", ns),
        ("create", "deployments.apps", "-n", ns),
        ("patch", "deployments.apps", "-n", ns),
        ("delete", "deployments.apps", "-n", ns),
        ("create", "poddisruptionbudgets.policy", "-n", ns),
        ("patch", "poddisruptionbudgets.policy", "-n", ns),
        ("list", "poddisruptionbudgets.policy", "-n", ns),
        ("watch", "poddisruptionbudgets.policy", "-n", ns),
        ("delete", "poddisruptionbudgets.policy", "-n", ns),
        ("create", "scaledobjects.keda.sh", "-n", ns),
        ("patch", "scaledobjects.keda.sh", "-n", ns),
        ("list", "scaledobjects.keda.sh", "-n", ns),
        ("delete", "scaledobjects.keda.sh", "-n", ns),
        ("create", "triggerauthentications.keda.sh", "-n", ns),
        ("patch", "triggerauthentications.keda.sh", "-n", ns),
        ("list", "triggerauthentications.keda.sh", "-n", ns),
        ("delete", "triggerauthentications.keda.sh", "-n", ns),
        ("create", "configmaps", "-n", ns),
        ("patch", "configmaps", "-n", ns),
        ("get", "secrets", "-n", ns),
        ("list", "pods", "-n", ns),
        ("create", "events", "-n", ns),
        ("create", "leases.coordination.k8s.io", "-n", ns),
        ("get", f"leases.coordination.k8s.io/{installed.release}-kafka-retry-operator", "-n", ns),
        (
            "update",
            f"leases.coordination.k8s.io/{installed.release}-kafka-retry-operator",
            "-n",
            ns,
        ),
    ]
    denied = [
        # Outside the watched namespace: nothing at all.
        ("list", "retrypipelines.kafkaretry.io", "-n", "default"),
        ("get", "secrets", "-n", "default"),
        ("patch", "deployments.apps", "-n", "default"),
        ("list", "retrypipelines.kafkaretry.io", "--all-namespaces"),
        # Inside it: only the verbs the operator uses.
        ("list", "secrets", "-n", ns),
        ("watch", "secrets", "-n", ns),
        ("create", "secrets", "-n", ns),
        ("create", "retrypipelines.kafkaretry.io", "-n", ns),
        ("update", "retrypipelines.kafkaretry.io", "-n", ns),
        ("delete", "retrypipelines.kafkaretry.io", "-n", ns),
        ("list", "configmaps", "-n", ns),
        ("delete", "configmaps", "-n", ns),
        ("update", "deployments.apps", "-n", ns),
        ("create", "pods", "-n", ns),
        ("get", "pods", "-n", ns),
        ("watch", "pods", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("create", "pods", "--subresource=exec", "-n", ns),
        ("create", "serviceaccounts", "--subresource=token", "-n", ns),
        ("create", "roles.rbac.authorization.k8s.io", "-n", ns),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", ns),
        ("update", "deployments.apps", "--subresource=scale", "-n", ns),
        ("update", "poddisruptionbudgets.policy", "-n", ns),
        # The leader-election Lease: only the chart's own, by name, in the release namespace.
        ("update", "leases.coordination.k8s.io", "-n", ns),
        ("get", "leases.coordination.k8s.io/kube-controller-manager", "-n", "kube-system"),
        ("list", "leases.coordination.k8s.io", "-n", ns),
        ("delete", "leases.coordination.k8s.io", "-n", ns),
        # Nothing cluster-scoped.
        ("list", "namespaces"),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("list", "nodes"),
    ]
    for args in granted:
        assert _can_i(kubectl, sa, *args), f"the chart should grant: {args}"
    for args in denied:
        assert not _can_i(kubectl, sa, *args), f"the chart must not grant: {args}"

    # And a real request with the ServiceAccount's own token is refused with 403.
    token = kubectl("create", "token", installed.service_account, "-n", ns).stdout.strip()
    config = tmp_path / "sa.kubeconfig"
    localenv.write_kubeconfig(config, token, installed.service_account, ns)
    proc = subprocess.run(
        [localenv.kubectl_binary(), "--kubeconfig", str(config), "get", "secrets", "-n", ns],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(config)},
    )
    assert proc.returncode != 0 and "Forbidden" in proc.stderr, proc.stderr
    proc = subprocess.run(
        [
            localenv.kubectl_binary(),
            "--kubeconfig",
            str(config),
            "get",
            "--raw",
            f"/apis/kafkaretry.io/v1alpha1/namespaces/{ns}/retrypipelines",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_cluster_scope_grants_the_same_rules_everywhere_and_nothing_more(
    helm: Run, kubectl: Run, namespace: str, unique: str
) -> None:
    release = f"rbacc-{unique}"
    installed = _install(helm, kubectl, release, namespace, {"rbac.scope": "cluster"})
    try:
        sa = installed.user
        for args in [
            ("list", "retrypipelines.kafkaretry.io", "--all-namespaces"),
            ("watch", "dlqreplays.kafkaretry.io", "--all-namespaces"),
            ("patch", "retrypipelines.kafkaretry.io", "--subresource=status", "-n", "default"),
            ("patch", "deployments.apps", "-n", "default"),
            ("get", "secrets", "-n", "default"),
            ("create", "events", "-n", "default"),
        ]:
            assert _can_i(kubectl, sa, *args), f"cluster scope should grant: {args}"
        for args in [
            ("list", "secrets", "--all-namespaces"),
            ("create", "pods", "-n", "default"),
            ("create", "retrypipelines.kafkaretry.io", "-n", "default"),
            ("list", "namespaces"),
            ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
            ("get", "nodes"),
        ]:
            assert not _can_i(kubectl, sa, *args), f"cluster scope must not grant: {args}"
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", check=False)


def _aggregated(kubectl: Run, role: str, release: str) -> bool:
    """Whether the default ClusterRole `role` has picked up the release's rules (the
    kube-controller-manager's clusterrole-aggregation controller copies them in)."""
    rules = json.loads(kubectl("get", "clusterrole", role, "-o", "json").stdout)["rules"] or []
    return any("kafkaretry.io" in r.get("apiGroups", []) for r in rules) and bool(
        kubectl(
            "get", "clusterroles", "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
        ).stdout.strip()
    )


def test_default_roles_get_pipelines_and_only_edit_may_replay(
    helm: Run, kubectl: Run, namespace: str, unique: str, crds: None, tmp_path: Path
) -> None:
    """People bound to the default roles in a namespace: view reads pipelines and replays;
    only edit and admin create a DLQReplay or cancel one. Proven by the API server's access
    reviews and by real requests made as those users (impersonation)."""
    release = f"roles-{unique}"
    _install(helm, kubectl, release, namespace,
             {"rbac.scope": "namespaces", "watchNamespaces": f"{{{namespace}}}"})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not all(_aggregated(kubectl, r, release) for r in ("view", "edit", "admin")):
            assert time.monotonic() < deadline, "the chart's roles were not aggregated"
            time.sleep(0.5)
        users = {role: f"{role}-{unique}" for role in ("view", "edit", "admin")}
        for role, user in users.items():
            kubectl("create", "rolebinding", f"{role}-{unique}", f"--clusterrole={role}",
                    f"--user={user}", "-n", namespace)  # fmt: skip

        def can(user: str, *args: str) -> bool:
            return _can_i(kubectl, user, *args, "-n", namespace)

        for user in users.values():
            for verb in ("get", "list", "watch"):
                for kind in ("retrypipelines", "dlqreplays"):
                    assert can(user, verb, f"{kind}.kafkaretry.io"), (user, verb, kind)
            for kind in ("retrypipelines", "dlqreplays"):
                assert not can(user, "patch", f"{kind}.kafkaretry.io", "--subresource=status")
        for verb in ("create", "patch", "update", "delete"):
            for kind in ("retrypipelines", "dlqreplays"):
                assert not can(users["view"], verb, f"{kind}.kafkaretry.io"), (verb, kind)
                assert can(users["edit"], verb, f"{kind}.kafkaretry.io"), (verb, kind)
                assert can(users["admin"], verb, f"{kind}.kafkaretry.io"), (verb, kind)

        # Real requests, as each user. No operator runs, so the replay just sits there.
        replay = {
            "apiVersion": "kafkaretry.io/v1alpha1",
            "kind": "DLQReplay",
            "metadata": {"name": f"replay-{unique}", "namespace": namespace},
            "spec": {"pipeline": "billing-orders"},
        }
        as_view = kubectl("create", f"--as={users['view']}", "-f", "-",
                          input=json.dumps(replay), check=False)  # fmt: skip
        assert as_view.returncode != 0 and "forbidden" in as_view.stderr.lower(), as_view
        kubectl("create", f"--as={users['edit']}", "-f", "-", input=json.dumps(replay))
        kubectl("get", f"--as={users['view']}", "dlqreplay", f"replay-{unique}", "-n", namespace)
        cancel = ["patch", "dlqreplay", f"replay-{unique}", "-n", namespace, "--type=merge",
                  "-p", '{"spec":{"cancel":true}}']  # fmt: skip
        refused = kubectl(*cancel, f"--as={users['view']}", check=False)
        assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused
        kubectl(*cancel, f"--as={users['admin']}")
        got = json.loads(kubectl("get", "dlqreplay", f"replay-{unique}", "-n", namespace,
                                 "-o", "json").stdout)  # fmt: skip
        assert got["spec"]["cancel"] is True
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", check=False)
