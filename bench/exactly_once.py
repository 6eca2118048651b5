"""ExactlyOnce against AtLeastOnce on a tier's forward path, side by side in one run.

Two measures per delivery mode, each at two batch sizes and commit intervals (ExactlyOnce's
transaction interval; AtLeastOnce's auto-commit interval set to the same):

- **rate**: a backlog of due events on a tier whose handler fails every one, so each is
  forwarded to the next tier; events per second from the first handler call until the last
  forward is visible to a read_committed reader of the next tier (what the next stage sees).
- **p99 lateness**: a steady stream at `--rate` events/s into a tier with a 1 s delay, same
  handler; per event, when its forward became visible on the next tier minus its due time.

Every variant runs in a fresh process (as a worker does), on fresh topics. Each round runs
every variant once, in rotating order; ratios are taken per round (neighbours in time share
the box's load) and the median over rounds is reported.

    python bench/exactly_once.py [--events 20000] [--rate 300] [--seconds 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

import benchlib
from kafka_retry.event import Event
from kafka_retry.kafka_config import producer_config
from kafka_retry.model import AT_LEAST_ONCE, EXACTLY_ONCE, Delivery
from kafka_retry.runner import tune_gc_for_worker
from kafka_retry.worker import build_worker
from tier_throughput import produce_input, topology, upstream_call

SETTINGS = ((500, 0.1), (100, 0.5))  # (consume batch, commit interval in seconds)
MODES: tuple[Delivery, ...] = (AT_LEAST_ONCE, EXACTLY_ONCE)
PARTITIONS = 2


class Visible:
    """A read_committed reader of the next tier, on its own thread: when each record (by key)
    became visible."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.seen: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
        tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)]
        self._consumer.assign(tps)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for m in self._consumer.consume(1000, 0.05):
                if m.error() is None:
                    self.seen.setdefault(m.key() or b"", time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    bootstrap = spec["bootstrap"]
    with benchlib.topics(bootstrap) as topics:
        tag = uuid.uuid4().hex[:8]
        tier, nxt, dlq = (topics.make(f"eos-{n}-{tag}", PARTITIONS) for n in ("t1", "t2", "dlq"))
        topo = topology(bootstrap, tag, tier, nxt, dlq).model_copy(
            update={"delivery": spec["delivery"]}
        )
        if spec["measure"] == "rate":
            produce_input(bootstrap, topo, tier, spec["events"], 200)
        started: list[float] = []

        def failing(_event: Event) -> None:
            if not started:
                started.append(time.time())
            upstream_call()

        interval = spec["interval"]
        runner = build_worker(
            topo, "retry-1", handler=failing, instance_id=f"bench-{tag}",
            client_settings={"auto.commit.interval.ms": int(interval * 1000)},
            batch_size=spec["batch"], transaction_interval_s=interval,
        )  # fmt: skip
        visible = Visible(bootstrap, nxt)
        tune_gc_for_worker()
        worker = threading.Thread(target=runner.run)
        worker.start()
        try:
            if spec["measure"] == "rate":
                return _rate(visible, started, spec["events"])
            return _lateness(bootstrap, tier, visible, spec, topo.tiers[0].delay_seconds)
        finally:
            runner.stop()
            worker.join(60)
            visible.close()


def _rate(visible: Visible, started: list[float], events: int) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while len(visible.seen) < events:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(visible.seen)} of {events} forwards visible")
        time.sleep(0.05)
    return {"rate": events / (max(visible.seen.values()) - started[0])}


