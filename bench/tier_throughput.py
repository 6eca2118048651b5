"""Tier worker throughput against a bare confluent-kafka loop, side by side in one run.

All events already sit on a tier topic and are due (the live lane's headers, due time in the
past); the worker's handler does nothing (success path) or raises a retriable error (every
event is forwarded to the next tier). The baseline is the least a Python program does to
move the same events: consume a batch, produce each record with its headers copied, store
the batch's offsets for the same 1 s auto-commit. Both use the worker's own librdkafka
settings (same batch size, prefetch, acks=all and idempotence), so the ratio is what the
worker's Python costs on top of the client library. A second baseline, consume and commit
without producing, is the floor under the worker's success path.

Every run is a fresh process, as a worker is (`kafka-retry worker` tunes its garbage
collector at start-up, so the worker runs here do too; the bare loops do not), on a fresh
consumer group over the same input. Each round runs every variant once, in rotating order;
ratios are taken per round (neighbours in time share the box's load) and the median over
rounds is reported. A rate counts from the first event handed over to the last one finished
(handled, or its forward acknowledged), so group joins do not count. CPU time is the whole
process's (Python and librdkafka's threads) over the same span: on a shared box it moves
less with the neighbours' load than wall-clock rates do.

    python bench/tier_throughput.py [--events 60000] [--rounds 5] [--profile forward]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

import benchlib
from kafka_retry import headers as h
from kafka_retry.classification import Classifier
from kafka_retry.event import Event
from kafka_retry.kafka_config import consumer_config, producer_config
from kafka_retry.model import Classification, Handler, PythonHandler, ResolvedTier, Topology
from kafka_retry.routing import Origin, Router, Stage
from kafka_retry.runner import tune_gc_for_worker
from kafka_retry.worker import build_worker

VARIANTS = ("bare-forward", "ours-forward", "ours-success", "bare-commit")


def topology(bootstrap: str, tag: str, input_topic: str, next_topic: str, dlq: str) -> Topology:
    def tier(name: str, topic: str, delay: int) -> ResolvedTier:
        return ResolvedTier(
            name=name, topic=topic, delay_seconds=delay, consumer_group=f"svc-{tag}.{name}"
        )

    return Topology(
        pipeline=f"bench/{tag}",
        bootstrap_servers=bootstrap,
        source_topic=f"orders-{tag}",
        consumer_group=f"svc-{tag}",
        tiers=[tier("retry-1", input_topic, 1), tier("retry-2", next_topic, 60)],
        dlq_topic=dlq,
        classification=Classification(),
        handler=Handler(python=PythonHandler(image="bench", callable="bench:noop")),
    )


def upstream_call() -> None:
    raise ConnectionError("upstream refused the connection")


def produce_input(bootstrap: str, topo: Topology, topic: str, events: int, value_bytes: int) -> int:
    """The input: what the live lane forwards after a failure, due six seconds ago so that the
    tier may process it at once. Returns the mean size in bytes of our headers per record."""
    try:
        upstream_call()
    except ConnectionError as exc:
        failure = Classifier().classify(exc)
    source = Router(topo, Stage.source(topo))
    due_ms = int(time.time() * 1000) - 6000
    route = source.route(True, due_ms - 1000 * topo.tiers[0].delay_seconds)
    producer = Producer(producer_config(bootstrap, {"linger.ms": 20}))
    value = b'{"order":"' + b"x" * max(0, value_bytes - 13) + b'"}'
    ours = 0
    for i in range(events):
        original = [("trace-id", b"%032x" % i), ("content-type", b"application/json")]
        origin = Origin(topo.source_topic, 0, i, due_ms - 2000)
        headers = source.forward_headers(
            original, origin, h.RetryState(), 1, failure, route, due_ms - 1000
        )
        ours += sum(len(k) + len(v or b"") for k, v in headers[len(original) :])
        while True:
            try:
                producer.produce(topic, value=value, key=b"order-%d" % i, headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0, "input not produced"
    return ours // max(1, events)


# --------------------------------------------------------------------------- one run (child)


class Clock:
    """When the first event was handed over (wall and process CPU time)."""

    def __init__(self) -> None:
        self.first: tuple[float, float] | None = None

    def start(self) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())


def watch(
    count: Callable[[], int], clock: Clock, target: int, stop: Callable[[], None], limit_s: float
) -> tuple[float, float]:
    """Wait until `count()` reaches `target`; (wall, CPU) seconds from the first event on."""
    deadline = time.monotonic() + limit_s
    while count() < target:
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"only {count()} of {target} events after {limit_s}s")
        time.sleep(0.05)  # seldom: each wake-up takes the GIL from the loop being measured
    end = (time.perf_counter(), time.process_time())
    stop()
    assert clock.first is not None
    return end[0] - clock.first[0], end[1] - clock.first[1]


def run_ours(topo: Topology, forward: bool, spec: dict[str, Any]) -> dict[str, Any]:
    clock = Clock()

    def noop(_event: Event) -> None:
        clock.start()

    def failing(_event: Event) -> None:
        clock.start()
        upstream_call()

    runner = build_worker(
        topo,
        "retry-1",
        handler=failing if forward else noop,
        client_settings={},
        batch_size=spec["batch"],
    )
    profiler = cProfile.Profile() if spec["profile"] else None

    def body() -> None:
        if profiler is not None:
            profiler.enable()
        try:
            runner.run()
        finally:
            if profiler is not None:
                profiler.disable()

    tune_gc_for_worker()  # as `kafka-retry worker` does before its loop
    thread = threading.Thread(target=body, name="ours")
    thread.start()
    stats = runner.stats

    def count() -> int:
        return stats.forwarded if forward else stats.handled

    try:
        seconds, cpu = watch(count, clock, spec["events"], runner.stop, spec["limit"])
    finally:
        runner.stop()
        thread.join(60)
    out: dict[str, Any] = {"seconds": seconds, "cpu_seconds": cpu}
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        out["profile"] = text.getvalue()
    return out


def run_bare(topo: Topology, forward: bool, spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline loop: consume, produce each record (headers copied), store offsets."""
    tier = topo.tiers[0]
    consumer = Consumer(
        consumer_config(topo.bootstrap_servers, tier.consumer_group, pauses_often=True)
    )
    producer = Producer(producer_config(topo.bootstrap_servers))
    out_topic, batch = topo.tiers[1].topic, spec["batch"]
    clock = Clock()
    stopping = threading.Event()
    acked = [0]
    produced = [0]
    consumed = [0]

    def delivered(err: Any, _msg: Any) -> None:
        if err is None:
            acked[0] += 1

    def loop() -> None:
        consumer.subscribe([tier.topic])
        try:
            while not stopping.is_set():
                # As the worker does: a short wait while forwards await acknowledgement.
                msgs = consumer.consume(batch, 0.005 if acked[0] < produced[0] else 0.1)
                if forward:
                    producer.poll(0)  # delivery reports of earlier batches
                if not msgs:
                    continue
                clock.start()
                last: dict[tuple[str, int], int] = {}
                for m in msgs:
                    if m.error() is not None:
                        continue
                    if forward:
                        while True:
                            try:
                                producer.produce(
                                    out_topic,
                                    m.value(),
                                    m.key(),
                                    headers=m.headers(),
                                    on_delivery=delivered,
                                )
                                produced[0] += 1
                                break
                            except BufferError:
                                producer.poll(0.05)
                    last[(m.topic(), m.partition())] = m.offset()
                consumed[0] += len(msgs)
                if forward:
                    producer.poll(0)
                consumer.store_offsets(
                    offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
                )
        finally:
            producer.flush(30)
            consumer.close()

    thread = threading.Thread(target=loop, name="bare")
    thread.start()

    def count() -> int:
        return acked[0] if forward else consumed[0]

    try:
        seconds, cpu = watch(count, clock, spec["events"], stopping.set, spec["limit"])
    finally:
        stopping.set()
        thread.join(60)
    return {"seconds": seconds, "cpu_seconds": cpu}


