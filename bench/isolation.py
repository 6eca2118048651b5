"""Live-lane isolation: do failures slow the live traffic? Side by side in one run.

The same handler (simulated I/O of `--handler-ms`, a sleep: the service's own work) and the
same events, a share of which fail retriably, consumed by:

- baseline: an in-place blocking-retry consumer, the usual first attempt at retries. A
  failing event is retried on the consumer's thread (`--attempts`, backoff from
  `--backoff-ms` doubling), then produced to the DLQ; everything behind it waits.
- ours: the live-lane SDK (`RetryingConsumer`); a failure is forwarded to the first retry
  tier and the consumer moves on. (Tier workers run elsewhere and are not part of the live
  lane; they do not run here.)

Each consumer runs in its own process, twice per failure share:
- capacity: a backlog of `--events` already waits; live-lane throughput is events finished
  per second (handled, or given up on: forwarded, or retried and dead-lettered);
- paced: events arrive at `--rate` per second (default: 70% of ours' no-failure capacity,
  measured first) for `--seconds`; end-to-end latency (handler done - produced) of the
  events that succeed at their first attempt. Events still unhandled when the run ends count
  at their age then: a lower bound, marked ">".

    python bench/isolation.py [--shares 0,5,20] [--events 3000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

import benchlib
from kafka_retry.errors import RetriableError
from kafka_retry.event import Event
from kafka_retry.kafka_config import consumer_config, producer_config
from kafka_retry.model import Classification, Handler, PythonHandler, ResolvedTier, Topology
from kafka_retry.sdk import RetryingConsumer

KINDS = ("baseline", "ours")
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def fails(event_id: int, share: int) -> bool:
    """Whether an event is in the failing share: spread evenly, the same for both consumers."""
    return (event_id * 2654435761) % 100 < share


def topology(
    bootstrap: str, tag: str, source: str, tier: str, dlq: str, handler: Handler | None = None
) -> Topology:
    """A live lane on `source` with one 30 s tier; the handler is named, not called (the
    benchmarks pass their handler functions in)."""
    return Topology(
        pipeline=f"bench/{tag}",
        bootstrap_servers=bootstrap,
        source_topic=source,
        consumer_group=f"svc-{tag}",
        tiers=[
            ResolvedTier(
                name="retry-1", topic=tier, delay_seconds=30, consumer_group=f"svc-{tag}.retry-1"
            )
        ],
        dlq_topic=dlq,
        classification=Classification(),
        handler=handler or Handler(python=PythonHandler(image="bench", callable="bench:handle")),
    )


# --------------------------------------------------------------------------- consumer (child)


class Tally:
    """What a consumer did, written by its thread, read once it stops."""

    def __init__(self, events: int, share: int, handler_s: float, partitions: int) -> None:
        self.expected = events
        self.share = share
        self.handler_s = handler_s
        self.finished = 0
        self.first: float | None = None
        self.last = 0.0
        self.latency_ms: dict[int, float] = {}  # first-time successes: id -> handled - produced
        self.warm = threading.Event()
        self.warm_ups = 0
        self.partitions = partitions

    def warm_up(self, value: bytes) -> bool:
        """The parent's warm-up events (id -1, one per partition): proof that the consumer
        fetches every partition. Not counted."""
        if not value.startswith(b"-1,"):
            return False
        self.warm_ups += 1
        if self.warm_ups >= self.partitions:
            self.warm.set()
        return True

    def handle(self, value: bytes, attempt: int) -> None:
        """The service's work: simulated I/O, then success or a retriable failure."""
        now = time.time()
        if self.first is None:
            self.first = now
        event_id, produced_ns = (int(x) for x in value.split(b","))
        time.sleep(self.handler_s)
        if fails(event_id, self.share):
            raise RetriableError(f"upstream unavailable for event {event_id}")
        if attempt == 1:
            self.latency_ms[event_id] = (time.time_ns() - produced_ns) / 1e6

    def done(self) -> None:
        self.finished += 1
        self.last = time.time()


