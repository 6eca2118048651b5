"""The tier worker: `kafka-retry worker --tier NAME [--topology-file PATH]`.

`kafka-retry worker --live` is the managed live lane (`spec.liveLane`): the SDK's loop
(`RetryingConsumer`'s stage) on the source topic as the service's group, calling the topology's
handler, so a service that only answers HTTP needs no SDK.

`kafka-retry worker --drain TOPIC` is a drain worker instead: it empties a tier or DLQ topic
that a spec change left behind into where its events go now (the topology's `draining`). A
worker given `--topology-file` (a mounted ConfigMap) follows changes to it without a restart.

Contract with the operator's Deployments: the topology comes from `KAFKA_RETRY_TOPOLOGY` (or
the file), extra librdkafka settings from `KAFKA_CLIENT_*` and an http handler's shared
secret from `KAFKA_RETRY_HTTP_TOKEN` (both never logged),
`KAFKA_RETRY_METRICS_PORT` (default 9400) serves /metrics, /healthz and /readyz, and
`KAFKA_RETRY_INSTANCE_ID` (the pod name) makes the worker a static member of its group, so a
restarted container takes its partitions back at once.

A suspended pipeline's worker idles: it joins no group and consumes nothing (events wait on
their tier), stays healthy and ready, and exits 0 on SIGTERM. The operator scales it to 0
anyway; idling keeps a pod that starts meanwhile from crash-looping.

Exit codes: 0 after SIGTERM/SIGINT (drained and committed), 1 on a fatal Kafka error,
2 for a bad topology or tier name, 3 when the handler cannot be loaded, 4 when a handler call
overran its deadline, 5 when a transaction call blocked past its own (watchdog.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaException

from kafka_retry import logformat
from kafka_retry.forwarding import TXN_CALL_DEADLINE_S, FatalProducerError
from kafka_retry.handlers import HTTP_TOKEN_ENV, HandlerFn, HandlerLoadError, build_handler
from kafka_retry.kafka_config import (
    client_settings_from_env,
    consumer_config,
    describe,
    producer_config,
)
from kafka_retry.metrics import DEFAULT_PORT, PORT_ENV, HealthServer
from kafka_retry.model import LIVE_LANE, Topology
from kafka_retry.routing import Stage
from kafka_retry.runner import StageRunner, tune_gc_for_worker
from kafka_retry.topology_follow import TopologyFollower
from kafka_retry.topology_source import TOPOLOGY_ENV, load_topology, topology_from_file
from kafka_retry.watchdog import EXIT_DEADLINE, EXIT_TRANSACTION_STUCK, Watch, Watchdog

log = logging.getLogger(__name__)

EXIT_OK, EXIT_KAFKA, EXIT_CONFIG, EXIT_HANDLER = 0, 1, 2, 3
LOG_LEVEL_ENV = "KAFKA_RETRY_LOG_LEVEL"
INSTANCE_ID_ENV = "KAFKA_RETRY_INSTANCE_ID"
DEADLINE_GRACE_S = 1


def build_worker(
    topology: Topology,
    tier: str,
    *,
    handler: HandlerFn | None = None,
    client_settings: Mapping[str, Any] | None = None,
    instance_id: str | None = None,
    **runner_options: Any,
) -> StageRunner:
    """The runner of one tier. `client_settings` are extra librdkafka settings (default: from
    `KAFKA_CLIENT_*`); `handler` defaults to the topology's handler spec; `instance_id`
    (the pod name) makes it a static group member."""
    stage = Stage.tier(topology, tier)
    extra = client_settings_from_env() if client_settings is None else dict(client_settings)
    config = consumer_config(
        topology.bootstrap_servers,
        stage.consumer_group,
        extra,
        pauses_often=True,
        instance_id=instance_id,
    )
    log.info("tier %s consumer settings: %s", tier, describe(config, frozenset(extra)))
    return StageRunner(
        topology,
        stage,
        handler if handler is not None else build_handler(topology.handler),
        consumer_config=config,
        producer_config=producer_config(topology.bootstrap_servers, extra),
        **(concurrency(topology) | runner_options),
    )


def build_live_lane(
    topology: Topology,
    *,
    handler: HandlerFn | None = None,
    client_settings: Mapping[str, Any] | None = None,
    instance_id: str | None = None,
    **runner_options: Any,
) -> StageRunner:
    """The live lane as the SDK runs it (`Stage.source`, the source group), with the
    topology's handler: what `spec.liveLane` deploys."""
    stage = Stage.source(topology)
    extra = client_settings_from_env() if client_settings is None else dict(client_settings)
    config = consumer_config(
        topology.bootstrap_servers, stage.consumer_group, extra, instance_id=instance_id
    )
    log.info("live lane consumer settings: %s", describe(config, frozenset(extra)))
    return StageRunner(
        topology,
        stage,
        handler if handler is not None else build_handler(topology.handler),
        consumer_config=config,
        producer_config=producer_config(topology.bootstrap_servers, extra),
        **(concurrency(topology) | runner_options),
    )


def concurrency(topology: Topology) -> dict[str, Any]:
    """The runner's concurrent calls per partition: an http handler's `maxInFlight` and
    `ordering` (a python handler's calls are one at a time)."""
    http = topology.handler.http
    if http is None:
        return {}
    return {"max_in_flight": http.max_in_flight, "by_key": http.ordering == "Key"}


