"""The operator's pure parts: children builders (the contract with the tier worker),
conditions, status composition, the depth formula, topic plans, settings."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kafka_retry import depth
from kafka_retry.kafka_secret import SecretNotFound
from kafka_retry.model import RetryPipelineSpec, Topology
from kafka_retry.topology_tag import topology_hash
from kafka_retry_operator import (
    announcements,
    children,
    draining,
    offset_keeper,
    secret_rotation,
    topics,
)
from kafka_retry_operator import conditions as c
from kafka_retry_operator import status as st
from kafka_retry_operator.config import ConfigError, OperatorConfig
from kafka_retry_operator.fleet import PipelineRecord
from kafka_retry_operator.keda_auth import KedaKafkaAuth, UnsupportedKafkaAuth
from kafka_retry_operator.sampler import ClusterHealth, Sample

ROOT = Path(__file__).resolve().parent.parent

SPEC: dict[str, Any] = {
    "kafka": {"bootstrapServers": "kafka:9092", "secretRef": {"name": "kafka-client"}},
    "source": {"topic": "orders", "consumerGroup": "billing"},
    "tiers": [{"name": "retry-1", "delaySeconds": 30}, {"name": "retry-2", "delaySeconds": 300}],
    "dlq": {"retentionHours": 48},
    "topics": {"partitions": 3},
    "handler": {"python": {"image": "billing:1.4", "callable": "billing.h:handle"}},
    "workers": {"replicas": 2},
}


def _spec(**overrides: Any) -> RetryPipelineSpec:
    return RetryPipelineSpec.model_validate({**SPEC, **overrides})


def _deployment(spec: RetryPipelineSpec, tier: int = 0) -> dict[str, Any]:
    topo = spec.topology("shop", "billing-orders")
    return children.tier_deployment(
        "shop",
        "billing-orders",
        spec,
        topo.tiers[tier],
        topo,
        children.WorkerDefaults("op:1", {"requests": {"cpu": "10m"}}),
    )


# --------------------------------------------------------------------------- children


def test_deployment_follows_the_worker_contract() -> None:
    d = _deployment(_spec())
    assert d["metadata"]["name"] == "billing-orders-retry-1"
    labels = d["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "kafka-retry-worker"
    assert labels["app.kubernetes.io/instance"] == "billing-orders"
    assert labels["kafkaretry.io/pipeline"] == "billing-orders"
    assert labels["kafkaretry.io/tier"] == "retry-1"
    pod = d["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["kafka-retry", "worker"]
    # The topology: the ConfigMap's key as a file in a read-only volume, followed live.
    assert container["args"] == ["--tier", "retry-1", "--topology-file", children.TOPOLOGY_FILE]
    assert container["image"] == "billing:1.4"  # python handler: the service's image
    env = {e["name"]: e for e in container["env"]}
    assert "KAFKA_RETRY_TOPOLOGY" not in env
    assert {"name": "topology", "mountPath": "/etc/kafka-retry", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert children.TOPOLOGY_FILE == "/etc/kafka-retry/topology.json"
    assert {
        "name": "topology",
        "configMap": {
            "name": "billing-orders-topology",
            "items": [{"key": "topology.json", "path": "topology.json"}],
        },
    } in pod["volumes"]
    assert env["KAFKA_RETRY_METRICS_PORT"]["value"] == "9400"
    # static group membership under the pod name: a restarted container rejoins at once
    assert env["KAFKA_RETRY_INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["envFrom"] == [
        {"prefix": "KAFKA_CLIENT_", "secretRef": {"name": "kafka-client"}}
    ]
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_deployment_is_locked_down() -> None:
    pod = _deployment(_spec())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


def _security(**overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts of a Deployment built with these overrides."""
    spec = _spec()
    topo = spec.topology("shop", "billing-orders")
    d = children.tier_deployment(
        "shop",
        "billing-orders",
        spec,
        topo.tiers[0],
        topo,
        children.WorkerDefaults("op:1", {}, **overrides),
    )
    pod = d["spec"]["template"]["spec"]
    return pod["securityContext"], pod["containers"][0]["securityContext"]


def test_security_contexts_default_to_restricted() -> None:
    pod, container = _security()
    assert pod == children.RESTRICTED_POD_SECURITY_CONTEXT
    assert container == children.RESTRICTED_SECURITY_CONTEXT
    assert _security(pod_security_context={}, security_context={}) == (pod, container)


def test_a_partial_override_cannot_weaken_the_restricted_defaults() -> None:
    pod, container = _security(
        pod_security_context={"runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {}},
        security_context={"capabilities": {"add": ["NET_BIND_SERVICE"]}},
    )
    assert pod == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": children.WORKER_UID,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},  # `{}` merges: nothing removed
    }
    assert container == {
        **children.RESTRICTED_SECURITY_CONTEXT,
        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
    }


def test_weakening_a_default_takes_saying_so() -> None:
    """Merge-patch semantics (RFC 7386): a value replaces, `null` removes, lists replace."""
    pod, container = _security(
        pod_security_context={"seccompProfile": None},
        security_context={"readOnlyRootFilesystem": False, "capabilities": {"drop": ["NET_RAW"]}},
    )
    assert "seccompProfile" not in pod and pod["runAsNonRoot"] is True
    assert container["readOnlyRootFilesystem"] is False
    assert container["capabilities"] == {"drop": ["NET_RAW"]}
    assert container["allowPrivilegeEscalation"] is False
    # The defaults themselves are never modified by an override.
    assert _security() == (
        dict(children.RESTRICTED_POD_SECURITY_CONTEXT),
        dict(children.RESTRICTED_SECURITY_CONTEXT),
    )
    assert children.RESTRICTED_SECURITY_CONTEXT["capabilities"] == {"drop": ["ALL"]}


def test_merge_patch() -> None:
    base = {"a": 1, "b": {"c": 2, "d": [1]}, "e": "x"}
    patch = {"a": None, "b": {"d": [2], "f": {"g": None, "h": 3}}, "e": {"i": None}}
    assert children.merge_patch(base, patch) == {"b": {"c": 2, "d": [2], "f": {"h": 3}}, "e": {}}
    assert base == {"a": 1, "b": {"c": 2, "d": [1]}, "e": "x"}


