"""Helpers for the operator tests (tests/test_operator_*.py): the CRDs installed, the operator
as a real subprocess scoped to one namespace, tier workers run by hack/podrunner.py, and
RetryPipeline manifests on fresh topics. Not a test module (no `test_` prefix)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLES = ROOT / "examples"

# Short intervals so tests converge in seconds, not minutes.
FAST_ENV = {
    "KAFKA_RETRY_OPERATOR_STATUS_INTERVAL": "1",
    "KAFKA_RETRY_OPERATOR_KAFKA_TIMEOUT": "3",
    "KAFKA_RETRY_OPERATOR_MAX_BACKOFF": "3",
    "KAFKA_RETRY_OPERATOR_SECRET_CHECK_INTERVAL": "1",
    "KAFKA_RETRY_OPERATOR_DRAIN_SETTLE": "3",
}

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Poll until `predicate()` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`kafka-retry-operator -n <namespace>` as a subprocess, logging to a file. Its /metrics
    is on a free local port (`metrics_url`): operators of concurrent runs share this machine."""

    def __init__(
        self,
        kubeconfig: str,
        namespaces: list[str],
        log_path: Path,
        *,
        verbose: bool = True,
        args: Sequence[str] = (),
        **env: str,
    ):
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.verbose = verbose
        self.args = list(args)
        self.log_path = log_path
        metrics = {
            "KAFKA_RETRY_METRICS_PORT": str(free_port()),
            "KAFKA_RETRY_METRICS_ADDRESS": "127.0.0.1",
        }
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, **FAST_ENV, **metrics, **env}
        self.metrics_url = f"http://127.0.0.1:{self.env['KAFKA_RETRY_METRICS_PORT']}/metrics"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_kb = 0

    def start(self) -> OperatorProcess:
        args = [str(BIN / "kafka-retry-operator"), *(["--verbose"] if self.verbose else [])]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        args += self.args
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def rss_kb(self) -> tuple[int, int]:
        """(current, peak) resident set size of the operator process."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.peak_rss_kb = self.rss_kb()[1]
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to the operator's process group (SIGKILL: no clean-up at all)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def operator(
    crds: None, kubeconfig: str, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start()
    yield op
    if op.proc is None or op.proc.poll() is not None:
        op.start()
    release_pipelines(kubectl, namespace)
    op.stop()


def release_pipelines(kubectl: Kubectl, namespace: str, timeout: int = 60) -> None:
    """Delete the namespace's replays and pipelines while the operator still runs (its
    finalizers would otherwise keep the namespace terminating forever); strip the finalizer of
    any left."""
    for kind in ("dlqreplays", "retrypipelines"):
        kubectl("delete", kind, "--all", "-n", namespace, f"--timeout={timeout}s", check=False)
    left = kubectl("get", "dlqreplays,retrypipelines", "-n", namespace, "-o", "name", check=False)
    for name in left.stdout.split():
        kubectl(
            "patch",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )


@pytest.fixture
def podrunner(kubeconfig: str, namespace: str, tmp_path: Path) -> Iterator[Any]:
    import podrunner as pr

    with pr.running(
        kubeconfig=kubeconfig, namespace=namespace, log_dir=tmp_path / "pods", grace_cap=5.0
    ) as runner:
        yield runner


@pytest.fixture
def cleanup_topics(kafka_admin: Any) -> Iterator[list[str]]:
    """Topic names to delete after the test (pipelines that keep theirs)."""
    names: list[str] = []
    yield names
    if names:
        for f in kafka_admin.delete_topics(sorted(set(names))).values():
            with contextlib.suppress(Exception):  # cleanup is best effort
                f.result(timeout=30)


def example(path: str = "retrypipeline-http.yaml") -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / path).read_text()))


def pipeline(
    name: str,
    bootstrap: str,
    source_topic: str,
    group: str,
    *,
    base: str = "retrypipeline-http.yaml",
    **spec_overrides: Any,
) -> dict[str, Any]:
    """An example pipeline pointed at the local broker and this test's topic and group, with
    small topics (one partition) and no Secret, unless overridden."""
    doc = copy.deepcopy(example(base))
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["kafka"] = {"bootstrapServers": bootstrap}
    spec["source"] = {"topic": source_topic, "consumerGroup": group}
    spec["topics"] = {"partitions": 1, "deletionPolicy": "Retain"}
    spec["dlq"] = {"retentionHours": 24}
    spec["tiers"] = [{"name": "retry-1", "delaySeconds": 1}, {"name": "retry-2", "delaySeconds": 2}]
    spec["workers"] = {"replicas": 1}
    spec.update(spec_overrides)
    return doc


def shown(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str, values: Iterable[str]
) -> list[str]:
    """Which of `values` (secrets) show in the operator's log, the pipelines, the Events or the
    Deployments of `namespace`: none should."""
    texts = [
        operator.log(),
        *(
            kubectl("get", kind, "-n", namespace, "-o", "yaml").stdout
            for kind in ("retrypipelines", "events", "deployments")
        ),
    ]
    return [value for value in values if any(value in text for text in texts)]


def apply(kubectl: Kubectl, namespace: str, doc: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = kubectl("get", "-n", namespace, kind, name, "-o", "json", check=False)
    if proc.returncode != 0:
        return None
    return dict(json.loads(proc.stdout))


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def wait_condition(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    type_: str = "Ready",
    status: str = "True",
    reason: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """The pipeline once its condition has `status` (and `reason`), for its current spec."""

    def check() -> dict[str, Any] | None:
        obj = get(kubectl, namespace, "retrypipeline", name)
        c = condition(obj, type_)
        current = obj is not None and (obj.get("status") or {}).get("observedGeneration") == (
            obj["metadata"].get("generation")
        )
        if current and c.get("status") == status and (reason is None or c.get("reason") == reason):
            return obj
        return None

    result: dict[str, Any] = wait_for(check, timeout, f"{name} {type_}={status} ({reason})")
    return result


def topic_partitions(admin: Any, names: list[str]) -> dict[str, int]:
    md = admin.list_topics(timeout=10)
    return {n: len(md.topics[n].partitions) for n in names if n in md.topics}


class StatusRecorder:
    """Every RetryPipeline event in the namespace, as (name, generation, observedGeneration,
    Ready status), from a watch that runs throughout."""

    def __init__(self, k8s_api: Any, namespace: str) -> None:
        from kubernetes import client, watch

        self._api = client.CustomObjectsApi(k8s_api)
        self._watch = watch.Watch()
        self._namespace = namespace
        self.events: list[tuple[str, int, int, str]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch_all, daemon=True)

    def _watch_all(self) -> None:
        try:
            self._run()
        except BaseException as e:  # the test checks the watch saw the whole window
            self.error = e

    def _run(self) -> None:
        stream = self._watch.stream(
            self._api.list_namespaced_custom_object,
            "kafkaretry.io", "v1alpha1", self._namespace, "retrypipelines",
            timeout_seconds=600,
        )  # fmt: skip
        for event in stream:
            obj = event["object"]
            status = obj.get("status") or {}
            ready = next(
                (c["status"] for c in status.get("conditions") or [] if c["type"] == "Ready"), ""
            )
            self.events.append(
                (
                    obj["metadata"]["name"],
                    int(obj["metadata"].get("generation") or 0),
                    int(status.get("observedGeneration") or 0),
                    ready,
                )
            )

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.watched_throughout = self._thread.is_alive() and self.error is None
        self._watch.stop()

    def flaps(self) -> list[str]:
        """Regressions: observedGeneration going back, or Ready leaving True and coming back
        within one observed generation (two writers taking turns)."""
        problems = []
        by_name: dict[str, list[tuple[int, str]]] = {}
        for name, _gen, observed, ready in self.events:
            by_name.setdefault(name, []).append((observed, ready))
        for name, seen in by_name.items():
            for (before, _), (after, _) in itertools.pairwise(seen):
                if after < before:
                    problems.append(f"{name}: observedGeneration {before} -> {after}")
            for generation in {g for g, _ in seen}:
                states = [r for g, r in seen if g == generation]
                collapsed = [r for i, r in enumerate(states) if i == 0 or states[i - 1] != r]
                if "True" in collapsed and collapsed.index("True") != len(collapsed) - 1:
                    problems.append(f"{name} generation {generation}: Ready went {collapsed}")
        return problems
