"""`kafka-retry dlq list|show|purge|replay|cancel` and `kafka-retry status`: the DLQ for people
on call (also `kubectl retry ...`, installed as the `kubectl-retry` plugin).

A pipeline is found in the cluster (kubeconfig, context namespace or `-n`): its topology from
the ConfigMap `<pipeline>-topology` the workers read (or computed from the spec before the
operator wrote it), Kafka credentials from the Secret in `spec.kafka.secretRef` (never
printed). Without a cluster, `--topology-file` (and `--bootstrap-servers`, `KAFKA_CLIENT_*`)
say the same.

Expected failures are one line on stderr and an exit code: 1 error, 2 usage, 3 nothing matched
(no events to list, show, purge or replay), 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml
from confluent_kafka import KafkaException

from kafka_retry import dlq, dlq_stats, pacing, replay_lease, replay_marks
from kafka_retry import headers as h
from kafka_retry import replay_resource as rr
from kafka_retry.dlq import DlqError, DlqReader, DlqRecord, EventFilter, InvalidRequest, KafkaAccess
from kafka_retry.dlq_replay import Checkpoint, InvalidTarget, Outcome, Replayer, resolve_target
from kafka_retry.kafka_config import client_settings_from_env
from kafka_retry.model import (
    GROUP,
    VERSION,
    DLQReplaySpec,
    RetryPipelineSpec,
    RetryPipelineStatus,
    Topology,
)
from kafka_retry.progress import ReplayProgress
from kafka_retry.topology_source import topology_from_configmap, topology_from_file

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOTHING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
DEFAULT_LIMIT = 100
NO_OPERATOR_WARNING_S = 20
OUTPUTS = ("table", "json", "yaml")
BAR_WIDTH = 30


class CliError(Exception):
    """An expected failure: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- parser


def add_parser(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the pipeline is")
    where.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    where.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG)")
    where.add_argument("--context", help="kubeconfig context (default: the current one)")
    where.add_argument(
        "--bootstrap-servers",
        help="Kafka to use instead of the pipeline's (e.g. through a port-forward)",
    )
    where.add_argument(
        "--topology-file",
        help="the pipeline's topology JSON: no cluster needed (credentials: KAFKA_CLIENT_*)",
    )
    where.add_argument(
        "--kafka-timeout", type=float, default=dlq.DEFAULT_TIMEOUT_S, help=argparse.SUPPRESS
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters (all must match)")
    group.add_argument("--since", help="reached the DLQ at or after: RFC 3339 or e.g. 2h, 7d ago")
    group.add_argument("--until", help="reached the DLQ before: RFC 3339 or e.g. 30m ago")
    group.add_argument("--key", action="append", default=[], help="event key (repeatable)")
    group.add_argument(
        "--error-class",
        action="append",
        default=[],
        help="error class, full or simple name (repeatable)",
    )

    dlq_parser = subparsers.add_parser(
        "dlq", help="list, show, purge and replay a pipeline's dead-letter queue"
    )
    sub = dlq_parser.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common, output, filters], help="events waiting in the DLQ")
    p.add_argument("pipeline", metavar="PIPELINE")
    p.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_LIMIT,
        help=f"at most this many, oldest first (0: all; default {DEFAULT_LIMIT})",
    )
    p.add_argument("--all", action="store_true", help="also events already replayed")
    p.set_defaults(func=_command(cmd_list))

    p = sub.add_parser(
        "stats",
        parents=[common, output, filters],
        help="counts by error class, DLQ reason, last tier and age",
    )
    p.add_argument("pipeline", metavar="PIPELINE")
    p.add_argument("--all", action="store_true", help="also events already replayed")
    p.set_defaults(func=_command(cmd_stats))

    p = sub.add_parser("show", parents=[common, output], help="one event: headers and payload")
    p.add_argument("pipeline", metavar="PIPELINE")
    p.add_argument("position", metavar="PARTITION:OFFSET")
    p.set_defaults(func=_command(cmd_show))

    p = sub.add_parser(
        "purge", parents=[common], help="delete DLQ events (Kafka delete-records); asks first"
    )
    p.add_argument("pipeline", metavar="PIPELINE")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--before-time", help="events that reached the DLQ before: RFC 3339 or 2h")
    which.add_argument(
        "--before-offset",
        action="append",
        metavar="P:O",
        help="events of partition P before offset O (repeatable)",
    )
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true", help="even while a replay is running")
    p.set_defaults(func=_command(cmd_purge))

    p = sub.add_parser(
        "replay",
        parents=[common, output, filters],
        help="replay DLQ events into a retry tier (a DLQReplay, or --direct)",
    )
    p.add_argument("pipeline", metavar="PIPELINE")
    p.add_argument("--target-tier", help="tier to replay into (default: the first)")
    p.add_argument(
        "--rate",
        type=_rate,
        help="at most this many events in any 1-second window "
        f"(sent in bursts of at most {pacing.BURST_FRACTION:.0%}% of it)",
    )
    p.add_argument("--name", help="name of the DLQReplay (default: generated)")
    p.add_argument("--no-wait", action="store_true", help="create the DLQReplay and return")
    p.add_argument("--direct", action="store_true", help="replay from here, without the operator")
    p.add_argument("--force", action="store_true", help="--direct even while a replay runs")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be replayed where, and how many; send nothing (-o for json/yaml)",
    )
    p.set_defaults(func=_command(cmd_replay))

    p = sub.add_parser("cancel", parents=[common], help="cancel a running DLQReplay")
    p.add_argument("replay", metavar="REPLAY")
    p.set_defaults(func=_command(cmd_cancel))

    p = subparsers.add_parser(
        "status", parents=[common, output], help="a pipeline's tiers, lag, DLQ depth, conditions"
    )
    p.add_argument("pipeline", metavar="PIPELINE")
    p.set_defaults(func=_command(cmd_status))

    p = subparsers.add_parser(
        "top",
        parents=[common, output],
        help="every pipeline of a namespace, refreshed: DLQ depth, oldest event, lag, rates",
    )
    p.add_argument("-A", "--all-namespaces", action="store_true", help="pipelines everywhere")
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)"
    )
    p.add_argument(
        "--once", action="store_true", help="print one table and exit (also when not a terminal)"
    )
    p.add_argument("--iterations", type=int, help=argparse.SUPPRESS)  # tests: refreshes, then exit
    p.set_defaults(func=_command(cmd_top))