def test_the_charts_worker_defaults_are_the_restricted_defaults() -> None:
    values = yaml.safe_load((ROOT / "charts/kafka-retry-operator/values.yaml").read_text())
    workers = values["workers"]
    pod, container = _security(
        pod_security_context=workers["podSecurityContext"],
        security_context=workers["securityContext"],
    )
    assert pod == children.RESTRICTED_POD_SECURITY_CONTEXT
    assert container == children.RESTRICTED_SECURITY_CONTEXT


def test_contract_constants_match_the_data_plane() -> None:
    from kafka_retry import metrics, worker
    from kafka_retry.kafka_config import CLIENT_ENV_PREFIX

    assert children.METRICS_PORT_ENV == metrics.PORT_ENV
    assert children.METRICS_PORT == metrics.DEFAULT_PORT
    assert children.INSTANCE_ID_ENV == worker.INSTANCE_ID_ENV
    assert CLIENT_ENV_PREFIX == "KAFKA_CLIENT_"


def test_keda_connects_with_the_pipelines_secret() -> None:
    """KEDA's Kafka scaler gets `sasl` and `tls` in its trigger (how to connect) and the
    credentials through a TriggerAuthentication naming keys of the pipeline's own Secret."""
    settings = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "billing",
        "sasl.password": "s3cret",
        "ssl.ca.pem": "-----BEGIN CERTIFICATE-----",
        "client.id": "billing",
    }
    auth = KedaKafkaAuth.of(settings)
    assert auth.metadata == {"sasl": "scram_sha512", "tls": "enable"}
    assert auth.parameters == {"username": "sasl.username", "password": "sasl.password",
                               "ca": "ssl.ca.pem"}  # fmt: skip
    spec = _spec(workers={"autoscaling": {"maxReplicas": 3, "lagPerReplica": 50}})
    tier = spec.topology("shop", "billing-orders").tiers[0]
    scaler = children.scaled_object("shop", "billing-orders", spec, tier, "kafka:9093", auth)
    (trigger,) = scaler["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": "billing-orders-kafka"}
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    ta = children.trigger_authentication("shop", "billing-orders", "kafka-client", auth)
    assert ta["metadata"]["name"] == "billing-orders-kafka"
    assert {(r["parameter"], r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]} == {
        ("username", "kafka-client", "sasl.username"),
        ("password", "kafka-client", "sasl.password"),
        ("ca", "kafka-client", "ssl.ca.pem"),
    }
    assert "s3cret" not in json.dumps([scaler, ta]), "credentials are never copied"

    assert KedaKafkaAuth.of({"security.protocol": "SSL"}) == KedaKafkaAuth({"tls": "enable"}, {})
    plain = KedaKafkaAuth.of({"security.protocol": "sasl_plaintext", "sasl.mechanism": "PLAIN"})
    assert plain.metadata == {"sasl": "plaintext"}
    with pytest.raises(UnsupportedKafkaAuth, match=r"sasl\.mechanism GSSAPI"):
        KedaKafkaAuth.of({"security.protocol": "SASL_SSL"})  # librdkafka's default mechanism
    with pytest.raises(UnsupportedKafkaAuth, match=r"ssl\.ca\.location"):
        KedaKafkaAuth.of({"security.protocol": "SSL", "ssl.ca.location": "/etc/ca.pem"})


def test_http_handler_image_and_resources() -> None:
    http = {"http": {"url": "http://svc/events"}}
    spec = _spec(handler=http, kafka={"bootstrapServers": "k:1"})
    (container,) = _deployment(spec)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "op:1"
    assert container["resources"] == {"requests": {"cpu": "10m"}}
    assert "envFrom" not in container
    own = _spec(
        handler=http,
        workers={"image": "mine:2", "resources": {"limits": {"memory": "1Gi"}}},
    )
    (container,) = _deployment(own)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "mine:2"
    assert container["resources"] == {"limits": {"memory": "1Gi"}}


def test_suspend_scales_to_zero() -> None:
    assert _deployment(_spec(suspend=True))["spec"]["replicas"] == 0


def test_only_what_a_worker_reads_at_start_changes_the_pod_template() -> None:
    """Tier workers follow routing, delays, classification and the DLQ live (a mounted
    ConfigMap): such a change must not roll (restart) them. What they read only at start (the
    handler, the delivery guarantee, their own topic) rolls them."""
    a = _deployment(_spec())
    assert a == _deployment(_spec()), "builders are deterministic"
    followed = [
        _spec(tiers=[{"name": "retry-1", "delaySeconds": 31}, SPEC["tiers"][1]]),
        _spec(tiers=[SPEC["tiers"][0], {"name": "later", "delaySeconds": 300}]),
        _spec(tiers=SPEC["tiers"][:1]),
        _spec(dlq={"retentionHours": 48, "topic": "elsewhere"}),
        _spec(classification={"nonRetriable": ["ValueError"]}),
    ]
    for spec in followed:
        assert _deployment(spec)["spec"]["template"] == a["spec"]["template"], spec
    read_at_start = [
        _spec(handler={"python": {"image": "billing:1.5", "callable": "billing.h:handle"}}),
        _spec(handler={"python": {"image": "billing:1.4", "callable": "billing.h:other"}}),
        _spec(delivery="ExactlyOnce"),
        _spec(tiers=[{"name": "retry-1", "delaySeconds": 30, "topic": "t1"}, SPEC["tiers"][1]]),
    ]
    key = children.TOPOLOGY_HASH_ANNOTATION
    for spec in read_at_start:
        b = _deployment(spec)["spec"]["template"]["metadata"]["annotations"][key]
        assert b != a["spec"]["template"]["metadata"]["annotations"][key], spec


