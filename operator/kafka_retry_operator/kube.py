"""The operator's own Kubernetes API calls (kopf does the watching and the status patches).

Children are written with server-side apply under one field manager: the operator states the
whole object it wants, fields it stops setting are removed, and an unchanged object is not
written at all, so reconciling again (or after a restart) never duplicates or churns anything.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from kafka_retry import kafka_secret
from kafka_retry.model import GROUP, LABEL_PIPELINE, LIVE_LANE, VERSION
from kafka_retry_operator.children import (
    KEDA_GROUP,
    KEDA_VERSION,
    LABEL_COMPONENT,
    MANAGER,
    SCALED_OBJECTS,
    TIER_WORKER,
)

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
# Not under `kafkaretry.io/`: kopf leaves its own storage prefix out of what it diffs.
RECONCILE_REQUESTED = f"operator.{GROUP}/reconcile-requested"
KEDA_CHECK_S = 10.0  # how long a look at whether KEDA is installed stays true
# On a RetryPipeline: a new version of its Kafka Secret (or of its http handler's), seen by the
# status timer; setting it is what makes the pipeline reconcile (see secret_rotation).
SECRET_VERSION_SEEN = f"operator.{GROUP}/kafka-secret-version"
HTTP_SECRET_VERSION_SEEN = f"operator.{GROUP}/http-secret-version"
# A Secret's metadata without its data (the API server's PartialObjectMetadata).
_METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def api_client(pool_size: int = 16) -> client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config. One
    connection per handler thread, so parallel reconciles never wait for a connection."""
    config: Any = kube_config  # partly untyped upstream
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.policy = client.PolicyV1Api(api)
        self._keda: tuple[bool, float] | None = None  # (served, when checked)
        # (plural, namespace) -> whether any pipeline's KEDA object is there (see
        # `keda_objects`); absent: not known yet.
        self._keda_any: dict[tuple[str, str], bool] = {}
        self._keda_lock = threading.Lock()

    def secret_settings(self, namespace: str, name: str) -> dict[str, str]:
        """The Secret's keys and decoded values (librdkafka settings). Never log the result."""
        return self.kafka_secret(namespace, name).settings

    def kafka_secret(self, namespace: str, name: str) -> kafka_secret.KafkaSecret:
        """Settings and version of a pipeline's Secret, in one read. Never log the settings."""
        return kafka_secret.read_kafka_secret(self.core.api_client, namespace, name)

    def secret_version(self, namespace: str, name: str) -> str:
        """A Secret's resourceVersion, read as metadata only: its values never reach the
        operator (`get`, like `kafka_secret`). Raises `SecretNotFound`."""
        try:
            answer: Any = self.core.read_namespaced_secret(  # the raw answer, not a V1Secret
                name, namespace, _headers={"Accept": _METADATA_ONLY}, _preload_content=False
            )
        except ApiException as e:
            if e.status == 404:
                raise kafka_secret.SecretNotFound(f"Secret {namespace}/{name} not found") from None
            raise
        meta = json.loads(answer.data)
        return str((meta.get("metadata") or {}).get("resourceVersion") or "")

    def apply_configmap(self, body: dict[str, Any]) -> None:
        _apply(self.core.patch_namespaced_config_map, body)

    def apply_deployment(self, body: dict[str, Any]) -> int:
        """The Deployment's generation after the apply: a status composed before the watch has
        delivered it must not take the previous generation's rollout for this one's."""
        applied = _apply(self.apps.patch_namespaced_deployment, body)
        return int(applied.metadata.generation or 0)

    def apply_pdb(self, body: dict[str, Any]) -> None:
        _apply(self.policy.patch_namespaced_pod_disruption_budget, body)

    def keda_served(self) -> bool:
        """Whether KEDA's ScaledObject API is served (its CRDs installed), as seen at most
        `KEDA_CHECK_S` ago: one discovery call, not one per reconcile. Discovery is open to
        every authenticated user: no RBAC needed."""
        now = time.monotonic()
        if self._keda is not None and now - self._keda[1] < KEDA_CHECK_S:
            return self._keda[0]
        try:
            found: Any = self.custom.get_api_resources(KEDA_GROUP, KEDA_VERSION)
            served = any(r.name == SCALED_OBJECTS for r in found.resources)
        except ApiException as e:
            if e.status != 404:
                raise
            served = False
        self._keda = (served, now)
        return served

    def apply_keda(self, plural: str, body: dict[str, Any]) -> None:
        """Server-side apply of a KEDA object (a ScaledObject, a TriggerAuthentication),
        validated strictly against KEDA's schema (an unknown field is an error, not silently
        dropped)."""
        meta = body["metadata"]
        with self._keda_lock:
            self._keda_any[(plural, meta["namespace"])] = True
        self.custom.patch_namespaced_custom_object(
            KEDA_GROUP, KEDA_VERSION, meta["namespace"], plural, meta["name"], body,
            field_manager=MANAGER, force=True, field_validation="Strict", _content_type=APPLY,
        )  # fmt: skip

    def keda_objects(self, plural: str, namespace: str, pipeline: str) -> dict[str, str]:
        """The pipeline's KEDA objects of one kind now in the cluster: name -> owner uid
        (none where that kind is not served).

        Where KEDA is installed but no pipeline of the namespace autoscales, the answer is
        empty without asking: one list of at most one object of any pipeline finds that, and
        it holds until the operator applies one there (2,000 pipelines created without
        autoscaling were 4,000 lists by label, each O(N) for the API server: a third of a
        reconcile's time)."""
        key = (plural, namespace)
        with self._keda_lock:
            known = self._keda_any.get(key)
        if known is None:
            anyone = self._keda_list(plural, namespace, LABEL_PIPELINE, limit=1)
            if anyone is None:
                return {}
            with self._keda_lock:  # an apply meanwhile has set True: it stays
                known = self._keda_any.setdefault(key, bool(anyone.get("items")))
        if not known:
            return {}
        found = self._keda_list(plural, namespace, f"{LABEL_PIPELINE}={pipeline}")
        if found is None:
            return {}
        return {
            o["metadata"]["name"]: next(
                (r["uid"] for r in o["metadata"].get("ownerReferences", []) if r.get("controller")),
                "",
            )
            for o in found.get("items", [])
        }

    def _keda_list(self, plural: str, namespace: str, selector: str, **kw: Any) -> Any:
        """None where the kind is not served."""
        try:
            return self.custom.list_namespaced_custom_object(
                KEDA_GROUP, KEDA_VERSION, namespace, plural, label_selector=selector, **kw
            )
        except ApiException as e:
            if e.status != 404:
                raise
            return None

    def delete_keda(self, plural: str, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                KEDA_GROUP, KEDA_VERSION, namespace, plural, name
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_pdb(self, namespace: str, name: str) -> None:
        try:
            self.policy.delete_namespaced_pod_disruption_budget(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    def tier_worker_pods(self, namespace: str, pipeline: str) -> list[dict[str, Any]]:
        """The pipeline's tier-worker and live-lane pods, as the API serves them (camelCase
        dicts)."""
        selector = f"{LABEL_PIPELINE}={pipeline},{LABEL_COMPONENT} in ({TIER_WORKER},{LIVE_LANE})"
        found = self.core.list_namespaced_pod(namespace, label_selector=selector)
        serialize = self.core.api_client.sanitize_for_serialization
        return [dict(serialize(pod)) for pod in found.items]

    def worker_deployments(self, namespace: str, pipeline: str) -> dict[str, str]:
        """The pipeline's Deployments now in the cluster (tier and drain workers): name ->
        controlling owner's uid."""
        return _owners(self.apps.list_namespaced_deployment, namespace, pipeline)

    def delete_deployment(self, namespace: str, name: str, *, foreground: bool = False) -> None:
        """Foreground: the Deployment stays (with a deletionTimestamp) until its pods are
        gone, so its absence proves that its workers have stopped."""
        policy = "Foreground" if foreground else "Background"
        try:
            self.apps.delete_namespaced_deployment(name, namespace, propagation_policy=policy)
        except ApiException as e:
            if e.status != 404:
                raise

    def request_reconcile(self, namespace: str, pipeline: str) -> None:
        """Touch an annotation of the pipeline: kopf sees a change and runs its update handler,
        serialized with any other handling of that pipeline."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        body = {"metadata": {"annotations": {RECONCILE_REQUESTED: stamp}}}
        try:
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "retrypipelines", pipeline, body, _content_type=MERGE
            )
        except ApiException as e:
            if e.status != 404:
                raise


def _owners(list_namespaced: Any, namespace: str, pipeline: str) -> dict[str, str]:
    """The pipeline's objects of one kind (by its label): name -> controlling owner's uid."""
    found = list_namespaced(namespace, label_selector=f"{LABEL_PIPELINE}={pipeline}")
    result: dict[str, str] = {}
    for item in found.items:
        meta = item.metadata
        if meta is None or not meta.name:
            continue
        owners = [o.uid for o in meta.owner_references or [] if o.controller]
        result[meta.name] = owners[0] if owners else ""
    return result


def _apply(patch: Any, body: dict[str, Any]) -> Any:
    """Server-side apply of `body` with the operator as the one field manager."""
    meta = body["metadata"]
    return patch(
        meta["name"],
        meta["namespace"],
        body,
        field_manager=MANAGER,
        force=True,
        _content_type=APPLY,
    )
