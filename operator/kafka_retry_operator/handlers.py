"""The kopf handlers: thin, typed, and the only place that speaks kopf.

- login: kopf's own credentials, on an API session bounded in requests at once (api_session).
- startup: operator settings and the long-lived parts (shared Kafka clients, the sampler,
  the /metrics endpoint).
- reconcile (create/update/resume): parse the spec once, then `reconciler.reconcile`.
- finalize (delete): topics per `deletionPolicy`; children go by owner references.
- refresh_status (timer): status from memory (the sampler's batched measurements and the
  Deployment index), written only when it changed; Events on transitions; the idle
  groups' committed offsets kept from expiring (`offset_keeper`); a rotated Kafka or http
  handler Secret noticed (`secret_rotation`) and handed to reconcile.
- tier_workers (index): the tier Deployments' replica counts, so no handler lists them.
- pipeline_deployments, pipeline_budgets (indexes): every worker Deployment and
  PodDisruptionBudget of each pipeline, so that a reconcile finds the ones to remove without
  listing them.
- pipeline_claims (index): the Kafka names every pipeline claims (`claims`), so that of two
  overlapping pipelines the younger creates nothing and deletes nothing of the older's.
- worker_deleted: a tier Deployment deleted by hand makes its pipeline reconcile.
- pipeline_gone: a pipeline deleted without its finalizer running is forgotten too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kafka_retry.model import (
    GROUP,
    LABEL_PIPELINE,
    LABEL_TIER,
    LIVE_LANE,
    VERSION,
    RetryPipelineSpec,
)
from kafka_retry.replay_lease import Lease
from kafka_retry_operator import (
    announcements,
    api_session,
    children,
    claims,
    offset_keeper,
    reconciler,
    secret_rotation,
)
from kafka_retry_operator import replay as replay  # registers the DLQReplay handlers
from kafka_retry_operator import status as st
from kafka_retry_operator.config import ENV_METRICS_PORT, OperatorConfig
from kafka_retry_operator.fleet import PipelineKey, PipelineRecord
from kafka_retry_operator.kube import HTTP_SECRET_VERSION_SEEN, SECRET_VERSION_SEEN, api_client
from kafka_retry_operator.runtime import Runtime, runtime_of
from kafka_retry_operator.topics import Retry

log = logging.getLogger(__name__)

PLURAL = "retrypipelines"
COMPONENT = "kafka-retry-operator"  # the source of our Events
# Read at import: kopf takes a timer's interval when the handler is registered.
CONFIG = OperatorConfig.from_env()


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """Async: the session is made in the operator's event loop, where kopf uses it."""
    return api_session.login(**kwargs)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our annotations, not status, hold kopf's progress: status carries only our fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Handler logs become Kubernetes Events only from warnings up (no event spam at scale);
    # our own Events (`announcements`) mark transitions. All from our name, not kopf's.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = socket.gethostname()  # in a pod: the pod's name
    settings.execution.max_workers = CONFIG.max_workers
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # No cluster-wide scans of namespaces and CRDs: the namespaces are the ones given, the
    # CRDs are installed before the operator starts, and a namespace-scoped install has no
    # right to list either (kopf would retry those 403s for a minute before starting).
    settings.scanning.disabled = True
    rt = Runtime.create(CONFIG, api_client(pool_size=CONFIG.max_workers + 4))
    if CONFIG.metrics_port:
        try:
            rt.metrics.serve(CONFIG.metrics_port, CONFIG.metrics_address)
        except OSError as e:  # a port in use: say so and stop, rather than run unobserved
            where = f"{CONFIG.metrics_address}:{CONFIG.metrics_port}"
            raise kopf.PermanentError(
                f"cannot serve /metrics on {where} (set {ENV_METRICS_PORT}): {e}"
            ) from e
    rt.sampler.start()
    memo.runtime = rt


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = runtime_of(memo)
    rt.sampler.stop()
    rt.metrics.close()


WORKER_INDEX = "tier_workers"  # the name of the indexing function below


