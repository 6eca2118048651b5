"""The chart, the operator and the tier workers as real pods on the local node (hack/node.py):
the image built from the Dockerfile, run by a kubelet under the `restricted` Pod Security
Standard, with the operator's ServiceAccount token, probes, limits and pod networking real.

The tests of this module share one installed chart and follow one another (a pipeline made
Ready, events through it, pods killed, a worker out of memory and shown in status, `helm
test`, two workers spread and evicted one at a time under their budget, the pipeline
deleted)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import node
from conftest import ROOT, make_restricted_namespace
from dataplane_support import Running, produce_ids
from operator_support import condition, wait_for

pytestmark = pytest.mark.e2e

CHART = ROOT / "charts" / "kafka-retry-operator"
BIN = Path(sys.executable).parent  # the venv's console scripts: kafka-retry
RELEASE = "kro"
# The chart's spread of tier workers over nodes; with one node every pod fits (skew 0).
SPREAD = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
           "whenUnsatisfiable": "DoNotSchedule"}]  # fmt: skip
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


# --------------------------------------------------------------------------- the service


@dataclass
class Call:
    id: str
    at: float
    headers: dict[str, str]
    status: int


@dataclass
class Service:
    """The service's HTTP endpoint on the bridge's gateway address, where worker pods reach
    the host. Events whose id is in `reject` get 422 (non-retriable: to the DLQ), those in
    `fail` 503 (retriable: to the next tier)."""

    url: str = ""
    reject: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handled(self, event_id: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.id == event_id and c.status == 200]

    def ids(self) -> set[str]:
        with self.lock:
            return {c.id for c in self.calls if c.status == 200}


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    state = Service()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            event_id = json.loads(body)["id"]
            status = 422 if event_id in state.reject else 503 if event_id in state.fail else 200
            with state.lock:
                state.calls.append(Call(event_id, time.time(), dict(self.headers), status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((node.GATEWAY, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://{node.GATEWAY}:{server.server_address[1]}/events"
    yield state
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- the chart


@dataclass(frozen=True)
class Installed:
    namespace: str  # the operator's
    pipelines: str  # the namespace it watches
    kubeconfig: str


@pytest.fixture(scope="module")
def installed(
    node_kubectl: Kubectl, node_kubeconfig: str, image: str, localenv_up: dict[str, str]
) -> Iterator[Installed]:
    """`helm install --wait` of charts/ into a `restricted` namespace, watching another."""
    suffix = os.urandom(4).hex()
    operator_ns, pipelines_ns = f"kro-system-{suffix}", f"shop-{suffix}"
    for ns in (operator_ns, pipelines_ns):
        make_restricted_namespace(node_kubectl, ns)
    # The node is shared: CRDs of this checkout replace any older ones (helm never updates).
    node_kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    repository, _, tag = image.rpartition(":")
    helm = [localenv_up["KRO_HELM"], "--kubeconfig", node_kubeconfig]
    install = subprocess.run(
        [
            *helm, "install", RELEASE, str(CHART), "--namespace", operator_ns, "--wait",
            "--timeout", "180s",
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never",
            "--set", "rbac.scope=namespaces", "--set", f"watchNamespaces={{{pipelines_ns}}}",
            "--set", "operator.statusIntervalSeconds=2",
            "--set-json", f"workers.topologySpreadConstraints={json.dumps(SPREAD)}",
        ],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if install.returncode != 0:
        pods = node_kubectl("describe", "pods", "-n", operator_ns, check=False).stdout
        pytest.fail(f"helm install failed: {install.stderr}\n{pods[-4000:]}", pytrace=False)
    yield Installed(operator_ns, pipelines_ns, node_kubeconfig)
    subprocess.run([*helm, "uninstall", RELEASE, "--namespace", operator_ns], capture_output=True)
    for ns in (pipelines_ns, operator_ns):
        node_kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _pods(kubectl: Kubectl, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def _ready(pod: dict[str, Any]) -> dict[str, Any]:
    return condition(pod, "Ready")


def _exec(kubectl: Kubectl, namespace: str, pod: str, code: str) -> str:
    return kubectl("exec", "-n", namespace, pod, "--", "python", "-c", code).stdout.strip()


def test_chart_runs_the_operator_as_a_restricted_pod_with_its_token(
    installed: Installed, node_kubectl: Kubectl
) -> None:
    pods = _pods(node_kubectl, installed.namespace, "app.kubernetes.io/instance=" + RELEASE)
    assert pods
    for pod in pods:
        assert pod["status"]["phase"] == "Running" and _ready(pod)["status"] == "True"
        assert pod["spec"]["serviceAccountName"] == "kro-kafka-retry-operator"
    name = pods[0]["metadata"]["name"]
    facts = json.loads(
        _exec(
            node_kubectl,
            installed.namespace,
            name,
            "import json, os; d = '/var/run/secrets/kubernetes.io/serviceaccount/'; "
            "print(json.dumps({'uid': os.getuid(), 'ns': open(d + 'namespace').read(), "
            "'token': len(open(d + 'token').read()), "
            "'host': os.environ['KUBERNETES_SERVICE_HOST']}))",
        )
    )
    assert facts["uid"] == 65532
    assert facts["ns"] == installed.namespace and facts["token"] > 100
    assert facts["host"] == node.KUBERNETES_SERVICE_IP  # the API server through kube-proxy
    # The operator talks to the API server with that token: it watches, and writes events.
    log = node_kubectl("logs", "-n", installed.namespace, name).stdout
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------- one pipeline


def _pipeline_doc(name: str, bootstrap: str, source: str, group: str, url: str) -> dict[str, Any]:
    return {
        "apiVersion": "kafkaretry.io/v1alpha1",
        "kind": "RetryPipeline",
        "metadata": {"name": name},
        "spec": {
            "kafka": {"bootstrapServers": bootstrap},
            "source": {"topic": source, "consumerGroup": group},
            "tiers": [{"name": "retry-1", "delaySeconds": 3}],
            "topics": {"partitions": 1, "deletionPolicy": "Delete"},
            "dlq": {"retentionHours": 24},
            "handler": {"http": {"url": url, "timeoutSeconds": 5}},
            "workers": {"replicas": 1},
        },
    }


@dataclass
class Pipeline:
    name: str
    namespace: str
    source: str
    group: str
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def pipeline(
    installed: Installed,
    node_kubectl: Kubectl,
    pod_kafka_bootstrap: str,
    kafka_admin: Any,
    service: Service,
) -> Iterator[Pipeline]:
    from confluent_kafka.admin import NewTopic

    suffix = os.urandom(4).hex()
    source, group = f"orders-{suffix}", f"shipping-{suffix}"
    kafka_admin.create_topics([NewTopic(source, 1, 1)])[source].result(timeout=30)
    doc = _pipeline_doc("orders", pod_kafka_bootstrap, source, group, service.url)
    p = Pipeline("orders", installed.pipelines, source, group, doc)
    _apply(node_kubectl, p.namespace, doc)
    yield p
    node_kubectl("delete", "rp", p.name, "-n", p.namespace, "--wait=false", check=False)
    with contextlib.suppress(Exception):
        kafka_admin.delete_topics([source])[source].result(timeout=30)


def _apply(kubectl: Kubectl, namespace: str, doc: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


def _rp(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    proc = kubectl("get", "rp", name, "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}


def _wait_ready(kubectl: Kubectl, p: Pipeline, status: str = "True", timeout: float = 180) -> Any:
    def check() -> Any:
        rp = _rp(kubectl, p.namespace, p.name)
        current = (rp.get("status") or {}).get("observedGeneration") == rp.get("metadata", {}).get(
            "generation"
        )
        return current and condition(rp, "Ready").get("status") == status and rp

    return wait_for(check, timeout, f"{p.name} Ready={status}", every=1)


def _workers(kubectl: Kubectl, p: Pipeline) -> list[dict[str, Any]]:
    return _pods(kubectl, p.namespace, f"kafkaretry.io/pipeline={p.name}")


def test_tier_workers_are_pods_whose_readiness_gates_ready(
    pipeline: Pipeline, node_kubectl: Kubectl
) -> None:
    rp = _wait_ready(node_kubectl, pipeline)
    (pod,) = _workers(node_kubectl, pipeline)
    assert pod["status"]["phase"] == "Running"
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The kubelet's readiness came first; the pipeline's Ready followed it.
    pod_ready = _ready(pod)["lastTransitionTime"]
    assert pod_ready <= condition(rp, "WorkersReady")["lastTransitionTime"], (pod, rp)
    assert rp["status"]["tiers"][0]["readyReplicas"] == 1


def _consume_failing(kubeconfig: str, p: Pipeline, failed_at: dict[str, float]) -> Any:
    """The service's live lane on the host: every event fails retriably (to retry-1)."""
    from kubernetes import config

    from kafka_retry.sdk import RetryingConsumer

    def fail(event: Any) -> None:
        failed_at[json.loads(event.value or b"{}")["id"]] = time.time()
        raise TimeoutError("upstream timed out")

    kube_config: Any = config  # untyped upstream
    return RetryingConsumer.from_configmap(
        f"{p.namespace}/{p.name}",
        fail,
        api_client=kube_config.new_client_from_config(config_file=kubeconfig),
    )