def test_configmap_holds_the_topology() -> None:
    spec = _spec()
    topo = spec.topology("shop", "billing-orders")
    cm = children.topology_configmap("shop", "billing-orders", topo)
    assert cm["metadata"]["name"] == "billing-orders-topology"
    assert Topology.from_json(cm["data"]["topology.json"]) == topo


# --------------------------------------------------------------------------- topics


def test_topic_plan() -> None:
    spec = _spec()
    plans = topics.plan(spec, spec.topology("shop", "p"))
    assert [p.name for p in plans] == [
        "billing.orders.retry-1",
        "billing.orders.retry-2",
        "billing.orders.dlq",
    ]
    assert {p.partitions for p in plans} == {3}
    assert plans[-1].config["retention.ms"] == str(48 * 3600 * 1000)
    assert all(p.config["cleanup.policy"] == "delete" for p in plans)
    assert int(plans[0].config["retention.ms"]) >= 7 * 24 * 3600 * 1000
    # tiers: the broker's clock; the DLQ keeps the forwarders' timestamps
    assert [p.config.get("message.timestamp.type") for p in plans] == [
        "LogAppendTime", "LogAppendTime", None,
    ]  # fmt: skip
    assert topics.tier_retention_ms(7 * 24 * 3600) > 2 * 7 * 24 * 3600 * 1000
    # room for the source's largest event and our headers
    sized = topics.sized(plans, 1_048_588)
    assert {p.config["max.message.bytes"] for p in sized} == {str(1_048_588 + 64 * 1024)}
    assert sized[-1].config["retention.ms"] == plans[-1].config["retention.ms"]


# --------------------------------------------------------------------------- depth


@pytest.mark.parametrize(
    ("low", "high", "committed", "expected"),
    [
        (0, 10, None, 10),  # no cursor: everything from the low watermark waits
        (0, 10, 4, 6),  # replayed/purged up to 4
        (5, 10, 2, 5),  # retention removed 0..4: the cursor behind it counts from low
        (0, 10, 10, 0),
        (0, 10, 12, 0),  # never negative
        (7, 7, None, 0),
    ],
)
def test_waiting(low: int, high: int, committed: int | None, expected: int) -> None:
    assert depth.waiting(low, high, committed) == expected


def test_backlog_sums_partitions_and_reports_heads() -> None:
    marks = {("d", 0): (0, 5), ("d", 1): (2, 2), ("d", 2): (1, 4)}
    b = depth.backlog("d", 3, marks, {("d", 0): 3, ("d", 1): None, ("d", 2): None})
    assert b == depth.Backlog(2 + 0 + 3, {0: 3, 2: 1})
    assert depth.backlog("d", 4, marks, {}) is None  # a partition unknown: no partial sum
    assert depth.cursor_group("billing.orders.dlq") == "billing.orders.dlq.cursor"


# --------------------------------------------------------------------------- conditions


def test_transition_time_changes_only_when_status_flips() -> None:
    first = c.stamp([c.Verdict("Ready", "False", "A", "one")], [], 1, at="T1")
    previous = [x.wire() for x in first]
    same = c.stamp([c.Verdict("Ready", "False", "B", "two")], previous, 2, at="T2")
    assert same[0].last_transition_time == "T1"
    assert (same[0].reason, same[0].message, same[0].observed_generation) == ("B", "two", 2)
    flipped = c.stamp([c.Verdict("Ready", "True", "Ready")], previous, 2, at="T3")
    assert flipped[0].last_transition_time == "T3"


def test_ready_summarizes_parts() -> None:
    ok = c.Verdict.of("TopicsReady", True, "TopicsReady")
    bad = c.Verdict.of("WorkersReady", False, "WorkersNotReady", "0/1")
    assert c.ready([ok, ok]).status == "True"
    r = c.ready([ok, bad])
    assert (r.status, r.reason) == ("False", "WorkersNotReady")
    assert "WorkersReady: 0/1" in r.message


# --------------------------------------------------------------------------- status


def _record(**kw: Any) -> PipelineRecord:
    spec = _spec()
    values: dict[str, Any] = {
        "key": ("shop", "billing-orders"),
        "generation": 3,
        "topology": spec.topology("shop", "billing-orders"),
        "cluster": None,
        "replicas": 2,
        "suspended": False,
        "topics": c.Verdict.of("TopicsReady", True, "TopicsReady", "3 topics ready"),
    }
    values.update(kw)
    return PipelineRecord(**values)


def _workers(ready: int = 2) -> dict[str, st.TierWorkers]:
    return {t: st.TierWorkers(t, 2, ready, 2, True) for t in ("retry-1", "retry-2")}


def test_compose_ready_status() -> None:
    sample = Sample(0.0, {"retry-1": 4, "retry-2": 0}, 7, 1_700_000_000_000)
    s = st.compose(_record(), sample, ClusterHealth(True), _workers(), {}, at="T1")
    assert s["observedGeneration"] == 3
    assert s["tierCount"] == 2
    assert s["topics"] == {
        "source": "orders",
        "tiers": ["billing.orders.retry-1", "billing.orders.retry-2"],
        "dlq": "billing.orders.dlq",
    }
    assert s["tiers"][0] == {
        "name": "retry-1",
        "topic": "billing.orders.retry-1",
        "lag": 4,
        "readyReplicas": 2,
        "delaySeconds": 30,
    }
    assert s["dlq"] == {
        "depth": 7,
        "oldestTimestamp": "2023-11-14T22:13:20.000Z",
        "lastUpdated": "T1",
    }
    ready = {x["type"]: x for x in s["conditions"]}
    assert ready["Ready"]["status"] == "True"
    assert ready["WorkersReady"]["status"] == "True"
    # Unchanged inputs compose an unchanged status: nothing to write.
    again = st.compose(_record(), sample, ClusterHealth(True), _workers(), s, at="T2")
    assert not st.differs(s, again)
    assert announcements.status_changed(s, again, "billing.orders.dlq") == []


