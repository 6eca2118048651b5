"""`kafka-retry-operator`: runs the kopf operator for RetryPipelines.

    kafka-retry-operator                      # all namespaces (cluster-wide RBAC)
    kafka-retry-operator -n shop -n billing   # only these namespaces
    kafka-retry-operator --leader-election-lease kafka-retry-operator \\
        --leader-election-namespace kafka-retry-system    # one of several replicas

With a leader-election Lease, the process reconciles only while it holds the Lease (leader.py);
until then it is a standby serving /healthz and /metrics. Without one it runs standalone: run a
single replica. Never kopf's peering. Kubernetes credentials come from the pod's service
account, else $KUBECONFIG. Settings are environment variables (see config.py); Prometheus
metrics are served on $KAFKA_RETRY_METRICS_PORT (default 9400, 0: off).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import kopf

from kafka_retry_operator import __version__
from kafka_retry_operator.config import ConfigError
from kafka_retry_operator.leader import LeaderElector, LeaseSettings, default_identity

log = logging.getLogger(__name__)

LOG_FORMATS = {"text": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kafka-retry-operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeat)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (default)"
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log handler progress")
    parser.add_argument("--debug", action="store_true", help="log everything kopf does")
    parser.add_argument(
        "--log-format",
        choices=sorted(LOG_FORMATS),
        default="text",
        help="text: time, level, logger and message per line (default); json: one object a line",
    )
    election = parser.add_argument_group("leader election (several replicas)")
    election.add_argument(
        "--leader-election-lease",
        metavar="NAME",
        help="reconcile only while holding this coordination.k8s.io Lease",
    )
    election.add_argument(
        "--leader-election-namespace",
        metavar="NS",
        default=os.environ.get("POD_NAMESPACE"),
        help="the Lease's namespace (default: $POD_NAMESPACE)",
    )
    election.add_argument(
        "--leader-election-identity",
        metavar="ID",
        default=None,
        help="this candidate's name in the Lease (default: $POD_NAME plus a random suffix)",
    )
    election.add_argument("--lease-duration-seconds", type=int, default=15, metavar="S")
    election.add_argument("--renew-deadline-seconds", type=int, default=10, metavar="S")
    election.add_argument("--retry-period-seconds", type=float, default=2.0, metavar="S")
    return parser


def _lease_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LeaseSettings:
    if not args.leader_election_namespace:
        parser.error("--leader-election-lease needs --leader-election-namespace or $POD_NAMESPACE")
    try:
        return LeaseSettings(
            name=args.leader_election_lease,
            namespace=args.leader_election_namespace,
            identity=args.leader_election_identity or default_identity(),
            lease_duration=args.lease_duration_seconds,
            renew_deadline=args.renew_deadline_seconds,
            retry_period=args.retry_period_seconds,
        )
    except ValueError as e:
        parser.error(str(e))


def _exit_on_lost_lease(reason: str) -> None:
    """Leadership lost: stop now, without clean-up, before a standby may take over; the
    container restarts as a standby."""
    log.critical(f"leader election: lost the Lease ({reason}); exiting so that no two operators "
                 "reconcile at once")  # fmt: skip
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


def _wait_for_lease(elector: LeaderElector, liveness: str | None) -> bool:
    """Standby until the Lease is ours (True) or SIGTERM/SIGINT arrives (False)."""
    from kafka_retry_operator import handlers, standby

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = handlers.CONFIG
        with standby.serving(liveness, config.metrics_address, config.metrics_port):
            return elector.acquire(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _lease_settings(parser, args) if args.leader_election_lease else None
    # A crash in native code (librdkafka, via confluent-kafka) prints every thread's stack.
    faulthandler.enable()
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=LOG_FORMATS[args.log_format])
    if not (args.verbose or args.debug):
        # kopf's per-handler success lines, at scale, are noise.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        from kafka_retry_operator import handlers  # noqa: F401 - registers the handlers
    except ConfigError as e:  # read at import (see config.py): no traceback for a typo
        print(f"kafka-retry-operator: invalid setting: {e}", file=sys.stderr)
        return 2

    elector = None
    if settings is not None:
        from kafka_retry_operator.kube import api_client

        elector = LeaderElector(api_client(pool_size=2), settings)
        if not _wait_for_lease(elector, args.liveness):
            return 0
        elector.keep(on_lost=_exit_on_lost_lease)
    try:
        kopf.run(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
