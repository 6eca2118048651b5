"""A pipeline's status over its life, end to end: the real kube-apiserver, the real Kafka broker
and the operator as a subprocess. What status says once the DLQ empties, and that an unchanged
pipeline's status is not written again."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dlq_support import fill_dlq
from kafka_retry import depth
from kafka_retry_operator.config import OperatorConfig
from operator_support import (
    Kubectl,
    OperatorProcess,
    apply,
    cleanup_topics,
    free_port,
    get,
    operator,
    pipeline,
    release_pipelines,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _dlq_status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    rp = get(kubectl, namespace, "rp", name) or {}
    return dict((rp.get("status") or {}).get("dlq") or {})


def test_an_emptied_dlq_clears_its_oldest_timestamp_and_status_stops_changing(
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    """DLQ with 3 events -> oldestTimestamp set; the cursor moves past them -> depth 0 and no
    oldestTimestamp; from then on the status timer (every second here) writes nothing."""
    source = make_topic("orders")
    group = f"svc-{unique}"
    dlq = f"{group}.{source}.dlq"
    cleanup_topics.extend([f"{group}.{source}.retry-1", dlq])
    doc = pipeline(
        "quiet",
        kafka_bootstrap,
        source,
        group,
        tiers=[{"name": "retry-1", "delaySeconds": 1}],
        workers={"replicas": 0},  # no tier worker needed: the DLQ is filled directly
    )
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "quiet", type_="TopicsReady", timeout=90)

    fill_dlq(kafka_bootstrap, dlq, 3, source_topic=source, group=group)
    full = wait_for(
        lambda: (s := _dlq_status(kubectl, namespace, "quiet")).get("depth") == 3 and s,
        30,
        "status.dlq.depth == 3",
    )
    assert full["oldestTimestamp"].endswith("Z")

    depth.advance_cursor(kafka_admin, dlq, {0: 3})  # as a replay of all three would
    empty = wait_for(
        lambda: (s := _dlq_status(kubectl, namespace, "quiet")).get("depth") == 0 and s,
        30,
        "status.dlq.depth == 0",
    )
    assert "oldestTimestamp" not in empty, empty

    # Several status passes (1 s apart) over an unchanged pipeline: not one write.
    before = get(kubectl, namespace, "rp", "quiet") or {}
    time.sleep(6)
    after = get(kubectl, namespace, "rp", "quiet") or {}
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (
        before["status"],
        after["status"],
    )


@pytest.fixture
def deployed_timeout_operator(
    crds: None, kubeconfig: str, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator with the Kafka timeout it is deployed with (10 s), so an unreachable
    cluster costs what it costs in production."""
    op = OperatorProcess(
        kubeconfig,
        [namespace],
        tmp_path / "operator.log",
        KAFKA_RETRY_OPERATOR_KAFKA_TIMEOUT=str(DEPLOYED_KAFKA_TIMEOUT_S),
    ).start()
    yield op
    release_pipelines(kubectl, namespace)
    op.stop()


DEPLOYED_KAFKA_TIMEOUT_S = OperatorConfig().kafka_timeout
UNREACHABLE_CLUSTERS = 20


def test_unreachable_clusters_delay_only_their_own_pipelines(
    deployed_timeout_operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    """20 pipelines on 20 clusters nobody answers at, beside one on the real broker: they show
    KafkaUnreachable, and the healthy pipeline's DLQ depth still follows within one status
    interval or so, never a bad cluster's timeout (10 s) later."""
    source = make_topic("orders")
    group = f"svc-{unique}"
    dlq = f"{group}.{source}.dlq"
    cleanup_topics.extend([f"{group}.{source}.retry-1", dlq])
    one_tier = [{"name": "retry-1", "delaySeconds": 1}]
    apply(
        kubectl,
        namespace,
        pipeline("near", kafka_bootstrap, source, group, tiers=one_tier, workers={"replicas": 0}),
    )
    wait_condition(kubectl, namespace, "near", type_="TopicsReady", timeout=90)

    for i in range(UNREACHABLE_CLUSTERS):
        far = pipeline(
            f"far-{i}",
            f"127.0.0.1:{free_port()}",  # nothing listens there
            source,
            f"far-{i}",
            tiers=one_tier,
            workers={"replicas": 0},
        )
        apply(kubectl, namespace, far)
    for i in range(UNREACHABLE_CLUSTERS):
        wait_condition(
            kubectl,
            namespace,
            f"far-{i}",
            type_="TopicsReady",
            status="False",
            reason="KafkaUnreachable",
            timeout=180,
        )

    lateness = []
    for round_ in range(1, 4):
        fill_dlq(kafka_bootstrap, dlq, 2, source_topic=source, group=group)
        written = time.monotonic()
        wait_for(
            lambda n=2 * round_: _dlq_status(kubectl, namespace, "near").get("depth") == n,
            120,
            f"status.dlq.depth == {2 * round_}",
            every=0.1,
        )
        lateness.append(time.monotonic() - written)
    print(f"healthy pipeline's DLQ depth shown after {[round(s, 1) for s in lateness]} s")
    assert max(lateness) < DEPLOYED_KAFKA_TIMEOUT_S, lateness
    near = get(kubectl, namespace, "rp", "near") or {}
    topics_ready = next(c for c in near["status"]["conditions"] if c["type"] == "TopicsReady")
    assert topics_ready["status"] == "True", topics_ready