def test_an_emptied_dlq_drops_its_oldest_timestamp_once() -> None:
    full = st.compose(_record(), Sample(0.0, {}, 2, 1_700_000_000_000), None, _workers(), {})
    empty = st.compose(_record(), Sample(1.0, {}, 0, None), None, _workers(), full, at="T2")
    assert empty["dlq"] == {"depth": 0, "lastUpdated": "T2"}
    patch = st.merge_patch(full, empty)
    assert patch["dlq"] == {"depth": 0, "lastUpdated": "T2", "oldestTimestamp": None}
    written = {**full, **empty}  # what the API server holds after the merge patch
    again = st.compose(_record(), Sample(2.0, {}, 0, None), None, _workers(), written, at="T3")
    assert not st.differs(written, again)


def test_compose_not_ready_and_unreachable() -> None:
    s = st.compose(_record(), None, ClusterHealth(False, "down"), _workers(ready=1), {}, at="T")
    conds = {x["type"]: x for x in s["conditions"]}
    assert conds["TopicsReady"]["reason"] == "KafkaUnreachable"
    assert conds["WorkersReady"]["reason"] == "WorkersNotReady"
    assert conds["Ready"]["status"] == "False"
    assert "dlq" not in s  # never measured


def test_workers_are_not_ready_until_the_watch_shows_the_applied_generation() -> None:
    """The index still holds the Deployment as it was before this reconcile's apply (ready and
    observed): it says nothing yet about the rollout the apply started."""
    record = _record(worker_generations={"retry-1": 5, "retry-2": 4})
    before = {t: st.TierWorkers(t, 2, 2, 2, True, generation=4) for t in ("retry-1", "retry-2")}
    verdict = st.workers_verdict(record, before)
    assert (verdict.ok, verdict.message) == (False, "1/2 tiers ready; retry-1: rolling out")
    seen = {**before, "retry-1": st.TierWorkers("retry-1", 2, 2, 2, True, generation=5)}
    assert st.workers_verdict(record, seen).ok


def _pod(name: str, tier: str, **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kafkaretry.io/tier": tier}},
        "status": {"containerStatuses": [{"restartCount": 0, "state": {}, **container}]},
    }


def test_workers_ready_names_why_pods_fail() -> None:
    """The kubelet's reasons (last termination, current wait) reach the WorkersReady message;
    the reason stays WorkersNotReady, which the not-ready alert keys on."""
    oom = _pod(
        "w-1", "retry-1", restartCount=3,
        lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}},
        state={"waiting": {"reason": "CrashLoopBackOff"}},
    )  # fmt: skip
    starting = _pod("w-2", "retry-2", state={"waiting": {"reason": "ContainerCreating"}})
    pull = _pod("w-3", "retry-2", state={"waiting": {"reason": "ImagePullBackOff"}})
    troubles = st.pod_troubles([oom, starting, pull])
    assert troubles == {
        "retry-1": "pod w-1 last terminated OOMKilled (exit 137), now CrashLoopBackOff, 3 restarts",
        "retry-2": "pod w-3 now ImagePullBackOff, 0 restarts",
    }
    s = st.compose(_record(), None, ClusterHealth(True), _workers(ready=0), {}, troubles=troubles)
    workers = {x["type"]: x for x in s["conditions"]}["WorkersReady"]
    assert workers["reason"] == "WorkersNotReady"
    assert f"retry-1: 0/2 ready, 2 up to date ({troubles['retry-1']})" in workers["message"]
    assert st.pod_troubles([_pod("w-4", "retry-1", state={"running": {}})]) == {}


def test_pods_are_listed_only_where_a_stage_lacks_ready_pods() -> None:
    """A pipeline being created (no Deployment yet, or 0 replicas wanted) costs no pods list
    per status tick; a stage with fewer ready or up-to-date pods than it wants does."""
    assert not st.pods_to_explain(_record(), {})  # no Deployments yet
    assert not st.pods_to_explain(_record(), _workers(ready=2))
    assert st.pods_to_explain(_record(), _workers(ready=1))
    rolling = {**_workers(), "retry-2": st.TierWorkers("retry-2", 2, 2, 1, True)}
    assert st.pods_to_explain(_record(), rolling)
    zero = {t: st.TierWorkers(t, 0, 0, 0, True) for t in ("retry-1", "retry-2")}
    assert not st.pods_to_explain(_record(replicas=0, suspended=True), zero)
    assert not st.pods_to_explain(_record(replicas=0), zero)
    keda = {**zero, "retry-1": st.TierWorkers("retry-1", 3, 1, 3, True)}  # KEDA wants 3
    assert st.pods_to_explain(_record(replicas=None), keda)


def test_live_lane_deployment_is_a_tier_workers_pod_on_the_source() -> None:
    spec = _spec(liveLane={}, workers={"replicas": 3, "resources": {"limits": {"cpu": "1"}}})
    topo = spec.topology("shop", "billing-orders")
    defaults = children.WorkerDefaults("op:1", {})
    _, deployments = children.desired_children("shop", "billing-orders", spec, topo, defaults)
    names = [d["metadata"]["name"] for d in deployments]
    assert names == ["billing-orders-retry-1", "billing-orders-retry-2", "billing-orders-live-lane"]
    live, tier = deployments[2], deployments[0]
    container = live["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--live", "--topology-file", children.TOPOLOGY_FILE]
    assert live["spec"]["replicas"] == 3
    assert live["spec"]["selector"]["matchLabels"]["kafkaretry.io/tier"] == "live-lane"
    tier_container = tier["spec"]["template"]["spec"]["containers"][0]
    for key in (
        "image",
        "resources",
        "securityContext",
        "env",
        "envFrom",
        "command",
        "volumeMounts",
    ):
        assert container[key] == tier_container[key], key
    # Without liveLane, nothing changes: the tiers' Deployments only.
    _, plain = children.desired_children("shop", "billing-orders", _spec(), topo, defaults)
    assert [d["metadata"]["name"] for d in plain] == names[:2]
    assert _spec(liveLane={}, suspend=True).topology("s", "p").suspend  # scaled to 0 with tiers
    suspended = children.live_lane_deployment(
        "shop", "billing-orders", _spec(liveLane={}, suspend=True), topo, defaults
    )
    assert suspended["spec"]["replicas"] == 0


