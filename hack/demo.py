"""`make demo`: the whole pipeline on this machine, from nothing to a replayed DLQ.

It starts (or reuses) the local servers (hack/localenv.py), installs the CRDs and runs the
operator: on the local node (hack/node.py) the chart's operator pod (`helm install`), whose
tier workers are pods too; with KRO_NODE=0, the operator and the pod runner (tier workers as
local processes, hack/podrunner.py) beside the run's own API server. It applies the example
RetryPipeline (examples/demo-pipeline.yaml), starts the example order service
(examples/order_service/: the live-lane SDK, and the endpoint the tier workers POST due orders
to) and produces orders: some fail retriably (the payments upstream answers 500 for a while)
and are handled on a retry tier after its delay, some hit the service's bug and land in the
DLQ. Then it fixes the bug, replays the DLQ with `kafka-retry dlq replay` (a DLQReplay the
operator executes) and prints a summary.

With `--service go` (`make demo DEMO_SERVICE=go`) the order service is the Go example
(examples/go_order_service/, no SDK) and the pipeline has `liveLane: {}`: the operator runs the
live lane too, and every order reaches the service as a POST.

    python hack/demo.py                          # live view; Ctrl-C stops what it started
    python hack/demo.py --service go             # the Go service behind the managed live lane
    python hack/demo.py --events 60 --delays 1,2 --no-live --namespace t-1 --prefix t-1-
    python hack/demo.py down                     # stop demo processes a killed demo left

The last line of output is a JSON summary. "lost" is the number of orders produced (acknowledged
by Kafka) minus the distinct orders the payments upstream charged. Exit code 0 when nothing is
lost and the DLQ is empty again, 1 otherwise, 130 when interrupted. The local servers keep
running (`make demo-down` stops them); everything else the demo made is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

HACK = Path(__file__).resolve().parent
ROOT = HACK.parent
EXAMPLES = ROOT / "examples"
sys.path[:0] = [str(HACK), str(EXAMPLES)]

from order_service.orders import order_events  # noqa: E402 - from examples/
from order_service.payments import Charge, Payments, PaymentsServer  # noqa: E402

import go_example  # noqa: E402 - from hack/, beside this file
import localenv  # noqa: E402
import node  # noqa: E402
from kafka_retry.model import RetryPipelineSpec, Topology  # noqa: E402

PIPELINE_FILE = EXAMPLES / "demo-pipeline.yaml"
CHART = ROOT / "charts" / "kafka-retry-operator"
RELEASE = "kafka-retry-operator"
REPLAY_NAME = "coupon-fix"
DEFAULT_NAMESPACE = "kafka-retry-demo"
STATE_DIR = localenv.RUN / "demo"
BIN = Path(sys.executable).parent  # the venv's console scripts
# The operator measures lag and DLQ depth every second, so the view follows closely: the
# chart's values on the node, the same settings as environment variables in a local process.
CHART_VALUES = {
    "operator.statusIntervalSeconds": "1",
    "operator.kafkaTimeoutSeconds": "3",
    "operator.maxBackoffSeconds": "3",
    # One replica is enough here; two (the chart's default) elect a leader on a Lease.
    "replicaCount": "1",
    "operator.leaderElection.enabled": "false",
    # Nothing cluster-wide: the release's namespace goes, and everything with it.
    "rbac.aggregateToDefaultRoles": "false",
}
OPERATOR_ENV = {
    "KAFKA_RETRY_OPERATOR_STATUS_INTERVAL": "1",
    "KAFKA_RETRY_OPERATOR_KAFKA_TIMEOUT": "3",
    "KAFKA_RETRY_OPERATOR_MAX_BACKOFF": "3",
    # Its Prometheus endpoint is not needed here; 0 turns it off, so no port can clash.
    "KAFKA_RETRY_METRICS_PORT": "0",
}


@dataclass(frozen=True)
class Placement:
    """Where the operator and the tier workers run. On the local node: as pods, which reach
    the host's Kafka and the order service's endpoint on the bridge address. With KRO_NODE=0:
    as local processes beside the run's API server, which has no kubelet."""

    pods: bool
    kubeconfig: str
    bootstrap: str  # the pipeline's Kafka, as the operator and the tier workers reach it
    host: str  # where the order service's endpoint listens, reachable by the tier workers

    @classmethod
    def here(cls) -> Placement:
        if node.enabled():
            pod_kafka = f"{node.GATEWAY}:{localenv.KAFKA_POD_PORT}"
            return cls(True, str(node.KUBECONFIG), pod_kafka, node.GATEWAY)
        return cls(False, str(localenv.KUBECONFIG), localenv.kafka_bootstrap(), "127.0.0.1")

    @property
    def operator_where(self) -> str:
        return "pods on the local node" if self.pods else "local processes (KRO_NODE=0)"


class DemoError(Exception):
    """The demo cannot go on; the message says why and which log to read."""


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# --------------------------------------------------------------------------- processes


class Child:
    """A process the demo starts and must stop: its own session (a Ctrl-C in the terminal
    reaches only the demo, which stops children in order), output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float) -> None:
        """SIGTERM to its process group (it drains and exits), SIGKILL after `grace`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text[-lines:])


def _state_file(namespace: str) -> Path:
    return STATE_DIR / f"{namespace}.json"