def _count(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _rate(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 event per second, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures become one line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        _configure_logging(args.verbose)
        prog = getattr(args, "prog", "kafka-retry")
        try:
            return fn(args)
        except CliError as e:
            return _fail(prog, str(e), e.code)
        except InvalidRequest as e:
            return _fail(prog, str(e), EXIT_USAGE)
        except DlqError as e:
            return _fail(prog, str(e), EXIT_ERROR)
        except KafkaException as e:
            return _fail(prog, f"Kafka: {dlq.kafka_reason(e)}", EXIT_ERROR)
        except KeyboardInterrupt:
            return _fail(prog, "interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            return _reader_gone()
        except Exception as e:
            if args.verbose:
                raise
            from kubernetes.client.exceptions import ApiException

            if isinstance(e, ApiException):
                return _fail(prog, f"Kubernetes API: {e.status} {e.reason}", EXIT_ERROR)
            return _fail(prog, f"{type(e).__name__}: {e}", EXIT_ERROR)

    return run


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def _reader_gone() -> int:
    """`kafka-retry dlq list | head`: the reader left. Quiet, and the exit code of a process
    that SIGPIPE ended, like other Unix tools; stdout is pointed at /dev/null so that the
    interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # librdkafka's connection chatter: only with -v (the error itself is reported once).
    dlq.librdkafka_log.setLevel(logging.DEBUG if verbose else logging.CRITICAL)


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    """A pipeline located: its topology, the cluster if there is one, and Kafka access, made
    on first use (the Secret is read only by commands that talk to Kafka)."""

    name: str
    namespace: str | None
    topology: Topology
    connect: Callable[[], KafkaAccess]
    api: Any = None  # kubernetes ApiClient; None without a cluster
    status: dict[str, Any] | None = None
    _access: KafkaAccess | None = None

    @property
    def access(self) -> KafkaAccess:
        if self._access is None:
            self._access = self.connect()
        return self._access

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def need_cluster(self, what: str) -> Any:
        if self.api is None:
            raise CliError(f"{what} needs the cluster (not --topology-file)")
        return self.api


def kube_client(args: argparse.Namespace) -> tuple[Any, str]:
    """(ApiClient, namespace) from --kubeconfig/--context/-n, else in-cluster."""
    from kubernetes import client
    from kubernetes import config as kube_config

    cfg: Any = kube_config  # partly typed upstream
    path = args.kubeconfig or os.environ.get("KUBECONFIG")
    try:
        api = cfg.new_client_from_config(config_file=path, context=args.context)
        _, active = cfg.list_kube_config_contexts(config_file=path)
        if args.context:
            contexts, _ = cfg.list_kube_config_contexts(config_file=path)
            active = next((c for c in contexts if c.get("name") == args.context), active)
        namespace = args.namespace or (active or {}).get("context", {}).get("namespace")
    except (cfg.ConfigException, FileNotFoundError, TypeError) as e:
        try:
            cfg.load_incluster_config()
        except cfg.ConfigException:
            raise CliError(f"no Kubernetes cluster configured: {e}") from None
        api = client.ApiClient()
        namespace = args.namespace or _pod_namespace()
    return api, namespace or "default"


def _pod_namespace() -> str | None:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
        return f.read().strip()
    return None


def locate(args: argparse.Namespace) -> Pipeline:
    if args.topology_file:
        try:
            topology = topology_from_file(args.topology_file)
        except (OSError, ValueError) as e:
            raise CliError(f"cannot read the topology file {args.topology_file}: {e}") from None
        if args.pipeline not in (topology.pipeline, topology.pipeline.rsplit("/", 1)[-1]):
            raise CliError(
                f"{args.topology_file} is the topology of pipeline {topology.pipeline}, "
                f"not {args.pipeline}",
                EXIT_USAGE,
            )
        bootstrap = args.bootstrap_servers or topology.bootstrap_servers

        def from_env() -> KafkaAccess:
            return KafkaAccess(bootstrap, client_settings_from_env(), timeout=args.kafka_timeout)

        return Pipeline(args.pipeline, None, topology, from_env)

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api, namespace = kube_client(args)
    name = args.pipeline
    try:
        custom: Any = client.CustomObjectsApi(api)
        obj = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, rr.PIPELINE_PLURAL, name
        )
    except ApiException as e:
        if e.status == 404:
            raise CliError(f"RetryPipeline {namespace}/{name} not found") from None
        raise CliError(f"cannot read RetryPipeline {namespace}/{name}: {_api_reason(e)}") from None
    except Exception as e:  # connection refused, TLS: urllib3's errors are long
        raise CliError(f"cannot reach the Kubernetes API: {_short(e)}") from None
    try:
        spec = RetryPipelineSpec.model_validate(obj.get("spec") or {})
    except ValueError as e:
        raise CliError(f"RetryPipeline {namespace}/{name} has an invalid spec: {e}") from None
    try:
        topology = topology_from_configmap(name, namespace, api_client=api)
    except Exception:  # not written yet (or unreadable): the same resolution from the spec
        topology = spec.topology(namespace, name)
    bootstrap = args.bootstrap_servers or topology.bootstrap_servers

    def from_secret() -> KafkaAccess:
        from kafka_retry.kafka_secret import SecretNotFound, secret_settings

        settings: dict[str, Any] = {}
        if spec.kafka.secret_ref is not None:
            secret = spec.kafka.secret_ref.name
            try:
                settings.update(secret_settings(api, namespace, secret))
            except SecretNotFound as e:
                raise CliError(str(e)) from None
            except ApiException as e:
                raise CliError(
                    f"cannot read Secret {namespace}/{secret} with the Kafka settings: "
                    f"{_api_reason(e)} (or use --topology-file with KAFKA_CLIENT_* settings)"
                ) from None
        settings.update(client_settings_from_env())
        return KafkaAccess(bootstrap, settings, timeout=args.kafka_timeout)

    return Pipeline(name, namespace, topology, from_secret, api, obj.get("status"))


def _api_reason(e: Any) -> str:
    try:
        message = json.loads(e.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return str(message or f"{e.status} {e.reason}")


def _short(e: BaseException) -> str:
    text = str(e)
    return text if len(text) < 200 else text[:200] + "..."


# --------------------------------------------------------------------------- dlq list


def filter_of(args: argparse.Namespace) -> EventFilter:
    now = int(time.time() * 1000)
    try:
        since = dlq.parse_time(args.since, now) if args.since else None
        until = dlq.parse_time(args.until, now) if args.until else None
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if since is not None and until is not None and since >= until:
        raise CliError(
            f"--since {args.since} is not before --until {args.until}: no event can match",
            EXIT_USAGE,
        )
    return EventFilter(
        since_ms=since,
        until_ms=until,
        keys=frozenset(k.encode() for k in args.key),
        error_classes=frozenset(args.error_class),
    )


def cmd_list(args: argparse.Namespace) -> int:
    event_filter = filter_of(args)
    pipeline = locate(args)
    topic = pipeline.topology.dlq_topic
    states = dlq.partition_states(pipeline.access, topic)
    replayed = _replayed_ranges(pipeline)
    limit = args.limit
    # Oldest first: a partition is in time order, so its first `limit` matches suffice.
    kept: dict[int, list[DlqRecord]] = {s.partition: [] for s in states}
    marks: dict[tuple[int, int], str] = {}  # waiting events a replay sent already
    marked: dict[str, int] = {}
    matched = 0
    for record in _read(pipeline, states, replayed_too=args.all):
        by = replay_marks.replayed_by(record, replayed) if record.waiting else None
        if by is not None:
            marked[by] = marked.get(by, 0) + 1
        if event_filter.matches(record):
            matched += 1
            bucket = kept[record.partition]
            if not limit or len(bucket) < limit:
                bucket.append(record)
                if by is not None:
                    marks[(record.partition, record.offset)] = by
    records = sorted(
        (r for bucket in kept.values() for r in bucket),
        key=lambda r: (r.timestamp_ms or 0, r.partition, r.offset),
    )
    if limit:
        records = records[:limit]
    waiting = dlq.depth_of(states)
    if args.output == "table":
        rows = _list_rows(records, marks, show_state=args.all or bool(marks))
        _print_table(rows, sys.stdout)
    else:
        _dump([_listed(r, marks) for r in records], args.output)
    what = "events" if args.all else "waiting events"
    shown = f"{len(records)} of {matched}" if len(records) < matched else f"{matched}"
    scope = "" if event_filter.empty else " matching"
    print(f"{shown}{scope} {what} shown; DLQ depth {waiting} ({topic})", file=sys.stderr)
    if marked:
        print(f"note: {_replayed_note(marked)}", file=sys.stderr)
    return EXIT_OK if matched else EXIT_NOTHING


def _replayed_ranges(pipeline: Pipeline) -> list[replay_marks.ReplayedRange]:
    if pipeline.api is None:
        return []
    assert pipeline.namespace is not None
    objects = rr.replay_objects(pipeline.api, pipeline.namespace, pipeline.name)
    return replay_marks.replayed_ranges(objects)


def _replayed_note(marked: Mapping[str, int]) -> str:
    """Why some waiting events show as replayed (docs/dlq.md)."""
    total = sum(marked.values())
    by = ", ".join(f"{n} by {name}" for name, n in sorted(marked.items()))
    return (
        f"{total} waiting event(s) were replayed already ({by}): a filtered replay's cursor "
        "stops at the first event it skipped, so they stay counted until the events before "
        "them are replayed or purged, and a replay that matches them sends them again"
    )


def _listed(record: DlqRecord, marks: Mapping[tuple[int, int], str]) -> dict[str, Any]:
    out = record.to_dict()
    by = marks.get((record.partition, record.offset))
    if by is not None:
        out["replayedBy"] = by
    return out


def _read(
    pipeline: Pipeline, states: Sequence[dlq.PartitionState], *, replayed_too: bool = False
) -> Iterator[DlqRecord]:
    """The DLQ's waiting events (with `replayed_too`, also those behind the cursor that
    retention still keeps), each partition in order."""
    ranges = {s.partition: (s.low if replayed_too else s.head, s.high) for s in states}
    heads = {s.partition: s.head for s in states}
    with DlqReader(pipeline.access, pipeline.topology.dlq_topic, ranges, heads=heads) as reader:
        while not reader.finished:
            yield from reader.poll(1000, 0.2)


# --------------------------------------------------------------------------- dlq stats


def cmd_stats(args: argparse.Namespace) -> int:
    event_filter = filter_of(args)
    pipeline = locate(args)
    topic = pipeline.topology.dlq_topic
    states = dlq.partition_states(pipeline.access, topic)
    now_ms = int(time.time() * 1000)
    stats = dlq_stats.collect(
        (r for r in _read(pipeline, states, replayed_too=args.all) if event_filter.matches(r)),
        now_ms,
    )
    if args.output != "table":
        _dump({"pipeline": pipeline.label, "topic": topic, **stats.to_dict()}, args.output)
    else:
        what = "events" if args.all else "waiting events"
        scope = "" if event_filter.empty else " matching"
        out = sys.stdout
        out.write(f"DLQ {topic}: {stats.events}{scope} {what}")
        if stats.oldest_ms is not None:
            out.write(f", reached it from {_time(stats.oldest_ms)} to {_time(stats.newest_ms)}")
        out.write("\n")
        _print_stats(stats, out)
    return EXIT_OK if stats.events else EXIT_NOTHING


def _print_stats(stats: dlq_stats.Stats, out: TextIO) -> None:
    data = stats.to_dict()
    for title, key in (
        ("ERROR CLASS", "errorClasses"),
        ("DLQ REASON", "reasons"),
        ("LAST TIER", "tiers"),
        ("AGE", "ages"),
    ):
        rows = [[title, "EVENTS", "SHARE", ""]]
        for item in data[key]:
            share = item["count"] / stats.events if stats.events else 0.0
            bar = "█" * max(1, round(share * BAR_WIDTH))
            rows.append([str(item["name"]), str(item["count"]), f"{share:.0%}", bar])
        out.write("\n")
        _print_table(rows, out)


def _list_rows(
    records: Sequence[DlqRecord], marks: Mapping[tuple[int, int], str], *, show_state: bool
) -> list[list[str]]:
    header = ["TIME", "PARTITION:OFFSET", "KEY", "ERROR", "MESSAGE", "ATTEMPTS", "ORIGIN"]
    rows = [header + (["STATE"] if show_state else [])]
    for r in records:
        s = r.state
        origin = "-"
        if s.original_topic:
            origin = f"{s.original_topic}/{_dash(s.original_partition)}@{_dash(s.original_offset)}"
        row = [
            _time(r.timestamp_ms),
            r.position,
            _clip(_text_or_hex(r.key), 24),
            _clip((s.error_class or "-").rsplit(".", 1)[-1], 32),
            _clip(_first_line(s.error_message) or "-", 50),
            _dash(s.attempt),
            origin,
        ]
        if show_state:
            by = marks.get((r.partition, r.offset))
            row.append(f"replayed by {by}" if by else "waiting" if r.waiting else "replayed")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- dlq show


def _position(text: str) -> tuple[int, int]:
    try:
        partition, offset = text.split(":")
        p, o = int(partition), int(offset)
    except ValueError:
        raise CliError(f"expected PARTITION:OFFSET like 0:42, got {text!r}", EXIT_USAGE) from None
    if p < 0 or o < 0:
        raise CliError(f"partition and offset cannot be negative: {text!r}", EXIT_USAGE)
    return p, o


def cmd_show(args: argparse.Namespace) -> int:
    partition, offset = _position(args.position)
    pipeline = locate(args)
    topic = pipeline.topology.dlq_topic
    record = dlq.read_event(pipeline.access, topic, partition, offset)
    if record is None:
        raise CliError(f"no event at {partition}:{offset} of {topic}", EXIT_NOTHING)
    if args.output != "table":
        _dump(record.to_dict(payload=True), args.output)
        return EXIT_OK
    out = sys.stdout
    s = record.state
    state = "waiting" if record.waiting else "replayed (behind the DLQ cursor)"
    out.write(f"Event {record.position} of {topic}: {state}\n")
    fields = [
        ("Reached DLQ", _time(record.timestamp_ms)),
        ("Key", _text_or_hex(record.key)),
        ("Error class", s.error_class or "-"),
        ("Error message", s.error_message or "-"),
        ("Attempts", _dash(s.attempt)),
        ("Last tier", s.tier or "-"),
        ("DLQ reason", s.dlq_reason or "-"),
        ("Retriable", _dash(s.retriable)),
        ("Failed at", _time(s.failed_at_ms)),
        (
            "Original",
            f"{s.original_topic or '-'}/{_dash(s.original_partition)}@"
            f"{_dash(s.original_offset)} at {_time(s.original_timestamp_ms)}",
        ),
        ("Consumer group", s.consumer_group or "-"),
        ("Replay id", s.replay_id or "-"),
    ]
    width = max(len(k) for k, _ in fields) + 2
    for label, text in fields:
        indented = text.replace("\n", "\n" + " " * width)
        out.write(f"{label + ':':<{width}}{indented}\n")
    for problem in record.parsed.problems:
        out.write(f"Header problem: {problem}\n")
    out.write("Headers:\n")
    for k, v in record.headers:
        out.write(f"  {k}: {_header_value(k, v)}\n")
    if s.error_stack:
        out.write("Stack:\n")
        for line in s.error_stack.rstrip().splitlines():
            out.write(f"  {line}\n")
    out.write(_payload(record.value))
    return EXIT_OK


def _header_value(key: str, value: bytes | None) -> str:
    if value is None:
        return "(null)"
    if key == h.ERROR_STACK:
        return "(see Stack)"
    return _clip(_text_or_hex(value), 200)


def _payload(value: bytes | None) -> str:
    if value is None:
        return "Payload: none (tombstone)\n"
    text = dlq.printable(value)
    if text is not None:
        try:
            pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            kind = "JSON"
        except ValueError:
            pretty, kind = text, "text"
        body = "\n".join(f"  {line}" for line in pretty.splitlines())
        return f"Payload ({kind}, {len(value)} bytes):\n{body}\n"
    if len(value) <= 512:
        lines = [f"  {i:04x}  {value[i : i + 16].hex(' ')}" for i in range(0, len(value), 16)]
        return f"Payload (binary, {len(value)} bytes, hex):\n" + "\n".join(lines) + "\n"
    encoded = base64.b64encode(value).decode("ascii")
    body = "\n".join(f"  {encoded[i : i + 76]}" for i in range(0, len(encoded), 76))
    return f"Payload (binary, {len(value)} bytes, base64):\n{body}\n"


# --------------------------------------------------------------------------- dlq purge


def cmd_purge(args: argparse.Namespace) -> int:
    pipeline = locate(args)
    topic = pipeline.topology.dlq_topic
    before_time = before_offsets = None
    if args.before_time:
        try:
            before_time = dlq.parse_time(args.before_time)
        except ValueError as e:
            raise CliError(str(e), EXIT_USAGE) from None
    if args.before_offset:
        before_offsets = {}
        for text in args.before_offset:
            p, o = _position(text)
            before_offsets[p] = o
    if pipeline.api is not None and not args.force:
        _refuse_while_replaying(pipeline, "purge")
    cuts = dlq.plan_purge(
        pipeline.access, topic, before_time_ms=before_time, before_offsets=before_offsets
    )
    total = sum(c.removed for c in cuts)
    if not total:
        print(f"nothing to purge in {topic}", file=sys.stderr)
        return EXIT_NOTHING
    waiting = sum(c.waiting_removed for c in cuts)
    ranges = ", ".join(f"{c.partition}:{c.low}-{c.before - 1}" for c in cuts)
    summary = f"{total} event(s) from {topic} ({waiting} waiting; offsets {ranges})"
    if not args.yes and not _confirm(f"Delete {summary}? This cannot be undone. [y/N] "):
        print("not purged", file=sys.stderr)
        return EXIT_ERROR
    removed = dlq.purge(pipeline.access, topic, cuts)
    depth = dlq.depth_of(dlq.partition_states(pipeline.access, topic))
    print(f"purged {removed} event(s) from {topic}; DLQ depth now {depth}")
    return EXIT_OK


def _confirm(prompt: str) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def _refuse_while_replaying(pipeline: Pipeline, what: str) -> None:
    """A replay holding the pipeline's lease (an operator's or a direct one), or a DLQReplay
    Running (between two of its attempts it may hold none), makes us refuse."""
    assert pipeline.namespace is not None
    lease = replay_lease.held({"status": pipeline.status or {}})
    if lease is not None and lease.replay.startswith(replay_lease.DIRECT_PREFIX):
        raise CliError(
            f"a direct replay is running on this DLQ: {replay_lease.describe(lease)}; wait for "
            f"it, or pass --force to {what} anyway"
        )
    running = [
        r.name
        for r in rr.list_replays(pipeline.api, pipeline.namespace, pipeline.name)
        if r.phase == rr.RUNNING or (lease is not None and r.name == lease.replay)
    ]
    if running:
        raise CliError(
            f"replay {running[0]} is running on this DLQ; wait for it or cancel it "
            f"(kafka-retry dlq cancel {running[0]}), or pass --force to {what} anyway"
        )


# --------------------------------------------------------------------------- dlq replay


def cmd_replay(args: argparse.Namespace) -> int:
    event_filter = filter_of(args)
    pipeline = locate(args)
    try:
        resolve_target(pipeline.topology, args.target_tier)
    except InvalidTarget as e:
        raise CliError(str(e)) from None
    if args.dry_run:
        return _replay_plan(args, pipeline, event_filter)
    if args.direct:
        return _replay_direct(args, pipeline, event_filter)
    api = pipeline.need_cluster("a replay by the operator (use --direct)")
    assert pipeline.namespace is not None
    spec = DLQReplaySpec(
        pipeline=pipeline.name,
        target_tier=args.target_tier,
        filter=event_filter.to_spec(),
        max_messages_per_second=args.rate,
    )
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom: Any = client.CustomObjectsApi(api)
    try:
        created = custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            pipeline.namespace,
            rr.PLURAL,
            rr.new_replay(pipeline.namespace, spec, name=args.name),
        )
    except ApiException as e:
        raise CliError(f"cannot create the DLQReplay: {_api_reason(e)}") from None
    name = created["metadata"]["name"]
    if args.no_wait:
        print(f"dlqreplay/{name} created")
        return EXIT_OK
    print(
        f"dlqreplay/{name} created; following (Ctrl-C stops following, not the replay)",
        file=sys.stderr,
    )
    try:
        return _follow(custom, pipeline.namespace, name)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the replay goes on. Cancel it with: "
            f"kafka-retry dlq cancel {name} -n {pipeline.namespace}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _follow(custom: Any, namespace: str, name: str) -> int:
    """Watch the DLQReplay (no polling) and draw its progress until it ends."""
    with ReplayProgress(sys.stderr) as bar:
        return _watch(custom, namespace, name, bar)


def _watch(custom: Any, namespace: str, name: str, bar: ReplayProgress) -> int:
    from kubernetes import watch as kube_watch
    from kubernetes.client.exceptions import ApiException

    watch: Any = kube_watch  # untyped upstream
    version: str | None = None
    seen_operator = False
    while True:
        options: dict[str, Any] = {
            "field_selector": f"metadata.name={name}",
            "timeout_seconds": NO_OPERATOR_WARNING_S,
        }
        if version:
            options["resource_version"] = version
        try:
            for event in watch.Watch().stream(
                custom.list_namespaced_custom_object, GROUP, VERSION, namespace, rr.PLURAL,
                **options,
            ):  # fmt: skip
                obj = event["object"]
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "DELETED":
                    raise CliError(f"dlqreplay/{name} was deleted")
                status = obj.get("status") or {}
                seen_operator = seen_operator or bool(status)
                code = _show_progress(bar, name, status)
                if code is not None:
                    return code
        except ApiException as e:
            if e.status != 410:  # 410: our resource version expired; list afresh
                raise
            version = None
        if not seen_operator:
            bar.note("no operator has picked the replay up yet; is kafka-retry-operator running?")


def _show_progress(bar: ReplayProgress, name: str, status: Mapping[str, Any]) -> int | None:
    """Draw one status; the exit code once the replay has ended."""
    phase = status.get("phase")
    counts = (status.get("replayed", 0), status.get("skipped", 0), status.get("total", 0))
    if phase in rr.TERMINAL:
        bar.update(*counts, phase, final=True)
        reason, message = _condition(status)
        return _report(name, phase, status, reason, message)
    if phase == rr.RUNNING:
        bar.update(*counts, phase)
    elif phase == rr.PENDING:
        reason, message = _condition(status)
        bar.note(f"pending: {message or reason}")
    return None


def _condition(status: Mapping[str, Any]) -> tuple[str, str]:
    conditions = status.get("conditions") or []
    if not conditions:
        return "", ""
    c = conditions[0]
    return str(c.get("reason", "")), str(c.get("message", ""))


def _report(name: str, phase: str, status: Mapping[str, Any], reason: str, message: str) -> int:
    replayed, skipped = status.get("replayed", 0), status.get("skipped", 0)
    line = f"dlqreplay/{name} {phase}: {replayed} replayed, {skipped} skipped"
    past = sum(int(p.get("replayedPastCursor", 0)) for p in status.get("partitions") or [])
    if past:
        print(
            f"note: {past} replayed event(s) come after skipped ones and stay counted in the "
            "DLQ depth until those are replayed or purged (docs/dlq.md)",
            file=sys.stderr,
        )
    if phase == rr.SUCCEEDED:
        print(line)
        if not replayed:
            print("nothing matched: no event was replayed", file=sys.stderr)
            return EXIT_NOTHING
        return EXIT_OK
    print(f"{line} ({reason}: {message})" if message else line)
    return EXIT_ERROR


def _replay_plan(args: argparse.Namespace, pipeline: Pipeline, event_filter: EventFilter) -> int:
    """`--dry-run`: what a replay would send where, from the DLQ as it is now; sends nothing."""
    _, target = resolve_target(pipeline.topology, args.target_tier)
    plan = dlq_stats.ReplayPlan(target.name, target.topic, args.rate)
    now_ms = int(time.time() * 1000)
    states = dlq.partition_states(pipeline.access, pipeline.topology.dlq_topic)
    for record in _read(pipeline, states):
        plan.add(record, event_filter, now_ms)
    if args.output != "table":
        _dump({"pipeline": pipeline.label, "dryRun": True, **plan.to_dict()}, args.output)
    else:
        out = sys.stdout
        out.write(
            f"dry run: would replay {plan.replayed.events} event(s) from "
            f"{pipeline.topology.dlq_topic} to tier {target.name} ({target.topic}); "
            f"{plan.skipped.events} would stay waiting\n"
        )
        if plan.seconds is not None:
            out.write(f"at --rate {args.rate}: {_duration(math.ceil(plan.seconds))} at least\n")
        if plan.replayed.events:
            _print_stats(plan.replayed, out)
    return EXIT_OK if plan.replayed.events else EXIT_NOTHING


def _replay_direct(args: argparse.Namespace, pipeline: Pipeline, event_filter: EventFilter) -> int:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    replay_id = f"direct-{stamp}-{uuid.uuid4().hex[:6]}"
    lease = None
    if pipeline.api is not None and not args.force:
        _refuse_while_replaying(pipeline, "replay directly")
        lease = _take_lease(pipeline, replay_id)
    replayer = Replayer(
        pipeline.topology,
        pipeline.access,
        replay_id=replay_id,
        target_tier=args.target_tier,
        event_filter=event_filter,
        rate=args.rate,
        checkpoint_interval=0.5,
    )
    checkpoint = replayer.snapshot()
    cancel = threading.Event()
    with ReplayProgress(sys.stderr) as bar:

        def progress(cp: Checkpoint) -> None:
            bar.update(cp.replayed, cp.skipped, cp.total, "Running")

        with _sigint_sets(cancel), _holding(lease, cancel):
            print(
                f"replaying {pipeline.topology.dlq_topic} -> {replayer.target.topic} as "
                f"{replay_id} (Ctrl-C cancels)",
                file=sys.stderr,
            )
            result = replayer.run(checkpoint, on_checkpoint=progress, should_cancel=cancel.is_set)
        cp = result.checkpoint
        phase = result.outcome.value if result.outcome != Outcome.INTERRUPTED else rr.CANCELLED
        total = cp.examined if result.outcome == Outcome.SUCCEEDED else cp.total
        bar.update(cp.replayed, cp.skipped, total, phase, final=True)
    code = _report(replay_id, phase, cp.to_status(), "", "")
    return EXIT_INTERRUPTED if cancel.is_set() else code


def _take_lease(pipeline: Pipeline, replay_id: str) -> replay_lease.Lease:
    """The pipeline's replay lease, as the operator's replays take it: refused while another
    replay holds it."""
    from kubernetes.client.exceptions import ApiException

    assert pipeline.namespace is not None
    lease = replay_lease.Lease(
        pipeline.api,
        pipeline.namespace,
        pipeline.name,
        replay_lease.DIRECT_PREFIX + replay_id,
        replay_lease.identity("kafka-retry"),
    )
    try:
        other = lease.acquire()
    except replay_lease.PipelineNotFound as e:
        raise CliError(f"{e} not found") from None
    except ApiException as e:
        raise CliError(
            f"cannot take the pipeline's replay lease (patch on retrypipelines/status): "
            f"{_api_reason(e)}; or pass --force to replay without it"
        ) from None
    if other is not None:
        name = other.replay
        how = "wait for it"
        if ":" not in name:  # a DLQReplay (direct and operator leases have a prefix)
            how += f" or cancel it (kafka-retry dlq cancel {name})"
        raise CliError(
            f"{replay_lease.describe(other)} holds this DLQ; {how}, or pass --force to replay "
            "directly anyway"
        )
    return lease


@contextlib.contextmanager
def _holding(lease: replay_lease.Lease | None, cancel: threading.Event) -> Iterator[None]:
    """Renew the lease while the replay runs, and release it after; a lost lease (this
    process stalled past its expiry) cancels the replay."""
    if lease is None:
        yield
        return
    done = threading.Event()

    def renew() -> None:
        while not done.wait(replay_lease.RENEW_EVERY_S):
            try:
                lease.renew()
            except replay_lease.LeaseLost as e:
                print(f"\n{e}: cancelling", file=sys.stderr)
                cancel.set()
                return
            except Exception as e:  # the API server away: try again at the next tick
                logging.getLogger(__name__).warning("replay lease not renewed: %s", e)

    renewer = threading.Thread(target=renew, name="lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        with contextlib.suppress(Exception):  # it expires on its own
            lease.release()


@contextlib.contextmanager
def _sigint_sets(event: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks for a graceful stop, a second one interrupts."""

    def handle(_signum: int, _frame: object) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Set spec.cancel, unless the replay has already ended (then nothing is cancelled: a
    usage error). The patch carries the resourceVersion read, so a replay that ends between
    the read and the write is read again rather than reported as cancelled."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api, namespace = kube_client(args)
    custom: Any = client.CustomObjectsApi(api)
    where = f"{namespace}/{args.replay}"
    for _attempt in range(5):
        try:
            obj = custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, rr.PLURAL, args.replay
            )
        except ApiException as e:
            if e.status == 404:
                raise CliError(f"DLQReplay {where} not found") from None
            raise CliError(f"cannot read DLQReplay {where}: {_api_reason(e)}") from None
        ref = rr.ReplayRef.of(obj)
        if not ref.active:
            raise CliError(
                f"dlqreplay/{args.replay} has already ended ({ref.phase}, "
                f"{ref.replayed} replayed, {ref.skipped} skipped): nothing to cancel",
                EXIT_USAGE,
            )
        version = obj["metadata"]["resourceVersion"]
        patch = {"metadata": {"resourceVersion": version}, "spec": {"cancel": True}}
        try:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, rr.PLURAL, args.replay, patch
            )
        except ApiException as e:
            if e.status == 409:  # changed since read: look again
                continue
            raise CliError(f"cannot cancel DLQReplay {where}: {_api_reason(e)}") from None
        print(
            f"dlqreplay/{args.replay} cancel requested ({ref.phase}, {ref.replayed} replayed so "
            "far); the operator stops it before its next event"
        )
        return EXIT_OK
    raise CliError(f"DLQReplay {where} kept changing; try again")


