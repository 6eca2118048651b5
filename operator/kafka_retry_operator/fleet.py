"""What the operator remembers about each pipeline between handler calls.

A reconcile records the pipeline's resolved topology, its Kafka cluster and the outcome of
its topic check; the sampler reads the records to know what to measure, and the status
timer composes status from the record, the latest sample and the workers' Deployments. The
record, not the (possibly older) status in a handler's body, is the truth for what the last
reconcile found, so a timer tick can never write back a stale TopicsReady. After a restart
the `resume` reconcile fills the fleet again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from kafka_retry.model import Topology
from kafka_retry_operator.conditions import Verdict
from kafka_retry_operator.kafka_admin import Cluster

PipelineKey = tuple[str, str]  # (namespace, name)


def owner_id(key: PipelineKey) -> str:
    return f"{key[0]}/{key[1]}"


@dataclass(frozen=True)
class PipelineRecord:
    key: PipelineKey
    generation: int
    topology: Topology
    cluster: Cluster | None  # None: no client could be made (bad settings, missing Secret)
    replicas: int | None  # desired per tier, 0 when suspended; None: KEDA decides
    suspended: bool
    topics: Verdict  # the TopicsReady verdict of the last reconcile
    # (name, resourceVersion) of spec.kafka.secretRef's Secret as last read; None: none read.
    secret: tuple[str, str] | None = None
    # The same of handler.http.secretRef's Secret (its metadata only: the operator never reads
    # the shared secret).
    http_secret: tuple[str, str] | None = None
    autoscaling: Verdict | None = None  # with spec.workers.autoscaling: KEDA or why not
    live_lane: bool = False  # spec.liveLane: the operator runs the live lane's Deployment
    # tier (or LIVE_LANE) -> the generation of its Deployment as this reconcile applied it:
    # until the index shows that generation, its workers are not judged ready.
    worker_generations: Mapping[str, int] = field(default_factory=dict)
    # The Deployments and PodDisruptionBudgets this reconcile applied: the next reconcile
    # removes those it no longer wants even before the indexes show them.
    deployments: frozenset[str] = frozenset()
    budgets: frozenset[str] = frozenset()


class Fleet:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[PipelineKey, PipelineRecord] = {}

    def put(self, record: PipelineRecord) -> None:
        with self._lock:
            self._records[record.key] = record

    def get(self, key: PipelineKey) -> PipelineRecord | None:
        with self._lock:
            return self._records.get(key)

    def remove(self, key: PipelineKey) -> None:
        with self._lock:
            self._records.pop(key, None)

    def records(self) -> list[PipelineRecord]:
        with self._lock:
            return list(self._records.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
