"""The chart's `helm test` hook on the real API server.

There is no kubelet here, so the hook pod cannot run as a pod: the test installs the chart,
takes the hook pod from the release (`helm get hooks`), proves the API server admits it at the
`restricted` Pod Security level, and runs its command and args as a local process whose only
credential is a token of the hook's ServiceAccount. The check fails while the operator
Deployment has no available replica and passes once it has one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import localenv
from chart_support import CHART, Run, set_args

BIN = Path(sys.executable).parent


@pytest.fixture
def release(helm: Run, namespace: str, unique: str, crds: None) -> Iterator[str]:
    name = f"st-{unique}"
    values = {"rbac.scope": "namespaces", "watchNamespaces": f"{{{namespace}}}"}
    helm("install", name, str(CHART), "--namespace", namespace, *set_args(values))
    yield name
    helm("uninstall", name, "--namespace", namespace, "--wait", check=False)


def _hook_pod(helm: Run, release: str, namespace: str) -> dict[str, Any]:
    hooks = helm("get", "hooks", release, "--namespace", namespace).stdout
    (pod,) = [d for d in yaml.safe_load_all(hooks) if d and d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return dict(pod)


def _run_check(
    kubectl: Run, pod: dict[str, Any], namespace: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    account = pod["spec"]["serviceAccountName"]
    token = kubectl("create", "token", account, "-n", namespace).stdout.strip()
    config = tmp_path / "selfcheck.kubeconfig"
    localenv.write_kubeconfig(config, token, account, namespace)
    (container,) = pod["spec"]["containers"]
    command = [sys.executable if c == "python" else c for c in container["command"]]
    return subprocess.run(
        [*command, *container["args"]],
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_helm_test_hook_checks_the_install(
    helm: Run, kubectl: Run, namespace: str, release: str, tmp_path: Path
) -> None:
    pod = _hook_pod(helm, release, namespace)

    # Admitted as a pod at the restricted level (its ServiceAccount exists: the release made it).
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    proc = kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-",
        input=json.dumps(pod), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    # No kubelet: the operator Deployment has no available replica, and the check says so.
    failed = _run_check(kubectl, pod, namespace, tmp_path)
    assert failed.returncode == 1, failed
    assert "no available replica" in failed.stderr, failed.stderr
    assert "not served" not in failed.stderr, failed.stderr

    # Play the deployment controller (not run here): one replica available.
    deployment = json.loads(
        kubectl("get", "deployment", "-n", namespace, "-l",
                f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator",
                "-o", "json").stdout
    )["items"][0]  # fmt: skip
    status = {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
        "updatedReplicas": 1,
    }
    kubectl(
        "patch", "deployment", deployment["metadata"]["name"], "-n", namespace,
        "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}),
    )  # fmt: skip
    passed = _run_check(kubectl, pod, namespace, tmp_path)
    assert passed.returncode == 0, passed
    assert "RetryPipeline" in passed.stdout and "DLQReplay" in passed.stdout, passed.stdout

    # The hook's ServiceAccount can read nothing else.
    user = f"system:serviceaccount:{namespace}:{pod['spec']['serviceAccountName']}"
    for args in (
        ("get", "secrets", "-n", namespace),
        ("list", "deployments.apps", "-n", namespace),
        ("get", "dlqreplays.kafkaretry.io", "-n", namespace),
        ("list", "retrypipelines.kafkaretry.io", "-n", "default"),
    ):
        answer = kubectl("auth", "can-i", f"--as={user}", *args, check=False).stdout.strip()
        assert answer == "no", f"{args}: {answer}"