def _lateness(
    bootstrap: str, tier: str, visible: Visible, spec: dict[str, Any], delay_s: int
) -> dict[str, Any]:
    producer = Producer(producer_config(bootstrap, {"linger.ms": 5}))
    due: dict[bytes, float] = {}
    begun = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - begun) < spec["seconds"]:
        while sent < elapsed * spec["rate"]:
            now_ms = int(time.time() * 1000)
            key = b"k%d" % sent
            producer.produce(tier, key=key, value=b"{}", timestamp=now_ms)
            due[key] = now_ms / 1000 + delay_s
            sent += 1
        producer.poll(0)
        time.sleep(0.01)
    producer.flush(30)
    deadline = time.monotonic() + 120
    while len(visible.seen) < len(due) and time.monotonic() < deadline:
        time.sleep(0.1)
    late = [visible.seen[k] - d for k, d in due.items() if k in visible.seen]
    if len(late) < len(due):
        raise RuntimeError(f"only {len(late)} of {len(due)} forwards visible")
    return {"p50_s": benchlib.percentile(late, 50), "p99_s": benchlib.percentile(late, 99)}


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="backlog for the rate")
    parser.add_argument("--rate", type=int, default=300, help="stream for the lateness, /s")
    parser.add_argument("--seconds", type=float, default=15.0, help="stream duration")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    base = {"bootstrap": benchlib.bootstrap(), "events": args.events, "rate": args.rate,
            "seconds": args.seconds}  # fmt: skip
    variants = [
        (measure, batch, interval, mode)
        for measure in ("rate", "lateness")
        for batch, interval in SETTINGS
        for mode in MODES
    ]
    results: dict[tuple[str, int, float, str], list[dict[str, Any]]] = {v: [] for v in variants}
    loads = [benchlib.load_average()]
    for r in range(args.rounds):
        shift = r % 2  # rotate which mode goes first
        for measure, batch, interval, _ in variants[::2]:
            for mode in MODES[shift:] + MODES[:shift]:
                spec = {**base, "measure": measure, "batch": batch, "interval": interval,
                        "delivery": mode}  # fmt: skip
                benchlib.log(f"round {r + 1}: {measure} batch {batch} interval {interval} {mode}")
                results[(measure, batch, interval, mode)].append(spawn(spec))
        loads.append(benchlib.load_average())
    rows = []
    summary = []
    for batch, interval in SETTINGS:
        alo_rate = results[("rate", batch, interval, AT_LEAST_ONCE)]
        eos_rate = results[("rate", batch, interval, EXACTLY_ONCE)]
        alo_late = results[("lateness", batch, interval, AT_LEAST_ONCE)]
        eos_late = results[("lateness", batch, interval, EXACTLY_ONCE)]
        rate_ratio = benchlib.median(
            [e["rate"] / a["rate"] for a, e in zip(alo_rate, eos_rate, strict=True)]
        )
        row = {
            "batch": batch, "interval_s": interval,
            "rate_alo": benchlib.median([x["rate"] for x in alo_rate]),
            "rate_eos": benchlib.median([x["rate"] for x in eos_rate]),
            "rate_ratio_eos_over_alo": round(rate_ratio, 3),
            "p99_alo_s": benchlib.median([x["p99_s"] for x in alo_late]),
            "p99_eos_s": benchlib.median([x["p99_s"] for x in eos_late]),
            "p50_alo_s": benchlib.median([x["p50_s"] for x in alo_late]),
            "p50_eos_s": benchlib.median([x["p50_s"] for x in eos_late]),
        }  # fmt: skip
        summary.append(row)
        label = f"batch {batch}, every {interval} s"
        rows.append([label, *(row[k] for k in ("rate_alo", "rate_eos", "rate_ratio_eos_over_alo",
                                              "p99_alo_s", "p99_eos_s"))])  # fmt: skip
    result = {
        "benchmark": "exactly_once", "environment": benchlib.environment(),
        "load_average": loads, "args": vars(args), "summary": summary,
        "runs": {" ".join(map(str, k)): v for k, v in results.items()},
    }  # fmt: skip
    path = benchlib.write_result("exactly_once", result)
    print(f"\nForward path, AtLeastOnce (ALO) vs ExactlyOnce (EOS); load {loads}; {path}")
    print(benchlib.table(
        ["settings", "ALO ev/s", "EOS ev/s", "EOS/ALO", "ALO p99 late s", "EOS p99 late s"], rows
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