def test_the_http_shared_secret_reaches_the_pods_from_the_secret_only() -> None:
    ref = {"name": "svc-token", "key": "token"}
    spec = _spec(handler={"http": {"url": "http://svc/events", "secretRef": ref}}, liveLane={})
    topo = spec.topology("shop", "billing-orders")
    _, deployments = children.desired_children(
        "shop", "billing-orders", spec, topo, children.WorkerDefaults("op:1", {})
    )
    for d in deployments:  # the tiers' and the live lane's
        env = d["spec"]["template"]["spec"]["containers"][0]["env"]
        token = [e for e in env if e["name"] == "KAFKA_RETRY_HTTP_TOKEN"]
        assert token == [{"name": "KAFKA_RETRY_HTTP_TOKEN", "valueFrom": {"secretKeyRef": ref}}]
    plain = _deployment(_spec(handler={"http": {"url": "http://svc/events"}}))
    env = plain["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "KAFKA_RETRY_HTTP_TOKEN" not in {e["name"] for e in env}


def test_live_lane_scaler_watches_the_source_group() -> None:
    spec = _spec(liveLane={}, workers={"autoscaling": {"maxReplicas": 4, "lagPerReplica": 100}})
    scaler = children.live_lane_scaled_object(
        "shop", "billing-orders", spec, spec.topology("shop", "billing-orders")
    )
    assert scaler["spec"]["scaleTargetRef"] == {"name": "billing-orders-live-lane"}
    meta = scaler["spec"]["triggers"][0]["metadata"]
    assert (meta["topic"], meta["consumerGroup"]) == ("orders", "billing")
    assert scaler["spec"]["maxReplicaCount"] == 4


def test_a_tier_named_like_the_live_lane_is_refused_with_it() -> None:
    tiers = [{"name": "live-lane", "delaySeconds": 5}]
    assert _spec(tiers=tiers)  # without liveLane the name is free
    with pytest.raises(ValueError, match="no tier may be named `live-lane` with `liveLane`"):
        _spec(tiers=tiers, liveLane={})


def test_status_shows_the_live_lane_beside_the_tiers() -> None:
    record = _record(live_lane=True, worker_generations={"live-lane": 2})
    live = st.TierWorkers("live-lane", 2, 1, 2, True, generation=2)
    sample = Sample(0.0, {"retry-1": 0, "retry-2": 0}, 0, None, live_lag=12)
    s = st.compose(record, sample, ClusterHealth(True), {**_workers(), "live-lane": live}, {})
    assert s["liveLane"] == {
        "topic": "orders",
        "consumerGroup": "billing",
        "lag": 12,
        "readyReplicas": 1,
    }
    conds = {x["type"]: x for x in s["conditions"]}
    assert conds["WorkersReady"]["message"] == (
        "2/3 tiers and live lane ready; live-lane: 1/2 ready, 2 up to date"
    )
    ready = {**_workers(), "live-lane": st.TierWorkers("live-lane", 2, 2, 2, True, generation=2)}
    # The lag stays known while Kafka cannot be measured.
    again = st.compose(record, None, ClusterHealth(True), ready, s)
    assert again["liveLane"]["lag"] == 12
    assert {x["type"]: x["status"] for x in again["conditions"]}["WorkersReady"] == "True"
    # A live lane removed from the spec is removed from status (a null in the merge patch).
    gone = st.compose(_record(), None, ClusterHealth(True), _workers(), again)
    assert st.merge_patch(again, gone)["liveLane"] is None


def test_suspended_is_ready_with_reason() -> None:
    workers = {t: st.TierWorkers(t, 0, 0, 0, True) for t in ("retry-1", "retry-2")}
    s = st.compose(_record(replicas=0, suspended=True), None, None, workers, {}, at="T")
    conds = {x["type"]: x for x in s["conditions"]}
    assert (conds["Ready"]["status"], conds["Ready"]["reason"]) == ("True", "Suspended")


def test_a_stopped_tiers_oldest_event_near_its_retention_is_at_risk() -> None:
    workers = {t: st.TierWorkers(t, 0, 0, 0, True) for t in ("retry-1", "retry-2")}
    record = _record(replicas=0, suspended=True)
    now = 1_700_000_000.0
    day_ms = 24 * 3600 * 1000

    def ready(oldest_ms: float) -> dict[str, Any]:
        sample = Sample(now, {}, None, None, {"retry-2": int(oldest_ms)})
        s = st.compose(record, sample, None, workers, {}, at="T", now_s=now)
        return next(x for x in s["conditions"] if x["type"] == "Ready")

    safe = ready(now * 1000 - day_ms)  # a week's retention: six days left
    assert (safe["status"], safe["reason"]) == ("True", "Suspended")
    assert "the oldest (on retry-2, from 2023-11-13T22:13:20.000Z) is kept until" in safe["message"]
    risky = ready(now * 1000 - 6.5 * day_ms)  # twelve hours left
    assert (risky["status"], risky["reason"]) == ("False", "EventsAtRisk")
    assert "retry-2" in risky["message"] and "resume the pipeline" in risky["message"]


def test_idle_group_offsets_are_refreshed_every_quarter_of_the_retention() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    assert offset_keeper.due({}, 3600, at)
    last = {"lastOffsetRefreshTime": "2024-01-01T00:00:00Z"}
    assert not offset_keeper.due(last, 3600, at + timedelta(seconds=899))
    assert offset_keeper.due(last, 3600, at + timedelta(seconds=900))
    assert offset_keeper.due({"lastOffsetRefreshTime": "garbage"}, 3600, at)


def test_offset_refreshes_run_one_at_a_time_per_cluster() -> None:
    gate = offset_keeper.OnePerCluster()
    with gate.claim("a") as first:
        with gate.claim("a") as second, gate.claim("b") as other:
            assert (first, second, other) == (True, False, True)
        with gate.claim("a") as again:  # the refused claim did not free the first one's
            assert not again
    with gate.claim("a") as after:
        assert after


def test_events_mark_transitions_not_levels() -> None:
    def status(depth: int | None, workers: str = "True") -> dict[str, Any]:
        s: dict[str, Any] = {"conditions": [{"type": "WorkersReady", "status": workers,
                                             "message": "2 tiers x 1 ready"}]}  # fmt: skip
        if depth is not None:
            s["dlq"] = {"depth": depth}
        return s

    def reasons(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
        return [a.reason for a in announcements.status_changed(before, after, "t.dlq")]

    assert reasons({}, status(3)) == ["WorkersReady", "DLQGrew"]
    assert reasons(status(0), status(3)) == ["DLQGrew"]
    assert reasons(status(3), status(5)) == [], "deeper, but not a transition"
    assert reasons(status(5), status(2)) == []
    assert reasons(status(2), status(0)) == ["DLQEmptied"]
    assert reasons(status(None), status(None)) == []
    assert reasons(status(0, "False"), status(0, "True")) == ["WorkersReady"]
    assert reasons(status(0, "True"), status(0, "False")) == []
    grew = announcements.status_changed(status(0), status(3), "t.dlq")[-1]
    assert grew.type == "Warning" and "3 event(s) now wait in the DLQ t.dlq" in grew.message
    made = announcements.topics_changed(["a", "b"], [])
    assert [(a.type, a.reason, a.message) for a in made] == [
        ("Normal", "TopicsCreated", "created topics a, b")
    ]
    assert announcements.topics_changed([], []) == []


def test_invalid_status() -> None:
    s = st.invalid("spec.tiers: bad", 4, {})
    assert s["observedGeneration"] == 4
    ready = next(x for x in s["conditions"] if x["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")


def test_backoff_grows_and_is_capped() -> None:
    config = OperatorConfig(max_backoff=10)
    assert [config.backoff(r) for r in range(5)] == [2, 4, 8, 10, 10]
    assert (
        OperatorConfig.from_env({"KAFKA_RETRY_OPERATOR_STATUS_INTERVAL": "1"}).status_interval == 1
    )


def test_settings_from_the_environment() -> None:
    default = OperatorConfig.from_env({})
    assert (default.metrics_port, default.metrics_address) == (9400, "0.0.0.0")
    assert default.worker_pod_security_context == {} == default.worker_security_context
    config = OperatorConfig.from_env(
        {
            "KAFKA_RETRY_METRICS_PORT": "0",
            "KAFKA_RETRY_METRICS_ADDRESS": "127.0.0.1",
            "KAFKA_RETRY_WORKER_POD_SECURITY_CONTEXT": json.dumps({"fsGroup": 2000}),
            "KAFKA_RETRY_WORKER_SECURITY_CONTEXT": " ",
        }
    )
    assert (config.metrics_port, config.metrics_address) == (0, "127.0.0.1")
    assert config.worker_pod_security_context == {"fsGroup": 2000}
    assert config.worker_security_context == {}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("KAFKA_RETRY_WORKER_SECURITY_CONTEXT", "{runAsNonRoot: true}", "invalid JSON"),
        ("KAFKA_RETRY_WORKER_POD_SECURITY_CONTEXT", "[]", "expected a JSON object"),
        ("KAFKA_RETRY_WORKER_RESOURCES", "{", "invalid JSON"),
        ("KAFKA_RETRY_METRICS_PORT", "metrics", "not an integer"),
        ("KAFKA_RETRY_METRICS_PORT", "70000", "not a port number"),
        ("KAFKA_RETRY_OPERATOR_STATUS_INTERVAL", "15s", "not a number"),
        ("KAFKA_RETRY_OPERATOR_SECRET_CHECK_INTERVAL", "1m", "not a number"),
        ("KAFKA_RETRY_WORKER_LOG_FORMAT", "yaml", "is not text or json"),
        ("KAFKA_RETRY_WORKER_TOPOLOGY_SPREAD", '{"maxSkew": 1}', "a JSON list of objects"),
    ],
)
def test_unusable_settings_are_named(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        OperatorConfig.from_env({name: value})
    assert str(e.value).startswith(f"{name}: ")


def test_the_operator_refuses_to_start_on_an_unusable_setting() -> None:
    """Settings are read when the handlers are imported: a clear message, no traceback."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kafka-retry-operator"), "-n", "nowhere"],
        env={"KAFKA_RETRY_WORKER_SECURITY_CONTEXT": "{oops"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "KAFKA_RETRY_WORKER_SECURITY_CONTEXT: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_secret_checks_read_each_pipeline_once_per_interval() -> None:
    checks = secret_rotation.SecretChecks(interval=60)
    assert checks.due(("ns", "a"), now=100.0)
    assert not checks.due(("ns", "a"), now=159.0)
    assert checks.due(("ns", "b"), now=159.0)  # per pipeline
    assert checks.due(("ns", "a"), now=160.0)
    checks.forget(("ns", "a"))
    assert checks.due(("ns", "a"), now=161.0)


class _SecretReads:
    """`Kube.secret_version` answering a fixed outcome: a version, or an exception."""

    def __init__(self, outcome: str | Exception) -> None:
        self.outcome = outcome

    def secret_version(self, namespace: str, name: str) -> str:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("41", None),  # unchanged
        ("42", "42"),  # rotated
        ("", None),  # no version: nothing to compare
        (SecretNotFound("gone"), None),  # the reconcile reports it
        (ApiException(status=500), None),  # the next check tries again
        (ConnectionRefusedError(), None),
    ],
)
def test_rotated_version(outcome: str | Exception, expected: str | None) -> None:
    kube: Any = _SecretReads(outcome)
    assert secret_rotation.rotated_version(kube, "shop", "kafka-client", "41") == expected


def test_claims_the_older_pipeline_keeps_overlapping_names() -> None:
    from kafka_retry_operator import claims

    def spec(group: str, source: str, servers: str = "k:9092") -> RetryPipelineSpec:
        return RetryPipelineSpec.model_validate(
            {
                "kafka": {"bootstrapServers": servers},
                "source": {"topic": source, "consumerGroup": group},
                "tiers": [{"name": "retry-1", "delaySeconds": 1}],
                "handler": {"http": {"url": "http://svc/events"}},
            }
        )

    def claimed(s: RetryPipelineSpec) -> dict[claims.ClaimKey, bool]:
        return claims.claims(s, s.topology("ns", "p"))

    old = claims.Claimant("2026-01-01T00:00:00Z", "a", "old", True)
    new = claims.Claimant("2026-01-02T00:00:00Z", "b", "new", True)
    index: dict[claims.ClaimKey, list[claims.Claimant]] = {}
    for key, exclusive in claimed(spec("g.p", "x.t")).items():
        index.setdefault(key, []).append(claims.Claimant(old.created, "a", "old", exclusive))
    # The same prefix with the dot elsewhere, brokers listed differently: an overlap.
    mine = claimed(spec("g.p.x", "t", "K:9092, "))
    overlaps = claims.older_overlaps(new, mine, index)
    assert sorted(overlaps) == [("a", "old")]
    assert "topic g.p.x.t.retry-1" in overlaps[("a", "old")]
    # The older one sees no older overlap; another cluster or group overlaps nothing.
    for key, exclusive in mine.items():
        index.setdefault(key, []).append(claims.Claimant(new.created, "b", "new", exclusive))
    assert claims.older_overlaps(old, claimed(spec("g.p", "x.t")), index) == {}
    assert claims.older_overlaps(new, claimed(spec("g.p.x", "t", "other:9092")), index) == {}
    # Two services sharing a group on different source topics do not overlap.
    assert claims.older_overlaps(new, claimed(spec("g.p", "y")), index) == {}
    # Deleting: names another pipeline claims are kept.
    keys = claims.topic_keys(spec("g.p", "x.t"), spec("g.p", "x.t").topology("a", "old"))
    assert claims.held_by_others(("a", "old"), keys, index) == {k[2] for k in keys}


def test_json_logs_and_spread_reach_the_worker_deployment() -> None:
    spread = {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}
    config = OperatorConfig.from_env(
        {
            "KAFKA_RETRY_WORKER_LOG_FORMAT": "json",
            "KAFKA_RETRY_WORKER_TOPOLOGY_SPREAD": json.dumps([spread]),
        }
    )
    defaults = children.WorkerDefaults(
        "op:1", {}, log_format=config.worker_log_format,
        topology_spread=config.worker_topology_spread,
    )  # fmt: skip
    spec = _spec()
    topo = spec.topology("shop", "billing-orders")
    d = children.tier_deployment("shop", "billing-orders", spec, topo.tiers[0], topo, defaults)
    pod = d["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][-1] == "--log-format=json"
    assert pod["topologySpreadConstraints"] == [{**spread, "labelSelector": d["spec"]["selector"]}]
    # The defaults change nothing of existing Deployments: no extra args, no spread.
    plain = _deployment(spec)["spec"]["template"]["spec"]
    assert plain["containers"][0]["args"] == [
        "--tier", "retry-1", "--topology-file", children.TOPOLOGY_FILE
    ]  # fmt: skip
    assert "topologySpreadConstraints" not in plain


def test_tier_budget_selects_its_tier() -> None:
    budget = children.tier_pdb("shop", "billing-orders", "retry-1")
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": children.selector_labels("billing-orders", "retry-1")},
    }
    assert budget["metadata"]["name"] == _deployment(_spec())["metadata"]["name"]


@pytest.mark.parametrize(
    ("duration", "deadline", "period"), [(15, 15, 2), (15, 10, 10), (15, 10, 0)]
)
def test_lease_timings_must_nest(duration: int, deadline: int, period: float) -> None:
    from kafka_retry_operator.leader import LeaseSettings

    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        LeaseSettings("l", "ns", "me", duration, deadline, period)
    assert LeaseSettings("l", "ns", "me").request_timeout <= 2.5  # (15 - 10) / 2


def test_worker_json_logs() -> None:
    """`kafka-retry worker --log-format json`: one JSON object a line, with a timestamp and a
    severity (as the operator's kopf JSON lines)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kafka-retry"), "worker", "--tier", "x",
         "--log-format", "json"],
        env={"KAFKA_RETRY_TOPOLOGY": "{not json"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2  # a bad topology, logged
    (line,) = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    assert line["severity"] == "error" and "cannot load the topology" in line["message"]
    assert line["timestamp"].endswith("+00:00") and line["logger"] == "kafka_retry.worker"


def test_draining_plans_what_a_spec_change_leaves_behind() -> None:
    from kafka_retry_operator import draining

    def spec(*tiers: tuple[str, int], dlq: str | None = None) -> RetryPipelineSpec:
        return RetryPipelineSpec.model_validate(
            {
                "kafka": {"bootstrapServers": "k:9092"},
                "source": {"topic": "orders", "consumerGroup": "billing"},
                "tiers": [{"name": n, "delaySeconds": d} for n, d in tiers],
                "dlq": {"topic": dlq} if dlq else {},
                "handler": {"http": {"url": "http://svc/events"}},
            }
        )

    def status_of(s: RetryPipelineSpec) -> dict[str, Any]:
        record = _record(topology=s.topology("shop", "p"))
        return st.compose(record, None, None, {}, {}, at="2026-01-01T00:00:00Z")

    before = status_of(spec(("r1", 10), ("r2", 20), ("r3", 30), dlq="old-dlq"))
    now = "2026-01-01T00:01:00Z"
    # A middle tier removed, the last renamed, the DLQ moved, r1's delay shortened.
    after = draining.follow(
        spec(("r1", 5), ("r3", 30), ("last", 40), dlq="new-dlq").topology("shop", "p"),
        before,
        now,
    )
    drains = {d.topic: (d.kind, d.to, d.consumer_group, d.delay_seconds) for d in after.draining}
    assert drains == {
        "billing.orders.r2": ("tier", "billing.orders.r3", "billing.orders.r2", 20),
        "old-dlq": ("dlq", "new-dlq", "old-dlq.cursor", 0),
    }
    assert after.tiers[0].hold_limit_ms() == 10_000, "r1 keeps holding for its old delay"
    assert after.tiers[1].hold_limit_ms() == 30_000
    # Under way drains carry on (their target follows the spec); one back in the spec stops.
    during = st.compose(_record(topology=after), None, None, {}, before, at=now)
    assert {d["topic"] for d in during["draining"]} == set(drains)
    later = draining.follow(
        spec(("r1", 5), ("r2", 20)).topology("shop", "p"), during, "2026-01-01T00:02:00Z"
    )
    assert {(d.topic, d.to) for d in later.draining} == {
        ("old-dlq", "billing.orders.dlq"),
        ("new-dlq", "billing.orders.dlq"),
        ("billing.orders.r3", "billing.orders.r2"),
        ("billing.orders.last", "billing.orders.r2"),
    }
    assert {d.since for d in later.draining if d.topic == "old-dlq"} == {now}
    # A drain ends at lag 0, once settled and with every tier worker current.
    lag = {"old-dlq": 0, "billing.orders.r3": 2, "billing.orders.last": 0}
    at = "2026-01-01T00:02:02Z"
    assert draining.finished(later.draining, lag, True, 5, at) == {"old-dlq"}
    assert draining.finished(later.draining, lag, True, 65, at) == set()
    assert draining.finished(later.draining, lag, False, 5, at) == set()


def test_the_drain_gate_waits_for_every_partition_to_carry_the_current_topology() -> None:
    """A drain ends only when every tier worker runs the current topology (no worker could
    still forward to the drained topic): each partition of each tier group committed with the
    current hash, or the group empty. Unknown counts as behind."""
    F = draining.Following
    current = "c0ffee"
    assert draining.behind({"r1": F(2, {0: current, 1: current})}, current) == []
    assert draining.behind({"r1": F(0, {0: "old", 1: None})}, current) == []  # no workers
    assert draining.behind({"r1": F(1, {})}, current) == []  # no partitions (yet)
    assert draining.behind(
        {"r1": F(1, {0: current, 1: "old", 2: None}), "r2": F(1, {0: current})}, current
    ) == ["r1: partitions 1,2 of 3 not yet"]
    assert draining.behind({"r1": None}, current) == ["r1: not measured yet"]

    # In status: the Draining condition says whom it waits for, and the drain does not end.
    spec = _spec(tiers=[{"name": "retry-1", "delaySeconds": 30}])
    previous = st.compose(
        _record(topology=_spec().topology("shop", "p")),
        None,
        None,
        {},
        {},
        at="2026-01-01T00:00:00Z",
    )
    topology = draining.follow(spec.topology("shop", "p"), previous, "2026-01-01T00:00:00Z")
    (drain,) = topology.draining
    record = _record(topology=topology)
    workers = {"retry-1": st.TierWorkers("retry-1", 2, 2, 2, True)}
    now = "2026-01-01T00:10:00Z"

    def compose(tags: dict[int, str | None]) -> dict[str, Any]:
        sample = Sample(0.0, drain_lag={drain.topic: 0}, following={"retry-1": F(2, tags)})
        return st.compose(record, sample, None, workers, previous, at=now, drain_settle_s=60)

    hashed = topology_hash(topology)
    stale = compose({0: hashed, 1: hashed, 2: "0123456789abcdef"})
    assert [d["topic"] for d in stale["draining"]] == [drain.topic]
    (cond,) = [x for x in stale["conditions"] if x["type"] == "Draining"]
    assert cond["status"] == "True"
    assert (
        "waiting for workers to follow the new topology: retry-1: partitions 2 of 3"
        in (cond["message"])
    )
    assert compose({0: hashed, 1: hashed, 2: hashed})["draining"] == []


class _KedaObjects:
    """The API server's ScaledObjects of one namespace, for Kube.keda_objects: pure bookkeeping
    of which lists it asks for (the real API is exercised by test_operator_autoscaling)."""

    def __init__(self) -> None:
        self.objects: list[tuple[str, dict[str, Any]]] = []  # (plural, object)
        self.lists: list[str] = []

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, label_selector: str, **kw: Any
    ) -> Any:
        self.lists.append(label_selector)
        key, _, value = label_selector.partition("=")
        found = [
            o for kind, o in self.objects
            if kind == plural and value in ("", o["metadata"]["labels"].get(key))
        ]  # fmt: skip
        return {"items": found[: kw.get("limit") or None]}

    def patch_namespaced_custom_object(self, *args: Any, **kw: Any) -> None:
        self.objects.append((args[3], args[5]))


def test_keda_objects_are_not_listed_per_reconcile_where_none_exist() -> None:
    """KEDA installed, no pipeline of the namespace autoscaling: one list of at most one
    object finds that, and later reconciles ask nothing; once one is applied there, each
    pipeline's are listed again (so that one no longer wanted is found and deleted)."""
    from kubernetes import client

    from kafka_retry.model import LABEL_PIPELINE
    from kafka_retry_operator.kube import Kube

    kube = Kube(client.ApiClient(client.Configuration()))
    api = _KedaObjects()
    kube.custom = api  # type: ignore[assignment]
    assert kube.keda_objects("scaledobjects", "shop", "orders") == {}
    assert kube.keda_objects("scaledobjects", "shop", "billing") == {}
    assert api.lists == [LABEL_PIPELINE]
    owner = {"uid": "u1", "controller": True}
    labels = {LABEL_PIPELINE: "orders"}
    meta = {"name": "orders-retry-1", "namespace": "shop", "labels": labels}
    so = {"metadata": {**meta, "ownerReferences": [owner]}}
    kube.apply_keda("scaledobjects", so)
    assert kube.keda_objects("scaledobjects", "shop", "orders") == {"orders-retry-1": "u1"}
    assert api.lists[-1] == f"{LABEL_PIPELINE}=orders"
    assert kube.keda_objects("triggerauthentications", "shop", "orders") == {}  # its own kind
