"""The operator's long-lived parts, made once at startup and handed to handlers via kopf's memo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kafka_retry_operator.children import WorkerDefaults
from kafka_retry_operator.config import OperatorConfig
from kafka_retry_operator.fleet import Fleet
from kafka_retry_operator.kafka_admin import AdminRegistry
from kafka_retry_operator.kube import Kube
from kafka_retry_operator.metrics import OperatorMetrics
from kafka_retry_operator.offset_keeper import OnePerCluster
from kafka_retry_operator.sampler import Sampler
from kafka_retry_operator.secret_rotation import SecretChecks
from kafka_retry_operator.status_writes import StatusWrites


@dataclass
class Runtime:
    config: OperatorConfig
    kube: Kube
    admins: AdminRegistry
    fleet: Fleet
    sampler: Sampler
    metrics: OperatorMetrics
    secret_checks: SecretChecks
    worker_defaults: WorkerDefaults
    offset_refreshes: OnePerCluster
    status_writes: StatusWrites

    @classmethod
    def create(cls, config: OperatorConfig, api: Any) -> Runtime:
        admins = AdminRegistry()
        fleet = Fleet()
        sampler = Sampler(fleet, admins, config.status_interval, config.kafka_timeout)
        metrics = OperatorMetrics(fleet, sampler)
        checks = SecretChecks(config.secret_check_interval)
        defaults = WorkerDefaults(
            config.worker_image,
            config.worker_resources,
            config.worker_pull_policy,
            config.worker_pod_security_context,
            config.worker_security_context,
            config.worker_log_format,
            config.worker_topology_spread,
        )
        # Long enough for the watch to catch up with a write; short enough to heal a lost one.
        writes = StatusWrites(ttl_s=max(30.0, 3 * config.status_interval))
        return cls(
            config, Kube(api), admins, fleet, sampler, metrics, checks, defaults, OnePerCluster(),
            writes,
        )  # fmt: skip


def runtime_of(memo: Any) -> Runtime:
    """The Runtime in kopf's memo (set by the startup handler)."""
    rt = getattr(memo, "runtime", None)
    if not isinstance(rt, Runtime):
        raise RuntimeError("the operator's startup handler has not run")
    return rt