def test_failed_event_is_handled_by_a_worker_pod_after_its_delay_and_the_dlq_replays(
    pipeline: Pipeline,
    node_kubectl: Kubectl,
    node_kubeconfig: str,
    pod_kafka_bootstrap: str,
    service: Service,
) -> None:
    _wait_ready(node_kubectl, pipeline)
    service.reject.add("bad-1")
    failed_at: dict[str, float] = {}
    with Running(_consume_failing(node_kubeconfig, pipeline, failed_at)):
        produce_ids(pod_kafka_bootstrap, pipeline.source, ["ok-1", "bad-1"])
        wait_for(lambda: service.handled("ok-1"), 90, "ok-1 handled by the retry-1 pod")
        wait_for(lambda: (_rp(node_kubectl, pipeline.namespace, pipeline.name)["status"]
                          .get("dlq") or {}).get("depth") == 1, 60, "bad-1 in the DLQ")  # fmt: skip
    (call,) = service.handled("ok-1")
    assert call.at - failed_at["ok-1"] >= 3 - 0.05, "never before the tier's delay"

    # The service is fixed; the DLQ is replayed (by the operator pod) through the worker pod.
    service.reject.clear()
    replay = subprocess.run(
        [str(BIN / "kafka-retry"), "dlq", "replay", pipeline.name, "-n", pipeline.namespace,
         "--kubeconfig", node_kubeconfig],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    assert "1 replayed" in replay.stdout, replay.stdout
    wait_for(lambda: service.handled("bad-1"), 90, "bad-1 handled after the replay")
    wait_for(lambda: (_rp(node_kubectl, pipeline.namespace, pipeline.name)["status"]
                      .get("dlq") or {}).get("depth") == 0, 60, "DLQ back to 0")  # fmt: skip


def test_kubectl_logs_and_describe_of_a_worker_are_useful(
    pipeline: Pipeline, node_kubectl: Kubectl
) -> None:
    deployment = f"deployment/{pipeline.name}-retry-1"
    logs = node_kubectl("logs", "-n", pipeline.namespace, deployment).stdout
    assert "retry-1" in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
    (pod,) = _workers(node_kubectl, pipeline)
    described = node_kubectl(
        "describe", "pod", "-n", pipeline.namespace, pod["metadata"]["name"]
    ).stdout
    for expected in ("Readiness:", "/readyz", "Liveness:", "Limits:", "memory:", "Started"):
        assert expected in described, f"{expected!r} not in:\n{described}"
    assert f"Node:             {node.NODE_NAME}/{node.GATEWAY}" in described


def _container_pid(pod: dict[str, Any]) -> int:
    """The host pid of the pod's container, from containerd."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    out = subprocess.run([*node.ctr(), "tasks", "ls"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = line.split()
        if words and words[0] == cid:
            return int(words[1])
    raise AssertionError(f"container {cid} not among containerd's tasks:\n{out}")


def test_killing_worker_pods_loses_nothing(
    pipeline: Pipeline,
    node_kubectl: Kubectl,
    node_kubeconfig: str,
    pod_kafka_bootstrap: str,
    service: Service,
) -> None:
    _wait_ready(node_kubectl, pipeline)
    ids = [f"kill-{i}" for i in range(40)]
    failed_at: dict[str, float] = {}
    with Running(_consume_failing(node_kubeconfig, pipeline, failed_at)):
        produce_ids(pod_kafka_bootstrap, pipeline.source, ids[:20])
        wait_for(lambda: len(failed_at) >= 20, 60, "20 events failed on the live lane")
        # While they wait out their delay: the pod force-deleted...
        (pod,) = _workers(node_kubectl, pipeline)
        node_kubectl(
            "delete", "pod", pod["metadata"]["name"], "-n", pipeline.namespace,
            "--grace-period=0", "--force",
        )  # fmt: skip
        produce_ids(pod_kafka_bootstrap, pipeline.source, ids[20:])

        # ...and its replacement's container SIGKILLed as soon as it runs.
        def replacement() -> Any:
            pods = [
                p
                for p in _workers(node_kubectl, pipeline)
                if p["metadata"]["name"] != pod["metadata"]["name"]
                and (p["status"].get("containerStatuses") or [{}])[0]
                .get("state", {})
                .get("running")
            ]
            return pods[0] if pods else None

        second = wait_for(replacement, 90, "a replacement worker pod running")
        os.kill(_container_pid(second), 9)
        wait_for(lambda: set(ids) <= service.ids(), 180, "all 40 events handled")
    restarted = wait_for(
        lambda: [p for p in _workers(node_kubectl, pipeline)
                 if p["status"]["containerStatuses"][0]["restartCount"] >= 1],
        60, "the SIGKILLed container restarted by the kubelet",
    )  # fmt: skip
    assert restarted
    _wait_ready(node_kubectl, pipeline)


def _tag(kafka_admin: Any, group: str, topic: str) -> str | None:
    """The topology hash on `group`'s committed offset of `topic`'s partition 0."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    from kafka_retry.topology_tag import tag_of

    asked = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])]
    (tp,) = (
        kafka_admin.list_consumer_group_offsets(asked)[group].result(timeout=10).topic_partitions
    )
    return tag_of(tp.metadata)


