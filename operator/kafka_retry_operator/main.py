"""`kafka-retry-operator`: runs the kopf operator for RetryPipelines.

    kafka-retry-operator                      # all namespaces (cluster-wide RBAC)
    kafka-retry-operator -n shop -n billing   # only these namespaces

Standalone: one replica, no kopf peering objects. Kubernetes credentials come from the pod's
service account, else $KUBECONFIG. Settings are environment variables (see config.py);
Prometheus metrics are served on $KAFKA_RETRY_METRICS_PORT (default 9400, 0: off).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
from collections.abc import Sequence

import kopf

from kafka_retry_operator import __version__
from kafka_retry_operator.config import ConfigError


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A crash in native code (librdkafka, via confluent-kafka) prints every thread's stack.
    faulthandler.enable()
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=kopf.LogFormat.PLAIN)
    if not (args.verbose or args.debug):
        # kopf's per-handler success lines, at scale, are noise.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        from kafka_retry_operator import handlers  # noqa: F401 - registers the handlers
    except ConfigError as e:  # read at import (see config.py): no traceback for a typo
        print(f"kafka-retry-operator: invalid setting: {e}", file=sys.stderr)
        return 2

    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
