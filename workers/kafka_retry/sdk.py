"""The live-lane SDK: a service consumes its source topic with its own handler; a failed
event is forwarded to the first retry tier (or, if non-retriable, the DLQ) and the consumer
moves on at once, so failures never hold up live traffic.

    topology = topology_from_configmap("shop/billing-orders")
    consumer = RetryingConsumer(topology, handle_order)
    consumer.run()          # until consumer.stop() (e.g. from a SIGTERM handler)

It runs the same loop as the tier workers (`runner.StageRunner`), on the source topic.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from kafka_retry.handlers import HandlerFn
from kafka_retry.kafka_config import client_settings_from_env, consumer_config, producer_config
from kafka_retry.model import Topology
from kafka_retry.routing import Stage
from kafka_retry.runner import RunnerStats, StageRunner
from kafka_retry.topology_follow import DEFAULT_INTERVAL_S, TopologyFollower
from kafka_retry.topology_source import (
    topology_from_configmap,
    topology_from_env,
    topology_from_file,
)

__all__ = [
    "RetryingConsumer",
    "topology_from_configmap",
    "topology_from_env",
    "topology_from_file",
]


class RetryingConsumer:
    """Consume `topology.source_topic` as `group` (default: the pipeline's consumer group).

    `extra_config` is added to both the consumer and the producer (after the `KAFKA_CLIENT_*`
    environment, unless `use_env=False`); `instance_id` (e.g. the pod name, from the downward
    API) makes the consumer a static group member, so a restarted service takes its partitions
    back without a rebalance; `runner_options` tune the loop (`batch_size`, `poll_cap_s`,
    `drain_timeout_s`). Not thread-safe except `stop()`: call `run()` on the thread that owns
    the consumer."""

    def __init__(
        self,
        topology: Topology,
        handler: HandlerFn,
        *,
        group: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        use_env: bool = True,
        instance_id: str | None = None,
        follow: Callable[[], Topology] | None = None,
        follow_interval_s: float = DEFAULT_INTERVAL_S,
        **runner_options: Any,
    ) -> None:
        """`follow`: how to re-read the topology while running (`from_configmap` and
        `from_file` pass one), so that a spec change reaches this service without a restart."""
        stage = Stage.source(topology, group)
        extra: dict[str, Any] = client_settings_from_env() if use_env else {}
        extra.update(extra_config or {})
        self._runner = StageRunner(
            topology,
            stage,
            handler,
            consumer_config=consumer_config(
                topology.bootstrap_servers, stage.consumer_group, extra, instance_id=instance_id
            ),
            producer_config=producer_config(topology.bootstrap_servers, extra),
            **runner_options,
        )
        self._follower = (
            TopologyFollower(follow, self._runner.follow, topology, follow_interval_s)
            if follow is not None
            else None
        )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], handler: HandlerFn, **kw: Any
    ) -> RetryingConsumer:
        """Follows the file (e.g. the topology ConfigMap mounted as a volume)."""
        kw.setdefault("follow", lambda: topology_from_file(path))
        return cls(topology_from_file(path), handler, **kw)

    @classmethod
    def from_env(cls, handler: HandlerFn, **kw: Any) -> RetryingConsumer:
        return cls(topology_from_env(), handler, **kw)

    @classmethod
    def from_configmap(
        cls,
        pipeline: str,
        handler: HandlerFn,
        *,
        namespace: str | None = None,
        api_client: Any = None,
        **kw: Any,
    ) -> RetryingConsumer:
        """Follows the ConfigMap: re-read every `follow_interval_s` (10 s)."""
        topology = topology_from_configmap(pipeline, namespace, api_client=api_client)
        kw.setdefault(
            "follow", lambda: topology_from_configmap(pipeline, namespace, api_client=api_client)
        )
        return cls(topology, handler, **kw)

    @property
    def topology(self) -> Topology:
        return self._runner.topology

    @property
    def stats(self) -> RunnerStats:
        return self._runner.stats

    def run(self) -> None:
        """Consume until `stop()`; then drain forwards, commit and leave the group."""
        if self._follower is not None:
            self._follower.start()
        try:
            self._runner.run()
        finally:
            if self._follower is not None:
                self._follower.stop()

    def stop(self) -> None:
        self._runner.stop()

    def alive(self) -> bool:
        return self._runner.alive()

    def ready(self) -> bool:
        return self._runner.ready()
