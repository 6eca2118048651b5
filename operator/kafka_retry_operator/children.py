"""The Kubernetes objects a pipeline owns, as pure functions of its spec: the topology
ConfigMap, one tier-worker Deployment per tier and, with `spec.liveLane`, the live lane's.

This is the operator's half of the contract with the tier worker (`kafka-retry worker`): the
command and args, the topology from the ConfigMap (mounted as a file that the tier and
live-lane workers follow, `--topology-file`; in `KAFKA_RETRY_TOPOLOGY` for drain workers), the
metrics and probe port, and the Secret's librdkafka settings as `KAFKA_CLIENT_*` variables. Owner
references are added by the caller (`kopf.adopt`), so these stay testable without a cluster.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kafka_retry.handlers import HTTP_TOKEN_ENV
from kafka_retry.kafka_config import CLIENT_ENV_PREFIX
from kafka_retry.model import (
    LABEL_PIPELINE,
    LABEL_TIER,
    LIVE_LANE,
    DrainingStage,
    ResolvedTier,
    RetryPipelineSpec,
    Topology,
)
from kafka_retry.topology_source import CONFIGMAP_KEY, TOPOLOGY_ENV, configmap_name
from kafka_retry_operator.keda_auth import KedaKafkaAuth

# The worker's probe and metrics port (kafka_retry.metrics.PORT_ENV / DEFAULT_PORT; not
# imported, so the operator does not register the data plane's metrics).
METRICS_PORT_ENV = "KAFKA_RETRY_METRICS_PORT"
METRICS_PORT = 9400
# The pod name, for static group membership (kafka_retry.worker.INSTANCE_ID_ENV).
INSTANCE_ID_ENV = "KAFKA_RETRY_INSTANCE_ID"
WORKER_CONTAINER = "worker"
WORKER_COMMAND = ["kafka-retry", "worker"]
# Images run as a fixed non-root user: runAsNonRoot cannot check a user given by name.
WORKER_UID = 65532
# The "restricted" Pod Security Standard. Deployers' overrides (config.py) are merged onto
# these with `merge_patch`, so a partial override cannot drop a protection by omission.
RESTRICTED_POD_SECURITY_CONTEXT: Mapping[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_SECURITY_CONTEXT: Mapping[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DRAIN = "kafkaretry.io/drain"  # on a drain worker: which drain (DrainingStage)
WORKER_APP = "kafka-retry-worker"
TIER_WORKER = "tier-worker"  # the component label of tier-worker pods
MANAGER = "kafka-retry-operator"
# KEDA's ScaledObject, made for tiers of pipelines with `spec.workers.autoscaling`.
KEDA_GROUP, KEDA_VERSION, SCALED_OBJECTS = "keda.sh", "v1alpha1", "scaledobjects"
TRIGGER_AUTHENTICATIONS = "triggerauthentications"
TOPOLOGY_HASH_ANNOTATION = "kafkaretry.io/topology-hash"
# On a pod template: the versions of the Secrets its pods were started with (Kafka settings,
# the http handler's shared secret): a new version rolls them.
SECRET_VERSION_ANNOTATION = "kafkaretry.io/kafka-secret-version"
HTTP_SECRET_VERSION_ANNOTATION = "kafkaretry.io/http-secret-version"


def secret_annotations(
    kafka: tuple[str, str] | None, http: tuple[str, str] | None
) -> dict[str, str]:
    """The pod-template annotations for the (name, version) of each Secret read."""
    named = {SECRET_VERSION_ANNOTATION: kafka, HTTP_SECRET_VERSION_ANNOTATION: http}
    return {annotation: s[1] for annotation, s in named.items() if s is not None and s[1]}


def deployment_name(pipeline: str, tier: str) -> str:
    return f"{pipeline}-{tier}"


def pipeline_labels(pipeline: str) -> dict[str, str]:
    """Labels on everything a pipeline owns; select its workers with `LABEL_PIPELINE`."""
    return {
        LABEL_NAME: WORKER_APP,
        LABEL_INSTANCE: pipeline,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_PIPELINE: pipeline,
    }


def selector_labels(pipeline: str, tier: str) -> dict[str, str]:
    """A Deployment's selector: immutable, so only labels that never change."""
    return {LABEL_NAME: WORKER_APP, LABEL_INSTANCE: pipeline, LABEL_TIER: tier}


# Where tier and live-lane workers find the topology: the ConfigMap's key as a file in a
# read-only volume, which the kubelet rewrites when the ConfigMap changes (a directory mount:
# a subPath mount would never be updated).
TOPOLOGY_VOLUME = "topology"
TOPOLOGY_DIR = "/etc/kafka-retry"
TOPOLOGY_FILE = f"{TOPOLOGY_DIR}/{CONFIGMAP_KEY}"


