"""Shared fixtures: the real local Kafka broker and Kubernetes API server, started once per
session by hack/localenv.py, and per-test unique names so tests never see each other's data."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

import localenv  # noqa: E402

# Property tests judge behaviour, not speed: on a loaded 2-core machine (tests run on several
# xdist workers) generating inputs is slow, which Hypothesis would otherwise report as an error.
settings.register_profile("suite", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("suite")

# Fixtures that need a real server, and the marker each implies.
_FIXTURE_MARKS = {
    "kafka_bootstrap": "kafka",
    "kafka_admin": "kafka",
    "make_topic": "kafka",
    "kubeconfig": "kube",
    "k8s_api": "kube",
    "namespace": "kube",
    "make_namespace": "kube",
    "kubectl": "kube",
    "helm": "helm",
    "node_kubeconfig": "node",
    "node_kubectl": "node",
    "node_namespace": "node",
}


# Tests sharing something no namespace or topic name separates run on one pytest-xdist worker,
# one after another: the local node (one per host, and test_node takes it down and up again),
# and cluster-scoped objects (the chart's ClusterRoles and CRDs, KEDA's CRDs that
# test_operator_autoscaling installs and deletes).
_SERIAL_GROUPS = {
    "test_node.py": "node",
    "test_demo.py": "node",
    "test_image_contents.py": "node",
    "test_real_pods.py": "node",
    "test_chart_": "cluster",
    "test_crd_": "cluster",
    "test_foundation_kube.py": "cluster",
    "test_operator_autoscaling.py": "cluster",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns xdist_group marks into groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the servers they use, so `-m kafka` / `-m "not kube"` select truthfully,
    and put the ones that share a host-wide thing in one xdist group (`--dist loadgroup`)."""
    for item in items:
        marks = {_FIXTURE_MARKS.get(f) for f in getattr(item, "fixturenames", ())} - {None}
        for mark in marks:
            item.add_marker(getattr(pytest.mark, str(mark)))
        name = item.path.name
        group = "node" if "node" in marks else None
        group = group or next((g for p, g in _SERIAL_GROUPS.items() if name.startswith(p)), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def localenv_up() -> dict[str, str]:
    """Start (or reuse) every local server; fail loudly, never skip, if one cannot start."""
    try:
        localenv.up()
    except localenv.SetupError as e:
        pytest.fail(f"local servers did not start: {e}", pytrace=False)
    env = localenv.env_vars()
    os.environ.update(env)
    os.environ["PATH"] = f"{localenv.tool_bin_dir()}:{os.environ['PATH']}"
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap(localenv_up: dict[str, str]) -> str:
    return localenv_up["KRO_KAFKA_BOOTSTRAP"]


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


@pytest.fixture
def unique() -> str:
    """A short unique suffix for this test's topics, groups and resources."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def make_topic(kafka_admin: Any, unique: str) -> Iterator[Callable[..., str]]:
    """Create uniquely named topics for this test; they are deleted afterwards."""
    from dataplane_support import topic_maker

    with topic_maker(kafka_admin, unique) as make:
        yield make


@pytest.fixture(scope="session")
def kubeconfig(localenv_up: dict[str, str]) -> str:
    return localenv_up["KUBECONFIG"]


@pytest.fixture(scope="session")
def k8s_api(kubeconfig: str) -> Any:
    """A kubernetes.client.ApiClient for the local admin user."""
    from kubernetes import config

    return config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture
def make_namespace(k8s_api: Any, unique: str) -> Iterator[Callable[[str], str]]:
    """Fresh namespaces `t-<unique><suffix>`, deleted afterwards (the namespace controller
    empties them)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s_api)
    made: list[str] = []

    def make(suffix: str = "") -> str:
        name = f"t-{unique}{suffix}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_namespace(name)


@pytest.fixture
def namespace(make_namespace: Callable[[str], str]) -> str:
    """A fresh namespace per test."""
    return make_namespace("")


@pytest.fixture(scope="session")
def kubectl(kubeconfig: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run this machine's kubectl against the local API server."""
    return _kubectl_runner(kubeconfig)


def _kubectl_runner(kubeconfig: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = os.environ.get("KRO_KUBECTL", "kubectl")

    def run(
        *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [binary, "--kubeconfig", kubeconfig, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def helm(
    localenv_up: dict[str, str], kubeconfig: str
) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = localenv_up["KRO_HELM"]

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [binary, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, timeout=300
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def crds(kubectl: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Install (or update) the generated CRDs; they are cluster-wide and shared, and etcd
    starts empty on a fresh machine, so every test that needs them asks for this."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for name in ("retrypipelines.kafkaretry.io", "dlqreplays.kafkaretry.io"):
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


# --------------------------------------------------------------------------- the local node


@pytest.fixture(scope="session")
def node_kubeconfig(localenv_up: dict[str, str], request: pytest.FixtureRequest) -> str:
    """The local node's cluster (hack/node.py), where pods are real containers. Its tests
    fail, never skip, when it does not run: they are part of the suite."""
    import node

    if not node.enabled():
        pytest.fail(
            "this test needs the local node (real pods), which KRO_NODE=0 leaves out: "
            "run it where the node runs (`make up` without KRO_NODE=0)",
            pytrace=False,
        )
    if not (node.running() and node.node_ready()):
        pytest.fail(
            f"the local node is not Ready: `make up` starts it (logs: {node.NODE / 'logs'})",
            pytrace=False,
        )
    request.session.stash[NODE_IN_USE] = using = node.in_use()
    using.__enter__()  # until the session ends: another checkout's `make down` waits
    return localenv_up["KRO_NODE_KUBECONFIG"]


NODE_IN_USE = pytest.StashKey[contextlib.AbstractContextManager[None]]()


@pytest.fixture(scope="session")
def node_kubectl(node_kubeconfig: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """kubectl against the local node's API server."""
    return _kubectl_runner(node_kubeconfig)


@pytest.fixture(scope="session")
def pod_kafka_bootstrap(node_kubeconfig: str, localenv_up: dict[str, str]) -> str:
    """This run's Kafka as pods reach it (the listener on the node's bridge); the host
    reaches that address too."""
    return localenv_up["KRO_POD_KAFKA_BOOTSTRAP"]


@pytest.fixture(scope="session")
def image(node_kubeconfig: str, localenv_up: dict[str, str]) -> str:
    """The image built from the Dockerfile (hack/images.py), present in the node's containerd."""
    return localenv_up["KRO_IMAGE"]


def make_restricted_namespace(kubectl: Callable[..., Any], name: str) -> None:
    """A namespace where PodSecurity admission enforces the `restricted` standard."""
    kubectl("create", "namespace", name)
    for mode in ("enforce", "warn"):
        kubectl("label", "namespace", name, f"pod-security.kubernetes.io/{mode}=restricted")


@pytest.fixture
def node_namespace(
    node_kubectl: Callable[..., subprocess.CompletedProcess[str]], unique: str
) -> Iterator[str]:
    """A fresh `restricted` namespace on the local node, deleted afterwards."""
    name = f"t-{unique}"
    make_restricted_namespace(node_kubectl, name)
    yield name
    node_kubectl("delete", "namespace", name, "--wait=false", check=False)
