"""What every benchmark here shares: the local broker, throwaway topics, the machine's load,
results as JSON under bench/results/ and a short table on stdout.

Benchmarks report ratios of runs made side by side in one process, so that the load other
engineers put on this shared 2-core box cancels out as far as it can; absolute numbers are
printed too, with the load average, but only the ratios are comparable between runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_BOOTSTRAP = "127.0.0.1:19092"


def bootstrap() -> str:
    return os.environ.get("KRO_KAFKA_BOOTSTRAP", DEFAULT_BOOTSTRAP)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Topics:
    """Topics created for one benchmark and deleted when it ends (auto-create is off)."""

    def __init__(self, admin: AdminClient) -> None:
        self.admin = admin
        self.created: list[str] = []

    def make(self, name: str, partitions: int = 1) -> str:
        futures = self.admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        futures[name].result(timeout=60)
        self.created.append(name)
        return name

    def delete_all(self) -> None:
        if not self.created:
            return
        for f in self.admin.delete_topics(self.created, operation_timeout=60).values():
            with contextlib.suppress(Exception):  # cleanup is best effort
                f.result(timeout=60)
        self.created.clear()


@contextlib.contextmanager
def topics(bootstrap_servers: str) -> Iterator[Topics]:
    t = Topics(AdminClient({"bootstrap.servers": bootstrap_servers}))
    try:
        yield t
    finally:
        t.delete_all()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict[str, Any]:
    """Where and when the numbers were taken: they mean little without the load."""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "git": _git_head(),
    }


def _git_head() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() + (" (+uncommitted changes)" if _dirty() else "")


def _dirty() -> bool:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(out.stdout.strip())


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def write_result(name: str, result: dict[str, Any]) -> Path:
    """`bench/results/<name>.json` (the latest run) and a timestamped copy beside it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{name}-{stamp}.json").write_text(text)
    latest = RESULTS / f"{name}.json"
    latest.write_text(text)
    return latest


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in cells:  # the first column is a label: left-aligned; numbers right-aligned
        first, *rest = zip(row, widths, strict=True)
        out.append("  ".join([first[0].ljust(first[1]), *(c.rjust(w) for c, w in rest)]))
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def start_child(script: str, spec: dict[str, Any], ready: str, what: str) -> subprocess.Popen[str]:
    """`script --child SPEC` (the measured side in its own process, as deployed), once it has
    printed `ready`; its stdin and stdout are the parent's line protocol with it."""
    proc = subprocess.Popen(
        [sys.executable, script, "--child", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != ready:
        proc.kill()
        raise RuntimeError(f"{what} did not start")
    return proc


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