def start_hash(topology: Topology, stage: str) -> str:
    """What a tier (or live-lane) worker reads of the topology only when it starts, hashed into
    its pod template so that a change rolls it: its own topic and group, the handler, the
    delivery guarantee, the cluster, suspension. The rest (routing, delays, classification,
    the DLQ) it follows live (`StageRunner.follow`), so such a change restarts nothing."""
    own = (
        topology.tier(stage).model_dump(mode="json", include={"topic", "consumer_group"})
        if stage != LIVE_LANE
        else {"topic": topology.source_topic, "consumer_group": topology.consumer_group}
    )
    read = topology.model_dump(
        mode="json", include={"pipeline", "bootstrap_servers", "handler", "delivery", "suspend"}
    )
    text = json.dumps({**read, "stage": own}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def topology_configmap(namespace: str, pipeline: str, topology: Topology) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(pipeline),
            "namespace": namespace,
            "labels": {**pipeline_labels(pipeline), LABEL_COMPONENT: "topology"},
        },
        "data": {CONFIGMAP_KEY: topology.to_json()},
    }


@dataclass(frozen=True)
class WorkerDefaults:
    """What the operator's settings (config.py) say of tier-worker pods where a spec is silent.
    The security contexts are overrides merged onto the restricted defaults (`merge_patch`);
    empty means exactly the defaults."""

    image: str
    resources: Mapping[str, Any]
    pull_policy: str = "IfNotPresent"
    pod_security_context: Mapping[str, Any] = field(default_factory=dict)
    security_context: Mapping[str, Any] = field(default_factory=dict)
    log_format: str = "text"  # `kafka-retry worker --log-format`
    topology_spread: tuple[Mapping[str, Any], ...] = ()  # topologySpreadConstraints


def worker_image(spec: RetryPipelineSpec, default_image: str) -> str:
    """A python handler runs in the service's image; an http handler in ours (or the one the
    spec names)."""
    if spec.handler.python is not None:
        return spec.handler.python.image
    return spec.workers.image or default_image


