"""The operator end to end: a real kube-apiserver, the real Kafka broker, the operator as a
subprocess (`kafka-retry-operator -n <test namespace>`), and its tier-worker Deployments run by
hack/podrunner.py as real `kafka-retry worker` processes."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dataplane_support import Running, produce_ids
from kafka_retry import depth
from kafka_retry.model import Topology
from operator_support import (
    Kubectl,
    OperatorProcess,
    apply,
    cleanup_topics,
    condition,
    get,
    operator,
    pipeline,
    podrunner,
    shown,
    topic_partitions,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _topics(group: str, source: str, tiers: list[str]) -> list[str]:
    return [f"{group}.{source}.{t}" for t in tiers] + [f"{group}.{source}.dlq"]


def _deployments(kubectl: Kubectl, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    out = kubectl(
        "get", "deployments", "-n", namespace, "-l", f"kafkaretry.io/pipeline={name}", "-o", "json"
    ).stdout
    items = json.loads(out)["items"]
    return {t: d for d in items if (t := d["metadata"]["labels"].get("kafkaretry.io/tier"))}


def _depth(kubectl: Kubectl, namespace: str) -> int | None:
    rp = get(kubectl, namespace, "rp", "billing") or {}
    return (rp.get("status", {}).get("dlq") or {}).get("depth")


def _owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == owner["metadata"]["uid"] and r.get("controller") for r in refs)


def test_example_pipeline_becomes_ready(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    doc = pipeline("orders", kafka_bootstrap, source, group, topics={"partitions": 2})
    names = _topics(group, source, ["retry-1", "retry-2"])
    cleanup_topics.extend(names)
    apply(kubectl, namespace, doc)

    rp = wait_condition(kubectl, namespace, "orders", timeout=90)
    assert topic_partitions(kafka_admin, names) == dict.fromkeys(names, 2)
    assert topic_partitions(kafka_admin, [source]) == {source: 1}, "the source is never touched"

    status = rp["status"]
    assert status["observedGeneration"] == rp["metadata"]["generation"]
    assert status["topics"] == {"source": source, "tiers": names[:2], "dlq": names[2]}
    assert [t["name"] for t in status["tiers"]] == ["retry-1", "retry-2"]
    assert all(t["readyReplicas"] == 1 for t in status["tiers"])
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "Ready": "True",
        "TopicsReady": "True",
        "WorkersReady": "True",
        "Draining": "False",
    }
    status = wait_for(
        lambda: (get(kubectl, namespace, "rp", "orders") or {}).get("status", {}).get("dlq"),
        30,
        "DLQ depth measured",
    )
    assert status["depth"] == 0

    cm = get(kubectl, namespace, "configmap", "orders-topology")
    assert cm is not None and _owned_by(cm, rp)
    topology = Topology.from_json(cm["data"]["topology.json"])
    assert [t.topic for t in topology.tiers] == names[:2]
    deployments = _deployments(kubectl, namespace, "orders")
    assert sorted(deployments) == ["retry-1", "retry-2"]
    for tier, d in deployments.items():
        assert d["metadata"]["name"] == f"orders-{tier}"
        assert _owned_by(d, rp)
        assert d["status"]["readyReplicas"] == 1  # written by the podrunner

    table = kubectl("get", "retrypipelines", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "SOURCE", "TIERS", "DLQ", "READY", "AGE"]
    assert table[1].split()[:5] == ["orders", source, "2", "0", "True"]
    short = kubectl("get", "rp", "-n", namespace, "-o", "name").stdout.strip()
    assert short == "retrypipeline.kafkaretry.io/orders"


class _Rejecting(BaseHTTPRequestHandler):
    """The service's endpoint, answering 422: a non-retriable failure for every event."""

    calls = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            type(self).calls += 1
        self.send_response(422)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def rejecting_service() -> Iterator[tuple[str, type[_Rejecting]]]:
    handler = type("Rejecting", (_Rejecting,), {"calls": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/events", handler
    server.shutdown()
    server.server_close()


def test_dlq_depth_counts_events_that_failed_non_retriably(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    k8s_api: Any,
    cleanup_topics: list[str],
    rejecting_service: tuple[str, type[_Rejecting]],
) -> None:
    """Live lane (SDK) fails retriably -> retry-1's worker (real process, run by the
    podrunner) POSTs to the service, which answers 422 -> DLQ; status.dlq.depth counts them."""
    url, service = rejecting_service
    source = make_topic("orders")
    group = f"svc-{unique}"
    cleanup_topics.extend(_topics(group, source, ["retry-1"]))
    doc = pipeline(
        "billing",
        kafka_bootstrap,
        source,
        group,
        tiers=[{"name": "retry-1", "delaySeconds": 1}],
        handler={"http": {"url": url, "timeoutSeconds": 2}},
    )
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "billing", timeout=90)

    from kafka_retry.sdk import RetryingConsumer

    def fail(event: Any) -> None:
        raise TimeoutError("upstream timed out")  # retriable: goes to retry-1

    consumer = RetryingConsumer.from_configmap(
        f"{namespace}/billing",
        fail,
        api_client=k8s_api,
    )
    with Running(consumer):
        produce_ids(kafka_bootstrap, source, [f"order-{i}" for i in range(5)])

        def depth_is_5() -> Any:
            rp = get(kubectl, namespace, "rp", "billing") or {}
            return (rp.get("status", {}).get("dlq") or {}).get("depth") == 5 and rp

        rp = wait_for(depth_is_5, 90, "status.dlq.depth == 5")
    assert service.calls == 5
    assert rp["status"]["dlq"]["oldestTimestamp"].endswith("Z")
    row = kubectl("get", "rp", "billing", "-n", namespace, "--no-headers").stdout.split()
    assert row[3] == "5", row
    # Three more dead letters: the DLQ grows, but it was not empty, so no second Warning.
    dlq = f"{group}.{source}.dlq"
    produce_ids(kafka_bootstrap, dlq, [f"late-{i}" for i in range(3)])
    wait_for(lambda: _depth(kubectl, namespace) == 8, 30, "status.dlq.depth == 8")

    # Replaying or purging advances the DLQ cursor: the depth counts what still waits.
    depth.advance_cursor(kafka_admin, dlq, {0: 2})
    assert depth.measure_dlq(kafka_admin, [dlq])[dlq].total == 6
    wait_for(lambda: _depth(kubectl, namespace) == 6, 30, "depth 6 after the cursor moved")
    depth.advance_cursor(kafka_admin, dlq, {0: 8})
    wait_for(lambda: _depth(kubectl, namespace) == 0, 30, "depth 0 once all were dealt with")

    # Events mark transitions, from the operator's own name: topics created, workers ready,
    # the DLQ filling (once, however many status passes saw it grow) and emptied.
    def events() -> list[dict[str, Any]]:
        found = kubectl("get", "events", "-n", namespace, "--field-selector",
                        "involvedObject.name=billing,involvedObject.kind=RetryPipeline",
                        "-o", "json").stdout  # fmt: skip
        return list(json.loads(found)["items"])

    wait_for(lambda: "DLQEmptied" in {e["reason"] for e in events()}, 30, "a DLQEmptied Event")
    posted = events()
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for e in posted:
        by_reason.setdefault(e["reason"], []).append(e)
        assert e["source"]["component"] == "kafka-retry-operator", e
    assert [e["type"] for e in by_reason["DLQGrew"]] == ["Warning"], by_reason["DLQGrew"]
    assert "now wait in the DLQ" in by_reason["DLQGrew"][0]["message"]
    assert len(by_reason["DLQEmptied"]) == 1 and by_reason["DLQEmptied"][0]["type"] == "Normal"
    created = by_reason["TopicsCreated"][0]["message"]
    assert f"{group}.{source}.retry-1" in created and dlq in created
    assert [e["type"] for e in by_reason["WorkersReady"]] == ["Normal"]


def test_spec_updates_reconcile_and_partitions_never_shrink(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    cleanup_topics.extend(_topics(group, source, ["retry-1", "retry-2", "retry-3"]))
    doc = pipeline("orders", kafka_bootstrap, source, group)
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=90)
    before = _deployments(kubectl, namespace, "orders")
    hash_key = "kafkaretry.io/topology-hash"
    old_hash = before["retry-1"]["spec"]["template"]["metadata"]["annotations"][hash_key]
    pods_before = [(p.name, p.pids) for p in podrunner.wait_ready(namespace, "orders-retry-1")]

    # Add a tier, change a delay, raise partitions.
    doc["spec"]["tiers"] = [
        {"name": "retry-1", "delaySeconds": 2},
        {"name": "retry-2", "delaySeconds": 2},
        {"name": "retry-3", "delaySeconds": 3},
    ]
    doc["spec"]["topics"] = {"partitions": 2}
    apply(kubectl, namespace, doc)
    rp = wait_condition(kubectl, namespace, "orders", timeout=90)
    names = _topics(group, source, ["retry-1", "retry-2", "retry-3"])
    assert topic_partitions(kafka_admin, names) == dict.fromkeys(names, 2)
    assert rp["status"]["tierCount"] == 3
    after = _deployments(kubectl, namespace, "orders")
    assert sorted(after) == ["retry-1", "retry-2", "retry-3"]
    assert after["retry-1"]["metadata"]["uid"] == before["retry-1"]["metadata"]["uid"]
    # A tier added and a delay changed: the workers follow the ConfigMap, nothing rolls.
    assert after["retry-1"]["spec"]["template"]["metadata"]["annotations"][hash_key] == old_hash
    assert after["retry-1"]["metadata"]["generation"] == before["retry-1"]["metadata"]["generation"]
    assert [(p.name, p.pids) for p in podrunner.pods(namespace, "orders-retry-1")] == pods_before
    cm = get(kubectl, namespace, "configmap", "orders-topology")
    assert cm is not None
    topology = Topology.from_json(cm["data"]["topology.json"])
    assert [(t.name, t.delay_seconds) for t in topology.tiers] == [
        ("retry-1", 2),
        ("retry-2", 2),
        ("retry-3", 3),
    ]

    # Lowering partitions is refused: a condition, and the topics stay as they are.
    doc["spec"]["topics"] = {"partitions": 1}
    apply(kubectl, namespace, doc)
    rp = wait_condition(
        kubectl, namespace, "orders", "TopicsReady", "False", "PartitionDecreaseRefused"
    )
    assert "partitions can only grow" in condition(rp, "TopicsReady")["message"]
    assert condition(rp, "Ready")["status"] == "False"
    assert topic_partitions(kafka_admin, names) == dict.fromkeys(names, 2)

    # Removing a tier removes its Deployment (its topic is kept); back to Ready.
    doc["spec"]["tiers"] = doc["spec"]["tiers"][:2]
    doc["spec"]["topics"] = {"partitions": 2}
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=60)
    wait_for(
        lambda: sorted(_deployments(kubectl, namespace, "orders")) == ["retry-1", "retry-2"],
        30,
        "retry-3's Deployment deleted",
    )
    assert names[2] in topic_partitions(kafka_admin, names), "never delete topics on update"

    # A tier Deployment deleted by hand comes back.
    uid = _deployments(kubectl, namespace, "orders")["retry-1"]["metadata"]["uid"]
    kubectl("delete", "deployment", "orders-retry-1", "-n", namespace)
    wait_for(
        lambda: (
            (d := _deployments(kubectl, namespace, "orders").get("retry-1"))
            and d["metadata"]["uid"] != uid
        ),
        30,
        "retry-1's Deployment recreated",
    )
    wait_condition(kubectl, namespace, "orders", timeout=60)


