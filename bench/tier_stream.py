"""A tier fed by a steady stream against the same events as an already-due backlog.

A tier is normally fed as the live lane fails: a steady stream of events, each due one delay
after it was written, so the worker always has a window of not-yet-due events in front of it.
The backlog (every event already due) is the exception and the cheapest case. For each of
`--rates` events per second, the same number of events is handled twice by a tier worker in
its own process, as `kafka-retry worker` runs it:
- stream: produced at the rate for `--seconds` while the worker runs;
- backlog: produced first, the worker started once all are due.

Reported per run: deliveries per handled event (messages the consumer returned, counted by a
`Consumer` subclass, so any version of the runner can be measured), CPU per handled event
(the whole worker process, Python and librdkafka threads, from start to the last event), the
consumer's pauses, seeks and resumes, lateness p50/p99 (stream) and peak RSS.

    python bench/tier_stream.py [--rates 200,1000,5000] [--seconds 10] [--delay 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from typing import Any, ClassVar

import confluent_kafka

import benchlib
from delay_precision import produce_stream, topology
from kafka_retry import runner as runner_module
from kafka_retry.event import Event
from kafka_retry.model import Topology
from kafka_retry.runner import tune_gc_for_worker
from kafka_retry.worker import build_worker

FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


class CountingConsumer(confluent_kafka.Consumer):  # type: ignore[misc]
    """What the worker asks of its consumer, counted."""

    counts: ClassVar[dict[str, int]] = {
        "delivered": 0,
        "consume_calls": 0,
        "pauses": 0,
        "resumes": 0,
        "seeks": 0,
        "lookups": 0,
    }

    def consume(self, *args: Any, **kwargs: Any) -> Any:
        messages = super().consume(*args, **kwargs)
        self.counts["consume_calls"] += 1
        self.counts["delivered"] += sum(1 for m in messages if m.error() is None)
        return messages

    def pause(self, partitions: Any) -> Any:
        self.counts["pauses"] += len(partitions)
        return super().pause(partitions)

    def resume(self, partitions: Any) -> Any:
        self.counts["resumes"] += len(partitions)
        return super().resume(partitions)

    def seek(self, partition: Any) -> Any:
        self.counts["seeks"] += 1
        return super().seek(partition)

    def offsets_for_times(self, *args: Any, **kwargs: Any) -> Any:
        self.counts["lookups"] += 1
        return super().offsets_for_times(*args, **kwargs)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- worker (child)


def child(spec: dict[str, Any]) -> int:
    """Run the tier worker until `events` are handled or the parent's deadline."""
    topo = Topology.from_json(spec["topology"])
    lateness_ms: list[float] = []
    # CPU from the first work to the last event, start-up left out: from the go (the worker
    # has joined and is idle) on a stream; from the first event on a backlog, which the
    # worker starts on as soon as it joins.
    first = [0.0]
    last = [0.0]

    def note(event: Event) -> None:
        now = time.time()
        lateness_ms.append(now * 1000 - (event.due_ms or 0))
        last[0] = _cpu_s()
        if not first[0]:
            first[0] = last[0]

    runner_module.Consumer = CountingConsumer  # type: ignore[misc]
    runner = build_worker(topo, "retry-1", handler=note, client_settings=FAST_GROUP)
    tune_gc_for_worker()
    thread = threading.Thread(target=runner.run, name="worker")
    thread.start()
    while not runner.ready():
        time.sleep(0.05)
    print("ready", flush=True)
    events, deadline = (float(x) for x in sys.stdin.readline().split())
    if spec["mode"] == "stream":
        first[0] = _cpu_s()
    while len(lateness_ms) < events and time.time() < deadline:
        time.sleep(0.05)
    cpu = last[0] - first[0]
    runner.stop()
    thread.join(60)
    handled = len(lateness_ms)
    print(
        json.dumps(
            {
                "handled": handled,
                **CountingConsumer.counts,
                "cpu_s": cpu,
                "early": sum(1 for x in lateness_ms if x < 0),
                "p50_ms": benchlib.percentile(lateness_ms, 50),
                "p99_ms": benchlib.percentile(lateness_ms, 99),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- the benchmark


def measure(
    args: argparse.Namespace, made: benchlib.Topics, tag: str, rate: int, mode: str
) -> dict[str, Any]:
    n = f"{tag}-{mode}-{rate}"
    topo = topology(
        args.bootstrap,
        n,
        made.make(f"bench-stream-{n}-retry-1", args.partitions),
        made.make(f"bench-stream-{n}-dlq", args.partitions),
        args.delay,
    )
    expected = int(rate * args.seconds)
    if mode == "backlog":  # every event written, then due, before the worker starts
        produce_stream(args.bootstrap, topo, max(rate, 20_000), expected / max(rate, 20_000), 200)
        time.sleep(args.delay + 0.5)
    spec = {"topology": topo.to_json(), "mode": mode}
    proc = benchlib.start_child(__file__, spec, "ready", "tier worker")
    assert proc.stdin is not None
    limit = args.seconds + args.delay + args.settle + 60
    proc.stdin.write(f"{expected} {time.time() + limit}\n")
    proc.stdin.flush()
    if mode == "stream":
        produce_stream(args.bootstrap, topo, rate, args.seconds, args.value_bytes)
    out = json.loads(proc.communicate(timeout=limit + 120)[0].strip().splitlines()[-1])
    handled = max(1, out["handled"])
    out.update(
        rate=rate,
        mode=mode,
        expected=expected,
        deliveries_per_event=round(out["delivered"] / handled, 3),
        cpu_us_per_event=round(out["cpu_s"] / handled * 1e6, 1),
        load_average=benchlib.load_average(),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="200,1000,5000", help="events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="production time per rate")
    parser.add_argument("--delay", type=int, default=2, help="the tier's delay, seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after the last is due")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--value-bytes", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    args.bootstrap = benchlib.bootstrap()
    rates = [int(r) for r in args.rates.split(",")]
    tag = benchlib.unique("s").split("-", 1)[1]
    load_before = benchlib.load_average()
    runs: list[dict[str, Any]] = []
    with benchlib.topics(args.bootstrap) as made:
        for rate in rates:
            for mode in ("stream", "backlog"):
                run = measure(args, made, tag, rate, mode)
                benchlib.log(
                    f"{rate}/s {mode}: handled {run['handled']}/{run['expected']}, "
                    f"{run['deliveries_per_event']} deliveries/event, "
                    f"{run['cpu_us_per_event']} us CPU/event, load {run['load_average']}"
                )
                runs.append(run)
    by = {(r["rate"], r["mode"]): r for r in runs}
    ratios = {
        rate: benchlib.ratio(
            by[(rate, "stream")]["cpu_us_per_event"], by[(rate, "backlog")]["cpu_us_per_event"]
        )
        for rate in rates
    }
    result = {
        "benchmark": "tier_stream",
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
        "cpu_stream_over_backlog": ratios,
        "target": "deliveries/event <= 1.2; stream CPU/event <= 2x backlog",
    }
    path = benchlib.write_result("tier_stream", result)
    print(
        f"\nTier under a steady stream vs a due backlog ({args.delay} s tier, "
        f"{args.partitions} partitions, load {load_before} -> {result['load_average']['after']})"
    )
    print(
        benchlib.table(
            [
                "rate/s",
                "mode",
                "handled",
                "deliveries/ev",
                "CPU us/ev",
                "stream/backlog CPU",
                "pauses",
                "seeks",
                "lookups",
                "p99 late ms",
                "peak RSS MiB",
            ],
            [
                (
                    r["rate"],
                    r["mode"],
                    f"{r['handled']}/{r['expected']}",
                    r["deliveries_per_event"],
                    r["cpu_us_per_event"],
                    ratios[r["rate"]] if r["mode"] == "stream" else None,
                    r["pauses"],
                    r["seeks"],
                    r["lookups"],
                    r["p99_ms"] if r["mode"] == "stream" else None,
                    r["peak_rss_mib"],
                )
                for r in runs
            ],
        )
    )
    print(f"\nresults: {path.relative_to(benchlib.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
