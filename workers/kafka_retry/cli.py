"""`kafka-retry` (also the kubectl plugin `kubectl retry`): the command line of the data plane.
Each subcommand lives in its own module, which adds its parser here."""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kafka_retry import __version__, dlq_cli, worker

DESCRIPTION = """\
Operate the retry pipelines of Kafka consumer services: look into a pipeline's dead-letter
queue, purge it, replay it into a retry tier, and see a pipeline's tiers, lag and DLQ depth.
The pipeline is found in the cluster of your kubeconfig (or described by --topology-file)."""

EPILOG = """\
examples:
  %(prog)s status billing-orders -n shop
  %(prog)s dlq list billing-orders -n shop --since 2h
  %(prog)s dlq replay billing-orders -n shop --error-class PaymentDeclined --rate 50

exit codes: 0 done, 1 error, 2 usage, 3 nothing matched, 130 interrupted.
`%(prog)s COMMAND --help` describes each command; docs/dlq.md has the details."""

PLUGIN = "kubectl-retry"  # kubectl runs `kubectl-retry` from PATH for `kubectl retry`


class Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def program_name(argv0: str | None = None) -> str:
    """`kubectl retry` when run as the kubectl plugin, else `kafka-retry`."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "kubectl retry" if name == PLUGIN else "kafka-retry"


def build_parser(prog: str = "kafka-retry") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dlq_cli.add_parser(sub)
    worker.add_parser(sub)
    parser.set_defaults(prog=prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(program_name()).parse_args(argv)
    # A crash in native code (librdkafka, via confluent-kafka) prints every thread's stack.
    faulthandler.enable()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
