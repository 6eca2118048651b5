"""Delay precision of a tier under load: how late after its due time each event is handled.

Events arrive on a tier with a short delay (`--delay`, seconds) as the live lane forwards
them: due one delay after they were written. They are produced at each of `--rates` events
per second for `--seconds`, and a tier worker (its own process, as `kafka-retry worker` runs)
with a handler that only notes the time handles them. Lateness is handler start - due time;
an event handled before its due time is early, and there must be none. The worker keeps the
events it fetched before they are due and takes them as they fall due, at most every
`delay.TAKE_EVERY_MS`: under a steady stream, lateness is mostly that period.

What precision must not cost: a tier that holds events asks the broker for nothing more. Last,
a worker at the deployed settings on a `--idle-delay` tier is given 20 events, and its
requests per second to the broker while it holds them are read from librdkafka's statistics
over `--idle-window` seconds, by request type (fetches, heartbeats...).

    python bench/delay_precision.py [--rates 1000,5000] [--seconds 10] [--delay 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from confluent_kafka import Producer

import benchlib
from kafka_retry import headers as h
from kafka_retry.classification import Classifier
from kafka_retry.event import Event
from kafka_retry.kafka_config import producer_config
from kafka_retry.model import Classification, Handler, PythonHandler, ResolvedTier, Topology
from kafka_retry.routing import Origin, Router, Stage
from kafka_retry.runner import tune_gc_for_worker
from kafka_retry.worker import build_worker

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def topology(bootstrap: str, tag: str, tier: str, dlq: str, delay_s: int) -> Topology:
    return Topology(
        pipeline=f"bench/{tag}",
        bootstrap_servers=bootstrap,
        source_topic=f"orders-{tag}",
        consumer_group=f"svc-{tag}",
        tiers=[
            ResolvedTier(
                name="retry-1",
                topic=tier,
                delay_seconds=delay_s,
                consumer_group=f"svc-{tag}.retry-1",
            )
        ],
        dlq_topic=dlq,
        classification=Classification(),
        handler=Handler(python=PythonHandler(image="bench", callable="bench:note")),
    )


# --------------------------------------------------------------------------- worker (child)


def idle_child(spec: dict[str, Any]) -> int:
    """Run the tier worker at the deployed settings; when the parent says (a line on stdin),
    report its broker requests per second over `idle_window_s`, by request type."""
    topo = Topology.from_json(spec["topology"])
    latest: list[tuple[float, dict[str, int]]] = []  # (stats ts in s, requests by type)

    def on_stats(text: str) -> None:
        stats = json.loads(text)
        by_type: dict[str, int] = {}
        for broker in stats.get("brokers", {}).values():
            for kind, n in (broker.get("req") or {}).items():
                by_type[kind] = by_type.get(kind, 0) + int(n)
        latest[:] = [(stats["ts"] / 1e6, by_type)]

    settings = {"statistics.interval.ms": 1000, "stats_cb": on_stats}
    runner = build_worker(topo, "retry-1", handler=lambda event: None, client_settings=settings)
    thread = threading.Thread(target=runner.run, name="worker")
    thread.start()
    while not runner.ready():
        time.sleep(0.05)
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(1.1)  # a fresh statistics report to start from
    (t0, first), held = latest[0], runner.paused_partitions()
    time.sleep(spec["idle_window_s"])
    t1, last = latest[0]
    runner.stop()
    thread.join(60)
    rates = {k: round((n - first.get(k, 0)) / (t1 - t0), 2) for k, n in last.items()}
    print(json.dumps({"seconds": round(t1 - t0, 1), "held_partitions": held, "per_s": rates}))
    return 0


def child(spec: dict[str, Any]) -> int:
    """Run the tier worker until the parent's deadline or `events` handled; report lateness."""
    if "idle_window_s" in spec:
        return idle_child(spec)
    topo = Topology.from_json(spec["topology"])
    lateness_ms: list[float] = []
    early = 0

    def note(event: Event) -> None:
        nonlocal early
        late = time.time() * 1000 - (event.due_ms or 0)
        if late < 0:
            early += 1
        lateness_ms.append(late)

    runner = build_worker(topo, "retry-1", handler=note, client_settings=FAST_GROUP)
    tune_gc_for_worker()
    thread = threading.Thread(target=runner.run, name="worker")
    thread.start()
    while not runner.ready():
        time.sleep(0.05)
    print("ready", flush=True)
    events, deadline = (float(x) for x in sys.stdin.readline().split())
    while len(lateness_ms) < events and time.time() < deadline:
        time.sleep(0.05)
    runner.stop()
    thread.join(60)
    values = lateness_ms
    print(
        json.dumps(
            {
                "handled": len(values),
                "early": early,
                "p50_ms": benchlib.percentile(values, 50),
                "p99_ms": benchlib.percentile(values, 99),
                "max_ms": max(values) if values else None,
                "min_ms": min(values) if values else None,
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- the benchmark


def produce_stream(
    bootstrap: str, topo: Topology, rate: int, seconds: float, value_bytes: int
) -> int:
    """The live lane's forwards at `rate` per second, each due one tier delay after it was
    written. Returns how many were produced."""
    try:
        raise ConnectionError("upstream refused the connection")
    except ConnectionError as exc:
        failure = Classifier().classify(exc)
    live = Router(topo, Stage.source(topo))
    producer = Producer(producer_config(bootstrap, {"linger.ms": 5}))
    value = b'{"order":"' + b"x" * max(0, value_bytes - 13) + b'"}'
    total = int(rate * seconds)
    start = time.monotonic()
    sent = 0
    while sent < total:
        due_now = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due_now:
            now_ms = int(time.time() * 1000)
            origin = Origin(topo.source_topic, 0, sent, now_ms)
            headers = live.forward_headers(
                [("trace-id", b"%032x" % sent)],
                origin,
                h.RetryState(),
                1,
                failure,
                live.route(True, now_ms),
                now_ms,
            )
            while True:
                try:
                    producer.produce(
                        topo.tiers[0].topic, value, b"order-%d" % sent, headers=headers
                    )
                    break
                except BufferError:
                    producer.poll(0.01)
            sent += 1
        producer.poll(0)
        wait = start + sent / rate - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.01))
    assert producer.flush(60) == 0
    return sent


def measure(args: argparse.Namespace, made: benchlib.Topics, tag: str, rate: int) -> dict[str, Any]:
    n = f"{tag}-{rate}"
    topo = topology(
        args.bootstrap,
        n,
        made.make(f"bench-delay-{n}-retry-1", args.partitions),
        made.make(f"bench-delay-{n}-dlq", args.partitions),
        args.delay,
    )
    spec = {"topology": topo.to_json()}
    proc = benchlib.start_child(__file__, spec, "ready", "tier worker")
    assert proc.stdin is not None
    load_before = benchlib.load_average()
    started = time.monotonic()
    produced_at = time.time()
    expected = int(rate * args.seconds)
    # The deadline leaves the last events their delay and some seconds to be handled.
    proc.stdin.write(f"{expected} {produced_at + args.seconds + args.delay + args.settle}\n")
    proc.stdin.flush()
    sent = produce_stream(args.bootstrap, topo, rate, args.seconds, args.value_bytes)
    production_s = time.monotonic() - started
    out = json.loads(
        proc.communicate(timeout=args.seconds + args.delay + args.settle + 120)[0]
        .strip()
        .splitlines()[-1]
    )
    out.update(
        rate=rate,
        produced=sent,
        achieved_rate=round(sent / production_s),
        load_average=[load_before, benchlib.load_average()],
    )
    for key in ("p50_ms", "p99_ms", "max_ms", "min_ms"):
        if out[key] is not None:
            out[key] = round(out[key], 1)
    return out


def measure_idle(args: argparse.Namespace, made: benchlib.Topics, tag: str) -> dict[str, Any]:
    """A worker's broker requests per second while it holds 20 events that are not due."""
    n = f"{tag}-idle"
    topo = topology(
        args.bootstrap,
        n,
        made.make(f"bench-delay-{n}-retry-1", args.partitions),
        made.make(f"bench-delay-{n}-dlq", args.partitions),
        args.idle_delay,
    )
    spec = {"topology": topo.to_json(), "idle_window_s": args.idle_window}
    proc = benchlib.start_child(__file__, spec, "ready", "tier worker")
    assert proc.stdin is not None
    produce_stream(args.bootstrap, topo, 20, 1.0, args.value_bytes)
    time.sleep(5)  # fetched, and held until due (the window ends well before)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out: dict[str, Any] = json.loads(
        proc.communicate(timeout=args.idle_window + 120)[0].strip().splitlines()[-1]
    )
    out["per_s"] = {k: v for k, v in out["per_s"].items() if v or k == "Fetch"}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000,5000", help="events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="production time per rate")
    parser.add_argument("--delay", type=int, default=2, help="the tier's delay, seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after the last is due")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--value-bytes", type=int, default=200)
    parser.add_argument("--idle-delay", type=int, default=60, help="the held tier's delay, s")
    parser.add_argument("--idle-window", type=float, default=10.0, help="requests counted, s")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    args.bootstrap = benchlib.bootstrap()
    rates = [int(r) for r in args.rates.split(",")]
    tag = benchlib.unique("delay").split("-", 1)[1]
    load_before = benchlib.load_average()
    runs = []
    with benchlib.topics(args.bootstrap) as made:
        for rate in rates:
            run = measure(args, made, tag, rate)
            benchlib.log(
                f"{rate}/s: handled {run['handled']}/{run['produced']}, lateness p50 "
                f"{run['p50_ms']} ms p99 {run['p99_ms']} ms max {run['max_ms']} ms, "
                f"early {run['early']}"
            )
            runs.append(run)
        idle = measure_idle(args, made, tag)
        benchlib.log(f"holding 20 events on {idle['held_partitions']} partitions: {idle}")
    result = {
        "benchmark": "delay_precision",
        "environment": benchlib.environment(),
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "parameters": {
            "rates": rates,
            "seconds": args.seconds,
            "delay_s": args.delay,
            "partitions": args.partitions,
            "value_bytes": args.value_bytes,
        },
        "runs": runs,
        "idle": idle,
        "target": "early == 0; p99 lateness <= 100 ms; no fetch requests while holding",
    }
    path = benchlib.write_result("delay_precision", result)
    print(
        f"\nDelay precision ({args.delay} s tier, {args.partitions} partitions, "
        f"load {load_before} -> {result['load_average']['after']})"
    )
    print(
        benchlib.table(
            ["rate/s", "achieved/s", "handled", "early", "p50 ms", "p99 ms", "max ms"],
            [
                (
                    r["rate"],
                    r["achieved_rate"],
                    f"{r['handled']}/{r['produced']}",
                    r["early"],
                    r["p50_ms"],
                    r["p99_ms"],
                    r["max_ms"],
                )
                for r in runs
            ],
        )
    )
    requests = ", ".join(f"{k} {v}" for k, v in sorted(idle["per_s"].items()))
    print(
        f"\nHolding 20 events not due ({args.idle_delay} s tier, deployed settings), broker "
        f"requests per second over {idle['seconds']} s: {requests or 'none'}"
    )
    print(f"\nresults: {path.relative_to(benchlib.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