def child(variant: str, spec: dict[str, Any]) -> int:
    topo = Topology.from_json(spec["topology"])
    run = run_ours if variant.startswith("ours") else run_bare
    print(json.dumps(run(topo, variant.endswith("forward"), spec)))
    return 0


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Run:
    variant: str
    events: int
    seconds: float
    cpu_seconds: float  # the whole process's, Python and librdkafka's threads

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_seconds / self.events * 1e6


def spawn(variant: str, spec: dict[str, Any]) -> tuple[Run, str | None]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=spec["limit"] + 120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run = Run(variant, spec["events"], out["seconds"], out["cpu_seconds"])
    return run, out.get("profile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60000, help="events per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500, help="consume() batch, both loops")
    parser.add_argument("--value-bytes", type=int, default=200)
    parser.add_argument("--limit", type=float, default=90.0, help="seconds allowed per run")
    parser.add_argument(
        "--profile", choices=("forward", "success"), help="cProfile one worker run, print it"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.spec))
    variants = [v for v in args.variants.split(",") if v]

    bootstrap = benchlib.bootstrap()
    tag = benchlib.unique("tput").split("-", 1)[1]
    load_before = benchlib.load_average()
    runs: list[list[Run]] = []
    profiles: dict[str, str] = {}
    with benchlib.topics(bootstrap) as made:
        src = made.make(f"bench-tput-{tag}-retry-1", args.partitions)
        nxt = made.make(f"bench-tput-{tag}-retry-2", args.partitions)
        dlq = made.make(f"bench-tput-{tag}-dlq", args.partitions)
        topo = topology(bootstrap, tag, src, nxt, dlq)
        benchlib.log(f"producing {args.events} events to {src}")
        header_bytes = produce_input(bootstrap, topo, src, args.events, args.value_bytes)
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            this_round: list[Run] = []
            for variant in order:
                # A fresh group per run: each one reads the whole input.
                first = topo.tiers[0].model_copy(
                    update={"consumer_group": f"g-{tag}-{r}-{variant}"}
                )
                spec = {
                    "topology": topo.model_copy(update={"tiers": [first, topo.tiers[1]]}).to_json(),
                    "events": args.events,
                    "batch": args.batch,
                    "limit": args.limit,
                    "profile": r == 0 and variant == f"ours-{args.profile}",
                }
                run, report = spawn(variant, spec)
                if report:
                    profiles[variant] = report
                benchlib.log(
                    f"round {r + 1}: {variant:13s} {run.rate:9,.0f} events/s, "
                    f"{run.cpu_us_per_event:5.1f} us CPU/event"
                )
                this_round.append(run)
            runs.append(this_round)

    def values(variant: str, what: Callable[[Run], float]) -> list[float]:
        return [what(run) for rnd in runs for run in rnd if run.variant == variant]

    def paired(num: str, den: str, what: Callable[[Run], float]) -> float | None:
        """Median over rounds of num/den, the two runs of a round a minute apart at most."""
        pairs = []
        for rnd in runs:
            by = {run.variant: what(run) for run in rnd}
            if num in by and den in by and by[den] > 0:
                pairs.append(by[num] / by[den])
        return round(benchlib.median(pairs), 3) if pairs else None

    def rate(run: Run) -> float:
        return run.rate

    def cpu_rate(run: Run) -> float:  # events per CPU-second: higher is better, like `rate`
        return 1e6 / run.cpu_us_per_event

    comparisons = [
        ("forward", "ours-forward", "bare-forward"),
        ("success", "ours-success", "bare-forward"),
        ("success vs no-produce floor", "ours-success", "bare-commit"),
    ]
    ratios = {
        f"{name}: {num} / {den}": {
            "wall_clock": paired(num, den, rate),
            "cpu_per_event": paired(num, den, cpu_rate),
        }
        for name, num, den in comparisons
        if num in variants and den in variants
    }
    per_variant = {
        v: {
            "events_per_s": [round(x) for x in values(v, rate)],
            "median_events_per_s": round(benchlib.median(values(v, rate))),
            "cpu_us_per_event": [round(x, 1) for x in values(v, lambda r: r.cpu_us_per_event)],
        }
        for v in variants
        if values(v, rate)
    }
    result = {
        "benchmark": "tier_throughput",
        "environment": benchlib.environment(),
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "parameters": {
            "events": args.events,
            "rounds": args.rounds,
            "partitions": args.partitions,
            "batch": args.batch,
            "value_bytes": args.value_bytes,
            "our_header_bytes_per_input_event": header_bytes,
        },
        "variants": per_variant,
        "ratios_median_of_rounds": ratios,
        "target": "ours / bare-forward >= 0.5 on both paths (wall clock)",
    }
    path = benchlib.write_result("tier_throughput", result)
    print(
        f"\nTier throughput ({args.events} events/run, {args.rounds} rounds, "
        f"load {load_before} -> {result['load_average']['after']})"
    )
    print(
        benchlib.table(
            ["variant", "median events/s", "events/s per round", "CPU us/event per round"],
            [
                (
                    v,
                    d["median_events_per_s"],
                    " ".join(f"{x:,}" for x in d["events_per_s"]),
                    " ".join(f"{x:.0f}" for x in d["cpu_us_per_event"]),
                )
                for v, d in per_variant.items()
            ],
        )
    )
    print()
    print(
        benchlib.table(
            ["ratio (median of per-round ratios)", "wall clock", "CPU per event"],
            [(k, r["wall_clock"], r["cpu_per_event"]) for k, r in ratios.items()],
        )
    )
    print(f"\nresults: {path.relative_to(benchlib.ROOT)}")
    for variant, report in profiles.items():
        print(f"\n--- cProfile of {variant} (round 1) ---\n{report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
