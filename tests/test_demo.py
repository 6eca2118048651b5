"""`make demo` end to end, in its non-interactive mode (`hack/demo.py --no-live`): the real
broker, the operator and the tier workers as pods on the local node (the operator installed
from the chart; with KRO_NODE=0 the operator and the pod runner's workers as local processes,
what the demo then runs), the example order service, a DLQ filled by the service's bug and
replayed after the fix. Each test runs the demo in a namespace and topic prefix of its own, so
it can run beside anything else."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import demo
import localenv
import node
from kafka_retry.event import Event
from kafka_retry.http_handler import ERROR_VERDICT, request_headers
from test_readme import lateness_claim

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, str(ROOT / "hack" / "demo.py")]


def _summary(stdout: str) -> dict[str, Any]:
    """The demo's last line: its JSON summary."""
    last = stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["demo"] == "summary", last
    return dict(summary)


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment mentions `text` (the demo's namespace is
    in the service's arguments, in the operator's and pod runner's when they are processes,
    and in the environment of the tier workers, processes or containers on this host)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()!r}")
    return found


def _wait_gone(text: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _topics(kafka_admin: Any, prefix: str) -> list[str]:
    return sorted(t for t in kafka_admin.list_topics(timeout=10).topics if t.startswith(prefix))


def _namespace_gone(kubectl: Any, namespace: str, timeout: float = 60) -> bool:
    """Deleted, or at least being deleted (the namespace controller finishes the job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = kubectl("get", "namespace", namespace, "-o", "json", check=False)
        if out.returncode != 0 or json.loads(out.stdout)["status"]["phase"] == "Terminating":
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def demo_kubectl(request: pytest.FixtureRequest) -> Any:
    """kubectl against the cluster the demo uses: the local node's, unless KRO_NODE=0."""
    return request.getfixturevalue("node_kubectl" if node.enabled() else "kubectl")


@pytest.fixture
def demo_names(unique: str, demo_kubectl: Any, kafka_admin: Any) -> Iterator[tuple[str, str]]:
    """A namespace and topic prefix for one demo run; whatever a failed run leaves is removed."""
    namespace, prefix = f"demo-{unique}", f"demo-{unique}-"
    yield namespace, prefix
    subprocess.run([*DEMO, "down", "--namespace", namespace], capture_output=True, timeout=60)
    kubectl = demo_kubectl
    left = kubectl("get", "retrypipelines", "-n", namespace, "-o", "name", check=False)
    for obj in left.stdout.split():
        kubectl("patch", obj, "-n", namespace, "--type=merge", "-p",
                '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip
    kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    topics = _topics(kafka_admin, prefix)
    if topics:
        for f in kafka_admin.delete_topics(topics).values():
            with contextlib.suppress(Exception):  # cleanup is best effort
                f.result(timeout=30)


def _start(namespace: str, prefix: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*DEMO, "--no-live", "--namespace", namespace, "--prefix", prefix, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """The demo's output up to the first line containing `marker`."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {marker!r} in the demo's output:\n{''.join(seen)}")


class PodWatch:
    """What `kubectl get pods` and `kubectl get nodes` show while the demo runs: the pods seen
    Running in its namespace (operator and tier workers, by component label) and the nodes."""

    def __init__(self, kubectl: Any, namespace: str) -> None:
        self.kubectl, self.namespace = kubectl, namespace
        self.running: dict[str, set[str]] = {}  # component label -> pod names seen Running
        self.nodes: list[tuple[str, str]] = []  # (name, Ready status) at the last look
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PodWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(1):
            out = self.kubectl("get", "pods", "-A", "-o", "json", check=False)
            if out.returncode == 0:
                for pod in json.loads(out.stdout)["items"]:
                    if pod["metadata"]["namespace"] != self.namespace:
                        continue
                    if pod["status"].get("phase") == "Running":
                        component = pod["metadata"]["labels"].get("app.kubernetes.io/component")
                        self.running.setdefault(component, set()).add(pod["metadata"]["name"])
            out = self.kubectl("get", "nodes", "-o", "json", check=False)
            if out.returncode == 0:
                self.nodes = [
                    (n["metadata"]["name"], _ready(n)) for n in json.loads(out.stdout)["items"]
                ]


def _ready(obj: dict[str, Any]) -> str:
    return next(
        (c["status"] for c in obj["status"].get("conditions", []) if c["type"] == "Ready"), "?"
    )


@pytest.mark.timeout(180)
def test_demo_replays_the_dlq_and_loses_nothing(
    demo_names: tuple[str, str], demo_kubectl: Any, kafka_admin: Any
) -> None:
    kubectl = demo_kubectl
    namespace, prefix = demo_names
    started = time.monotonic()
    with PodWatch(kubectl, namespace) as pods:
        proc = subprocess.run(
            [*DEMO, "--no-live", "--namespace", namespace, "--prefix", prefix,
             "--events", "60", "--delays", "1,2", "--rate", "40"],
            capture_output=True, text=True, timeout=170, cwd=ROOT,
        )  # fmt: skip
    took = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    s = _summary(proc.stdout)
    if node.enabled():
        # Real pods: the chart's operator and one tier-worker pod per tier, on one Ready node.
        assert len(pods.running.get("operator", ())) == 1, pods.running
        assert len(pods.running.get("tier-worker", ())) == 2, pods.running
        assert pods.nodes == [(node.NODE_NAME, "True")]
        assert "helm install kafka-retry-operator" in output
        assert "pod runner" not in output
    else:
        assert pods.running == {}, "KRO_NODE=0: no pods, the pod runner runs the workers"
        assert "pod runner: runs the tier workers' Deployments as local processes" in output

    assert s["ok"] is True, output
    assert s["events"] == 60
    assert s["lost"] == 0
    assert s["handled"] == 60, "every order charged: first time, after a retry or replayed"
    assert s["handled_first_time"] + s["handled_after_retry"] + s["replayed"] == 60
    # The example's mix (examples/order_service/orders.py): per 20 orders, 2 hit the bug,
    # 3 fail once at payments (handled on retry-1) and 2 fail twice (handled on retry-2).
    assert s["dead_lettered"] == 6 and s["replayed"] == 6
    assert s["handled_after_retry_by_tier"] == {"retry-1": 9, "retry-2": 6}
    assert s["handled_first_time"] == 39
    assert s["replay"] == {"name": "coupon-fix", "phase": "Succeeded", "replayed": 6}
    assert s["dlq_depth"] == 0
    assert s["lateness_ms"]["count"] == 21 and s["lateness_ms"]["early"] == 0, (
        "no retry is processed before its tier's delay has passed"
    )
    p50, worst = lateness_claim()  # what the README says of lateness holds
    assert s["lateness_ms"]["p50"] / 1000 < p50, s["lateness_ms"]
    assert s["lateness_ms"]["max"] / 1000 < worst, s["lateness_ms"]
    assert took < 120, f"the demo took {took:.0f}s"

    # It cleans up after itself: processes, topics, namespace; the shared servers stay.
    assert not _wait_gone(namespace)
    assert _topics(kafka_admin, prefix) == []
    assert _namespace_gone(kubectl, namespace)
    assert all(server.pid() for server in localenv.ALL), "the shared servers keep running"
    assert not node.enabled() or node.running(), "and the node"
    assert not (localenv.RUN / "demo" / f"{namespace}.json").exists()
    assert "make demo-down" in output


@pytest.mark.timeout(150)
def test_ctrl_c_stops_everything_the_demo_started(
    demo_names: tuple[str, str], demo_kubectl: Any, kafka_admin: Any
) -> None:
    namespace, prefix = demo_names
    # A prefix without a trailing separator gets a dash: `--prefix demo-x` names demo-x-orders.
    proc = _start(namespace, prefix.rstrip("-"), "--events", "2000", "--rate", "20")
    try:
        _read_until(proc, "producing", timeout=90)
        assert f"{prefix}orders" in _topics(kafka_admin, prefix)
        time.sleep(3)  # orders flowing, retries waiting on their tiers
        assert _processes_mentioning(namespace), "the demo's processes run"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    summary = _summary(out)
    assert summary["error"] == "interrupted" and summary["ok"] is False
    assert "cleaning up" in out
    assert not _wait_gone(namespace), "operator, tier workers and service stopped"
    assert _topics(kafka_admin, prefix) == []
    assert _namespace_gone(demo_kubectl, namespace)
    assert all(server.pid() for server in localenv.ALL), "Ctrl-C never stops the shared servers"


@pytest.mark.timeout(150)
def test_demo_down_stops_what_a_killed_demo_left(
    demo_names: tuple[str, str], demo_kubectl: Any
) -> None:
    namespace, prefix = demo_names
    proc = _start(namespace, prefix, "--events", "2000", "--rate", "20")
    try:
        _read_until(proc, "producing", timeout=90)
    finally:
        proc.kill()  # no clean-up: its children live on
        proc.wait()
    assert _processes_mentioning(namespace)
    down = subprocess.run(
        [*DEMO, "down", "--namespace", namespace], capture_output=True, text=True, timeout=90
    )
    assert down.returncode == 0, down.stderr
    assert "order-service" in down.stdout and "operator" in down.stdout
    if node.enabled():
        assert "operator and tier-worker pods" in down.stdout
        assert _namespace_gone(demo_kubectl, namespace)
    assert not _wait_gone(namespace)
    assert all(server.pid() for server in localenv.ALL), "`demo.py down` leaves the servers"


def test_demo_help_and_makefile_targets() -> None:
    """`make demo` passes DEMO_ARGS to hack/demo.py; `make demo-down` stops demo processes,
    then the servers (checked with `make -n`: running it would stop the shared servers)."""
    help_text = subprocess.run([*DEMO, "--help"], capture_output=True, text=True, check=True).stdout
    bad = subprocess.run([*DEMO, "--prefix", "team/a"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "'team/a': letters, digits" in bad.stderr, bad.stderr
    for flag in (
        "--events",
        "--rate",
        "--delays",
        "--namespace",
        "--prefix",
        "--no-live",
        "--keep",
        "--service",
    ):
        assert flag in help_text
    plan = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo-down"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    assert [line.split()[1:] for line in plan] == [
        ["hack/demo.py", "down"],
        ["hack/localenv.py", "down"],
    ]
    plan = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", "DEMO_ARGS=--events 5"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert "hack/demo.py --events 5" in plan


def _post_order(url: str, order: dict[str, Any], event: Event) -> tuple[int, str]:
    """POST `order` as the pipeline's workers would for `event`: (status, verdict header)."""
    headers = request_headers(event)
    request = urllib.request.Request(url, data=json.dumps(order).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status), ""
    except urllib.error.HTTPError as e:
        return int(e.code), e.headers.get(ERROR_VERDICT, "")


def _as_delivered(order: dict[str, Any], attempt: int, replay_id: str | None = None) -> Event:
    tier = None if attempt == 1 else f"retry-{attempt - 1}"
    return Event(
        key=b"customer-1", value=None, headers=(), topic="orders", partition=0, offset=1,
        timestamp_ms=None, attempt=attempt, tier=tier, pipeline="demo/order-service",
        consumer_group="order-service", original_topic="orders", original_partition=0,
        original_offset=1, original_timestamp_ms=None, replay_id=replay_id,
    )  # fmt: skip


def test_demo_go_service_path(unique: str) -> None:
    """`--service go` (`make demo DEMO_SERVICE=go`), the parts that differ from the Python
    demo, without a second full demo (the Go service behind the managed live lane on the real
    broker: test_live_lane.py): the demo's pipeline gets `liveLane: {}`; the demo builds and
    starts examples/go_order_service, which charges through the demo's payments upstream, so
    the demo's ledger (its summary) sees where each order was charged: a flaky bank's 500
    becomes a retriable 503, the coupon bug a non-retriable 500 until the flag fixes it."""
    namespace = f"demo-go-{unique}"
    args = demo.parse_args(["--service", "go", "--no-live", "--namespace", namespace])
    d = demo.Demo(args)
    assert d.doc["spec"]["liveLane"] == {}
    assert (
        demo.Demo(demo.parse_args(["--namespace", namespace])).doc["spec"].get("liveLane") is None
    )

    payments = demo.PaymentsServer(demo.Payments()).start()  # examples/order_service's
    d.logs.mkdir(parents=True, exist_ok=True)
    d.flags_file.write_text(json.dumps({"couponPercentFix": False}))
    endpoint = f"127.0.0.1:{demo._free_port()}"
    env = {**os.environ, "PAYMENTS_URL": payments.url, "ORDER_SERVICE_FLAGS": str(d.flags_file)}
    try:
        d._start_go_service(endpoint, env)
        url = f"http://{endpoint}/orders"
        orders = {o["id"]: o for _, o in demo.order_events(20)}
        flaky = next(o for o in orders.values() if o["bank"] == "fabrikam")  # fails 2 attempts
        buggy = next(o for o in orders.values() if o["coupon"] == "SAVE15%")
        healthy = next(o for o in orders.values() if o["bank"] not in ("northwind", "fabrikam")
                       and o["coupon"] != "SAVE15%")  # fmt: skip

        assert _post_order(url, healthy, _as_delivered(healthy, 1)) == (200, "")
        assert _post_order(url, flaky, _as_delivered(flaky, 1)) == (503, "")
        assert _post_order(url, flaky, _as_delivered(flaky, 2)) == (503, "")
        assert _post_order(url, flaky, _as_delivered(flaky, 3)) == (200, "")
        assert _post_order(url, buggy, _as_delivered(buggy, 1)) == (500, "non-retriable")
        d.flags_file.write_text(json.dumps({"couponPercentFix": True}))
        assert _post_order(url, buggy, _as_delivered(buggy, 2, "coupon-fix")) == (200, "")
        assert _post_order(url, healthy, _as_delivered(healthy, 1)) == (200, "")  # again
    finally:
        for child in d.children:
            child.stop(5)
        demo.stop_recorded(namespace)
        payments.close()
    ledger = demo.Tally.of(payments.payments.charges())
    assert {o: (c.stage, c.attempt, c.replay_id) for o, c in ledger.handled.items()} == {
        healthy["id"]: ("source", 1, ""),
        flaky["id"]: ("retry-2", 3, ""),
        buggy["id"]: ("retry-1", 2, "coupon-fix"),
    }
    assert ledger.duplicates == 1, "the repeated delivery is charged once (idempotency key)"
    assert payments.payments.failures == 2
