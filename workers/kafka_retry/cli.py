"""`kafka-retry`: the command line of the data plane. Each subcommand lives in its own module
and registers itself here with `add_parser(subparsers)`."""

from __future__ import annotations

import argparse
import faulthandler
from collections.abc import Sequence

from kafka_retry import __version__, dlq_cli, worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kafka-retry", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    worker.add_parser(sub)
    dlq_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A crash in native code (librdkafka, via confluent-kafka) prints every thread's stack.
    faulthandler.enable()
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