def run_ours(topo: Topology, tally: Tally, ready: threading.Event, stop: threading.Event) -> None:
    def handler(event: Event) -> None:
        value = event.value or b""
        if tally.warm_up(value):
            return
        try:
            tally.handle(value, event.attempt)
        finally:
            tally.done()  # handled or forwarded: the live lane is past it

    consumer = RetryingConsumer(topo, handler, use_env=False, extra_config=FAST_GROUP)
    thread = threading.Thread(target=consumer.run, name="ours")
    thread.start()
    while not consumer.ready():
        time.sleep(0.05)
    ready.set()
    stop.wait()
    consumer.stop()
    thread.join(60)


def run_baseline(
    topo: Topology,
    tally: Tally,
    ready: threading.Event,
    stop: threading.Event,
    attempts: int,
    backoff_s: float,
) -> None:
    """The classic loop: poll one message, retry it on the consumer's thread, then the DLQ.
    Offsets are stored per message for the same 1 s auto-commit as the SDK's."""
    config = consumer_config(topo.bootstrap_servers, topo.consumer_group, FAST_GROUP)
    consumer = Consumer(config)
    producer = Producer(producer_config(topo.bootstrap_servers))

    def assigned(c: Any, partitions: list[TopicPartition]) -> None:
        c.incremental_assign(partitions)
        ready.set()

    consumer.subscribe([topo.source_topic], on_assign=assigned)
    try:
        while not stop.is_set():
            m = consumer.poll(0.2)
            producer.poll(0)
            if m is None or m.error() is not None:
                continue
            value = m.value() or b""
            if not tally.warm_up(value):
                for attempt in range(1, attempts + 1):
                    try:
                        tally.handle(value, attempt)
                        break
                    except RetriableError:
                        if attempt == attempts:
                            producer.produce(topo.dlq_topic, value, m.key(), headers=m.headers())
                        else:
                            time.sleep(backoff_s * 2 ** (attempt - 1))
                tally.done()
            consumer.store_offsets(message=m)
    finally:
        producer.flush(30)
        consumer.close()