def worker_resources(spec: RetryPipelineSpec, defaults: Mapping[str, Any]) -> dict[str, Any]:
    if spec.workers.resources is not None:
        return spec.workers.resources.wire()
    return {k: dict(v) for k, v in defaults.items()}


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`patch` applied to `base` as a JSON merge patch (RFC 7386): objects merge key by key,
    recursively; a `null` removes the key; anything else (scalars, lists) replaces it.

    Why merge rather than replace: `{"runAsUser": 1000}` must not silently lose runAsNonRoot
    and seccomp, nor `{"capabilities": {"add": [...]}}` the `drop: [ALL]`. Weakening a default
    takes saying so (`"readOnlyRootFilesystem": false`, or `null` to remove it)."""
    merged = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            below = merged.get(key)
            merged[key] = merge_patch(below if isinstance(below, Mapping) else {}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def desired_replicas(spec: RetryPipelineSpec, autoscaled: bool) -> int | None:
    """Workers per tier the operator sets; None when KEDA sets them (the Deployment's
    `replicas` is then left out of the operator's apply, so it owns the field no more). With
    autoscaling asked for but no KEDA, the fewest it allows."""
    if spec.suspend:
        return 0
    if spec.workers.autoscaling is not None:
        return None if autoscaled else spec.workers.autoscaling.min_replicas
    return spec.workers.replicas


def tier_deployment(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    tier: ResolvedTier,
    topology: Topology,
    defaults: WorkerDefaults,
    secrets: Mapping[str, str] | None = None,
    autoscaled: bool = False,
) -> dict[str, Any]:
    """The Deployment of one tier's workers. The Secrets' versions (`secret_annotations`) are
    written into the pod template, so that a rotated Secret rolls the pods (its values reach
    them only as environment variables, read at start)."""
    return _worker_deployment(
        namespace, pipeline, spec, deployment_name(pipeline, tier.name),
        {LABEL_COMPONENT: TIER_WORKER, LABEL_TIER: tier.name},
        selector_labels(pipeline, tier.name),
        ["--tier", tier.name, "--topology-file", TOPOLOGY_FILE],
        start_hash(topology, tier.name), defaults, secrets, desired_replicas(spec, autoscaled),
    )  # fmt: skip


def live_lane_deployment(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    topology: Topology,
    defaults: WorkerDefaults,
    secrets: Mapping[str, str] | None = None,
    autoscaled: bool = False,
) -> dict[str, Any]:
    """The managed live lane (`spec.liveLane`): `kafka-retry worker --live`, a tier worker's
    pod on the source topic. Labelled as a stage named `live-lane` (no tier may have that name
    then), so the Deployment index, budgets and KEDA treat it as they treat a tier."""
    return _worker_deployment(
        namespace, pipeline, spec, deployment_name(pipeline, LIVE_LANE),
        {LABEL_COMPONENT: LIVE_LANE, LABEL_TIER: LIVE_LANE},
        selector_labels(pipeline, LIVE_LANE), ["--live", "--topology-file", TOPOLOGY_FILE],
        start_hash(topology, LIVE_LANE), defaults, secrets, desired_replicas(spec, autoscaled),
    )  # fmt: skip


def drain_deployment(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    drain: DrainingStage,
    defaults: WorkerDefaults,
    secrets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Deployment that empties a topic a spec change left behind (see draining.py). Its
    pods roll only when their own drain changes (its target), not with the topology."""
    suffix = drain.deployment_suffix()
    selector = {LABEL_NAME: WORKER_APP, LABEL_INSTANCE: pipeline, LABEL_DRAIN: suffix}
    digest = hashlib.sha256(drain.model_dump_json(exclude={"since"}).encode()).hexdigest()[:16]
    return _worker_deployment(
        namespace, pipeline, spec, deployment_name(pipeline, suffix),
        {LABEL_COMPONENT: "drain-worker", LABEL_DRAIN: suffix}, selector,
        ["--drain", drain.topic], digest, defaults, secrets,
        desired_replicas(spec, autoscaled=False),
    )  # fmt: skip


def _worker_deployment(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    name: str,
    role_labels: Mapping[str, str],
    selector: Mapping[str, str],
    args: list[str],
    template_hash: str,
    defaults: WorkerDefaults,
    secrets: Mapping[str, str] | None,
    replicas: int | None,
) -> dict[str, Any]:
    labels = {**pipeline_labels(pipeline), **role_labels}
    follows = TOPOLOGY_FILE in args  # the file, followed live; else the variable, read at start
    from_configmap = {"name": configmap_name(pipeline), "key": CONFIGMAP_KEY}
    env: list[dict[str, Any]] = [
        *(
            []
            if follows
            else [{"name": TOPOLOGY_ENV, "valueFrom": {"configMapKeyRef": from_configmap}}]
        ),
        {"name": METRICS_PORT_ENV, "value": str(METRICS_PORT)},
        {"name": INSTANCE_ID_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    token = spec.handler.http.secret_ref if spec.handler.http is not None else None
    if token is not None:  # from the Secret to the pod: never through the operator
        ref = {"name": token.name, "key": token.key}
        env.append({"name": HTTP_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}})
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": worker_image(spec, defaults.image),
        "imagePullPolicy": defaults.pull_policy,
        "command": list(WORKER_COMMAND),
        # Text is the worker's default: Deployments of text-logging workers stay as they were.
        "args": args
        + ([f"--log-format={defaults.log_format}"] if defaults.log_format != "text" else []),
        "env": env,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "resources": worker_resources(spec, defaults.resources),
        "securityContext": merge_patch(RESTRICTED_SECURITY_CONTEXT, defaults.security_context),
        # A read-only root still needs somewhere for temporary files.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
        + (
            [{"name": TOPOLOGY_VOLUME, "mountPath": TOPOLOGY_DIR, "readOnly": True}]
            if follows
            else []
        ),
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    if follows:
        volumes.append(
            {
                "name": TOPOLOGY_VOLUME,
                "configMap": {
                    "name": configmap_name(pipeline),
                    "items": [{"key": CONFIGMAP_KEY, "path": CONFIGMAP_KEY}],
                },
            }
        )
    if spec.kafka.secret_ref is not None:
        container["envFrom"] = [
            {"prefix": CLIENT_ENV_PREFIX, "secretRef": {"name": spec.kafka.secret_ref.name}}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            **_replicas(replicas),
            "selector": {"matchLabels": dict(selector)},
            "template": {
                "metadata": {
                    "labels": labels,
                    # What the workers read only at start (`start_hash`): its change rolls them.
                    "annotations": {
                        TOPOLOGY_HASH_ANNOTATION: template_hash,
                        **(secrets or {}),
                    },
                },
                "spec": {
                    "automountServiceAccountToken": False,  # workers never call the API
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": merge_patch(
                        RESTRICTED_POD_SECURITY_CONTEXT, defaults.pod_security_context
                    ),
                    "containers": [container],
                    "volumes": volumes,
                    **_spread(defaults.topology_spread, dict(selector)),
                },
            },
        },
    }


def _replicas(replicas: int | None) -> dict[str, int]:
    return {} if replicas is None else {"replicas": replicas}


def scaled_object(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    tier: ResolvedTier,
    bootstrap: str,
    auth: KedaKafkaAuth | None = None,
) -> dict[str, Any]:
    """KEDA's Kafka scaler on the tier's own consumer group and topic: a worker per
    `lagPerReplica` events waiting, between min and max; with the pipeline's Secret, it
    connects as the pipeline's clients do (`auth`, see keda_auth)."""
    return _scaled_object(
        namespace, pipeline, spec, tier.name, tier.consumer_group, tier.topic, bootstrap, auth
    )


