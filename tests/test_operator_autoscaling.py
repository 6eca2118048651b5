"""`spec.workers.autoscaling` on the real API server, with and without KEDA's CRDs (KEDA
v2.18.1's own manifests, from its Go module; the KEDA operator itself does not run here).

- Without KEDA: condition Autoscaling False `KedaNotInstalled`, workers at minReplicas.
- With KEDA's CRDs: a ScaledObject per tier, applied with strict field validation against
  KEDA's schema and read back unchanged; the operator stops owning the Deployment's `replicas`,
  so a scale by another manager (KEDA's HPA) survives the next reconcile.
- Autoscaling off again: the ScaledObjects go, the operator owns `replicas` again.
- With the pipeline's Kafka Secret: a TriggerAuthentication naming its keys, against KEDA's
  schema too.
"""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kafka_retry.model import RetryPipelineSpec
from kafka_retry_operator import children
from kafka_retry_operator.keda_auth import KedaKafkaAuth
from kafka_retry_operator.kube import KEDA_CHECK_S
from operator_support import (
    Kubectl,
    apply,
    get,
    operator,
    pipeline,
    wait_condition,
    wait_for,
)

CRDS = ("scaledobjects", "triggerauthentications")  # of keda.sh


@pytest.fixture
def no_keda(kubectl: Kubectl) -> Iterator[Callable[[], None]]:
    """KEDA's CRDs absent; the test installs them by calling the fixture's value. Removed
    afterwards, so that every run starts without KEDA."""
    for plural in CRDS:
        kubectl("delete", "crd", f"{plural}.keda.sh", "--ignore-not-found", "--wait=true")

    def install() -> None:
        for plural in CRDS:
            manifest = Path(os.environ["KRO_KEDA_CRDS"]) / f"keda.sh_{plural}.yaml"
            kubectl("apply", "--server-side", "-f", str(manifest))
            crd = f"crd/{plural}.keda.sh"
            kubectl("wait", "--for=condition=Established", crd, "--timeout=60s")

    yield install
    for plural in CRDS:
        kubectl("delete", "crd", f"{plural}.keda.sh", "--ignore-not-found", "--wait=false")


def _replicas_owners(kubectl: Kubectl, namespace: str, name: str) -> set[str]:
    """The field managers that own the Deployment's spec.replicas."""
    deployment = json.loads(
        kubectl("get", "deployment", name, "-n", namespace, "-o", "json",
                "--show-managed-fields").stdout
    )  # fmt: skip
    return {
        m["manager"]
        for m in deployment["metadata"].get("managedFields", [])
        if "f:replicas" in (m.get("fieldsV1", {}).get("f:spec") or {})
    }


def test_autoscaling_with_and_without_keda(
    no_keda: Callable[[], None],
    operator: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    doc = pipeline("pay", kafka_bootstrap, make_topic("src"), f"g-{unique}")
    doc["spec"]["tiers"] = doc["spec"]["tiers"][:1]
    doc["spec"]["topics"]["deletionPolicy"] = "Delete"
    scaling = {"minReplicas": 2, "maxReplicas": 4, "lagPerReplica": 100}
    doc["spec"]["workers"] = {"replicas": 1, "autoscaling": scaling}

    # min > max is refused by the API server.
    bad = json.loads(json.dumps(doc))
    bad["spec"]["workers"]["autoscaling"]["minReplicas"] = 5
    proc = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0 and "minReplicas must not exceed maxReplicas" in proc.stderr

    apply(kubectl, namespace, doc)
    cond = wait_condition(kubectl, namespace, "pay", "Autoscaling", "False", "KedaNotInstalled")
    message = next(c for c in cond["status"]["conditions"] if c["type"] == "Autoscaling")
    assert "minReplicas (2)" in message["message"]
    deployment = wait_for(lambda: get(kubectl, namespace, "deployment", "pay-retry-1"), 30, "dep")
    assert deployment["spec"]["replicas"] == 2
    assert children.MANAGER in _replicas_owners(kubectl, namespace, "pay-retry-1")

    # KEDA's CRDs appear; the next reconcile (a spec change, after the operator's look at the
    # API has expired) makes ScaledObjects and lets go of `replicas`.
    no_keda()
    time.sleep(KEDA_CHECK_S)
    doc["spec"]["workers"]["autoscaling"]["lagPerReplica"] = 200
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "pay", "Autoscaling", "True", "KedaScaledObject")
    scaled = get(kubectl, namespace, "scaledobject", "pay-retry-1")
    assert scaled is not None
    spec = RetryPipelineSpec.model_validate(doc["spec"])
    tier = spec.topology(namespace, "pay").tiers[0]
    expected = children.scaled_object(namespace, "pay", spec, tier, kafka_bootstrap)
    assert scaled["spec"] == expected["spec"], "KEDA's schema pruned or changed a field"
    assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == tier.consumer_group
    (owner,) = scaled["metadata"]["ownerReferences"]
    assert owner["kind"] == "RetryPipeline" and owner["controller"] is True
    deployment = get(kubectl, namespace, "deployment", "pay-retry-1")
    assert deployment is not None
    assert children.MANAGER not in _replicas_owners(kubectl, namespace, "pay-retry-1")

    # KEDA's HPA scales the tier; a later reconcile leaves that alone.
    kubectl("scale", "deployment", "pay-retry-1", "-n", namespace, "--replicas=3")
    doc["spec"]["workers"]["autoscaling"]["lagPerReplica"] = 300
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "pay", "Autoscaling", "True", "KedaScaledObject")
    scaled = get(kubectl, namespace, "scaledobject", "pay-retry-1")
    assert scaled is not None
    assert scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "300"
    deployment = get(kubectl, namespace, "deployment", "pay-retry-1")
    assert deployment is not None and deployment["spec"]["replicas"] == 3

    # Autoscaling off: no ScaledObject, no Autoscaling condition, replicas the operator's again.
    doc["spec"]["workers"] = {"replicas": 1}
    apply(kubectl, namespace, doc)
    wait_for(lambda: get(kubectl, namespace, "scaledobject", "pay-retry-1") is None, 60, "gone")
    wait_for(
        lambda: (lambda d: d if d and d["spec"]["replicas"] == 1 else None)(
            get(kubectl, namespace, "deployment", "pay-retry-1")
        ),
        60, "replicas back to 1",
    )  # fmt: skip
    assert children.MANAGER in _replicas_owners(kubectl, namespace, "pay-retry-1")
    obj = get(kubectl, namespace, "retrypipeline", "pay")
    assert obj is not None
    assert "Autoscaling" not in {c["type"] for c in obj["status"]["conditions"]}