def child(spec: dict[str, Any]) -> int:
    """Consume until every event is finished or the parent's deadline passes; report."""
    topo = Topology.from_json(spec["topology"])
    tally = Tally(spec["events"], spec["share"], spec["handler_ms"] / 1000, spec["partitions"])
    ready, stop = threading.Event(), threading.Event()
    if spec["kind"] == "ours":
        args: tuple[Any, ...] = (topo, tally, ready, stop)
        thread = threading.Thread(target=run_ours, args=args)
    else:
        args = (topo, tally, ready, stop, spec["attempts"], spec["backoff_ms"] / 1000)
        thread = threading.Thread(target=run_baseline, args=args)
    thread.start()
    ready.wait(60)
    print("assigned", flush=True)
    if sys.stdin.readline().strip() == "warm-up":
        tally.warm.wait(60)
        print("warm", flush=True)
    deadline = float(sys.stdin.readline())
    while tally.finished < tally.expected and time.time() < deadline:
        time.sleep(0.05)
    ended = time.time()
    stop.set()
    thread.join(90)
    print(
        json.dumps(
            {
                "finished": tally.finished,
                "first": tally.first,
                "last": tally.last,
                "ended": ended,
                "latency_ms": tally.latency_ms,
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Run:
    kind: str
    phase: str
    share: int
    events: int
    finished: int
    seconds: float
    latency: dict[str, float | None]
    censored: int  # first-time successes not handled by the end: latency is at least their age

    @property
    def rate(self) -> float:
        return self.finished / self.seconds if self.seconds > 0 else 0.0


def value(event_id: int) -> bytes:
    return b"%d,%d" % (event_id, time.time_ns())


def produce_backlog(bootstrap: str, topic: str, events: int) -> None:
    producer = Producer(producer_config(bootstrap, {"linger.ms": 20}))
    for i in range(events):
        producer.produce(topic, value(i), b"order-%d" % i)
        producer.poll(0)
    assert producer.flush(60) == 0


def produce_paced(producer: Producer, topic: str, events: int, rate: float) -> dict[int, int]:
    """Produce at `rate` per second, on schedule (not catching up in bursts); returns the
    produce times (ns) by event id. The producer is warm: its first send (producer id,
    metadata) would otherwise count into the first events' latency."""
    sent: dict[int, int] = {}
    start = time.monotonic()
    for i in range(events):
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        v = value(i)
        sent[i] = int(v.split(b",")[1])
        producer.produce(topic, v, b"order-%d" % i)
        producer.poll(0)
    assert producer.flush(60) == 0
    return sent


def measure(
    args: argparse.Namespace,
    made: benchlib.Topics,
    tag: str,
    kind: str,
    phase: str,
    share: int,
    rate: float | None,
) -> Run:
    n = f"{tag}-{kind}-{phase}-{share}"
    source = made.make(f"bench-iso-{n}", args.partitions)
    topo = topology(
        args.bootstrap,
        n,
        source,
        made.make(f"bench-iso-{n}-retry-1", args.partitions),
        made.make(f"bench-iso-{n}-dlq", args.partitions),
    )
    events = args.events if rate is None else int(rate * args.seconds)
    if rate is None:
        produce_backlog(args.bootstrap, source, events)
    spec = {
        "topology": topo.to_json(),
        "kind": kind,
        "share": share,
        "events": events,
        "handler_ms": args.handler_ms,
        "attempts": args.attempts,
        "backoff_ms": args.backoff_ms,
        "partitions": args.partitions,
    }
    proc = benchlib.start_child(__file__, spec, "assigned", f"{kind} consumer")
    assert proc.stdin is not None and proc.stdout is not None
    producer = Producer(producer_config(args.bootstrap, {"linger.ms": 0}))
    if rate is None:
        proc.stdin.write("go\n")
    else:  # warm-up events first: latencies start once the consumer fetches every partition
        proc.stdin.write("warm-up\n")
        proc.stdin.flush()
        for partition in range(args.partitions):
            producer.produce(source, b"-1,0", b"warm-up", partition=partition)
        producer.flush(30)
        if proc.stdout.readline().strip() != "warm":
            proc.kill()
            raise RuntimeError(f"{kind} consumer did not fetch")
    window = args.capacity_window if phase == "capacity" else args.seconds + args.settle
    proc.stdin.write(f"{time.time() + window}\n")
    proc.stdin.flush()
    sent = produce_paced(producer, source, events, rate) if rate is not None else {}
    out_text, _ = proc.communicate(timeout=window + 120)
    out = json.loads(out_text.strip().splitlines()[-1])
    latencies = {int(k): v for k, v in out["latency_ms"].items()}
    censored = 0
    if sent:  # first-time successes not handled yet: at least as late as their age at the end
        for event_id, produced_ns in sent.items():
            if not fails(event_id, share) and event_id not in latencies:
                latencies[event_id] = (out["ended"] * 1e9 - produced_ns) / 1e6
                censored += 1
    values = list(latencies.values())
    seconds = (out["last"] - out["first"]) if out["first"] else 0.0
    return Run(
        kind,
        phase,
        share,
        events,
        out["finished"],
        seconds,
        {
            "p50_ms": _round(benchlib.percentile(values, 50)),
            "p99_ms": _round(benchlib.percentile(values, 99)),
            "max_ms": _round(max(values) if values else None),
        },
        censored,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", default="0,5,20", help="percent of events failing")
    parser.add_argument("--events", type=int, default=3000, help="capacity backlog")
    parser.add_argument("--capacity-window", type=float, default=8.0, help="seconds at most")
    parser.add_argument("--rate", type=float, help="paced events/s (default: 70%% of ours' 0%%)")
    parser.add_argument("--seconds", type=float, default=5.0, help="paced production time")
    parser.add_argument("--settle", type=float, default=3.0, help="paced: wait after producing")
    parser.add_argument("--handler-ms", type=float, default=1.5)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--attempts", type=int, default=3, help="baseline: attempts in place")
    parser.add_argument("--backoff-ms", type=float, default=50.0, help="baseline: first backoff")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    args.bootstrap = benchlib.bootstrap()
    shares = [int(s) for s in args.shares.split(",")]
    tag = benchlib.unique("iso").split("-", 1)[1]
    load_before = benchlib.load_average()
    runs: list[Run] = []

    def log(run: Run) -> None:
        lat = run.latency
        benchlib.log(
            f"{run.phase:8s} {run.kind:8s} {run.share:3d}% failing: {run.rate:7.0f} events/s "
            f"({run.finished}/{run.events}), first-time successes p50 {lat['p50_ms']} ms "
            f"p99 {lat['p99_ms']} ms" + (f" ({run.censored} censored)" if run.censored else "")
        )

    with benchlib.topics(args.bootstrap) as made:
        for share in shares:
            for kind in KINDS:
                runs.append(measure(args, made, tag, kind, "capacity", share, None))
                log(runs[-1])
        ours0 = next((r for r in runs if r.kind == "ours" and r.share == 0), None)
        rate = args.rate or round(0.7 * (ours0.rate if ours0 else 400.0))
        for share in shares:
            for kind in KINDS:
                runs.append(measure(args, made, tag, kind, "paced", share, rate))
                log(runs[-1])

    def find(kind: str, phase: str, share: int) -> Run | None:
        return next((r for r in runs if (r.kind, r.phase, r.share) == (kind, phase, share)), None)

    def cap_rate(kind: str, share: int) -> float | None:
        run = find(kind, "capacity", share)
        return run.rate if run else None

    ratios = {
        f"{share}%": {
            "ours / its 0% run": benchlib.ratio(cap_rate("ours", share), cap_rate("ours", 0)),
            "baseline / its 0% run": benchlib.ratio(
                cap_rate("baseline", share), cap_rate("baseline", 0)
            ),
            "ours / baseline": benchlib.ratio(cap_rate("ours", share), cap_rate("baseline", share)),
        }
        for share in shares
    }
    result = {
        "benchmark": "isolation",
        "environment": benchlib.environment(),
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "parameters": {
            "shares": shares,
            "events": args.events,
            "capacity_window_s": args.capacity_window,
            "paced_rate": rate,
            "paced_seconds": args.seconds,
            "handler_ms": args.handler_ms,
            "partitions": args.partitions,
            "baseline_attempts": args.attempts,
            "baseline_backoff_ms": args.backoff_ms,
        },
        "runs": [
            {
                "kind": r.kind,
                "phase": r.phase,
                "failing_percent": r.share,
                "events": r.events,
                "finished": r.finished,
                "events_per_s": round(r.rate, 1),
                "first_time_success_latency": r.latency,
                "censored": r.censored,
            }
            for r in runs
        ],
        "capacity_ratios": ratios,
        "target": "ours at 20% failing >= 0.9 x ours at 0% (capacity)",
    }
    path = benchlib.write_result("isolation", result)

    def lat(run: Run | None, key: str) -> str:
        if run is None or run.latency[key] is None:
            return "-"
        return (">" if run.censored else "") + f"{run.latency[key]:,.0f}"

    print(
        f"\nLive-lane isolation (handler {args.handler_ms} ms, paced at {rate}/s, "
        f"load {load_before} -> {result['load_average']['after']})"
    )
    rows = []
    for share in shares:
        for kind in KINDS:
            cap, paced = find(kind, "capacity", share), find(kind, "paced", share)
            rows.append(
                (
                    f"{kind} {share}%",
                    cap.rate if cap else None,
                    f"{paced.rate:,.0f}" if paced else "-",
                    lat(paced, "p50_ms"),
                    lat(paced, "p99_ms"),
                )
            )
    print(
        benchlib.table(
            ["consumer, failing", "capacity ev/s", "paced ev/s", "p50 ms", "p99 ms"], rows
        )
    )
    print()
    print(
        benchlib.table(
            ["capacity ratio", *[f"{s}%" for s in shares]],
            [
                (name, *[ratios[f"{s}%"][name] for s in shares])
                for name in ("ours / its 0% run", "baseline / its 0% run", "ours / baseline")
            ],
        )
    )
    print(f"\nresults: {path.relative_to(benchlib.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
