"""One reconcile of a RetryPipeline, and its clean-up on deletion.

Order matters: the topics first (workers of a missing topic would only crash-loop), then the
topology ConfigMap, then one Deployment per tier, then the Deployments of tiers no longer in
the spec are removed. Every step is idempotent, so a retry or a restart of the operator
converges without duplicating anything.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import kopf

from kafka_retry.kafka_secret import SecretNotFound
from kafka_retry.model import LABEL_TIER, LIVE_LANE, RetryPipelineSpec, Topology
from kafka_retry_operator import children, claims, conditions, draining, topics
from kafka_retry_operator.fleet import PipelineKey, PipelineRecord, owner_id
from kafka_retry_operator.kafka_admin import Cluster, InvalidKafkaSettings
from kafka_retry_operator.keda_auth import KedaKafkaAuth, UnsupportedKafkaAuth
from kafka_retry_operator.runtime import Runtime
from kafka_retry_operator.topics import Retry, TopicsVerdict

KAFKA_SECRET_NOT_FOUND = "KafkaSecretNotFound"
# Reasons of the Autoscaling condition.
KEDA_SCALED_OBJECT = "KedaScaledObject"
KEDA_NOT_INSTALLED = "KedaNotInstalled"
KEDA_AUTH_UNSUPPORTED = "KedaAuthUnsupported"
TRIGGER_AUTHS = children.TRIGGER_AUTHENTICATIONS
SUSPENDED = "Suspended"
PIPELINE_OVERLAP = "PipelineOverlap"
ClaimsIndex = Mapping[claims.ClaimKey, Iterable[claims.Claimant]]
INVALID_KAFKA_SETTINGS = "InvalidKafkaSettings"


class Children(NamedTuple):
    """The pipeline's worker Deployments and PodDisruptionBudgets in the cluster, as kopf's
    indexes show them: name -> controlling owner's uid. No list per reconcile: at 2,000
    pipelines, a list by label was O(N) work for the API server each."""

    deployments: Mapping[str, str]
    budgets: Mapping[str, str]

    def with_applied(self, last: PipelineRecord | None, uid: str) -> Children:
        """Also those the last reconcile applied, which the indexes may not show yet."""
        if last is None:
            return self
        return Children(
            {**self.deployments, **dict.fromkeys(last.deployments, uid)},
            {**self.budgets, **dict.fromkeys(last.budgets, uid)},
        )


class Connection(NamedTuple):
    cluster: Cluster | None  # None: no client (see `verdict`)
    verdict: TopicsVerdict | None  # why there is no client
    secret: tuple[str, str] | None  # (name, version) of the Secret read, if the spec names one
    settings: Mapping[str, str]  # the Secret's librdkafka settings; never log them


def connect(rt: Runtime, key: PipelineKey, spec: RetryPipelineSpec) -> Connection:
    """Bind the pipeline to its cluster's shared AdminClient, with the Secret's settings."""
    settings: dict[str, str] = {}
    secret: tuple[str, str] | None = None
    if spec.kafka.secret_ref is not None:
        name = spec.kafka.secret_ref.name
        try:
            settings, version = rt.kube.kafka_secret(key[0], name)
        except SecretNotFound as e:
            rt.admins.release(owner_id(key))
            verdict = TopicsVerdict(False, KAFKA_SECRET_NOT_FOUND, str(e), Retry.LATER)
            return Connection(None, verdict, None, {})
        secret = (name, version)
    try:
        cluster = rt.admins.bind(owner_id(key), spec.kafka.bootstrap_servers, settings)
        return Connection(cluster, None, secret, settings)
    except InvalidKafkaSettings as e:
        rt.admins.release(owner_id(key))
        verdict = TopicsVerdict(False, INVALID_KAFKA_SETTINGS, str(e), Retry.LATER)
        return Connection(None, verdict, secret, settings)


def http_secret_version(
    rt: Runtime, key: PipelineKey, spec: RetryPipelineSpec
) -> tuple[str, str] | None:
    """(name, resourceVersion) of `handler.http.secretRef`'s Secret, from its metadata only:
    the operator never reads the shared secret. None when there is none, or not yet (the pods
    wait for it: their container cannot start without it)."""
    ref = spec.handler.http.secret_ref if spec.handler.http is not None else None
    if ref is None:
        return None
    try:
        return ref.name, rt.kube.secret_version(key[0], ref.name)
    except SecretNotFound:
        return None


def reconcile(
    rt: Runtime,
    body: kopf.Body,
    spec: RetryPipelineSpec,
    claimed: ClaimsIndex,
    existing: Children,
    previous: Mapping[str, Any],
    logger: logging.Logger | Any,
) -> tuple[PipelineRecord, TopicsVerdict]:
    """`previous` is the pipeline's status as last written: what its topics were, so that the
    ones this spec leaves behind drain (draining.py)."""
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    key = (namespace, name)
    last = rt.fleet.get(key)
    topology = draining.follow(spec.topology(namespace, name), previous, conditions.now())
    me = claims.Claimant(str(body.metadata.get("creationTimestamp") or ""), namespace, name, True)
    overlaps = claims.older_overlaps(me, claims.claims(spec, topology), claimed)
    if overlaps:
        # Nothing is created, not even a Kafka client: the names are another pipeline's.
        rt.admins.release(owner_id(key))
        why = TopicsVerdict(False, PIPELINE_OVERLAP, claims.describe(overlaps), Retry.LATER)
        connection = Connection(None, why, None, {})
    else:
        connection = connect(rt, key, spec)
    cluster, verdict, secret = connection.cluster, connection.verdict, connection.secret
    http_secret = http_secret_version(rt, key, spec)
    if secret is not None or http_secret is not None:
        rt.secret_checks.read(key, time.monotonic())  # the status timer need not read them again
    if cluster is not None:
        admin = rt.admins.admin(cluster)
        assert admin is not None  # just bound
        verdict = topics.ensure(
            admin,
            topics.plan(spec, topology),
            spec.source.topic,
            spec.kafka.bootstrap_servers,
            rt.config.kafka_timeout,
        )
    assert verdict is not None
    if verdict.created or verdict.grown:
        logger.info(f"topics created: {list(verdict.created)}, grown: {list(verdict.grown)}")
    autoscaled, autoscaling, keda_auth = autoscaling_verdict(rt, spec, connection.settings)
    record = PipelineRecord(
        key=key,
        generation=int(body.metadata.get("generation") or 0),
        topology=topology,
        cluster=cluster,
        replicas=children.desired_replicas(spec, autoscaled),
        suspended=spec.suspend,
        topics=conditions.Verdict.of(
            conditions.TOPICS_READY, verdict.ready, verdict.reason, verdict.message
        ),
        secret=secret,
        http_secret=http_secret,
        autoscaling=autoscaling,
        live_lane=spec.live_lane is not None,
    )
    # Recorded before the children change, so that a Deployment this reconcile removes is
    # already unknown when its deletion is seen (see handlers.worker_deleted).
    rt.fleet.put(record)
    if verdict.usable:
        versions = children.secret_annotations(secret, http_secret)
        existing = existing.with_applied(last, str(body.metadata.uid))
        applied, names, budgets = apply_children(
            rt, body, spec, topology, existing, versions, autoscaled, keda_auth
        )
        record = dataclasses.replace(
            record, worker_generations=applied, deployments=names, budgets=budgets
        )
        rt.fleet.put(record)
    rt.sampler.wake(cluster, key)
    return record, verdict


def autoscaling_verdict(
    rt: Runtime, spec: RetryPipelineSpec, settings: Mapping[str, str]
) -> tuple[bool, conditions.Verdict | None, KedaKafkaAuth | None]:
    """(KEDA scales the tier workers, the Autoscaling condition, how KEDA authenticates with
    the pipeline's Secret). No condition without `spec.workers.autoscaling`. No HPA fallback:
    the lag is not served as an external metric."""
    if spec.workers.autoscaling is None:
        return False, None, None
    if spec.suspend:
        why = "spec.suspend: tier workers are scaled to 0, no ScaledObject"
        return False, conditions.Verdict.of(conditions.AUTOSCALING, False, SUSPENDED, why), None
    least = f"tier workers stay at minReplicas ({spec.workers.autoscaling.min_replicas})"
    if not rt.kube.keda_served():
        why = (
            f"KEDA's ScaledObject API ({children.KEDA_GROUP}/{children.KEDA_VERSION}) is not "
            f"served: {least}. Install KEDA, or drop autoscaling"
        )
        verdict = conditions.Verdict.of(conditions.AUTOSCALING, False, KEDA_NOT_INSTALLED, why)
        return False, verdict, None
    auth = None
    if spec.kafka.secret_ref is not None:
        try:
            auth = KedaKafkaAuth.of(settings)
        except UnsupportedKafkaAuth as e:
            why = f"Secret {spec.kafka.secret_ref.name}: {e}: {least}"
            verdict = conditions.Verdict.of(
                conditions.AUTOSCALING, False, KEDA_AUTH_UNSUPPORTED, why
            )
            return False, verdict, None
    ok = "a KEDA ScaledObject per tier scales its workers on the tier's lag"
    return True, conditions.Verdict.of(conditions.AUTOSCALING, True, KEDA_SCALED_OBJECT, ok), auth


def apply_children(
    rt: Runtime,
    body: kopf.Body,
    spec: RetryPipelineSpec,
    topology: Topology,
    existing: Children,
    secrets: Mapping[str, str],
    autoscaled: bool = False,
    keda_auth: KedaKafkaAuth | None = None,
) -> tuple[dict[str, int], frozenset[str], frozenset[str]]:
    """Returns each tier's (and the live lane's) Deployment generation as applied (stage ->
    generation), and the names of the Deployments and of the budgets applied. Those of
    `existing` not wanted any more are deleted."""
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    configmap, deployments = children.desired_children(
        namespace, name, spec, topology, rt.worker_defaults, secrets, autoscaled
    )
    kopf.adopt([configmap, *deployments], owner=body)
    rt.kube.apply_configmap(configmap)
    applied = {}
    for deployment in deployments:
        generation = rt.kube.apply_deployment(deployment)
        tier = deployment["metadata"]["labels"].get(LABEL_TIER)
        if tier is not None:  # not a drain's
            applied[tier] = generation
    # Removed tiers' workers go (their topics drain: see draining.py), as do finished drains'.
    wanted = frozenset(d["metadata"]["name"] for d in deployments)
    for deployment_name, owner_uid in existing.deployments.items():
        if deployment_name not in wanted and owner_uid == body.metadata.uid:
            rt.kube.delete_deployment(namespace, deployment_name)
    budgets = apply_disruption_budgets(rt, body, spec, topology, existing.budgets)
    apply_scaled_objects(rt, body, spec, topology, autoscaled, keda_auth)
    return applied, wanted, budgets


def apply_scaled_objects(
    rt: Runtime,
    body: kopf.Body,
    spec: RetryPipelineSpec,
    topology: Topology,
    autoscaled: bool,
    auth: KedaKafkaAuth | None,
) -> None:
    """A KEDA ScaledObject per tier (and the live lane) while KEDA scales the workers, and the
    TriggerAuthentication they name when the pipeline's Secret holds credentials; others of the
    pipeline go (autoscaling turned off, a tier removed, no credentials). Without KEDA there is
    nothing to list."""
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    bootstrap = spec.kafka.bootstrap_servers
    wanted: dict[str, list[dict[str, Any]]] = {children.SCALED_OBJECTS: [], TRIGGER_AUTHS: []}
    if autoscaled:
        if auth is not None and auth.parameters and spec.kafka.secret_ref is not None:
            secret = spec.kafka.secret_ref.name
            trigger_auth = children.trigger_authentication(namespace, name, secret, auth)
            wanted[TRIGGER_AUTHS].append(trigger_auth)
        wanted[children.SCALED_OBJECTS] = [
            children.scaled_object(namespace, name, spec, tier, bootstrap, auth)
            for tier in topology.tiers
        ]
        if spec.live_lane is not None:
            wanted[children.SCALED_OBJECTS].append(
                children.live_lane_scaled_object(namespace, name, spec, topology, auth)
            )
    for plural in (TRIGGER_AUTHS, children.SCALED_OBJECTS):  # named before it is used
        kopf.adopt(wanted[plural], owner=body)
        for obj in wanted[plural]:
            rt.kube.apply_keda(plural, obj)
    if not (autoscaled or rt.kube.keda_served()):
        return
    for plural in (children.SCALED_OBJECTS, TRIGGER_AUTHS):  # unused before it goes
        keep = {o["metadata"]["name"] for o in wanted[plural]}
        for obj_name, owner_uid in rt.kube.keda_objects(plural, namespace, name).items():
            if obj_name not in keep and owner_uid == body.metadata.uid:
                rt.kube.delete_keda(plural, namespace, obj_name)


def apply_disruption_budgets(
    rt: Runtime,
    body: kopf.Body,
    spec: RetryPipelineSpec,
    topology: Topology,
    existing: Mapping[str, str],
) -> frozenset[str]:
    """A PodDisruptionBudget per tier (and the live lane) while it runs more than one worker;
    those of `existing` (name -> owner uid) for stages scaled down to one, suspended or
    removed go. Returns the names of the budgets applied."""
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    scaling = spec.workers.autoscaling
    most = scaling.max_replicas if scaling is not None else spec.workers.replicas
    several = most > 1 and not spec.suspend
    stages = [t.name for t in topology.tiers] + ([LIVE_LANE] if spec.live_lane else [])
    budgets = [children.tier_pdb(namespace, name, stage) for stage in stages if several]
    kopf.adopt(budgets, owner=body)
    for budget in budgets:
        rt.kube.apply_pdb(budget)
    keep = frozenset(b["metadata"]["name"] for b in budgets)
    for pdb, owner_uid in existing.items():
        if pdb not in keep and owner_uid == body.metadata.uid:
            rt.kube.delete_pdb(namespace, pdb)
    return keep


def forget(rt: Runtime, key: PipelineKey) -> None:
    """Stop measuring a pipeline and release its cluster's client."""
    rt.fleet.remove(key)
    rt.sampler.forget(key)
    rt.secret_checks.forget(key)
    rt.status_writes.forget(key)
    rt.admins.release(owner_id(key))


