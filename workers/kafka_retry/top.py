"""`kafka-retry top`: the pipelines of a namespace (or of all), refreshed in place: ready or
why not, DLQ depth and how old its oldest event is, tier lag, and how fast both change.

Read from the pipelines' status, which the operator keeps measured (every
`operator.statusIntervalSeconds`), so it needs only `list` on retrypipelines and costs the
cluster one list per refresh, however many pipelines there are. Rates are the change over the
last minute this view has seen (they start blank).
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kafka_retry import replay_resource as rr
from kafka_retry.model import GROUP, VERSION

RATE_WINDOW_S = 60.0
PLAIN_WIDTH = 400


@dataclass(frozen=True)
class Row:
    """One pipeline as its status says."""

    namespace: str
    name: str
    source: str
    ready: str  # True | False | Unknown
    reason: str
    dlq_depth: int | None
    oldest: str | None  # RFC 3339: when the oldest waiting event reached the DLQ
    tiers: tuple[tuple[str, int | None], ...]  # (tier, lag)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def lag(self) -> int | None:
        lags = [lag for _, lag in self.tiers if lag is not None]
        return sum(lags) if lags else None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Row:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        status = obj.get("status") or {}
        ready: Mapping[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        dlq = status.get("dlq") or {}
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            source=str((spec.get("source") or {}).get("topic", "")),
            ready=str(ready.get("status", "Unknown")),
            reason=str(ready.get("reason", "")),
            dlq_depth=_int_or_none(dlq.get("depth")),
            oldest=dlq.get("oldestTimestamp"),
            tiers=tuple(
                (str(t.get("name", "")), _int_or_none(t.get("lag")))
                for t in status.get("tiers") or []
            ),
        )

    def to_dict(self, rates: Rates) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "source": self.source,
            "ready": self.ready,
            "reason": self.reason,
            "dlqDepth": self.dlq_depth,
            "oldestTimestamp": self.oldest,
            "lag": self.lag,
            "tiers": [{"name": n, "lag": lag} for n, lag in self.tiers],
            "dlqPerMinute": rates.dlq_per_minute,
            "lagPerMinute": rates.lag_per_minute,
        }


@dataclass(frozen=True)
class Rates:
    dlq_per_minute: float | None = None
    lag_per_minute: float | None = None


@dataclass
class History:
    """The samples of the last RATE_WINDOW_S seconds, per pipeline."""

    samples: dict[tuple[str, str], deque[tuple[float, int | None, int | None]]] = field(
        default_factory=dict
    )

    def add(self, rows: Iterable[Row], at: float) -> None:
        seen = set()
        for row in rows:
            seen.add(row.key)
            kept = self.samples.setdefault(row.key, deque())
            kept.append((at, row.dlq_depth, row.lag))
            while kept and at - kept[0][0] > RATE_WINDOW_S:
                kept.popleft()
        for gone in set(self.samples) - seen:
            del self.samples[gone]

    def rates(self, key: tuple[str, str]) -> Rates:
        kept = self.samples.get(key)
        if not kept or len(kept) < 2 or kept[-1][0] <= kept[0][0]:
            return Rates()
        (t0, d0, l0), (t1, d1, l1) = kept[0], kept[-1]
        minutes = (t1 - t0) / 60

        def rate(a: int | None, b: int | None) -> float | None:
            return None if a is None or b is None else (b - a) / minutes

        return Rates(rate(d0, d1), rate(l0, l1))


def list_rows(api: Any, namespace: str | None) -> list[Row]:
    """Every pipeline of `namespace` (None: of all), the deepest DLQ first."""
    from kubernetes import client

    custom: Any = client.CustomObjectsApi(api)
    if namespace is None:
        found = custom.list_cluster_custom_object(GROUP, VERSION, rr.PIPELINE_PLURAL)
    else:
        found = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, rr.PIPELINE_PLURAL)
    rows = [Row.of(obj) for obj in found.get("items", [])]
    return sorted(rows, key=lambda r: (-(r.dlq_depth or 0), r.namespace, r.name))


def table(rows: list[Row], history: History, title: str, now: datetime) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (
        ("NAMESPACE", "left"),
        ("PIPELINE", "left"),
        ("SOURCE", "left"),
        ("READY", "left"),
        ("DLQ", "right"),
        ("DLQ/MIN", "right"),
        ("OLDEST", "right"),
        ("LAG", "right"),
        ("LAG/MIN", "right"),
        ("TIERS (LAG)", "left"),
    ):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        rates = history.rates(row.key)
        ready = Text(row.ready if row.ready != "False" else f"False ({row.reason})")
        if row.ready == "False":
            ready.stylize("red")
        depth = Text(_dash(row.dlq_depth), style="bold yellow" if row.dlq_depth else "")
        t.add_row(
            row.namespace,
            row.name,
            row.source,
            ready,
            depth,
            _rate(rates.dlq_per_minute),
            _age(row.oldest, now) if row.dlq_depth else "-",
            _dash(row.lag),
            _rate(rates.lag_per_minute),
            " · ".join(f"{n} {_dash(lag)}" for n, lag in row.tiers) or "-",
        )
    if not rows:
        t.caption = "no RetryPipelines here"
    return t


def run(args: argparse.Namespace, api: Any, namespace: str | None) -> int:
    """Refresh every `args.interval` seconds until Ctrl-C (or `args.iterations`); once when
    asked or when the output is not a terminal."""
    console = Console()
    if not console.is_terminal:  # a file or a pipe: full width, never squashed
        console = Console(width=PLAIN_WIDTH)
    history = History()
    where = "all namespaces" if namespace is None else f"namespace {namespace}"

    def render() -> Table:
        rows = list_rows(api, namespace)
        history.add(rows, time.monotonic())
        now = datetime.now().astimezone()
        title = f"kafka-retry top · {where} · every {args.interval:g}s · {now:%H:%M:%S}"
        return table(rows, history, title, now)

    if args.once or not console.is_terminal:
        console.print(render())
        return 0
    count = 0
    try:
        with Live(render(), console=console, auto_refresh=False) as live:
            while args.iterations is None or (count := count + 1) < args.iterations:
                time.sleep(args.interval)  # sleep-ok: the CLI view's refresh period
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        pass  # the way out of a live view
    return 0


def snapshot(api: Any, namespace: str | None) -> list[dict[str, Any]]:
    """`-o json|yaml`: one refresh, for scripts (no rates: they need two)."""
    return [row.to_dict(Rates()) for row in list_rows(api, namespace)]


def _age(rfc3339: str | None, now: datetime) -> str:
    if not rfc3339:
        return "-"
    try:
        then = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _rate(per_minute: float | None) -> str:
    if per_minute is None:
        return "-"
    return f"{per_minute:+.0f}" if abs(per_minute) >= 1 or per_minute == 0 else f"{per_minute:+.1f}"


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None
