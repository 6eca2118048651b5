"""A pipeline's life beyond create and delete, with real parts: a real kube-apiserver, the
real Kafka broker, the operator as a subprocess and tier workers run by hack/podrunner.py.

- a typo in `source.topic` creates nothing until the topic exists;
- of two pipelines (in different namespaces) whose topics overlap, the younger creates
  nothing and its `Delete` policy deletes nothing of the older's.
"""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import NewTopic

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
    release_pipelines,
    topic_partitions,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _derived(group: str, source: str, tiers: list[str]) -> list[str]:
    return [f"{group}.{source}.{t}" for t in tiers] + [f"{group}.{source}.dlq"]


def _deployments(kubectl: Kubectl, namespace: str) -> list[str]:
    out = kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout
    return sorted(out.split())


def test_source_topic_typo_creates_nothing_until_the_topic_exists(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    typo = f"ordrs-{unique}"
    group = f"svc-{unique}"
    derived = _derived(group, typo, ["retry-1", "retry-2"])
    cleanup_topics.extend([typo, *derived])
    apply(kubectl, namespace, pipeline("orders", kafka_bootstrap, typo, group))

    rp = wait_condition(
        kubectl, namespace, "orders", "TopicsReady", "False", "SourceTopicNotFound", timeout=60
    )
    assert typo in condition(rp, "TopicsReady")["message"]
    assert condition(rp, "Ready")["reason"] == "SourceTopicNotFound"
    # Several retries later, still nothing named after the typo: no topic, no worker.
    wait_for(lambda: operator.log().count("SourceTopicNotFound") >= 3, 60, "three retries")
    assert topic_partitions(kafka_admin, derived) == {}
    assert _deployments(kubectl, namespace) == []
    assert get(kubectl, namespace, "configmap", "orders-topology") is None

    # The topic appears (the typo was in the topic's name after all): the pipeline proceeds.
    kafka_admin.create_topics([NewTopic(typo, num_partitions=1, replication_factor=1)])[
        typo
    ].result(timeout=30)
    wait_condition(kubectl, namespace, "orders", timeout=90)
    assert sorted(topic_partitions(kafka_admin, derived)) == sorted(derived)


@pytest.fixture
def other_namespace(namespace: str, make_namespace: Callable[[str], str]) -> str:
    return make_namespace("-b")


@pytest.fixture
def two_namespace_operator(
    crds: None,
    kubeconfig: str,
    kubectl: Kubectl,
    namespace: str,
    other_namespace: str,
    tmp_path: Path,
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kubeconfig, [namespace, other_namespace], tmp_path / "operator.log")
    op.start()
    yield op
    for ns in (namespace, other_namespace):
        release_pipelines(kubectl, ns)
    op.stop()


def test_overlapping_pipelines_younger_creates_and_deletes_nothing(
    two_namespace_operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    other_namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    """The same source topic and group in two namespaces: the same derived topics."""
    source = make_topic("orders")
    group = f"svc-{unique}"
    derived = _derived(group, source, ["retry-1", "retry-2"])
    cleanup_topics.extend(derived)
    delete = {"partitions": 1, "deletionPolicy": "Delete"}
    first = pipeline("orders", kafka_bootstrap, source, group, topics=delete)
    apply(kubectl, namespace, first)
    wait_condition(kubectl, namespace, "orders", "TopicsReady", timeout=90)

    # The younger one, in another namespace.
    second = pipeline("orders", kafka_bootstrap, source, group, topics=delete)
    apply(kubectl, other_namespace, second)
    rp = wait_condition(
        kubectl, other_namespace, "orders", "TopicsReady", "False", "PipelineOverlap", timeout=60
    )
    message = condition(rp, "TopicsReady")["message"]
    assert f"{namespace}/orders" in message and derived[0] in message, message
    assert _deployments(kubectl, other_namespace) == []
    assert get(kubectl, other_namespace, "configmap", "orders-topology") is None

    # Its Delete policy deletes none of the older pipeline's topics.
    kubectl("delete", "rp", "orders", "-n", other_namespace, "--timeout=60s")
    assert sorted(topic_partitions(kafka_admin, derived)) == sorted(derived)
    log = two_namespace_operator.log()
    assert "keeping topics other pipelines claim too" in log
    first_rp = get(kubectl, namespace, "rp", "orders")
    assert condition(first_rp, "TopicsReady")["status"] == "True"

    # Groups and sources differing only in where a dot falls resolve to the same names.
    dotted = make_topic("o")
    other_source = f"x.{dotted}"
    kafka_admin.create_topics([NewTopic(other_source, num_partitions=1, replication_factor=1)])[
        other_source
    ].result(timeout=30)
    cleanup_topics.extend(
        [other_source, *_derived(f"{group}.p", other_source, ["retry-1", "retry-2"])]
    )
    # `<group>.p` + `x.<dotted>` and `<group>.p.x` + `<dotted>`: one prefix.
    apply(kubectl, namespace, pipeline("dots-a", kafka_bootstrap, other_source, f"{group}.p"))
    wait_condition(kubectl, namespace, "dots-a", "TopicsReady", timeout=90)
    apply(kubectl, other_namespace, pipeline("dots-b", kafka_bootstrap, dotted, f"{group}.p.x"))
    rp = wait_condition(
        kubectl, other_namespace, "dots-b", "TopicsReady", "False", "PipelineOverlap", timeout=60
    )
    assert f"{namespace}/dots-a" in condition(rp, "TopicsReady")["message"]


def test_delete_policy_deletes_topics_only_after_the_workers_are_gone(
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
    """A worker that is slow to go (here: its Deployment held by a finalizer, as a real
    cluster holds a foreground deletion until the pods have stopped) keeps the topics."""
    source = make_topic("orders")
    group = f"svc-{unique}"
    derived = _derived(group, source, ["retry-1", "retry-2"])
    cleanup_topics.extend(derived)
    doc = pipeline(
        "orders",
        kafka_bootstrap,
        source,
        group,
        topics={"partitions": 1, "deletionPolicy": "Delete"},
    )
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=120)
    hold = '{"metadata":{"finalizers":["test.kafkaretry.io/hold"]}}'
    kubectl("patch", "deployment", "orders-retry-1", "-n", namespace, "--type=merge", "-p", hold)

    kubectl("delete", "rp", "orders", "-n", namespace, "--wait=false")
    wait_for(
        lambda: (
            (get(kubectl, namespace, "deployment", "orders-retry-1") or {})
            .get("metadata", {})
            .get("deletionTimestamp")
        ),
        60,
        "the worker Deployment being deleted",
    )
    wait_for(lambda: "waiting for the workers to stop" in operator.log(), 60, "finalizer waits")
    assert sorted(topic_partitions(kafka_admin, derived)) == sorted(derived)
    assert get(kubectl, namespace, "rp", "orders") is not None, "the pipeline is not gone yet"

    kubectl(
        "patch", "deployment", "orders-retry-1", "-n", namespace, "--type=merge",
        "-p", '{"metadata":{"finalizers":null}}',
    )  # fmt: skip
    wait_for(lambda: not topic_partitions(kafka_admin, derived), 90, "topics deleted")
    wait_for(lambda: get(kubectl, namespace, "rp", "orders") is None, 60, "pipeline gone")