def finalize(
    rt: Runtime,
    key: PipelineKey,
    spec: RetryPipelineSpec | None,
    claimed: ClaimsIndex,
    logger: logging.Logger | Any,
) -> dict[str, str]:
    """Clean-up on deletion; answers the topics that could not be deleted (retry later).

    With `deletionPolicy: Delete` the tier workers are stopped first, and the topics deleted
    only once their Deployments are gone (deleted in the foreground: after their pods), so
    that no worker writes to a topic being deleted; then the tier and DLQ topics go, except
    any another pipeline claims too (`claims`); the source topic never does. The ConfigMap
    and Deployments are garbage-collected through their owner references."""
    rt.fleet.remove(key)
    rt.sampler.forget(key)
    rt.secret_checks.forget(key)
    rt.status_writes.forget(key)
    rt.metrics.forget(key)
    if spec is None or spec.topics.deletion_policy != "Delete":
        rt.admins.release(owner_id(key))
        return {}
    namespace, name = key
    running = rt.kube.worker_deployments(namespace, name)
    if running:
        # Topics go only once no worker can write to them (a producer might re-create one).
        for deployment_name in running:
            rt.kube.delete_deployment(namespace, deployment_name, foreground=True)
        return {"*": f"waiting for the workers to stop: {', '.join(sorted(running))}"}
    cluster, verdict, _, _ = connect(rt, key, spec)
    admin = rt.admins.admin(cluster) if cluster is not None else None
    if admin is None:
        return {"*": verdict.message if verdict else "no Kafka client"}
    topology = spec.topology(namespace, name)
    ours = claims.topic_keys(spec, topology)
    shared = claims.held_by_others(key, ours, claimed)
    if shared:
        logger.info(f"keeping topics other pipelines claim too: {sorted(shared)}")
    names = [name for _, _, name in ours if name not in shared]
    failed = topics.delete(admin, names, rt.config.kafka_timeout)
    if not failed:
        logger.info(f"deleted topics {names} (deletionPolicy: Delete)")
        rt.admins.release(owner_id(key))
    return failed
