"""Operator settings, read once from the environment (the Helm chart sets them).

Environment variables rather than flags because kopf's timers take their interval when the
handlers are registered, at import time, before any command line is parsed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_WORKER_IMAGE = "ghcr.io/kafka-retry-operator/kafka-retry-operator:0.1.0"
DEFAULT_WORKER_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "50m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}

ENV_WORKER_IMAGE = "KAFKA_RETRY_WORKER_IMAGE"
ENV_WORKER_RESOURCES = "KAFKA_RETRY_WORKER_RESOURCES"  # JSON {"requests": {...}, "limits": {...}}
ENV_WORKER_PULL_POLICY = "KAFKA_RETRY_WORKER_IMAGE_PULL_POLICY"
ENV_STATUS_INTERVAL = "KAFKA_RETRY_OPERATOR_STATUS_INTERVAL"
ENV_KAFKA_TIMEOUT = "KAFKA_RETRY_OPERATOR_KAFKA_TIMEOUT"
ENV_MAX_BACKOFF = "KAFKA_RETRY_OPERATOR_MAX_BACKOFF"
ENV_MAX_WORKERS = "KAFKA_RETRY_OPERATOR_MAX_WORKERS"


@dataclass(frozen=True)
class OperatorConfig:
    worker_image: str = DEFAULT_WORKER_IMAGE
    worker_resources: Mapping[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_WORKER_RESOURCES)
    )
    worker_pull_policy: str = "IfNotPresent"
    # How often lag, DLQ depth and worker readiness are measured and written to status.
    status_interval: float = 15.0
    # Bound on every Kafka admin call; an unreachable cluster costs at most this per attempt.
    kafka_timeout: float = 10.0
    # Longest wait between retries of a failed reconcile (it doubles from 2 s up to this).
    max_backoff: float = 120.0
    # Threads for synchronous handlers: reconciles of different pipelines run in parallel.
    max_workers: int = 16

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        resources = env.get(ENV_WORKER_RESOURCES)
        return cls(
            worker_image=env.get(ENV_WORKER_IMAGE) or DEFAULT_WORKER_IMAGE,
            worker_resources=json.loads(resources) if resources else DEFAULT_WORKER_RESOURCES,
            worker_pull_policy=env.get(ENV_WORKER_PULL_POLICY) or "IfNotPresent",
            status_interval=float(env.get(ENV_STATUS_INTERVAL) or 15.0),
            kafka_timeout=float(env.get(ENV_KAFKA_TIMEOUT) or 10.0),
            max_backoff=float(env.get(ENV_MAX_BACKOFF) or 120.0),
            max_workers=int(env.get(ENV_MAX_WORKERS) or 16),
        )

    def backoff(self, retry: int) -> float:
        """Seconds before retry number `retry` (0-based) of a failed reconcile."""
        return float(min(self.max_backoff, 2.0 * 2 ** min(retry, 16)))
