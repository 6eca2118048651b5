"""Where a worker or a service finds its pipeline's `Topology`: one source of truth, published
by the operator in the ConfigMap `<pipeline>-topology` (key `topology.json`), and handed to
tier workers as the `KAFKA_RETRY_TOPOLOGY` environment variable or a file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kafka_retry.model import Topology

TOPOLOGY_ENV = "KAFKA_RETRY_TOPOLOGY"
CONFIGMAP_KEY = "topology.json"
CONFIGMAP_SUFFIX = "-topology"
_SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TopologyNotFound(LookupError):
    pass


def configmap_name(pipeline_name: str) -> str:
    return f"{pipeline_name}{CONFIGMAP_SUFFIX}"


def topology_from_file(path: str | os.PathLike[str]) -> Topology:
    return Topology.from_json(Path(path).read_text(encoding="utf-8"))


def topology_from_env(environ: Mapping[str, str] | None = None) -> Topology:
    env = os.environ if environ is None else environ
    text = env.get(TOPOLOGY_ENV)
    if not text:
        raise TopologyNotFound(f"{TOPOLOGY_ENV} is not set")
    return Topology.from_json(text)


def topology_from_configmap(
    pipeline: str, namespace: str | None = None, *, api_client: Any = None
) -> Topology:
    """Read `<pipeline>-topology`. `pipeline` may be `namespace/name` (`Topology.pipeline`);
    otherwise the namespace defaults to the pod's own, then the kubeconfig's, then default."""
    if "/" in pipeline:
        namespace, pipeline = pipeline.split("/", 1)
    from kubernetes import client
    from kubernetes import config as kube_config

    config: Any = kube_config  # partly typed upstream; used as the dynamic module it is
    if api_client is None:
        try:
            config.load_incluster_config()
            api_client = client.ApiClient()
        except config.ConfigException:
            api_client = config.new_client_from_config()
            if namespace is None:
                _, context = config.list_kube_config_contexts()
                namespace = (context or {}).get("context", {}).get("namespace")
    if namespace is None and _SERVICEACCOUNT_NAMESPACE.exists():
        namespace = _SERVICEACCOUNT_NAMESPACE.read_text().strip()
    name = configmap_name(pipeline)
    cm = client.CoreV1Api(api_client).read_namespaced_config_map(name, namespace or "default")
    text = (cm.data or {}).get(CONFIGMAP_KEY)
    if not text:
        raise TopologyNotFound(f"ConfigMap {namespace}/{name} has no {CONFIGMAP_KEY}")
    return Topology.from_json(text)


def load_topology(
    file: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Topology:
    """A file if given, else the environment variable."""
    if file is not None:
        return topology_from_file(file)
    return topology_from_env(environ)