def test_a_tier_worker_pod_follows_a_spec_change_without_a_restart(
    pipeline: Pipeline,
    node_kubectl: Kubectl,
    node_kubeconfig: str,
    pod_kafka_bootstrap: str,
    kafka_admin: Any,
    service: Service,
) -> None:
    """A tier added after retry-1: the retry-1 pod (same UID, no restart) reads the new
    topology from its ConfigMap volume once the kubelet rewrites it, says so in its group's
    committed offsets (what a drain waits for), and forwards an event that fails on retry-1 to
    the new tier instead of the DLQ. The tier removed again: its drain ends only after the
    pod followed that change too."""
    from kafka_retry.http_handler import TIER
    from kafka_retry.model import Topology
    from kafka_retry.topology_tag import topology_hash

    _wait_ready(node_kubectl, pipeline)
    selector = f"kafkaretry.io/pipeline={pipeline.name},kafkaretry.io/tier=retry-1"
    (before,) = _pods(node_kubectl, pipeline.namespace, selector)
    doc = json.loads(json.dumps(pipeline.doc))
    doc["spec"]["tiers"] = [
        {"name": "retry-1", "delaySeconds": 3},
        {"name": "retry-2", "delaySeconds": 1},
    ]
    _apply(node_kubectl, pipeline.namespace, doc)
    changed = time.time()
    _wait_ready(node_kubectl, pipeline)
    cm = json.loads(node_kubectl("get", "configmap", f"{pipeline.name}-topology", "-n",
                                 pipeline.namespace, "-o", "json").stdout)  # fmt: skip
    published = Topology.from_json(cm["data"]["topology.json"])
    retry_1 = published.tier("retry-1")
    # The kubelet rewrites the volume in its own time (a minute or two), the worker re-reads
    # it every 10 s and then tags its partition with the new hash.
    wait_for(
        lambda: (
            _tag(kafka_admin, retry_1.consumer_group, retry_1.topic) == topology_hash(published)
        ),
        240,
        "the retry-1 pod on the new topology",
        every=2,
    )
    print(f"the retry-1 pod followed {time.time() - changed:.0f} s after the change")
    service.fail.add("follow-1")
    failed_at: dict[str, float] = {}
    with Running(_consume_failing(node_kubeconfig, pipeline, failed_at)):
        produce_ids(pod_kafka_bootstrap, pipeline.source, ["follow-1"])

        def tiers() -> list[str]:
            with service.lock:
                calls = [c for c in service.calls if c.id == "follow-1"]
            return [
                {k.lower(): v for k, v in c.headers.items()}.get(TIER.lower(), "") for c in calls
            ]

        wait_for(
            lambda: tiers() == ["retry-1", "retry-2"], 90, "follow-1 tried on retry-2", every=1
        )
    service.fail.discard("follow-1")
    (after,) = _pods(node_kubectl, pipeline.namespace, selector)
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "the worker pod was replaced"
    assert [s["restartCount"] for s in after["status"]["containerStatuses"]] == [
        s["restartCount"] for s in before["status"]["containerStatuses"]
    ], "the worker restarted"

    # retry-2 removed again: its topic drains, and the drain ends only once the retry-1 pod
    # (whose next hop changes back to the DLQ) has followed, as its group's offsets say.
    _apply(node_kubectl, pipeline.namespace, pipeline.doc)
    wait_for(
        lambda: _rp(node_kubectl, pipeline.namespace, pipeline.name)["status"].get("draining"),
        60,
        "retry-2 draining",
        every=1,
    )
    wait_for(
        lambda: not _rp(node_kubectl, pipeline.namespace, pipeline.name)["status"].get("draining"),
        300,
        "the drain ended",
        every=1,
    )
    cm = json.loads(node_kubectl("get", "configmap", f"{pipeline.name}-topology", "-n",
                                 pipeline.namespace, "-o", "json").stdout)  # fmt: skip
    current = topology_hash(Topology.from_json(cm["data"]["topology.json"]))
    assert current != topology_hash(published)
    assert _tag(kafka_admin, retry_1.consumer_group, retry_1.topic) == current, (
        "the drain ended before the retry-1 pod followed"
    )
    (still,) = _pods(node_kubectl, pipeline.namespace, selector)
    assert still["metadata"]["uid"] == before["metadata"]["uid"]