@kopf.index("apps", "v1", "deployments", labels={children.LABEL_NAME: children.WORKER_APP})
def tier_workers(
    namespace: str | None,
    labels: kopf.Labels,
    meta: kopf.Meta,
    spec: kopf.Spec,
    status: kopf.Status,
    **_: Any,
) -> dict[PipelineKey, st.TierWorkers] | None:
    pipeline = labels.get(LABEL_PIPELINE)
    tier = labels.get(LABEL_TIER)
    if not (namespace and pipeline and tier):
        return None
    workers = st.TierWorkers(
        tier=tier,
        desired=int(spec.get("replicas", 1)),
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        current=int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0),
        generation=int(meta.get("generation") or 0),
    )
    return {(namespace, pipeline): workers}


def _workers(kwargs: dict[str, Any], key: PipelineKey) -> dict[str, st.TierWorkers]:
    """The pipeline's tier Deployments from the index (kopf passes it as a kwarg named after
    the indexing function)."""
    index: kopf.Index[PipelineKey, st.TierWorkers] = kwargs[WORKER_INDEX]
    return {w.tier: w for w in index.get(key, [])}


DEPLOYMENTS_INDEX = "pipeline_deployments"  # the names of the indexing functions below
BUDGETS_INDEX = "pipeline_budgets"
OwnedIndex = kopf.Index[PipelineKey, tuple[str, str]]


WORKERS = {children.LABEL_NAME: children.WORKER_APP}  # the label on everything a pipeline owns


@kopf.index("apps", "v1", "deployments", labels=WORKERS)
def pipeline_deployments(
    name: str, namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, **_: Any
) -> dict[PipelineKey, tuple[str, str]] | None:
    """Every worker Deployment (tiers', live lane's, drains') by pipeline."""
    return _owned(name, namespace, labels, meta)


@kopf.index("policy", "v1", "poddisruptionbudgets", labels=WORKERS)
def pipeline_budgets(
    name: str, namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, **_: Any
) -> dict[PipelineKey, tuple[str, str]] | None:
    """Every tier's (and the live lane's) PodDisruptionBudget by pipeline."""
    return _owned(name, namespace, labels, meta)


def _owned(
    name: str, namespace: str | None, labels: kopf.Labels, meta: kopf.Meta
) -> dict[PipelineKey, tuple[str, str]] | None:
    """The object under its pipeline's key: (its name, its controlling owner's uid)."""
    pipeline = labels.get(LABEL_PIPELINE)
    if not (namespace and pipeline):
        return None
    owners = [o.get("uid", "") for o in meta.get("ownerReferences") or [] if o.get("controller")]
    return {(namespace, pipeline): (name, owners[0] if owners else "")}


def _children(kwargs: dict[str, Any], key: PipelineKey) -> reconciler.Children:
    """The pipeline's Deployments and budgets as the indexes show them (name -> owner uid)."""
    deployments: OwnedIndex = kwargs[DEPLOYMENTS_INDEX]
    budgets: OwnedIndex = kwargs[BUDGETS_INDEX]
    return reconciler.Children(dict(deployments.get(key, [])), dict(budgets.get(key, [])))


CLAIMS_INDEX = "pipeline_claims"  # the name of the indexing function below


@kopf.index(GROUP, VERSION, PLURAL)
def pipeline_claims(
    spec: kopf.Spec, name: str, namespace: str | None, meta: kopf.Meta, **_: Any
) -> dict[claims.ClaimKey, claims.Claimant] | None:
    try:
        parsed = RetryPipelineSpec.model_validate(dict(spec))
    except ValidationError:
        return None  # claims nothing: it never creates anything
    created = str(meta.get("creationTimestamp") or "")
    return {
        key: claims.Claimant(created, namespace or "", name, exclusive)
        for key, exclusive in claims.claims(parsed, parsed.topology(namespace or "", name)).items()
    }


def _claims(kwargs: dict[str, Any]) -> kopf.Index[claims.ClaimKey, claims.Claimant]:
    index: kopf.Index[claims.ClaimKey, claims.Claimant] = kwargs[CLAIMS_INDEX]
    return index