def live_lane_scaled_object(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    topology: Topology,
    auth: KedaKafkaAuth | None = None,
) -> dict[str, Any]:
    """The live lane's scaler: on the source group's lag, with the tiers' bounds."""
    return _scaled_object(
        namespace, pipeline, spec, LIVE_LANE, topology.consumer_group, topology.source_topic,
        topology.bootstrap_servers, auth,
    )  # fmt: skip


def _scaled_object(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    stage: str,
    group: str,
    topic: str,
    bootstrap: str,
    auth: KedaKafkaAuth | None,
) -> dict[str, Any]:
    autoscaling = spec.workers.autoscaling
    assert autoscaling is not None
    component = LIVE_LANE if stage == LIVE_LANE else TIER_WORKER
    labels = {**pipeline_labels(pipeline), LABEL_COMPONENT: component, LABEL_TIER: stage}
    trigger: dict[str, Any] = {
        "type": "kafka",
        "metadata": {
            "bootstrapServers": bootstrap,
            "consumerGroup": group,
            "topic": topic,
            "lagThreshold": str(autoscaling.lag_per_replica),
            # A group starts at the beginning of its topic, as the worker.
            "offsetResetPolicy": "earliest",
            **(auth.metadata if auth else {}),
        },
    }
    if auth is not None and auth.parameters:
        trigger["authenticationRef"] = {"name": trigger_authentication_name(pipeline)}
    return {
        "apiVersion": f"{KEDA_GROUP}/{KEDA_VERSION}",
        "kind": "ScaledObject",
        "metadata": {
            "name": deployment_name(pipeline, stage),
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            "scaleTargetRef": {"name": deployment_name(pipeline, stage)},
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "triggers": [trigger],
        },
    }


def trigger_authentication_name(pipeline: str) -> str:
    return f"{pipeline}-kafka"


def trigger_authentication(
    namespace: str, pipeline: str, secret: str, auth: KedaKafkaAuth
) -> dict[str, Any]:
    """The TriggerAuthentication the pipeline's ScaledObjects name: KEDA reads each credential
    from the pipeline's own Secret (nothing is copied)."""
    return {
        "apiVersion": f"{KEDA_GROUP}/{KEDA_VERSION}",
        "kind": "TriggerAuthentication",
        "metadata": {
            "name": trigger_authentication_name(pipeline),
            "namespace": namespace,
            "labels": {**pipeline_labels(pipeline), LABEL_COMPONENT: TIER_WORKER},
        },
        "spec": {
            "secretTargetRef": [
                {"parameter": param, "name": secret, "key": key}
                for param, key in sorted(auth.parameters.items())
            ]
        },
    }


def _spread(
    constraints: tuple[Mapping[str, Any], ...], selector: Mapping[str, str]
) -> dict[str, Any]:
    """topologySpreadConstraints over the tier's own pods unless a constraint says otherwise."""
    if not constraints:
        return {}
    spread = [{"labelSelector": {"matchLabels": dict(selector)}, **c} for c in constraints]
    return {"topologySpreadConstraints": spread}


def pdb_name(pipeline: str, tier: str) -> str:
    return deployment_name(pipeline, tier)


def tier_pdb(namespace: str, pipeline: str, tier: str) -> dict[str, Any]:
    """At most one of a tier's workers evicted at a time (a node drain): the others go on
    consuming while the evicted one's partitions move. Only for tiers of more than one replica
    (with one it would protect nothing: maxUnavailable 1 lets its only pod go)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": pdb_name(pipeline, tier),
            "namespace": namespace,
            "labels": {
                **pipeline_labels(pipeline),
                LABEL_COMPONENT: LIVE_LANE if tier == LIVE_LANE else TIER_WORKER,
                LABEL_TIER: tier,
            },
        },
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(pipeline, tier)}},
    }


def desired_children(
    namespace: str,
    pipeline: str,
    spec: RetryPipelineSpec,
    topology: Topology,
    defaults: WorkerDefaults,
    secrets: Mapping[str, str] | None = None,
    autoscaled: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ConfigMap and the Deployments: the tiers' in tier order, the live lane's, then the
    drains'."""
    live = (
        [live_lane_deployment(namespace, pipeline, spec, topology, defaults, secrets, autoscaled)]
        if spec.live_lane is not None
        else []
    )
    deployments = (
        [
            tier_deployment(
                namespace, pipeline, spec, tier, topology, defaults, secrets, autoscaled
            )
            for tier in topology.tiers
        ]
        + live
        + [
            drain_deployment(namespace, pipeline, spec, drain, defaults, secrets)
            for drain in topology.draining
        ]
    )
    return topology_configmap(namespace, pipeline, topology), deployments
