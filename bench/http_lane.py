"""The managed live lane with an http handler vs the SDK, at the same handler cost, side by side.

Every call costs `--handler-ms` (default 20): the SDK variant runs a Python handler that
waits that long in the service's process (what a service embedding `RetryingConsumer` does);
the managed lane (`kafka-retry worker --live`'s runner) POSTs each event to a local HTTP
service (a child process) that waits that long before answering 200, at
`handler.http.maxInFlight` 1, 8 and 32. Each variant reads the same backlog of `--events`
on `--partitions` partitions as a fresh group, one after the other in one run; throughput is
events handled per second from the first to the last.

    python bench/http_lane.py [--events 1000] [--partitions 1] [--handler-ms 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from confluent_kafka import Producer

import benchlib
from isolation import FAST_GROUP, topology
from kafka_retry.event import Event
from kafka_retry.model import Handler, HttpHandler, PythonHandler
from kafka_retry.sdk import RetryingConsumer
from kafka_retry.worker import build_live_lane

IN_FLIGHT = (1, 8, 32)


def serve(cost_s: float) -> int:
    """The child: an HTTP service whose every answer takes `cost_s`; prints its port."""

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(cost_s)  # the service's own work
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.request_queue_size = 128
    print(server.server_address[1], flush=True)
    server.serve_forever()
    return 0


def timed(runner: Any, events: int, limit_s: float) -> float:
    """Run `runner` until it handled `events`: events per second, first handled to last."""
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + limit_s
    first = None
    try:
        while runner.stats.handled < events:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {runner.stats.handled} of {events} in {limit_s:g} s")
            if first is None and runner.stats.handled:
                first = (time.monotonic(), runner.stats.handled)
            time.sleep(0.005)  # polling a counter, not the data path
        assert first is not None
        return (events - first[1]) / (time.monotonic() - first[0])
    finally:
        runner.stop()
        thread.join(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--handler-ms", type=float, default=20.0)
    parser.add_argument("--limit", type=float, default=120.0, help="seconds allowed per variant")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cost_s = args.handler_ms / 1000
    if args.serve:
        return serve(cost_s)

    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--handler-ms", str(args.handler_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    url = f"http://127.0.0.1:{int(child.stdout.readline())}/events"
    bootstrap = benchlib.bootstrap()
    tag = benchlib.unique("http").split("-", 1)[1]
    load_before = benchlib.load_average()
    rates: dict[str, float] = {}
    try:
        with benchlib.topics(bootstrap) as made:
            src = made.make(f"bench-http-{tag}-src", args.partitions)
            tier = made.make(f"bench-http-{tag}-retry-1", args.partitions)
            dlq = made.make(f"bench-http-{tag}-dlq", args.partitions)
            producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
            for i in range(args.events):
                producer.produce(src, key=str(i).encode(), value=b'{"order": %d}' % i)
            producer.flush(60)

            def sdk_handler(_event: Event) -> None:
                time.sleep(cost_s)  # the service's own work, in its process

            variants: dict[str, Callable[[str], Any]] = {
                "SDK (in-process handler)": lambda g: RetryingConsumer(
                    topology(
                        bootstrap,
                        g,
                        src,
                        tier,
                        dlq,
                        Handler(python=PythonHandler(image="bench", callable="bench:handle")),
                    ),
                    sdk_handler,
                    extra_config=FAST_GROUP,
                    use_env=False,
                ),
            }
            for n in IN_FLIGHT:
                http = HttpHandler(url=url, timeout_seconds=10, max_in_flight=n)
                variants[f"managed lane, maxInFlight {n}"] = lambda g, http=http: build_live_lane(
                    topology(bootstrap, g, src, tier, dlq, Handler(http=http)),
                    client_settings=FAST_GROUP,
                )
            for i, (name, make) in enumerate(variants.items()):
                rates[name] = timed(make(f"{tag}-{i}"), args.events, args.limit)
                benchlib.log(f"{name}: {rates[name]:,.0f} events/s")
    finally:
        child.kill()
        child.wait(10)

    sdk = rates["SDK (in-process handler)"]
    result = {
        "benchmark": "http_lane",
        "environment": benchlib.environment(),
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "parameters": {
            "events": args.events,
            "partitions": args.partitions,
            "handler_ms": args.handler_ms,
        },
        "events_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_sdk": {k: benchlib.ratio(v, sdk) for k, v in rates.items()},
        "ceiling_one_at_a_time": round(args.partitions * 1000 / args.handler_ms, 1),
    }
    path = benchlib.write_result("http_lane", result)
    print(
        f"\nManaged live lane vs SDK ({args.events} events, {args.partitions} partition(s), "
        f"{args.handler_ms:g} ms per call; load {load_before} -> "
        f"{result['load_average']['after']})"
    )
    print(
        benchlib.table(
            ["consumer", "events/s", "x SDK"],
            [(k, v, benchlib.ratio(v, sdk)) for k, v in rates.items()],
        )
    )
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