def test_keda_authenticates_with_the_pipelines_kafka_secret(
    no_keda: Callable[[], None],
    operator: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    """A pipeline whose Kafka Secret holds credentials: its ScaledObject names a
    TriggerAuthentication that points KEDA at that same Secret's keys; both pass KEDA's
    schemas (strict) and read back unchanged, owned by the pipeline; with autoscaling off
    both go. (The `sasl` and `tls` mapping is unit-tested: this broker takes no SASL.)"""
    no_keda()
    settings = {
        "security.protocol": "PLAINTEXT",  # what this broker takes; credentials unused by it
        "sasl.username": "billing",
        "sasl.password": f"s3cret-{unique}",
        "ssl.ca.pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kafka-client"},
              "stringData": settings}  # fmt: skip
    apply(kubectl, namespace, secret)
    kafka = {"bootstrapServers": kafka_bootstrap, "secretRef": {"name": "kafka-client"}}
    doc = pipeline("pay", kafka_bootstrap, make_topic("src"), f"g-{unique}", kafka=kafka)
    doc["spec"]["tiers"] = doc["spec"]["tiers"][:1]
    doc["spec"]["topics"]["deletionPolicy"] = "Delete"
    doc["spec"]["workers"] = {"autoscaling": {"minReplicas": 1, "maxReplicas": 3,
                                              "lagPerReplica": 100}}  # fmt: skip
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "pay", "Autoscaling", "True", "KedaScaledObject")

    auth = KedaKafkaAuth.of(settings)
    expected = children.trigger_authentication(namespace, "pay", "kafka-client", auth)
    found = wait_for(lambda: get(kubectl, namespace, "triggerauthentication", "pay-kafka"), 30,
                     "the TriggerAuthentication")  # fmt: skip
    assert found["spec"] == expected["spec"], "KEDA's schema pruned or changed a field"
    assert {r["parameter"] for r in found["spec"]["secretTargetRef"]} == {
        "username", "password", "ca"}  # fmt: skip
    (owner,) = found["metadata"]["ownerReferences"]
    assert owner["kind"] == "RetryPipeline" and owner["controller"] is True
    scaled = get(kubectl, namespace, "scaledobject", "pay-retry-1")
    assert scaled is not None
    spec = RetryPipelineSpec.model_validate(doc["spec"])
    tier = spec.topology(namespace, "pay").tiers[0]
    assert (
        scaled["spec"]
        == children.scaled_object(namespace, "pay", spec, tier, kafka_bootstrap, auth)["spec"]
    )
    assert scaled["spec"]["triggers"][0]["authenticationRef"] == {"name": "pay-kafka"}
    assert settings["sasl.password"] not in json.dumps([found, scaled]), "never copied"

    doc["spec"]["workers"] = {"replicas": 1}
    apply(kubectl, namespace, doc)
    wait_for(lambda: get(kubectl, namespace, "scaledobject", "pay-retry-1") is None, 60, "gone")
    wait_for(lambda: get(kubectl, namespace, "triggerauthentication", "pay-kafka") is None, 60,
             "the TriggerAuthentication gone")  # fmt: skip
