"""Prometheus metrics of the data plane, and the one HTTP port for /metrics, /healthz, /readyz.

Metrics live in the default registry, labelled by pipeline and stage (`tier` is the tier's
name, or `source` for the live lane), so several consumers in one process share them.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from kafka_retry.routing import OUTCOMES

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400
PORT_ENV = "KAFKA_RETRY_METRICS_PORT"

EVENTS = Counter(
    "kafka_retry_events",
    "Events by outcome: succeeded, retried (sent to the next tier), dead_lettered, malformed "
    "(dead-lettered because of unreadable retry headers). Counted when durable.",
    ["pipeline", "tier", "outcome"],
)


class HistogramChild:
    """The buckets of one writer (one consumer loop) for one label set. `observe` is on every
    event's path: a C bisect and two additions, no lock, as only its own thread writes it (a
    scrape reads a copy); a tenth of what prometheus_client's Histogram costs."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # ascending, ending with +Inf
        self._counts = [0] * len(bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1  # first bound >= amount
        self._sum += amount

    def snapshot(self) -> tuple[list[int], float]:
        """Bucket counts (not cumulative) and the sum."""
        return list(self._counts), self._sum


class Histogram(Collector):
    """A histogram with the exposition of prometheus_client's (`_bucket`, `_count`, `_sum`),
    registered in the default registry. Each `labels(...)` call gives the caller a child of its
    own, to be written by one thread; a scrape adds up the children of each label set."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(bounds)
        self._les = ["+Inf" if b == float("inf") else repr(b) for b in bounds]  # as Go prints
        self._children: dict[tuple[str, ...], list[HistogramChild]] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def labels(self, *values: str) -> HistogramChild:
        """A new child for one writer; call it once per writer, not per observation."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        child = HistogramChild(self._bounds)
        with self._lock:
            self._children.setdefault(tuple(str(v) for v in values), []).append(child)
        return child

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            children = [(key, list(kids)) for key, kids in self._children.items()]
        for key, kids in children:
            counts = [0] * len(self._bounds)
            total = 0.0
            for kid in kids:
                kid_counts, kid_sum = kid.snapshot()
                counts = [a + b for a, b in zip(counts, kid_counts, strict=True)]
                total += kid_sum
            cumulative = list(itertools.accumulate(counts))
            family.add_metric(
                list(key), buckets=list(zip(self._les, cumulative, strict=True)), sum_value=total
            )
        yield family


LATENESS = Histogram(
    "kafka_retry_lateness_seconds",
    "How long after its due time a tier event reached its handler (never negative).",
    ["pipeline", "tier"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
HANDLER_SECONDS = Histogram(
    "kafka_retry_handler_duration_seconds",
    "Time spent in the handler per event.",
    ["pipeline", "tier"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DELIVERY_FAILURES = Counter(
    "kafka_retry_delivery_failures",
    "Forwards whose delivery failed and were sent again (the input offset waits for them).",
    ["pipeline", "tier"],
)
PAUSED_PARTITIONS = Gauge(
    "kafka_retry_paused_partitions",
    "Partitions held because their head event is not due yet.",
    ["pipeline", "tier"],
)
STUCK = Gauge(
    "kafka_retry_stuck",
    "1 while a forward is stuck: refused by its topic and by the DLQ (authorization, a "
    "missing topic, too large). Consumption is stalled and the worker not ready meanwhile.",
    ["pipeline", "tier"],
)
ASSIGNED_PARTITIONS = Gauge(
    "kafka_retry_assigned_partitions", "Partitions assigned to this consumer.", ["pipeline", "tier"]
)


class StageMetrics:
    """The metrics of one stage with their labels bound once, off the per-event path."""

    def __init__(self, pipeline: str, tier: str) -> None:
        self.outcome = {o: EVENTS.labels(pipeline, tier, o) for o in OUTCOMES}
        self.lateness = LATENESS.labels(pipeline, tier)
        self.handler_seconds = HANDLER_SECONDS.labels(pipeline, tier)
        self.delivery_failures = DELIVERY_FAILURES.labels(pipeline, tier)
        self.paused = PAUSED_PARTITIONS.labels(pipeline, tier)
        self.assigned = ASSIGNED_PARTITIONS.labels(pipeline, tier)
        self.stuck = STUCK.labels(pipeline, tier)


class HealthServer:
    """Serves /metrics, /healthz (the loop is alive) and /readyz (joined and polling)."""

    def __init__(
        self,
        port: int,
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        host: str = "0.0.0.0",
    ) -> None:
        checks = {"/healthz": alive, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path in checks:
                    ok = _safe(checks[path])
                    self._send(200 if ok else 503, b"ok\n" if ok else b"not ok\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes are not news
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kafka-retry-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        log.exception("health check failed")
        return False
