"""Noticing a rotated Secret with nothing more than `get` on Secrets.

A pipeline's Kafka credentials reach its workers as environment variables, read when a pod
starts, and the operator's own AdminClient when a reconcile binds it; the http handler's
shared secret (`handler.http.secretRef`) reaches only the workers, the same way. Watching
Secrets would take `list` and `watch` on every Secret of the watched namespaces, and a copy of
them all in the operator's memory; instead the status timer reads each pipeline's Secrets'
metadata again every `interval` seconds (never their values). When a version is not the one
the last reconcile used, the timer marks the pipeline with the new version (an annotation
change, which kopf hands to the update handler): that reconcile reads the Secret (the Kafka
one: it rebinds the AdminClient) and writes the version into the workers' pod template, which
rolls them.
"""

from __future__ import annotations

import logging
import threading

from kubernetes.client.exceptions import ApiException

from kafka_retry.kafka_secret import SecretNotFound
from kafka_retry_operator.fleet import PipelineKey
from kafka_retry_operator.kube import Kube

log = logging.getLogger(__name__)


class SecretChecks:
    """When each pipeline's Secret was last read; one read per pipeline and interval."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[PipelineKey, float] = {}

    def due(self, key: PipelineKey, now: float) -> bool:
        """True (and counted as read now) when `key`'s Secret was last read an interval ago."""
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                return False
            self._last[key] = now
            return True

    def read(self, key: PipelineKey, now: float) -> None:
        """`key`'s Secret was read now (by a reconcile): the next check is an interval away."""
        with self._lock:
            self._last[key] = now

    def forget(self, key: PipelineKey) -> None:
        with self._lock:
            self._last.pop(key, None)


def rotated_version(kube: Kube, namespace: str, secret: str, seen: str) -> str | None:
    """The Secret's version when it is no longer `seen`, else None. A Secret that is gone
    is left to the next reconcile to report (a condition), and a failed read to the next
    check: only a changed Secret is news here, and the status refresh goes on regardless."""
    try:
        version = kube.secret_version(namespace, secret)
    except SecretNotFound:
        return None
    except (ApiException, OSError) as e:
        log.warning("could not read Secret %s/%s to check for rotation: %s", namespace, secret, e)
        return None
    return version if version and version != seen else None
