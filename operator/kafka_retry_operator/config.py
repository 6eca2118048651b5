"""Operator settings, read once from the environment (the Helm chart sets them).

Environment variables rather than flags because kopf's timers take their interval when the
handlers are registered, at import time, before any command line is parsed. A value that
cannot be read is a `ConfigError` naming the variable: the operator refuses to start rather
than run with a default the deployer did not ask for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

N = TypeVar("N", int, float)

DEFAULT_WORKER_IMAGE = "kafka-retry-operator:0.1.0"  # the chart's default image (values.yaml)
DEFAULT_WORKER_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "50m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}

ENV_WORKER_IMAGE = "KAFKA_RETRY_WORKER_IMAGE"
ENV_WORKER_RESOURCES = "KAFKA_RETRY_WORKER_RESOURCES"  # JSON {"requests": {...}, "limits": {...}}
ENV_WORKER_PULL_POLICY = "KAFKA_RETRY_WORKER_IMAGE_PULL_POLICY"
ENV_WORKER_LOG_FORMAT = "KAFKA_RETRY_WORKER_LOG_FORMAT"  # text | json
# JSON list of topologySpreadConstraints for tier-worker pods (a missing labelSelector selects
# the tier's own pods).
ENV_WORKER_TOPOLOGY_SPREAD = "KAFKA_RETRY_WORKER_TOPOLOGY_SPREAD"
ENV_STATUS_INTERVAL = "KAFKA_RETRY_OPERATOR_STATUS_INTERVAL"
ENV_SECRET_CHECK_INTERVAL = "KAFKA_RETRY_OPERATOR_SECRET_CHECK_INTERVAL"
ENV_KAFKA_TIMEOUT = "KAFKA_RETRY_OPERATOR_KAFKA_TIMEOUT"
ENV_MAX_BACKOFF = "KAFKA_RETRY_OPERATOR_MAX_BACKOFF"
ENV_MAX_WORKERS = "KAFKA_RETRY_OPERATOR_MAX_WORKERS"
ENV_DRAIN_SETTLE = "KAFKA_RETRY_OPERATOR_DRAIN_SETTLE"
# JSON objects merged key by key onto the restricted defaults (children.merge_patch).
ENV_WORKER_POD_SECURITY_CONTEXT = "KAFKA_RETRY_WORKER_POD_SECURITY_CONTEXT"
ENV_WORKER_SECURITY_CONTEXT = "KAFKA_RETRY_WORKER_SECURITY_CONTEXT"
# The operator's own /metrics (the same port variable as the tier workers'); port 0: off.
ENV_METRICS_PORT = "KAFKA_RETRY_METRICS_PORT"
ENV_METRICS_ADDRESS = "KAFKA_RETRY_METRICS_ADDRESS"
DEFAULT_METRICS_PORT = 9400


class ConfigError(ValueError):
    """A setting in the environment that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class OperatorConfig:
    worker_image: str = DEFAULT_WORKER_IMAGE
    worker_resources: Mapping[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_WORKER_RESOURCES)
    )
    worker_pull_policy: str = "IfNotPresent"
    worker_log_format: str = "text"
    worker_topology_spread: tuple[Mapping[str, Any], ...] = ()
    # How often lag, DLQ depth and worker readiness are measured and written to status.
    status_interval: float = 15.0
    # How often each pipeline's Kafka Secret is read again to notice a rotation.
    secret_check_interval: float = 60.0
    # Bound on every Kafka admin call; an unreachable cluster costs at most this per attempt.
    kafka_timeout: float = 10.0
    # Longest wait between retries of a failed reconcile (it doubles from 2 s up to this).
    max_backoff: float = 120.0
    # A drain ends no sooner than this after it began: time for services' SDKs (which re-read
    # the topology every `sdk.TOPOLOGY_REFRESH_S`) to stop producing to the old topic.
    drain_settle: float = 60.0
    # Threads for synchronous handlers: reconciles of different pipelines run in parallel.
    max_workers: int = 16
    # Overrides of the tier workers' restricted security contexts, merged onto them.
    worker_pod_security_context: Mapping[str, Any] = field(default_factory=dict)
    worker_security_context: Mapping[str, Any] = field(default_factory=dict)
    # Where the operator serves /metrics; port 0 serves nothing.
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_address: str = "0.0.0.0"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        port = _number(env, ENV_METRICS_PORT, int, DEFAULT_METRICS_PORT)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{ENV_METRICS_PORT}: {port} is not a port number (0 turns it off)")
        log_format = env.get(ENV_WORKER_LOG_FORMAT) or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"{ENV_WORKER_LOG_FORMAT}: {log_format!r} is not text or json")
        return cls(
            worker_image=env.get(ENV_WORKER_IMAGE) or DEFAULT_WORKER_IMAGE,
            worker_log_format=log_format,
            worker_topology_spread=_json_objects(env, ENV_WORKER_TOPOLOGY_SPREAD),
            worker_resources=_json_object(env, ENV_WORKER_RESOURCES) or DEFAULT_WORKER_RESOURCES,
            worker_pull_policy=env.get(ENV_WORKER_PULL_POLICY) or "IfNotPresent",
            status_interval=_number(env, ENV_STATUS_INTERVAL, float, 15.0),
            secret_check_interval=_number(env, ENV_SECRET_CHECK_INTERVAL, float, 60.0),
            kafka_timeout=_number(env, ENV_KAFKA_TIMEOUT, float, 10.0),
            max_backoff=_number(env, ENV_MAX_BACKOFF, float, 120.0),
            drain_settle=_number(env, ENV_DRAIN_SETTLE, float, 60.0),
            max_workers=_number(env, ENV_MAX_WORKERS, int, 16),
            worker_pod_security_context=_json_object(env, ENV_WORKER_POD_SECURITY_CONTEXT),
            worker_security_context=_json_object(env, ENV_WORKER_SECURITY_CONTEXT),
            metrics_port=port,
            metrics_address=env.get(ENV_METRICS_ADDRESS) or "0.0.0.0",
        )

    def backoff(self, retry: int) -> float:
        """Seconds before retry number `retry` (0-based) of a failed reconcile."""
        return float(min(self.max_backoff, 2.0 * 2 ** min(retry, 16)))


def _json_object(env: Mapping[str, str], name: str) -> dict[str, Any]:
    """The variable as a JSON object; unset or empty is `{}`."""
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name}: invalid JSON ({e}): {raw[:200]}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_objects(env: Mapping[str, str], name: str) -> tuple[dict[str, Any], ...]:
    """The variable as a JSON list of objects; unset or empty is `()`."""
    raw = env.get(name, "").strip()
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name}: invalid JSON ({e}): {raw[:200]}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{name}: expected a JSON list of objects")
    return tuple(value)


def _number(env: Mapping[str, str], name: str, kind: type[N], default: N) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name}: {raw!r} is not {what}") from None