def test_worker_over_its_memory_limit_is_oomkilled_restarted_and_shown(
    pipeline: Pipeline, node_kubectl: Kubectl, kafka_admin: Any, service: Service
) -> None:
    """Another pipeline, whose worker cannot start within 24 MiB: the kernel kills it, the
    kubelet restarts it, and the pipeline says its workers are not ready, until the limit is
    raised. (A limit lowered on a running pipeline would only stall the rollout: the old pod
    stays ready.)"""
    from confluent_kafka.admin import NewTopic

    source = f"{pipeline.source}-hungry"
    kafka_admin.create_topics([NewTopic(source, 1, 1)])[source].result(timeout=30)
    doc = _pipeline_doc("hungry", pipeline.doc["spec"]["kafka"]["bootstrapServers"], source,
                        f"{pipeline.group}-hungry", service.url)  # fmt: skip
    doc["spec"]["workers"]["resources"] = {"limits": {"memory": "24Mi"}}
    hungry = Pipeline("hungry", pipeline.namespace, source, f"{pipeline.group}-hungry", doc)
    _apply(node_kubectl, hungry.namespace, doc)
    try:

        def oomkilled() -> Any:
            for p in _workers(node_kubectl, hungry):
                for s in p["status"].get("containerStatuses") or []:
                    last = (s.get("lastState") or {}).get("terminated") or {}
                    if last.get("reason") == "OOMKilled" and s["restartCount"] >= 1:
                        return s
            return None

        status = wait_for(oomkilled, 120, "a tier worker OOMKilled and restarted", every=1)
        assert status["lastState"]["terminated"]["exitCode"] == 137
        rp = _wait_ready(node_kubectl, hungry, status="False", timeout=60)
        workers = condition(rp, "WorkersReady")
        assert workers["status"] == "False", workers
        assert "retry-1: 0/1 ready" in workers["message"], workers

        # ...and why: the kubelet's last termination reason of the worker's container, at the
        # next status refresh (every 2 s here) after the kubelet reported it.
        def named() -> Any:
            rp = _rp(node_kubectl, hungry.namespace, hungry.name)
            message = condition(rp, "WorkersReady").get("message", "")
            return "last terminated OOMKilled (exit 137)" in message and rp

        rp = wait_for(named, 30, "WorkersReady to name the OOMKilled worker", every=1)
        workers = condition(rp, "WorkersReady")
        assert workers["status"] == "False", workers
        assert workers["reason"] == "WorkersNotReady", "the alert on not-ready workers keys on it"
        assert condition(rp, "Ready")["status"] == "False"
        assert rp["status"]["tiers"][0]["readyReplicas"] == 0

        del doc["spec"]["workers"]["resources"]  # the default limit: Ready
        _apply(node_kubectl, hungry.namespace, doc)
        _wait_ready(node_kubectl, hungry)
    finally:
        node_kubectl("delete", "rp", hungry.name, "-n", hungry.namespace, "--wait=false")
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics([source])[source].result(timeout=30)


