"""Tier workers and node drains, on the real API server: a tier with more than one worker gets
a PodDisruptionBudget (maxUnavailable 1) that selects exactly that tier's pods, and loses it
when scaled to one; the chart's topology spread reaches the pod template with the tier's own
selector; the budgets go with the pipeline (owner references).

There is no kubelet here, so no pod is evicted: the objects are proven valid (the API server
accepted them) and correctly aimed (their selectors against the Deployment's pod labels).
Evictions against them need the real node (issue 11's).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from operator_support import (
    Kubectl,
    OperatorProcess,
    apply,
    get,
    pipeline,
    release_pipelines,
    wait_for,
)

SPREAD = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
           "whenUnsatisfiable": "ScheduleAnyway"}]  # fmt: skip


@pytest.fixture
def spreading_operator(
    crds: None, kubeconfig: str, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        kubeconfig, [namespace], tmp_path / "operator.log",
        KAFKA_RETRY_WORKER_TOPOLOGY_SPREAD=json.dumps(SPREAD),
    ).start()  # fmt: skip
    yield op
    release_pipelines(kubectl, namespace)
    op.stop()


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.keys() == {"matchLabels"} and selector["matchLabels"].items() <= labels.items()


def test_tier_budgets_follow_the_replica_count(
    spreading_operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    doc = pipeline("pay", kafka_bootstrap, make_topic("src"), f"g-{unique}")
    doc["spec"]["workers"] = {"replicas": 2}
    doc["spec"]["topics"]["deletionPolicy"] = "Delete"
    apply(kubectl, namespace, doc)
    tiers = [t["name"] for t in doc["spec"]["tiers"]]

    budgets = wait_for(
        lambda: (lambda b: b if len(b) == len(tiers) else None)(
            json.loads(kubectl("get", "pdb", "-n", namespace, "-o", "json").stdout)["items"]
        ),
        60, "a budget per tier",
    )  # fmt: skip
    by_name = {b["metadata"]["name"]: b for b in budgets}
    uid = get(kubectl, namespace, "retrypipeline", "pay")["metadata"]["uid"]  # type: ignore[index]
    for tier in tiers:
        deployment = get(kubectl, namespace, "deployment", f"pay-{tier}")
        assert deployment is not None
        template = deployment["spec"]["template"]
        budget = by_name[f"pay-{tier}"]
        assert budget["spec"]["maxUnavailable"] == 1
        # Selects this tier's pods, and no other tier's.
        assert _matches(budget["spec"]["selector"], template["metadata"]["labels"])
        for other in set(tiers) - {tier}:
            other_pods = get(kubectl, namespace, "deployment", f"pay-{other}")
            assert other_pods is not None
            labels = other_pods["spec"]["template"]["metadata"]["labels"]
            assert not _matches(budget["spec"]["selector"], labels)
        (owner,) = budget["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["controller"] is True
        (spread,) = template["spec"]["topologySpreadConstraints"]
        assert {k: spread[k] for k in SPREAD[0]} == SPREAD[0]
        assert _matches(spread["labelSelector"], template["metadata"]["labels"])
        assert spread["labelSelector"] == deployment["spec"]["selector"]

    # One worker per tier: no budget (maxUnavailable 1 of one pod protects nothing).
    doc["spec"]["workers"] = {"replicas": 1}
    apply(kubectl, namespace, doc)
    wait_for(
        lambda: not json.loads(kubectl("get", "pdb", "-n", namespace, "-o", "json").stdout)[
            "items"
        ],
        60, "the budgets removed",
    )  # fmt: skip