def _record_children(namespace: str, children: Sequence[Child], pods: Placement | None) -> None:
    """What `demo.py down` stops if this demo dies without cleaning up (kill -9), in the order
    it stops them: the service drains first, the operator goes last; then, on the local node,
    the namespace with the operator and tier-worker pods."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    order = {"order-service": 0, "podrunner": 1, "operator": 2}
    entries = [
        {"name": c.name, "pid": c.proc.pid, "argv": c.argv}
        for c in sorted(children, key=lambda c: order.get(c.name, 1))
        if c.proc is not None
    ]
    kubeconfig = pods.kubeconfig if pods is not None else None
    _state_file(namespace).write_text(json.dumps({"children": entries, "pods": kubeconfig}))


def _alive_as(pid: int, argv: Sequence[str]) -> bool:
    """Whether `pid` still runs the command we started (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A script run through its shebang shows the interpreter first: compare the tail.
    parts = cmdline.rstrip(b"\0").split(b"\0")
    return parts[-len(argv) :] == [os.fsencode(a) for a in argv]


def stop_recorded(namespace: str | None = None) -> list[str]:
    """Stop the processes recorded by demos (all, or one namespace's); answers their names."""
    files = [_state_file(namespace)] if namespace else sorted(STATE_DIR.glob("*.json"))
    stopped: list[str] = []
    for path in files:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for entry in state["children"]:  # recorded in stop order: the service goes first
            pid, argv = int(entry["pid"]), [str(a) for a in entry["argv"]]
            if not _alive_as(pid, argv):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive_as(pid, argv) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive_as(pid, argv):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            stopped.append(f"{entry['name']} (pid {pid})")
        if state["pods"]:
            ns = path.stem
            if _delete_node_namespace(Cluster(state["pods"]), ns):
                stopped.append(f"namespace {ns} on the local node (operator and tier-worker pods)")
        path.unlink(missing_ok=True)
    return stopped


def _delete_node_namespace(cluster: Cluster, namespace: str) -> bool:
    """Delete a demo's namespace on the node, its pipelines' finalizers removed first (their
    operator may be gone): the kubelet stops the pods in it. Answers whether it was there."""
    if cluster.namespace_phase(namespace) is None:
        return False
    left = cluster.kubectl("get", "retrypipelines", "-n", namespace, "-o", "name", check=False)
    for obj in left.stdout.split():
        cluster.kubectl(
            "patch", obj, "-n", namespace, "--type=merge", "-p",
            '{"metadata":{"finalizers":null}}', check=False,
        )  # fmt: skip
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    return True


# --------------------------------------------------------------------------- cluster


class Cluster:
    """kubectl (for what a person would type) and the API client (for what the demo polls)."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        self.kubeconfig = kubeconfig
        self.kubectl_bin = localenv.kubectl_binary()
        config: Any = kube_config  # partly untyped upstream
        api = config.new_client_from_config(config_file=self.kubeconfig)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def get(self, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: Any = self.custom.get_namespaced_custom_object(
                "kafkaretry.io", "v1alpha1", namespace, plural, name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return dict(obj)

    def namespace_phase(self, name: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            status = self.core.read_namespace(name).status
            return str(status.phase) if status is not None else "Active"
        except ApiException as e:
            if e.status == 404:
                return None
            raise


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


# --------------------------------------------------------------------------- observing


@dataclass
class Move:
    """One event the pipeline forwarded, read back from a tier or DLQ topic."""

    order: str
    origin: str  # "source", a tier name, or "replay"
    dest: str  # a tier name or "dlq"
    error: str  # "ValueError: ..." (empty on a replay)
    failed_at_ms: int | None
    due_ms: int | None
    replay_id: str | None


class Feed:
    """Reads every forward the pipeline writes (tier topics and the DLQ) from the beginning,
    without joining a consumer group, and keeps what moved where and why."""

    def __init__(
        self, bootstrap: str, topics: dict[str, str], partitions: int, delay_ms: dict[str, int]
    ) -> None:
        self._bootstrap = bootstrap
        self._stage_of = topics  # topic -> stage name ("retry-1", ..., "dlq")
        self._delay_ms = delay_ms  # tier topic -> its delay
        self._partitions = partitions
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-feed", daemon=True)
        self.moves: Counter[tuple[str, str]] = Counter()
        self.failed_at: dict[str, int] = {}  # order -> when its last failure happened (ms)
        self.due: dict[str, int] = {}  # order -> due time of its last forward to a tier (ms)
        self.fresh: deque[Move] = deque(maxlen=200)

    def start(self) -> Feed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def take(self) -> list[Move]:
        with self._lock:
            moves = list(self.fresh)
            self.fresh.clear()
        return moves

    def counts(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self.moves)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": f"kafka-retry-demo-view-{uuid.uuid4().hex[:8]}",  # never joined
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        consumer.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING)
                for topic in self._stage_of
                for p in range(self._partitions)
            ]
        )
        try:
            while not self._stop.is_set():
                for msg in consumer.consume(num_messages=500, timeout=0.2):
                    if msg.error() is None:
                        self._record(msg)
        finally:
            consumer.close()

    def _record(self, msg: Any) -> None:
        from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

        from kafka_retry import headers as h

        raw = msg.headers() or []
        state = h.parse_headers(raw).state
        try:
            order = str(json.loads(msg.value() or b"{}").get("id", "?"))
        except (ValueError, AttributeError):
            order = "?"
        replayed = any(key == h.REPLAY_SOURCE for key, _ in raw)
        due_ms = state.due_ms
        ts_type, appended_ms = msg.timestamp()
        delay_ms = self._delay_ms.get(str(msg.topic()))
        if ts_type == TIMESTAMP_LOG_APPEND_TIME and delay_ms is not None:
            # When the worker takes it as due: the broker's append time + the tier's delay
            # (docs/headers.md), whatever `due-ms` says (a replay's says "now").
            due_ms = appended_ms + delay_ms
        error_class = (state.error_class or "").rsplit(".", 1)[-1]
        move = Move(
            order=order,
            origin="replay" if replayed else (state.tier or h.SOURCE_STAGE),
            dest=self._stage_of.get(str(msg.topic()), "?"),
            error="" if replayed else f"{error_class}: {state.error_message or ''}".strip(),
            failed_at_ms=state.failed_at_ms,
            due_ms=due_ms,
            replay_id=state.replay_id,
        )
        with self._lock:
            self.moves[(move.origin, move.dest)] += 1
            if move.dest != "dlq" and state.failed_at_ms is not None and not replayed:
                self.failed_at[order] = state.failed_at_ms
            if move.dest != "dlq" and due_ms is not None:
                self.due[order] = due_ms
            self.fresh.append(move)


@dataclass
class Tally:
    """Orders by where they were first charged (the payments ledger)."""

    handled: dict[str, Charge] = field(default_factory=dict)  # order -> its first charge
    duplicates: int = 0

    @classmethod
    def of(cls, charges: Sequence[Charge]) -> Tally:
        tally = cls()
        for c in charges:
            if c.order in tally.handled:
                tally.duplicates += 1
            else:
                tally.handled[c.order] = c
        return tally

    def count(self, what: Callable[[Charge], bool]) -> int:
        return sum(1 for c in self.handled.values() if what(c))

    @property
    def first_try(self) -> int:
        return self.count(lambda c: c.stage == "source")

    @property
    def after_retry(self) -> int:
        return self.count(lambda c: c.stage != "source" and not c.replay_id)

    @property
    def replayed(self) -> int:
        return self.count(lambda c: bool(c.replay_id))


@dataclass
class Snapshot:
    """One look at everything, taken once per refresh."""

    elapsed: float
    produced: int
    arrived: dict[str, int]  # stage -> events written to its topic
    waiting: dict[str, int]  # stage -> not yet committed by its consumers (dlq: depth)
    moves: Counter[tuple[str, str]]
    tally: Tally
    pipeline: dict[str, Any] | None
    replay: dict[str, Any] | None
    payment_failures: int

    @property
    def status_depth(self) -> int | None:
        dlq = ((self.pipeline or {}).get("status") or {}).get("dlq") or {}
        return int(dlq["depth"]) if "depth" in dlq else None

    @property
    def replay_phase(self) -> str:
        return str(((self.replay or {}).get("status") or {}).get("phase") or "")


# --------------------------------------------------------------------------- the view


class View:
    """A block of lines redrawn in place once a second on a terminal (cursor-up and clear,
    no curses); messages scroll above it. Off a terminal, or with --no-live, it prints the
    messages and a one-line progress report every few seconds instead."""

    def __init__(self, live: bool, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.live = live and out.isatty()
        self._drawn = 0
        self._frame: list[str] = []
        self._last_plain = 0.0

    def _erase(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def say(self, text: str = "") -> None:
        self._erase()
        self.out.write(text + "\n")
        self._draw()

    def frame(self, lines: list[str], plain: str) -> None:
        if self.live:
            self._frame = lines
            self._erase()
            self._draw()
        elif time.monotonic() - self._last_plain >= 5:
            self._last_plain = time.monotonic()
            self.out.write(plain + "\n")
            self.out.flush()

    def close(self) -> None:
        """Leave the last frame on screen and write below it from now on."""
        self._drawn = 0
        self._frame = []

    def _draw(self) -> None:
        if self.live and self._frame:
            size = shutil.get_terminal_size()
            lines = [line[: size.columns - 1] for line in self._frame][: size.lines - 2]
            self.out.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        self.out.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def _label(stage: str) -> str:
    return {"source": "live lane", "dlq": "DLQ"}.get(stage, stage)


# --------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.where = Placement.here()
        self.view = View(live=not args.no_live)
        self.namespace: str = args.namespace
        self.prefix: str = args.prefix
        self.started = time.monotonic()
        self.logs = localenv.RUN / "logs" / f"demo-{self.namespace}"
        self.flags_file = self.logs / "order-service-flags.json"
        self.children: list[Child] = []
        self.created_namespace = False
        self.pipeline_applied = False
        self.operator_installed = False
        self.cluster: Cluster | None = None
        self.admin: Any = None
        self.payments: PaymentsServer | None = None
        self.feed: Feed | None = None
        self.producer_thread: threading.Thread | None = None
        self.produced = 0
        self.stop_producing = threading.Event()
        self.recent: deque[str] = deque(maxlen=8)
        self.narrated: set[str] = set()  # orders whose tier charge is in `recent` already
        self.phase = "starting"
        self.final: Snapshot | None = None
        self.summary: dict[str, Any] = {"demo": "summary", "namespace": self.namespace, "ok": False}
        self.doc, self.topology = self._pipeline()

    # ------------------------------------------------------------------ names

    def _pipeline(self) -> tuple[dict[str, Any], Topology]:
        """The example pipeline, pointed at the local broker and this run's topic and group."""
        doc: dict[str, Any] = yaml.safe_load(PIPELINE_FILE.read_text())
        spec = doc["spec"]
        spec["kafka"]["bootstrapServers"] = self.where.bootstrap
        spec["source"]["topic"] = f"{self.prefix}{spec['source']['topic']}"
        spec["source"]["consumerGroup"] = f"{self.prefix}{spec['source']['consumerGroup']}"
        if self.args.delays:
            delays = [int(d) for d in self.args.delays.split(",")]
            spec["tiers"] = [
                {"name": f"retry-{i + 1}", "delaySeconds": d} for i, d in enumerate(delays)
            ]
        if self.args.service == "go":
            spec["liveLane"] = {}  # the operator runs the live lane: the service embeds nothing
        doc["metadata"] = {"name": doc["metadata"]["name"], "namespace": self.namespace}
        name = doc["metadata"]["name"]
        return doc, RetryPipelineSpec.model_validate(spec).topology(self.namespace, name)

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def partitions(self) -> int:
        return int(self.doc["spec"]["topics"]["partitions"])

    def _stage_topics(self) -> dict[str, str]:
        """stage -> topic, in pipeline order: source, tiers, dlq."""
        t = self.topology
        return {"source": t.source_topic, **{r.name: r.topic for r in t.tiers}, "dlq": t.dlq_topic}

    def _stage_groups(self) -> dict[str, str]:
        """stage -> the consumer group whose committed offsets say what still waits."""
        from kafka_retry.depth import cursor_group

        t = self.topology
        return {
            "source": t.consumer_group,
            **{r.name: r.consumer_group for r in t.tiers},
            "dlq": cursor_group(t.dlq_topic),
        }

    # ------------------------------------------------------------------ output

    def say(self, text: str = "") -> None:
        self.view.say(text)

    def step(self, text: str) -> None:
        self.say(f"[{_clock(time.monotonic() - self.started)}] {text}")

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(localenv.env_vars())
        env["KUBECONFIG"] = self.where.kubeconfig
        env["PATH"] = f"{BIN}:{localenv.tool_bin_dir()}:{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ------------------------------------------------------------------ the story

    def run(self) -> int:
        self.setup()
        self.produce_and_watch()
        self.fix_and_replay()
        return self.summarize()

    def setup(self) -> None:
        args = self.args
        built = (
            localenv.KAFKA_DIR / "libs",
            localenv.ETCD_BIN,
            localenv.KUBE_BIN,
            localenv.HELM_BIN,
        )
        if not all(path.exists() for path in built):
            self.step(
                f"first run: fetching and building Kafka, etcd, kube-apiserver and helm into "
                f"{localenv.CACHE} (about 13 minutes, once; progress in {localenv.CACHE}/logs)"
            )
        self.step(
            "local servers: Kafka, etcd, kube-apiserver"
            + (", the local node" if self.where.pods else "")
            + " (started once, then reused)"
        )
        try:
            localenv.up()
        except localenv.SetupError as e:
            raise DemoError(str(e)) from None
        os.environ.update(localenv.env_vars())
        leftovers = stop_recorded(self.namespace)
        if leftovers:
            self.step(f"stopped what an earlier demo left: {', '.join(leftovers)}")
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster = Cluster(self.where.kubeconfig)
        from confluent_kafka.admin import AdminClient

        self.admin = AdminClient({"bootstrap.servers": localenv.kafka_bootstrap()})

        self.step("$ kubectl apply --server-side -f crds/")
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        for crd in ("retrypipelines.kafkaretry.io", "dlqreplays.kafkaretry.io"):
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        self._fresh_namespace()
        self._fresh_topics()

        self.flags_file.write_text(json.dumps({"couponPercentFix": False}))
        self.payments = PaymentsServer(Payments()).start()
        upstream = self.payments.payments
        flaky = ", ".join(f"{b} fails {n}x per order" for b, n in upstream.flaky.items())
        self.step(f"fake payments upstream on {self.payments.url} ({flaky})")

        env = self.child_env()
        if self.where.pods:
            self._install_operator()
        else:
            self._start_operator_processes(env)

        endpoint = f"{self.where.host}:{_free_port(self.where.host)}"
        self.doc["spec"]["handler"]["http"]["url"] = f"http://{endpoint}/orders"
        service_env = {
            **env, "PAYMENTS_URL": self.payments.url, "ORDER_SERVICE_FLAGS": str(self.flags_file)
        }  # fmt: skip
        go = args.service == "go"
        if go:  # listening before the pipeline's live lane calls it
            self._start_go_service(endpoint, service_env)
        tiers = ", ".join(f"{t.name} {t.delay_seconds}s" for t in self.topology.tiers)
        callers = "the live lane (liveLane: {}) and the tier workers POST every" if go else (
            "the tier workers POST due"
        )  # fmt: skip
        self.step(
            f"$ kubectl apply -f examples/demo-pipeline.yaml   # tiers: {tiers}, then DLQ; "
            f"{callers} orders to http://{endpoint}/orders"
        )
        cluster.kubectl("apply", "-f", "-", input=json.dumps(self.doc))
        self.pipeline_applied = True
        self._wait_ready()
        if self.where.pods:
            pods = cluster.kubectl("get", "pods", "-n", self.namespace).stdout.rstrip()
            self.step(f"$ kubectl get pods -n {self.namespace}\n" + _indent(pods))

        if not go:
            self._start_python_service(endpoint, service_env)
        self.feed = Feed(
            localenv.kafka_bootstrap(),
            {t: s for s, t in self._stage_topics().items() if s != "source"},
            self.partitions,
            {t.topic: t.delay_seconds * 1000 for t in self.topology.tiers},
        ).start()
        if args.no_live:
            self.step(f"logs: {self.logs}")

    def _start_python_service(self, endpoint: str, env: dict[str, str]) -> None:
        """examples/order_service: the live-lane SDK on the source topic, and the endpoint the
        tier workers POST due orders to."""
        port = _free_port()
        source = self.topology.source_topic
        self.step(
            f"order service: python -m order_service --endpoint {endpoint} (live-lane SDK on "
            f"{source}; the tier workers' endpoint)"
        )
        self._start(
            "order-service",
            [
                sys.executable,
                "-m",
                "order_service",
                "--pipeline",
                self.name,
                "--namespace",
                self.namespace,
                "--metrics-port",
                str(port),
                "--endpoint",
                endpoint,
            ],
            env,
        )
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"), 60, "the order service")

    def _start_go_service(self, endpoint: str, env: dict[str, str]) -> None:
        """examples/go_order_service: no SDK, it only answers the POSTs of the operator's live
        lane and tier workers; it charges through the same payments upstream."""
        self.step("order service (Go, no SDK): building examples/go_order_service (cached)")
        try:
            binary = go_example.binary()
        except go_example.GoBuildError as e:
            raise DemoError(str(e)) from None
        self.step(f"order service: go-order-service -addr {endpoint}")
        self._start("order-service", [str(binary), "-addr", endpoint], env)
        self._wait(lambda: _http_ok(f"http://{endpoint}/healthz"), 30, "the Go order service")

    def _install_operator(self) -> None:
        """The chart's operator as a pod, from the image built from the Dockerfile (the one
        `localenv.up` made sure containerd has)."""
        image = os.environ["KRO_IMAGE"]
        repository, _, tag = image.rpartition(":")
        values = {
            **CHART_VALUES,
            "image.repository": repository,
            "image.tag": tag,
            "image.pullPolicy": "Never",
            "rbac.scope": "namespaces",
            "watchNamespaces": f"{{{self.namespace}}}",
        }
        self.step(
            f"operator: helm install {RELEASE} charts/kafka-retry-operator -n {self.namespace} "
            f"--wait   # image {image}; its tier workers run as pods"
        )
        helm = subprocess.run(
            [
                str(localenv.HELM_BIN), "--kubeconfig", self.where.kubeconfig, "install", RELEASE,
                str(CHART), "--namespace", self.namespace, "--skip-crds", "--wait",
                "--timeout", "180s", *(f"--set={k}={v}" for k, v in values.items()),
            ],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        self.operator_installed = True
        if helm.returncode != 0:
            pods = self._cluster().kubectl("describe", "pods", "-n", self.namespace, check=False)
            raise DemoError(f"helm install failed: {helm.stderr.strip()}\n{pods.stdout[-3000:]}")

    def _start_operator_processes(self, env: dict[str, str]) -> None:
        """The operator as a local process, and the pod runner running its tier workers."""
        self.step(f"operator: kafka-retry-operator --namespace {self.namespace}")
        self._start(
            "operator",
            [str(BIN / "kafka-retry-operator"), "--namespace", self.namespace],
            {**env, **OPERATOR_ENV},
        )
        self.step("pod runner: runs the tier workers' Deployments as local processes (KRO_NODE=0)")
        self._start(
            "podrunner",
            [
                sys.executable,
                str(HACK / "podrunner.py"),
                "--namespace",
                self.namespace,
                "--log-dir",
                str(self.logs / "pods"),
                "--grace-cap",
                "5",
            ],
            env,
        )

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.children.append(Child(name, argv, env, self.logs / f"{name}.log").start())
        self._record()

    def _record(self) -> None:
        _record_children(self.namespace, self.children, self.where if self.where.pods else None)

    def _fresh_namespace(self) -> None:
        """A namespace of our own; an earlier demo's leftovers in it are removed first (on
        the node: the whole namespace, with any pods a killed demo left). On the node it is
        labelled for the `restricted` Pod Security Standard, as the chart expects."""
        cluster = self._cluster()
        if self.where.pods:
            _delete_node_namespace(cluster, self.namespace)
        deadline = time.monotonic() + 120
        while cluster.namespace_phase(self.namespace) == "Terminating":
            if time.monotonic() > deadline:
                raise DemoError(f"namespace {self.namespace} is stuck terminating")
            time.sleep(1)
        if cluster.namespace_phase(self.namespace) is None:
            cluster.kubectl("create", "namespace", self.namespace)
            self.created_namespace = True
            if self.where.pods:
                cluster.kubectl(
                    "label", "namespace", self.namespace,
                    "pod-security.kubernetes.io/enforce=restricted",
                )  # fmt: skip
                self._record()
            return
        self._release_pipelines(wait=0)

    def _fresh_topics(self) -> None:
        """Delete this run's topics and groups if an earlier run left them, then create the
        source topic: every count the demo shows starts from zero."""
        from confluent_kafka.admin import NewTopic

        self._delete_kafka_leftovers()
        topic = self.topology.source_topic
        deadline = time.monotonic() + 60
        while True:
            futures = self.admin.create_topics(
                [NewTopic(topic, num_partitions=self.partitions, replication_factor=1)]
            )
            try:
                futures[topic].result(timeout=15)
                return
            except Exception as e:  # a deleted topic of the same name may still be going
                if time.monotonic() > deadline:
                    raise DemoError(f"cannot create topic {topic}: {e}") from None
                time.sleep(0.5)

    def _delete_kafka_leftovers(self) -> None:
        topics = list(self._stage_topics().values())
        existing = [t for t in topics if t in self.admin.list_topics(timeout=10).topics]
        if existing:
            for f in self.admin.delete_topics(existing, operation_timeout=30).values():
                with contextlib.suppress(Exception):
                    f.result(timeout=30)
        groups = list(self._stage_groups().values())
        for f in self.admin.delete_consumer_groups(groups, request_timeout=10).values():
            with contextlib.suppress(Exception):  # most do not exist: fine
                f.result(timeout=15)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not set(topics) & set(self.admin.list_topics(timeout=10).topics):
                return
            time.sleep(0.3)

    def _cluster(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    def _wait_ready(self) -> None:
        cluster = self._cluster()

        def ready() -> bool:
            rp = cluster.get(self.namespace, "retrypipelines", self.name)
            c = _condition(rp, "Ready")
            current = (rp or {}).get("status", {}).get("observedGeneration") == (rp or {}).get(
                "metadata", {}
            ).get("generation")
            return bool(current and c.get("status") == "True")

        self._wait(ready, 120, "the pipeline to become Ready (topics, tier workers)")
        table = cluster.kubectl("get", "retrypipelines", "-n", self.namespace).stdout.rstrip()
        self.step("$ kubectl get retrypipelines\n" + _indent(table))

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in self.children:
                if not child.running():
                    raise DemoError(f"{child.name} exited; its log {child.log}:\n{child.tail()}")
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.5)
        logs = "\n".join(f"  {c.name}: {c.log}\n{c.tail(8)}" for c in self.children)
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    # ------------------------------------------------------------------ traffic

    def _produce(self) -> None:
        from confluent_kafka import Producer

        producer = Producer(
            {"bootstrap.servers": localenv.kafka_bootstrap(), "enable.idempotence": True}
        )
        acked = threading.Lock()

        def delivered(err: Any, _msg: Any) -> None:
            if err is None:
                with acked:
                    self.produced += 1

        rate = float(self.args.rate)
        start = time.monotonic()
        for i, (key, order) in enumerate(order_events(self.args.events, self.args.seed)):
            if self.stop_producing.is_set():
                break
            if rate > 0:  # pace: the n-th event no earlier than start + n / rate
                delay = start + i / rate - time.monotonic()
                if delay > 0 and self.stop_producing.wait(delay):
                    break
            producer.produce(
                self.topology.source_topic,
                key=key.encode(),
                value=json.dumps(order).encode(),
                headers=[("content-type", b"application/json")],
                on_delivery=delivered,
            )
            producer.poll(0)
        producer.flush(30)

    def produce_and_watch(self) -> None:
        n = self.args.events
        self.step(
            f"producing {n} orders to {self.topology.source_topic} at {self.args.rate:g}/s: 10% "
            "carry a SAVE15% coupon (the service's bug → DLQ), 25% pay through a flaky bank "
            "(payments 500 → retried after each tier's delay)"
        )
        self.producer_thread = threading.Thread(target=self._produce, daemon=True)
        self.producer_thread.start()
        self.phase = "orders flowing"

        def settled(s: Snapshot) -> bool:
            """Every order produced is either charged or waiting in the DLQ, and the
            operator's DLQ depth says so too."""
            producing = self.producer_thread is not None and self.producer_thread.is_alive()
            busy = any(s.waiting.get(stage, 0) for stage in self._stage_topics() if stage != "dlq")
            dlq = s.waiting.get("dlq", 0)
            return (
                not producing
                and not busy
                and len(s.tally.handled) + dlq >= s.produced
                and s.status_depth == dlq
            )

        delays = sum(t.delay_seconds for t in self.topology.tiers)
        timeout = n / max(self.args.rate, 1) + 3 * delays + 60
        last = self.watch(settled, timeout)
        self.view.close()
        self.step(
            f"settled: {len(last.tally.handled)} orders charged, {last.waiting.get('dlq', 0)} "
            f"in the DLQ (RetryPipeline status.dlq.depth = {last.status_depth})"
        )

    def fix_and_replay(self) -> None:
        cluster = self._cluster()
        env = self.child_env()
        cli = str(BIN / "kafka-retry")
        listing = subprocess.run(
            [cli, "dlq", "list", self.name, "-n", self.namespace, "--limit", "5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.step(
            f"what is in the DLQ?\n  $ kafka-retry dlq list {self.name} -n {self.namespace} "
            f"--limit 5\n{_indent(listing.stdout.rstrip() or listing.stderr.rstrip())}"
        )
        self.flags_file.write_text(json.dumps({"couponPercentFix": True}))
        self.step(
            "fixing the bug: flag couponPercentFix=true in the service's flags file "
            "(the service re-reads it within a second; the tier workers call the service)"
        )
        time.sleep(2.5)  # longer than the service's flag refresh: no replayed order sees the bug
        command = [cli, "dlq", "replay", self.name, "-n", self.namespace, "--name", REPLAY_NAME]
        out = subprocess.run(
            [*command, "--no-wait"], env=env, capture_output=True, text=True, timeout=60
        )
        self.step(
            f"replaying the DLQ into {self.topology.tiers[0].name} (never the live topic)\n"
            f"  $ kafka-retry dlq replay {self.name} -n {self.namespace} --name {REPLAY_NAME}"
            f"\n{_indent((out.stdout + out.stderr).rstrip())}"
        )
        if out.returncode != 0:
            raise DemoError(f"kafka-retry dlq replay failed (exit {out.returncode})")
        self.phase = "replaying the DLQ"

        def replayed(s: Snapshot) -> bool:
            done = s.replay_phase in ("Succeeded", "Failed", "Cancelled")
            if s.replay_phase != "Succeeded":
                return done
            busy = any(s.waiting.get(stage, 0) for stage in self._stage_topics())
            return len(s.tally.handled) >= s.produced and not busy and s.status_depth == 0

        delays = sum(t.delay_seconds for t in self.topology.tiers)
        last = self.watch(replayed, 3 * delays + 90)
        self.view.close()
        rp = cluster.kubectl("get", "retrypipelines,dlqreplays", "-n", self.namespace)
        self.step(
            f"replay {last.replay_phase or 'unknown'}: DLQ depth "
            f"{last.status_depth}\n{_indent(rp.stdout.rstrip())}"
        )
        self.final = last

    # ------------------------------------------------------------------ watching

    def snapshot(self) -> Snapshot:
        from kafka_retry import depth
        from kafka_retry.offset_queries import committed, watermarks

        cluster = self._cluster()
        topics, groups = self._stage_topics(), self._stage_groups()
        tps = {stage: [(t, p) for p in range(self.partitions)] for stage, t in topics.items()}
        marks = watermarks(self.admin, [tp for v in tps.values() for tp in v], 5)
        offsets = committed(self.admin, {groups[s]: tps[s] for s in topics}, 5)
        arrived: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for stage, stage_tps in tps.items():
            done = offsets.get(groups[stage], {})
            arrived[stage] = sum(marks.get(tp, (0, 0))[1] for tp in stage_tps)
            waiting[stage] = sum(
                depth.waiting(*marks.get(tp, (0, 0)), done.get(tp)) for tp in stage_tps
            )
        assert self.payments is not None and self.feed is not None
        return Snapshot(
            elapsed=time.monotonic() - self.started,
            produced=self.produced,
            arrived=arrived,
            waiting=waiting,
            moves=self.feed.counts(),
            tally=Tally.of(self.payments.payments.charges()),
            pipeline=cluster.get(self.namespace, "retrypipelines", self.name),
            replay=cluster.get(self.namespace, "dlqreplays", REPLAY_NAME),
            payment_failures=self.payments.payments.failures,
        )

    def watch(self, done: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
        """Refresh the view about once a second until `done` or `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            tick = time.monotonic()
            for child in self.children:
                if not child.running():
                    raise DemoError(f"{child.name} exited; its log {child.log}:\n{child.tail()}")
            snap = self.snapshot()
            self._narrate(snap)
            self.view.frame(self._frame(snap), self._plain(snap))
            if done(snap):
                return snap
            if tick > deadline:
                self.view.close()
                self.step(f"gave up waiting after {timeout:.0f}s (logs: {self.logs})")
                return snap
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

    def _narrate(self, snap: Snapshot) -> None:
        """Recent forwards (from the feed) and charges after a failure (from the ledger);
        how long after its due time each tier charged its order."""
        assert self.feed is not None
        when = _clock(snap.elapsed)
        for m in self.feed.take():
            if m.origin == "replay":
                text = f"{m.order}  DLQ → {m.dest}   replayed ({m.replay_id})"
            else:
                where = f"{_label(m.origin)} → {_label(m.dest)}"
                if m.dest != "dlq":
                    where += f" (due in {self.topology.tier(m.dest).delay_seconds}s)"
                text = f"{m.order}  {where}  {m.error}"
            self.recent.append(f"{when}  {text}")
        failed_at = dict(self.feed.failed_at)
        for order, charge in snap.tally.handled.items():
            if charge.stage == "source" or order in self.narrated:
                continue
            self.narrated.add(order)
            if charge.replay_id:
                how = f"after the replay (attempt {charge.attempt})"
            else:
                since = failed_at.get(order)
                waited = f", {charge.at - since / 1000:.1f}s after it failed" if since else ""
                how = f"(attempt {charge.attempt}{waited})"
            self.recent.append(f"{when}  {order}  ✓ charged on {charge.stage} {how}")

    def _frame(self, s: Snapshot) -> list[str]:
        cluster = self._cluster()
        lines = [
            f"── kafka-retry demo · namespace {self.namespace} · {_clock(s.elapsed)} · "
            f"{self.phase}",
            "$ kubectl get retrypipelines",
        ]
        table = cluster.kubectl("get", "retrypipelines", "-n", self.namespace, check=False)
        lines += _indent(table.stdout.rstrip()).splitlines()
        if s.replay is not None:
            lines.append("$ kubectl get dlqreplays")
            out = cluster.kubectl("get", "dlqreplays", "-n", self.namespace, check=False)
            lines += _indent(out.stdout.rstrip()).splitlines()
        dests = [t.name for t in self.topology.tiers] + ["dlq"]
        handled = Counter(c.stage for c in s.tally.handled.values())
        head = f"  {'stage':<10}{'delay':>6}{'in':>6}{'charged':>9}{'waiting':>9}   "
        lines += ["", head + "  ".join(f"→ {_label(d):<7}" for d in dests)]
        rows = [("source", "-"), *((t.name, f"{t.delay_seconds}s") for t in self.topology.tiers)]
        for stage, delay in rows:
            moved = "  ".join(f"{s.moves.get((stage, d), 0):>9}" for d in dests)
            lines.append(
                f"  {_label(stage):<10}{delay:>6}{s.arrived.get(stage, 0):>6}"
                f"{handled.get(stage, 0):>9}{s.waiting.get(stage, 0):>9}   {moved}"
            )
        if any(origin == "replay" for origin, _ in s.moves):
            moved = "  ".join(f"{s.moves.get(('replay', d), 0):>9}" for d in dests)
            lines.append(f"  {'replay':<10}{'':>6}{'':>6}{'':>9}{'':>9}   {moved}")
        lines.append(
            f"  {'DLQ':<10}{'':>6}{s.arrived.get('dlq', 0):>6}{'':>9}"
            f"{s.waiting.get('dlq', 0):>9}   (waiting = DLQ depth)"
        )
        t = s.tally
        lines += [
            "",
            f"  orders produced {s.produced}/{self.args.events} · charged {len(t.handled)}: "
            f"{t.first_try} first try · {t.after_retry} after a retry · {t.replayed} after "
            "the replay",
            f"  payments answered 500 {s.payment_failures} times",
            "",
            "  recent:",
            *(f"  {line}" for line in list(self.recent)[-6:]),
        ]
        return lines

    def _plain(self, s: Snapshot) -> str:
        waiting = " ".join(f"{_label(k)}={v}" for k, v in s.waiting.items() if k != "dlq")
        return (
            f"[{_clock(s.elapsed)}] produced {s.produced}/{self.args.events} · charged "
            f"{len(s.tally.handled)} · waiting {waiting} · DLQ depth {s.waiting.get('dlq', 0)} "
            f"(status {s.status_depth}) · replay {s.replay_phase or '-'}"
        )

    # ------------------------------------------------------------------ the end

    def summarize(self) -> int:
        s = self.final
        assert s is not None
        t = s.tally
        produced_ids = {o["id"] for _, o in order_events(self.args.events, self.args.seed)}
        handled_ids = set(t.handled) & produced_ids
        lost = s.produced - len(handled_ids)
        replayed_by_replay = int(((s.replay or {}).get("status") or {}).get("replayed") or 0)
        # Measured at the end, when the feed has seen every forward (during the run it may lag
        # the ledger): each charge after a failure against the due time of its last forward.
        due = dict(self.feed.due) if self.feed is not None else {}
        lateness = sorted(
            charge.at * 1000 - due[order]
            for order, charge in t.handled.items()
            if charge.stage != "source" and order in due
        )
        # Charged before the due time; a few ms of slack for where the ledger reads its clock.
        early = sum(1 for ms in lateness if ms < -5)
        late: dict[str, int | None] = {"count": len(lateness), "early": early}
        timing = ""
        if lateness:
            p50, worst = lateness[len(lateness) // 2], lateness[-1]
            late.update(p50=round(p50), max=round(worst))
            timing = (
                f"  tier charges after due time  p50 {p50 / 1000:.2f}s · max {worst / 1000:.2f}s"
                f" · {early or 'none'} early\n"
            )
        by_tier = Counter(
            c.stage for c in t.handled.values() if c.stage != "source" and not c.replay_id
        )
        summary = {
            "demo": "summary",
            "namespace": self.namespace,
            "service": self.args.service,
            "events": s.produced,
            "handled_first_time": t.first_try,
            "handled_after_retry": t.after_retry,
            "handled_after_retry_by_tier": dict(sorted(by_tier.items())),
            "replayed": t.replayed,
            "handled": len(handled_ids),
            "lost": lost,
            "duplicates": t.duplicates,
            "dead_lettered": s.arrived.get("dlq", 0),
            "dlq_depth": s.status_depth,
            "replay": {
                "name": REPLAY_NAME,
                "phase": s.replay_phase,
                "replayed": replayed_by_replay,
            },
            "lateness_ms": late,
            "seconds": round(s.elapsed, 1),
            "ok": lost == 0 and s.status_depth == 0 and s.replay_phase == "Succeeded",
        }
        tiers = " · ".join(f"{k} {v}" for k, v in sorted(by_tier.items()))
        self.say(
            "\nsummary\n"
            f"  orders produced              {s.produced:>5}\n"
            f"  charged on the first try     {t.first_try:>5}   (live lane)\n"
            f"  charged after a retry        {t.after_retry:>5}   ({tiers or 'none'})\n"
            f"  dead-lettered                {s.arrived.get('dlq', 0):>5}   "
            f"(the SAVE15% bug; replayed {replayed_by_replay})\n"
            f"  charged after the replay     {t.replayed:>5}\n"
            f"  lost                         {lost:>5}   (produced - distinct orders charged)\n"
            f"  duplicate deliveries         {t.duplicates:>5}   (at-least-once; payments "
            "dedupes by order id)\n"
            f"  DLQ depth now                {s.status_depth!s:>5}\n"
            f"{timing}"
            f"  took {_clock(s.elapsed)}"
        )
        self.summary = summary
        if self.args.keep:
            self.hold()
        return 0 if summary["ok"] else 1

    def hold(self) -> None:
        ns = self.namespace
        self.say(
            "\neverything is still running; in another terminal:\n"
            '  eval "$(make -s env)"\n'
            f"  kubectl get retrypipelines,dlqreplays,deployments -n {ns}\n"
            f"  kafka-retry status {self.name} -n {ns}\n"
            f"  kafka-retry dlq list {self.name} -n {ns} --all\n"
            f"logs: {self.logs}\n"
            "Ctrl-C stops the demo."
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()

    def _release_pipelines(self, wait: float) -> None:
        """Delete the namespace's replays and pipelines; with the operator running (wait > 0)
        its finalizer deletes the pipeline's topics; a finalizer still there after `wait`
        (no operator) is removed so nothing hangs."""
        cluster = self._cluster()
        ns = self.namespace
        cluster.kubectl("delete", "dlqreplays", "--all", "-n", ns, "--wait=false", check=False)
        cluster.kubectl(
            "delete", "retrypipelines", "--all", "-n", ns, f"--timeout={max(wait, 1):.0f}s",
            check=False, timeout=wait + 30,
        )  # fmt: skip
        left = cluster.kubectl("get", "retrypipelines", "-n", ns, "-o", "name", check=False)
        for obj in left.stdout.split():
            cluster.kubectl(
                "patch", obj, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                check=False,
            )  # fmt: skip

    def _delete_namespace(self) -> None:
        self._cluster().kubectl("delete", "namespace", self.namespace, "--wait=false", check=False)

    def _uninstall_operator(self) -> None:
        subprocess.run(
            [str(localenv.HELM_BIN), "--kubeconfig", self.where.kubeconfig, "uninstall", RELEASE,
             "--namespace", self.namespace],
            capture_output=True, timeout=60,
        )  # fmt: skip

    def cleanup(self) -> None:
        """Stop and remove everything the demo started, in an order that loses nothing: the
        service drains first, the pipeline goes while the operator can still delete its
        topics, the operator last. A second Ctrl-C skips the waiting, never the stopping."""
        hurry = threading.Event()

        def hurry_up(_signum: int, _frame: object) -> None:
            hurry.set()

        signal.signal(signal.SIGINT, hurry_up)
        signal.signal(signal.SIGTERM, hurry_up)
        self.view.close()
        self.stop_producing.set()
        if self.feed is not None:
            self.feed.stop()
        steps: list[tuple[str, Callable[[], None]]] = []
        by_name = {c.name: c for c in self.children}
        if "order-service" in by_name:
            steps.append(("order service", lambda: by_name["order-service"].stop(20)))
        if self.cluster is not None and self.pipeline_applied:
            operator_up = self.operator_installed or (
                "operator" in by_name and by_name["operator"].running()
            )
            steps.append(
                (
                    "pipeline (its retry and DLQ topics go with it)",
                    lambda: self._release_pipelines(0 if hurry.is_set() or not operator_up else 30),
                )
            )
        for name in ("podrunner", "operator"):
            if name in by_name:
                steps.append((name, _stopper(by_name[name], hurry)))
        if self.operator_installed:
            steps.append((f"operator (helm uninstall {RELEASE})", self._uninstall_operator))
        if self.admin is not None:
            steps.append(("topics and consumer groups", self._delete_kafka_leftovers))
        if self.cluster is not None and self.created_namespace:
            steps.append((f"namespace {self.namespace}", self._delete_namespace))
        if self.payments is not None:
            steps.append(("payments upstream", self.payments.close))
        if steps:
            self.say(f"cleaning up: {', '.join(name for name, _ in steps)}")
        for name, fn in steps:
            try:
                fn()
            except Exception as e:  # go on: the rest must still be stopped
                self.say(f"  could not clean up {name}: {e}")
        _state_file(self.namespace).unlink(missing_ok=True)
        self.say(
            "done. The local Kafka and kube-apiserver keep running for the next `make demo` "
            "or `make test`; `make demo-down` stops them."
        )


# --------------------------------------------------------------------------- helpers


def _free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stopper(child: Child, hurry: threading.Event) -> Callable[[], None]:
    return lambda: child.stop(3 if hurry.is_set() else 15)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= int(r.status) < 300
    except OSError:
        return False


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line if line.strip() else "" for line in text.splitlines())


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C: the demo cleans up either way. SIGINT is set explicitly:
    a shell starts background jobs with it ignored, and then Python would ignore it too."""
    previous = signal.signal(signal.SIGTERM, _interrupt), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def name_prefix(text: str) -> str:
    """A prefix of topic and group names, joined with a dash unless it ends in a separator."""
    if text and not re.fullmatch(r"[a-zA-Z0-9._-]{1,100}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: letters, digits, '.', '_' and '-' only (it starts topic names)"
        )
    return text if not text or text[-1] in "-._" else f"{text}-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hack/demo.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults can also come from DEMO_EVENTS, DEMO_RATE, DEMO_DELAYS, DEMO_NAMESPACE, "
        "DEMO_PREFIX, DEMO_SERVICE and DEMO_NO_LIVE=1.",
    )
    parser.add_argument(
        "command", nargs="?", choices=["run", "down"], default="run",
        help="run the demo (default), or stop the processes of demos that did not clean up",
    )  # fmt: skip
    env = os.environ.get
    parser.add_argument(
        "--events", type=int, default=int(env("DEMO_EVENTS", "200")), help="orders to produce"
    )
    parser.add_argument(
        "--rate", type=float, default=float(env("DEMO_RATE", "10")),
        help="orders per second (0: as fast as possible)",
    )  # fmt: skip
    parser.add_argument(
        "--delays", default=env("DEMO_DELAYS", ""),
        help="tier delays in seconds, e.g. 1,2 (default: examples/demo-pipeline.yaml's 2,5)",
    )  # fmt: skip
    parser.add_argument(
        "--namespace", default=env("DEMO_NAMESPACE"),
        help=f"default: {DEFAULT_NAMESPACE}; with `down`: stop only this demo's processes",
    )  # fmt: skip
    parser.add_argument(
        "--prefix", type=name_prefix, default=env("DEMO_PREFIX", ""),
        help="prefix of the topic and consumer group names, for runs side by side: "
        "`--prefix run1` names them run1-orders, run1-order-service",
    )  # fmt: skip
    parser.add_argument(
        "--no-live", action="store_true",
        default=env("DEMO_NO_LIVE", "").lower() in ("1", "true", "yes"),
        help="no live view: progress lines, then the summary (also when not on a terminal)",
    )  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true",
        help="after the summary, keep everything running until Ctrl-C (to explore)",
    )  # fmt: skip
    parser.add_argument(
        "--service", choices=["python", "go"], default=env("DEMO_SERVICE", "python"),
        help="the order service: python (examples/order_service, the live-lane SDK) or go "
        "(examples/go_order_service, no SDK, behind the operator's managed live lane)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated orders")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    if args.command == "down":
        stopped = stop_recorded(args.namespace)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no demo processes running")
        return 0
    args.namespace = args.namespace or DEFAULT_NAMESPACE
    demo = Demo(args)
    code = 1
    with _signals():
        try:
            code = demo.run()
        except KeyboardInterrupt:
            demo.view.close()
            demo.say("\ninterrupted: stopping what the demo started (Ctrl-C again to hurry)")
            demo.summary["error"] = "interrupted"
            code = 130
        except DemoError as e:
            demo.view.close()
            demo.say(f"\ndemo failed: {e}")
            demo.summary["error"] = str(e).splitlines()[0]
        finally:
            demo.cleanup()
    print(json.dumps(demo.summary), flush=True)  # the last line, for machines
    return code


if __name__ == "__main__":
    sys.exit(main())