@kopf.on.event("apps", "v1", "deployments", labels={children.LABEL_NAME: children.WORKER_APP})
def worker_deleted(
    event: kopf.RawEvent,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """A tier's (or the live lane's) Deployment deleted by hand comes back: its pipeline is
    asked to reconcile (an annotation change is a kopf update). Deployments of removed tiers,
    or of pipelines being deleted, are not in the fleet's records and are left alone. An event
    handler, not a delete handler: kopf then keeps no state (annotations, finalizers) on
    Deployments."""
    if event.get("type") != "DELETED":
        return
    rt = runtime_of(memo)
    pipeline, tier = labels.get(LABEL_PIPELINE), labels.get(LABEL_TIER)
    record = rt.fleet.get((namespace or "", pipeline or ""))
    if record is None:
        return
    stages = {t.name for t in record.topology.tiers} | ({LIVE_LANE} if record.live_lane else set())
    if tier not in stages:
        return
    logger.warning(f"worker Deployment of {tier} was deleted: reconciling {pipeline}")
    rt.kube.request_reconcile(namespace or "", pipeline or "")


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile(
    spec: kopf.Spec,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    retry: int,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    rt = runtime_of(memo)
    key = (namespace or "", name)
    with rt.metrics.reconciling(), rt.status_writes.reconciling(key, time.monotonic()):
        try:
            parsed = RetryPipelineSpec.model_validate(dict(spec))
        except ValidationError as e:
            reconciler.forget(rt, key)
            message = _summary(e)
            invalid = st.invalid(message, body.metadata.get("generation"), status)
            patch.status.update(invalid)
            rt.metrics.pipeline_status(key, invalid)
            raise kopf.PermanentError(f"invalid spec: {message}") from None
        record, verdict = reconciler.reconcile(
            rt, body, parsed, _claims(kwargs), _children(kwargs, key), dict(status), logger
        )
        now = time.monotonic()
        previous = rt.status_writes.previous(key, status, now)
        troubles = _pod_troubles(rt, record, kwargs)
        new = _status(rt, record, kwargs, previous, troubles, drains_end=False)
        patch.status.update(st.merge_patch(previous, new))
        rt.status_writes.wrote(key, new, now)
        _announce(body, announcements.topics_changed(verdict.created, verdict.grown))
        _announce(body, announcements.status_changed(previous, new, record.topology.dlq_topic))
        rt.metrics.pipeline_status(key, new)
        if verdict.retry is Retry.LATER:
            raise kopf.TemporaryError(
                f"{verdict.reason}: {verdict.message}", delay=rt.config.backoff(retry)
            )
        if not verdict.ready:
            raise kopf.PermanentError(f"{verdict.reason}: {verdict.message}")


@kopf.on.delete(GROUP, VERSION, PLURAL, retries=20)
def finalize(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    memo: kopf.Memo,
    retry: int,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    rt = runtime_of(memo)
    try:
        parsed: RetryPipelineSpec | None = RetryPipelineSpec.model_validate(dict(spec))
    except ValidationError:
        parsed = None  # never reconciled: nothing of ours to delete
    failed = reconciler.finalize(rt, (namespace or "", name), parsed, _claims(kwargs), logger)
    if failed:
        detail = "; ".join(f"{t}: {e}" for t, e in sorted(failed.items()))
        raise kopf.TemporaryError(f"cannot delete topics: {detail}", delay=rt.config.backoff(retry))


@kopf.on.event(GROUP, VERSION, PLURAL)
def pipeline_gone(
    event: kopf.RawEvent, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """A pipeline gone without `finalize` (its finalizer stripped by hand) is forgotten all the
    same: no longer measured, no series left on /metrics. After `finalize`, a no-op."""
    if event.get("type") == "DELETED":
        rt = runtime_of(memo)
        key = (namespace or "", name)
        reconciler.forget(rt, key)
        rt.metrics.forget(key)


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.status_interval, idle=None)
async def refresh_status(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    rt = runtime_of(memo)
    key = (namespace or "", name)
    record = rt.fleet.get(key)
    if record is None:  # not reconciled (yet), or its spec is invalid
        return
    troubles: dict[str, str] = {}
    if st.pods_to_explain(record, _workers(kwargs, key)):  # no thread hop per tick otherwise
        troubles = await asyncio.to_thread(_pod_troubles, rt, record, kwargs)
    now = time.monotonic()
    if rt.status_writes.settling(key, status, now):
        return  # the reconcile's status first (nothing awaited from here to `wrote`)
    previous = rt.status_writes.previous(key, status, now)  # our last write, if not seen yet
    new = _status(rt, record, kwargs, previous, troubles)
    if st.differs(previous, new):
        patch.status.update(st.merge_patch(previous, new))
        rt.status_writes.wrote(key, new, now)
    elif st.finished_drains(record, status):
        # The stored status has dropped a finished drain: a reconcile removes its worker.
        await asyncio.to_thread(rt.kube.request_reconcile, namespace or "", name)
    rt.metrics.pipeline_status(key, new, record)
    _announce(body, announcements.status_changed(previous, new, record.topology.dlq_topic))
    health = rt.sampler.health(record.cluster)
    if health is not None and health.reachable:
        retention = health.offsets_retention_s or offset_keeper.FALLBACK_RETENTION_S
        if offset_keeper.due(status, retention):
            await asyncio.to_thread(_keep_offsets, rt, record)
    secrets = [
        (secret, seen, reason)
        for secret, seen, reason in (
            (record.secret, SECRET_VERSION_SEEN, "KafkaSecretRotated"),
            (record.http_secret, HTTP_SECRET_VERSION_SEEN, "HttpSecretRotated"),
        )
        if secret is not None
    ]
    if secrets and rt.secret_checks.due(key, time.monotonic()):
        for secret, seen, reason in secrets:
            rotated = await asyncio.to_thread(
                secret_rotation.rotated_version, rt.kube, namespace or "", *secret
            )
            if rotated is not None and rotated != body.metadata.annotations.get(seen):
                patch.metadata.annotations[seen] = rotated
                kopf.event(
                    body,
                    type="Normal",
                    reason=reason,
                    message=f"Secret {secret[0]} changed: reconciling, its workers roll",
                )


def _keep_offsets(rt: Runtime, record: PipelineRecord) -> None:
    admin = rt.admins.admin(record.cluster) if record.cluster is not None else None
    if admin is None:
        return
    namespace, name = record.key
    lease = Lease(rt.kube.core.api_client, namespace, name, offset_keeper.LEASE_NAME, replay.HOLDER)
    with rt.offset_refreshes.claim(record.cluster) as mine:
        if not mine:  # another pipeline's refresh on this cluster: still due at the next pass
            return
        try:
            offset_keeper.refresh(
                lease, admin, record.topology, record.replicas == 0, rt.config.kafka_timeout
            )
        except Exception as e:  # tried again at the next pass
            log.warning("%s/%s: offsets not refreshed: %s", namespace, name, e)


def _announce(body: kopf.Body, found: list[announcements.Announcement]) -> None:
    for a in found:
        kopf.event(body, type=a.type, reason=a.reason, message=a.message)


def _status(
    rt: Runtime,
    record: PipelineRecord,
    kwargs: dict[str, Any],
    status: Mapping[str, Any],
    troubles: dict[str, str],
    drains_end: bool = True,
) -> dict[str, Any]:
    """The status the pipeline should show now: from the last reconcile, the sampler's latest
    measurements, the tier Deployments' index and why their pods fail. A reconcile's status
    ends no drain (`drains_end`): one it began is shown at least once, however long the
    reconcile took (past the settle time); the timer ends them."""
    return st.compose(
        record,
        rt.sampler.sample(record.key),
        rt.sampler.health(record.cluster),
        _workers(kwargs, record.key),
        status,
        drain_settle_s=rt.config.drain_settle if drains_end else math.inf,
        troubles=troubles,
    )


def _pod_troubles(rt: Runtime, record: PipelineRecord, kwargs: dict[str, Any]) -> dict[str, str]:
    """Why the pods of tiers that are not ready fail (OOMKilled, CrashLoopBackOff...): one
    list of the pipeline's tier-worker pods, only while some tier has fewer ready pods than it
    wants. Without the right to list pods, or the API answering an error, the status says only
    the counts."""
    if not st.pods_to_explain(record, _workers(kwargs, record.key)):
        return {}
    namespace, name = record.key
    try:
        return st.pod_troubles(rt.kube.tier_worker_pods(namespace, name))
    except ApiException as e:
        log.warning(
            "%s/%s: tier-worker pods not listed: %s %s", namespace, name, e.status, e.reason
        )
        return {}


def _summary(error: ValidationError) -> str:
    """`spec.tiers.0.delaySeconds: Input should be ...; ...` (wire field names)."""
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in ("spec", *e["loc"]))
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)