def test_kafka_unreachable_then_fixed_without_restart(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    cleanup_topics.extend(_topics(group, source, ["retry-1", "retry-2"]))
    doc = pipeline("orders", "127.0.0.1:1", source, group)  # a closed port
    apply(kubectl, namespace, doc)
    rp = wait_condition(kubectl, namespace, "orders", "TopicsReady", "False", "KafkaUnreachable")
    assert "127.0.0.1:1" in condition(rp, "TopicsReady")["message"]
    assert condition(rp, "Ready")["reason"] == "KafkaUnreachable"
    assert _deployments(kubectl, namespace, "orders") == {}, "no workers for missing topics"
    assert operator.proc is not None and operator.proc.poll() is None, "no crash"

    doc["spec"]["kafka"] = {"bootstrapServers": kafka_bootstrap}
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=90)


def test_deletion_policy(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    kept = _topics(f"keep-{unique}", source, ["retry-1", "retry-2"])
    dropped = _topics(f"drop-{unique}", source, ["retry-1", "retry-2"])
    cleanup_topics.extend(kept + dropped)
    for name, policy in (("keep", "Retain"), ("drop", "Delete")):
        doc = pipeline(
            name,
            kafka_bootstrap,
            source,
            f"{name}-{unique}",
            topics={"partitions": 1, "deletionPolicy": policy},
        )
        apply(kubectl, namespace, doc)
    for name in ("keep", "drop"):
        wait_condition(kubectl, namespace, name, timeout=90)
    assert len(topic_partitions(kafka_admin, kept + dropped)) == 6

    kubectl("delete", "rp", "keep", "drop", "-n", namespace, "--timeout=60s")
    wait_for(lambda: not topic_partitions(kafka_admin, dropped), 30, "Delete policy removed topics")
    assert topic_partitions(kafka_admin, kept) == dict.fromkeys(kept, 1), "Retain kept them"
    assert source in topic_partitions(kafka_admin, [source]), "the source is never deleted"
    for name in ("keep", "drop"):
        wait_for(
            lambda n=name: (
                not _deployments(kubectl, namespace, n)  # type: ignore[misc]
                and get(kubectl, namespace, "configmap", f"{n}-topology") is None
            ),
            60,
            f"{name}'s children garbage-collected",
        )


def test_restart_converges_without_duplicates(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    cleanup_topics.extend(_topics(group, source, ["retry-1", "retry-2"]))
    doc = pipeline("orders", kafka_bootstrap, source, group)
    apply(kubectl, namespace, doc)
    rp = wait_condition(kubectl, namespace, "orders", timeout=90)
    before = {
        t: d["metadata"]["uid"] for t, d in _deployments(kubectl, namespace, "orders").items()
    }

    # A plain restart: the same children, nothing new, still Ready.
    operator.restart()
    wait_for(lambda: "Resuming is processed" in operator.log(), 30, "resume handled")
    after = _deployments(kubectl, namespace, "orders")
    assert {t: d["metadata"]["uid"] for t, d in after.items()} == before
    assert all(d["metadata"]["generation"] == 1 for d in after.values()), "no needless writes"
    same = wait_condition(kubectl, namespace, "orders")
    assert same["metadata"]["generation"] == rp["metadata"]["generation"]

    # A change made while the operator is down is picked up when it is back.
    operator.stop()
    doc["spec"]["tiers"][0]["delaySeconds"] = 5
    doc["spec"]["suspend"] = True
    apply(kubectl, namespace, doc)
    operator.start()
    rp = wait_condition(kubectl, namespace, "orders", reason="Suspended", timeout=60)
    after = _deployments(kubectl, namespace, "orders")
    assert {t: d["metadata"]["uid"] for t, d in after.items()} == before
    assert all(d["spec"]["replicas"] == 0 for d in after.values())
    assert podrunner.pods(namespace, "orders-retry-1") == []
    cm = get(kubectl, namespace, "configmap", "orders-topology")
    assert cm is not None
    topology = Topology.from_json(cm["data"]["topology.json"])
    assert topology.tiers[0].delay_seconds == 5 and topology.suspend
    listed = kubectl("get", "configmaps", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == ["configmap/kube-root-ca.crt", "configmap/orders-topology"]


def test_kafka_secret_is_used_rotated_and_never_shown(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    cleanup_topics.extend(_topics(group, source, ["retry-1", "retry-2"]))
    secret_value = f"sekrit-{unique}"
    doc = pipeline(
        "orders",
        kafka_bootstrap,
        source,
        group,
        kafka={"bootstrapServers": kafka_bootstrap, "secretRef": {"name": "kafka-client"}},
    )
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", "TopicsReady", "False", "KafkaSecretNotFound")

    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kafka-client"},
        # A harmless librdkafka setting that the operator's and the workers' clients take.
        "data": {"client.id": base64.b64encode(secret_value.encode()).decode()},
    }
    apply(kubectl, namespace, secret)
    wait_condition(kubectl, namespace, "orders", timeout=90)

    def worker_environ() -> list[bytes]:
        pods = [p for p in podrunner.pods(namespace, "orders-retry-1") if p.pids]
        if len(pods) != 1:
            return []  # mid-rollout
        try:
            return Path(f"/proc/{pods[0].pids[0]}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return []

    assert f"KAFKA_CLIENT_client.id={secret_value}".encode() in worker_environ()

    # Rotation: the new value reaches the running workers (they roll) and the operator's
    # client, with nothing but `get` on the Secret.
    rotated_value = f"rotated-{unique}"
    secret["data"] = {"client.id": base64.b64encode(rotated_value.encode()).decode()}
    apply(kubectl, namespace, secret)
    version = get(kubectl, namespace, "secret", "kafka-client")["metadata"]["resourceVersion"]
    wait_for(
        lambda: f"KAFKA_CLIENT_client.id={rotated_value}".encode() in worker_environ(),
        60,
        "the tier worker restarted with the rotated Secret",
    )
    deployment = get(kubectl, namespace, "deployment", "orders-retry-1")
    template_annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert template_annotations["kafkaretry.io/kafka-secret-version"] == version
    rp = get(kubectl, namespace, "retrypipeline", "orders")
    assert rp["metadata"]["annotations"]["operator.kafkaretry.io/kafka-secret-version"] == version
    wait_condition(kubectl, namespace, "orders", timeout=30)
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "KafkaSecretRotated" in events

    assert shown(operator, kubectl, namespace, [secret_value, rotated_value]) == []