def build_drain_worker(
    topology: Topology,
    topic: str,
    *,
    client_settings: Mapping[str, Any] | None = None,
    instance_id: str | None = None,
) -> StageRunner:
    """The runner that empties `topic`, a tier or DLQ topic the spec no longer has (the
    topology's `draining`): a tier's events when due, a DLQ's at once, forwarded unchanged."""
    d = topology.draining_stage(topic)
    if d.kind == "dlq":
        stage = Stage(-1, "dlq-drain", d.topic, d.consumer_group, 0)
    else:
        to = next((i for i, t in enumerate(topology.tiers) if t.topic == d.to), 0)
        stage = Stage(to, d.name, d.topic, d.consumer_group, d.delay_seconds * 1000)
    extra = client_settings_from_env() if client_settings is None else dict(client_settings)
    config = consumer_config(
        topology.bootstrap_servers,
        d.consumer_group,
        extra,
        pauses_often=d.kind == "tier",
        instance_id=instance_id,
    )
    return StageRunner(
        topology,
        stage,
        _never_called,
        consumer_config=config,
        producer_config=producer_config(topology.bootstrap_servers, extra),
        drain_to=d.to,
    )


def _never_called(_event: Any) -> None:
    raise AssertionError("a drain worker forwards events, it never handles them")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "worker", help="run the tier worker of one retry tier (what the operator deploys)"
    )
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--tier", help="tier name, as in the pipeline's spec")
    role.add_argument(
        "--live",
        action="store_true",
        help="run the live lane on the source topic (the operator's, with spec.liveLane)",
    )
    role.add_argument(
        "--drain", metavar="TOPIC", help="empty a topic the spec left behind (operator's use)"
    )
    p.add_argument(
        "--topology-file", help=f"topology JSON file (default: ${TOPOLOGY_ENV})", default=None
    )
    p.add_argument(
        "--log-format",
        choices=logformat.FORMATS,
        default="text",
        help="text: time, level, logger and message per line (default); json: one object a line",
    )
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    configure_logging(env, getattr(args, "log_format", "text"))
    try:
        topology = load_topology(args.topology_file, env)
        if args.drain:
            topology.draining_stage(args.drain)
        elif not args.live:
            topology.tier(args.tier)
    except Exception as e:
        log.error("cannot load the topology: %s", e)
        return EXIT_CONFIG
    port = int(env.get(PORT_ENV, DEFAULT_PORT))
    if topology.suspend:
        return _idle(topology, args.tier or args.drain or LIVE_LANE, port)
    settings = client_settings_from_env(env)
    instance_id = env.get(INSTANCE_ID_ENV) or None
    if args.drain:
        runner = build_drain_worker(
            topology, args.drain, client_settings=settings, instance_id=instance_id
        )
    else:
        try:
            handler = build_handler(topology.handler, http_token=env.get(HTTP_TOKEN_ENV))
        except (HandlerLoadError, ValueError) as e:
            log.error("cannot load the handler: %s", e)
            return EXIT_HANDLER
        if args.live:
            runner = build_live_lane(
                topology, handler=handler, client_settings=settings, instance_id=instance_id
            )
        else:
            runner = build_worker(
                topology,
                args.tier,
                handler=handler,
                client_settings=settings,
                instance_id=instance_id,
            )
    server = HealthServer(port, runner.alive, runner.ready).start()
    log.info("metrics and probes on port %d", server.port)
    _on_signals(runner.stop)
    # Room for the handler's own timeout (an http handler answers TimeoutError at its deadline).
    handler_deadline_s = topology.handler.timeout_seconds + DEADLINE_GRACE_S
    Watchdog([
        Watch("the handler", handler_deadline_s, runner.handler_started, EXIT_DEADLINE,
              "so that the event is read again after the restart (dead-lettered as poison if "
              "it keeps doing this)"),
        Watch("a transaction call", TXN_CALL_DEADLINE_S, runner.transaction_call_started,
              EXIT_TRANSACTION_STUCK, "so that a new producer fences this one and the "
              "transaction it left open is aborted"),
    ]).start()  # fmt: skip
    follower = None
    if args.topology_file and not args.drain:  # a mounted ConfigMap: follow it, no restart
        path = args.topology_file
        read = lambda: topology_from_file(path)  # noqa: E731
        follower = TopologyFollower(read, runner.follow, topology).start()
    tune_gc_for_worker()
    try:
        runner.run()
    except (KafkaException, FatalProducerError) as e:
        log.error("fatal Kafka error, exiting to re-read from the committed offsets: %s", e)
        return EXIT_KAFKA
    finally:
        server.close()
        if follower is not None:
            follower.stop()
    log.info("stopped: in-flight forwards drained, offsets committed")
    return EXIT_OK


def configure_logging(environ: Mapping[str, str], fmt: str = "text") -> None:
    logformat.configure(environ.get(LOG_LEVEL_ENV, "INFO"), fmt)


def _idle(topology: Topology, tier: str, port: int) -> int:
    log.info("pipeline %s is suspended: tier %s idles until stopped", topology.pipeline, tier)
    stopped = threading.Event()
    server = HealthServer(port, lambda: True, lambda: True).start()
    _on_signals(stopped.set)
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        server.close()
    return EXIT_OK


def _on_signals(stop: Callable[[], None]) -> None:
    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