# --------------------------------------------------------------------------- top


def cmd_top(args: argparse.Namespace) -> int:
    from kafka_retry import top

    if args.interval <= 0:
        raise CliError("--interval must be more than 0 seconds", EXIT_USAGE)
    api, namespace = kube_client(args)
    where = None if args.all_namespaces else namespace
    if args.output != "table":
        _dump(top.snapshot(api, where), args.output)
        return EXIT_OK
    return top.run(args, api, where)


# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    pipeline = locate(args)
    replayed: list[replay_marks.ReplayedRange] = []
    if pipeline.api is None:
        status = _live_status(pipeline)
        replays: list[rr.ReplayRef] = []
    else:
        assert pipeline.namespace is not None
        status = pipeline.status or {}
        objects = rr.replay_objects(pipeline.api, pipeline.namespace, pipeline.name)
        replays = rr.order(rr.ReplayRef.of(o) for o in objects)
        replayed = replay_marks.replayed_ranges(objects)
    if args.output != "table":
        _dump(
            {
                "pipeline": pipeline.label,
                "status": status,
                "replays": [r.__dict__ for r in replays],
            },
            args.output,
        )
        return EXIT_OK
    parsed = RetryPipelineStatus.model_validate(status)
    out = sys.stdout
    topo = pipeline.topology
    out.write(f"Pipeline {pipeline.label}: {topo.source_topic} (group {topo.consumer_group})\n")
    if topo.suspend:
        out.write("Suspended: tier workers are stopped; events wait on their tiers\n")
    if parsed.conditions:
        out.write("\n")
        rows = [["CONDITION", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        for c in parsed.conditions:
            rows.append(
                [
                    c.type,
                    c.status,
                    c.reason,
                    c.last_transition_time or "-",
                    _clip(c.message or "", 70),
                ]
            )
        _print_table(rows, out)
    elif pipeline.api is not None:
        out.write("No status yet: has the operator seen this pipeline?\n")
    out.write("\n")
    lags = {t.name: t for t in parsed.tiers}
    rows = [["TIER", "TOPIC", "DELAY", "LAG", "READY"]]
    for t in topo.tiers:
        s = lags.get(t.name)
        ready = "-" if pipeline.api is None or s is None else str(s.ready_replicas)
        lag = "-" if s is None or s.lag is None else str(s.lag)
        rows.append([t.name, t.topic, _duration(t.delay_seconds), lag, ready])
    _print_table(rows, out)
    d = parsed.dlq
    out.write(f"\nDLQ {topo.dlq_topic}: ")
    if d is None:
        out.write("depth unknown\n")
    else:
        oldest = f", oldest from {d.oldest_timestamp}" if d.oldest_timestamp else ""
        out.write(f"{d.depth} event(s) waiting{oldest}\n")
        if d.depth and replayed:
            states = dlq.partition_states(pipeline.access, topo.dlq_topic)
            marked = replay_marks.count_waiting(pipeline.access, topo.dlq_topic, states, replayed)
            if marked:
                out.write(f"  {_replayed_note(marked)} (kafka-retry dlq list)\n")
    if replays:
        out.write("\n")
        rows = [["REPLAY", "PHASE", "REPLAYED", "SKIPPED", "TOTAL", "REASON", "CREATED"]]
        for r in replays[-10:]:
            counts = [str(r.replayed), str(r.skipped), str(r.total)]
            rows.append([r.name, r.phase, *counts, r.reason or "-", r.created])
        _print_table(rows, out)
    return EXIT_OK


def _live_status(pipeline: Pipeline) -> dict[str, Any]:
    """Without the cluster: lag and depth measured now, in the RetryPipeline status shape."""
    from kafka_retry.depth import backlog
    from kafka_retry.offset_queries import committed, watermarks

    access, topo = pipeline.access, pipeline.topology
    states = dlq.partition_states(access, topo.dlq_topic)
    admin = access.admin()
    tiers = []
    for t in topo.tiers:
        n = dlq.partition_count(access, t.topic)
        tps = [(t.topic, p) for p in range(n)]
        marks = watermarks(admin, tps, access.timeout)
        offsets = committed(admin, {t.consumer_group: tps}, access.timeout)
        lag = backlog(t.topic, n, marks, offsets.get(t.consumer_group))
        tiers.append({"name": t.name, "topic": t.topic, "lag": lag.total if lag else None})
    return {"tiers": tiers, "dlq": {"depth": dlq.depth_of(states)}}


# --------------------------------------------------------------------------- output


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _dump(data: Any, fmt: str) -> None:
    if fmt == "json":
        json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        yaml.safe_dump(data, sys.stdout, sort_keys=False, allow_unicode=True)


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _text_or_hex(data: bytes | None) -> str:
    if data is None:
        return "-"
    text = dlq.printable(data)
    return text if text is not None else "0x" + data.hex()


def _first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text and text.strip() else None


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _dash(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
