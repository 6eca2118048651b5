"""Kafka client settings from the Kubernetes Secret a pipeline names in `spec.kafka.secretRef`.

The operator, the CLI and the replay engine read credentials the same way: each key of the
Secret is a librdkafka setting. The values are credentials: never log or print them.
"""

from __future__ import annotations

import base64
from typing import Any, NamedTuple

from kubernetes import client
from kubernetes.client.exceptions import ApiException


class SecretNotFound(LookupError):
    pass


class KafkaSecret(NamedTuple):
    settings: dict[str, str]  # credentials: never log them
    version: str  # the Secret's resourceVersion: changes when the Secret does


def read_kafka_secret(api: Any, namespace: str, name: str) -> KafkaSecret:
    """The Secret's keys and decoded values, and its version. `api` is a kubernetes ApiClient."""
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise SecretNotFound(f"Secret {namespace}/{name} not found") from None
        raise
    data = secret.data or {}
    settings = {k: base64.b64decode(v).decode() for k, v in data.items()}
    meta = secret.metadata
    return KafkaSecret(settings, str(meta.resource_version or "") if meta is not None else "")


def secret_settings(api: Any, namespace: str, name: str) -> dict[str, str]:
    """The Secret's keys and decoded values. `api` is a kubernetes ApiClient."""
    return read_kafka_secret(api, namespace, name).settings
