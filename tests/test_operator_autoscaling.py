"""`spec.workers.autoscaling` on the real API server, with and without KEDA's CRDs (KEDA
v2.18.1's own manifests, from its Go module), and with the real KEDA operator (built from that
module by `make test`'s set-up) scaling a tier on the lag it reads from the real broker.

- Without KEDA: condition Autoscaling False `KedaNotInstalled`, workers at minReplicas.
- With KEDA's CRDs: a ScaledObject per tier, applied with strict field validation against
  KEDA's schema and read back unchanged; the operator stops owning the Deployment's `replicas`,
  so a scale by another manager (KEDA's HPA) survives the next reconcile.
- Autoscaling off again: the ScaledObjects go, the operator owns `replicas` again.
- With the pipeline's Kafka Secret: a TriggerAuthentication naming its keys, against KEDA's
  schema too.
- The real KEDA operator takes the generated ScaledObject: Ready, an HPA on the tier's
  Deployment, the idle tier scaled to zero, and back to one worker once events wait on the
  tier's topic; our reconciles leave KEDA's replicas alone.
"""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kafka_retry.model import RetryPipelineSpec
from kafka_retry_operator import children
from kafka_retry_operator.keda_auth import KedaKafkaAuth
from kafka_retry_operator.kube import KEDA_CHECK_S
from operator_support import (
    Kubectl,
    apply,
    condition,
    free_port,
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


@pytest.fixture
def keda_operator(
    no_keda: Callable[[], None],
    kubeconfig: str,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
) -> Iterator[Path]:
    """KEDA's own operator watching the test's namespace, as a process; yields its log. It
    watches all of KEDA's kinds, so all its CRDs are installed (the other four removed after).
    Its metrics gRPC service wants mTLS files: a self-signed pair."""
    no_keda()
    others = [m for m in sorted(Path(os.environ["KRO_KEDA_CRDS"]).glob("*.yaml"))
              if m.name.removeprefix("keda.sh_").removesuffix(".yaml") not in CRDS]  # fmt: skip
    for manifest in others:
        kubectl("apply", "--server-side", "-f", str(manifest))
    names = [yaml.safe_load(m.read_text())["metadata"]["name"] for m in others]
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    certs = tmp_path / "keda-certs"
    certs.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=keda-operator", "-keyout", str(certs / "tls.key"),
         "-out", str(certs / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    (certs / "ca.crt").write_bytes((certs / "tls.crt").read_bytes())
    env = {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "WATCH_NAMESPACE": namespace,
        "POD_NAMESPACE": namespace,
        "KEDA_CLUSTER_OBJECT_NAMESPACE": namespace,
    }
    args = [
        os.environ["KRO_KEDA_OPERATOR"],
        f"--metrics-bind-address=127.0.0.1:{free_port()}",
        f"--health-probe-bind-address=127.0.0.1:{free_port()}",
        f"--metrics-service-bind-address=127.0.0.1:{free_port()}",
        f"--cert-dir={certs}",
        f"--ca-dir={certs}",
    ]
    log = tmp_path / "keda-operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        yield log
    finally:
        # KEDA puts a finalizer on each ScaledObject: let it see the pipeline's go (the operator
        # fixture deleted them) before it stops, and never leave one behind, or the CRD's and
        # the namespace's deletion would wait forever.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not _keda_objects(kubectl, namespace), 60, "ScaledObjects gone")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for name in _keda_objects(kubectl, namespace):
            kubectl("patch", name, "-n", namespace, "--type=merge",
                    "-p", '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip
        for manifest in others:
            kubectl("delete", "-f", str(manifest), "--ignore-not-found", "--wait=false")


def _keda_objects(kubectl: Kubectl, namespace: str) -> list[str]:
    proc = kubectl("get", "scaledobjects.keda.sh", "-n", namespace, "-o", "name", check=False)
    return proc.stdout.split() if proc.returncode == 0 else []


def test_real_keda_scales_a_tier_on_its_lag(
    keda_operator: Path,
    operator: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    """KEDA reads the lag of the tier's consumer group from the broker through the trigger we
    generate, at its own default polling interval (30 s): an idle tier goes to zero workers and
    comes back when events wait. The delay is long, so nothing is consumed meanwhile."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    doc = pipeline("pay", kafka_bootstrap, make_topic("src"), f"g-{unique}")
    doc["spec"]["tiers"] = [{"name": "retry-1", "delaySeconds": 3600}]
    doc["spec"]["topics"]["deletionPolicy"] = "Delete"
    scaling = {"minReplicas": 0, "maxReplicas": 3, "lagPerReplica": 5}
    doc["spec"]["workers"] = {"autoscaling": scaling}
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "pay", "Autoscaling", "True", "KedaScaledObject")

    def keda_condition(type_: str, status: str) -> dict[str, Any] | None:
        scaled = get(kubectl, namespace, "scaledobject", "pay-retry-1")
        return scaled if condition(scaled, type_).get("status") == status else None

    def replicas(n: int) -> dict[str, Any] | None:
        deployment = get(kubectl, namespace, "deployment", "pay-retry-1")
        return deployment if deployment and deployment["spec"]["replicas"] == n else None

    def why() -> str:
        return keda_operator.read_text(errors="replace")[-3000:]

    try:
        wait_for(lambda: keda_condition("Ready", "True"), 90, "KEDA: ScaledObject Ready")
        hpa = wait_for(lambda: get(kubectl, namespace, "hpa", "keda-hpa-pay-retry-1"), 60,
                       "KEDA's HPA")  # fmt: skip
        assert hpa["spec"]["scaleTargetRef"]["name"] == "pay-retry-1"
        assert hpa["spec"]["maxReplicas"] == 3
        # Idle tier (no lag, never active): KEDA scales its workers to zero.
        wait_for(lambda: replicas(0), 90, "KEDA: idle tier scaled to zero")
        wait_for(lambda: keda_condition("Active", "False"), 60, "KEDA: Active False")

        spec = RetryPipelineSpec.model_validate(doc["spec"])
        tier = spec.topology(namespace, "pay").tiers[0]
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for i in range(20):
            producer.produce(tier.topic, value=f"event-{i}".encode())
        assert producer.flush(30) == 0

        # Two of KEDA's 30 s polls at most, plus slack for a loaded machine.
        wait_for(lambda: keda_condition("Active", "True"), 150, "KEDA: Active on the lag")
        wait_for(lambda: replicas(1), 60, "KEDA: tier scaled from zero")
        assert children.MANAGER not in _replicas_owners(kubectl, namespace, "pay-retry-1")

        # A spec change: our reconcile leaves KEDA's replica count alone.
        doc["spec"]["workers"]["autoscaling"]["maxReplicas"] = 4
        apply(kubectl, namespace, doc)
        wait_for(
            lambda: (lambda h: h if h and h["spec"]["maxReplicas"] == 4 else None)(
                get(kubectl, namespace, "hpa", "keda-hpa-pay-retry-1")
            ),
            90, "KEDA: HPA follows the new maxReplicas",
        )  # fmt: skip
        assert replicas(1) is not None

        # The tier's group catches up (as its workers would): KEDA sees no lag on that group,
        # so it read the group we named, not just the topic's size.
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap,
                             "group.id": tier.consumer_group})  # fmt: skip
        consumer.commit(offsets=[TopicPartition(tier.topic, 0, 20)], asynchronous=False)
        consumer.close()
        wait_for(lambda: keda_condition("Active", "False"), 150, "KEDA: inactive at lag 0")
    except AssertionError as e:
        raise AssertionError(f"{e}\nKEDA operator log (tail):\n{why()}") from None