def test_helm_test_runs_its_check_pod_on_the_node(
    installed: Installed, node_kubectl: Kubectl, localenv_up: dict[str, str]
) -> None:
    """`helm test`: the hook pod runs (restricted, its own ServiceAccount) and passes."""
    test = subprocess.run(
        [localenv_up["KRO_HELM"], "--kubeconfig", installed.kubeconfig, "test", RELEASE,
         "--namespace", installed.namespace, "--timeout", "180s", "--logs"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert test.returncode == 0, test.stdout + test.stderr
    assert "Phase:          Succeeded" in test.stdout, test.stdout
    hooks = _pods(node_kubectl, installed.namespace, "app.kubernetes.io/component=test")
    assert [p["status"]["phase"] for p in hooks] == ["Succeeded"], hooks


def _evict(kubectl: Kubectl, namespace: str, pod: str) -> subprocess.CompletedProcess[str]:
    """The eviction API, as `kubectl drain` calls it."""
    body = {"apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": pod, "namespace": namespace}}  # fmt: skip
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction"
    return kubectl("create", "--raw", path, "-f", "-", input=json.dumps(body), check=False)


def test_two_workers_are_spread_and_evicted_one_at_a_time(
    pipeline: Pipeline, node_kubectl: Kubectl, kafka_admin: Any, service: Service
) -> None:
    """A tier of two workers: the chart's topology spread reaches the pods the scheduler
    placed, and its PodDisruptionBudget lets a drain evict one worker, refusing the second
    until the first's replacement is ready."""
    from confluent_kafka.admin import NewTopic

    source = f"{pipeline.source}-pair"
    kafka_admin.create_topics([NewTopic(source, 2, 1)])[source].result(timeout=30)
    doc = _pipeline_doc("pair", pipeline.doc["spec"]["kafka"]["bootstrapServers"], source,
                        f"{pipeline.group}-pair", service.url)  # fmt: skip
    doc["spec"]["workers"]["replicas"] = 2
    pair = Pipeline("pair", pipeline.namespace, source, f"{pipeline.group}-pair", doc)
    _apply(node_kubectl, pair.namespace, doc)
    try:
        _wait_ready(node_kubectl, pair)
        pods = _workers(node_kubectl, pair)
        assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Running"}
        for pod in pods:
            (constraint,) = pod["spec"]["topologySpreadConstraints"]
            assert constraint["topologyKey"] == "kubernetes.io/hostname", constraint
            assert constraint["whenUnsatisfiable"] == "DoNotSchedule", constraint
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= pod["metadata"]["labels"].items(), (selector, pod)
            assert selector["kafkaretry.io/tier"] == "retry-1"
            assert pod["spec"]["nodeName"] == node.NODE_NAME

        def budget() -> Any:
            out = node_kubectl("get", "pdb", "pair-retry-1", "-n", pair.namespace, "-o", "json")
            status = json.loads(out.stdout).get("status") or {}
            return status.get("currentHealthy") == 2 and status.get("disruptionsAllowed") == 1

        wait_for(budget, 60, "the tier's budget to allow one disruption", every=1)
        first, second = (p["metadata"]["name"] for p in pods)
        evicted = _evict(node_kubectl, pair.namespace, first)
        assert evicted.returncode == 0, evicted.stderr
        refused = _evict(node_kubectl, pair.namespace, second)
        assert refused.returncode != 0, "a second worker evicted while the first is away"
        assert "disruption budget" in refused.stderr, refused.stderr

        def replaced() -> Any:
            names = {p["metadata"]["name"] for p in _workers(node_kubectl, pair)
                     if _ready(p).get("status") == "True"}  # fmt: skip
            return first not in names and len(names) == 2

        wait_for(replaced, 120, "the evicted worker replaced and ready", every=1)
        wait_for(budget, 60, "the budget to allow one disruption again", every=1)
        again = _evict(node_kubectl, pair.namespace, second)
        assert again.returncode == 0, again.stderr
    finally:
        node_kubectl("delete", "rp", pair.name, "-n", pair.namespace, "--wait=false")
        with contextlib.suppress(Exception):
            kafka_admin.delete_topics([source])[source].result(timeout=30)


def test_deleting_the_pipeline_removes_its_pods(pipeline: Pipeline, node_kubectl: Kubectl) -> None:
    assert _workers(node_kubectl, pipeline)
    node_kubectl("delete", "rp", pipeline.name, "-n", pipeline.namespace, "--timeout=120s")
    wait_for(lambda: not _workers(node_kubectl, pipeline), 90, "the worker pods gone")
