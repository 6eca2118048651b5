"""Ours against Spring Kafka `@RetryableTopic`, side by side in one run on the same broker.

The same events and the same handler logic run through each side, every consumer in a fresh
process on fresh topics and groups:
- ours: the live-lane SDK (`RetryingConsumer`) in one process and the tier worker (one tier,
  then the DLQ) in another, as a service and `kafka-retry worker` run;
- spring: the Spring Boot 3.5 service in bench/peers/ (one `@RetryableTopic` listener: the
  main topic, one retry topic, the DLT, all in one JVM), at Spring's and Boot's defaults;
- spring-tuned: the same jar with the Boot properties in `TUNED` (what Spring's docs say delay
  precision depends on: the poll timeout; and the fetch wait, as on our tier consumers).

Workloads (one retry after `--delay` seconds, then the DLQ/DLT):
- retry: `--rate` events/s for `--seconds`, each failing on the live lane and succeeding on its
  retry. Lateness: retry start - (failure + delay); CPU per retried event: every process of the
  side, from the first event produced to the last retry handled, over the events retried;
- idle: `--idle-events` events fail at once and wait on a `--idle-delay` s delay; CPU of every
  process of the side over `--idle-window` s while they wait;
- isolation: a backlog of `--backlog` events, handler `--handler-ms` of simulated I/O, 0% and
  20% failing on every attempt; the live lane's rate (calls finished per second) with 20%
  failing over its rate with none.

    python bench/peers.py --jar bench/peers/target/spring-peer.jar [--sides ours,spring]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

import benchlib
from kafka_retry.errors import RetriableError
from kafka_retry.event import Event
from kafka_retry.kafka_config import producer_config
from kafka_retry.model import Classification, Handler, PythonHandler, ResolvedTier, Topology
from kafka_retry.runner import tune_gc_for_worker
from kafka_retry.sdk import RetryingConsumer
from kafka_retry.worker import build_worker
from peer_measures import (
    Call,
    Lateness,
    cpu_ticks,
    lateness_ms,
    live_rate,
    parse,
    ratio_rows,
    repeated,
    retried,
    unretried,
)

SIDES = ("ours", "spring", "spring-tuned")
# What Spring's docs say delay precision depends on: the container's poll timeout ("we rely on
# waking up the consumer from polling and having full pollTimeouts"; default 5 s); and the fetch
# wait (Kafka's default 500 ms) as on our tier consumers. Not the RECORD ack mode the docs suggest
# for retry topics: a synchronous commit per record cut the live rate to a third in a trial.
TUNED = (
    "--spring.kafka.listener.poll-timeout=100ms",
    "--spring.kafka.consumer.fetch-max-wait=100ms",
)
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def fails(event_id: int, percent: int) -> bool:
    """Whether an event is in the failing share (the Java peer's `fails` is the same)."""
    return (event_id * 2654435761) % 100 < percent


@dataclass(frozen=True)
class Workload:
    name: str
    events: int
    rate: float | None  # None: a backlog, written before the consumers start
    delay_s: int
    fail_percent: int  # -1: fail on the live lane, succeed on the retry
    handler_ms: float


# --------------------------------------------------------------------------- ours (children)


class EventLog:
    """The handler's calls as `EV` lines, written every 100 ms in one go (as the Java peer's
    EventLog), so a handler never waits on the pipe."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._flush_forever, daemon=True).start()

    def call(self, failed: bool, event_id: int, stage: int) -> None:
        line = f"EV {'F' if failed else 'H'} {event_id} {stage} {time.time_ns() // 1000}\n"
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(0.1)
            self.flush()


def child(spec: dict[str, Any]) -> int:
    """One of our processes: the live lane (stage 0) or the tier worker (stage 1), until the
    parent closes stdin."""
    topo = Topology.from_json(spec["topology"])
    stage, percent, handler_s = spec["stage"], spec["fail_percent"], spec["handler_ms"] / 1000
    log = EventLog()

    def handler(event: Event) -> None:
        event_id = int((event.value or b"").split(b",", 1)[0])
        if event_id < 0:
            return  # warm-up
        if handler_s:
            time.sleep(handler_s)
        failed = stage == 0 if percent < 0 else fails(event_id, percent)
        log.call(failed, event_id, stage)
        if failed:
            raise RetriableError(f"upstream unavailable for event {event_id}")

    run: Any
    if stage == 0:
        run = RetryingConsumer(topo, handler, use_env=False)
    else:
        run = build_worker(topo, "retry-1", handler=handler, client_settings={})
        tune_gc_for_worker()
    thread = threading.Thread(target=run.run, name=f"stage-{stage}")
    thread.start()
    while not run.ready():
        time.sleep(0.05)
    print("READY", flush=True)
    sys.stdin.read()  # the parent closes it to stop us
    run.stop()
    thread.join(60)
    log.flush()
    return 0


# --------------------------------------------------------------------------- a side's processes


class Side:
    """The processes of one side, their `EV` lines collected as they come."""

    def __init__(self, name: str, source: str, commands: Sequence[Sequence[str]]) -> None:
        self.name = name
        self.source = source
        self.calls: list[Call] = []
        self.log_lines: list[str] = []  # anything else the processes printed (JVM logs)
        self._ready = threading.Semaphore(0)
        self.procs = [
            subprocess.Popen(
                list(c), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
            for c in commands
        ]
        for p in self.procs:
            threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        ready = False
        for line in proc.stdout:
            call = parse(line)
            if call is not None:
                self.calls.append(call)  # list.append is atomic: no lock for one writer each
            elif line.strip() == "READY":
                if not ready:
                    ready = True
                    self._ready.release()
            else:
                self.log_lines.append(line.rstrip())

    def log_summary(self) -> dict[str, Any]:
        """How much the side logged besides its calls (logging costs CPU too), and a sample."""
        return {"log_lines": len(self.log_lines), "log_sample": self.log_lines[:5]}

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for _ in self.procs:
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"{self.name} did not get its partitions in {timeout_s} s")

    def cpu_s(self) -> float:
        """Every process of the side, every thread: JIT and GC threads count as much as ours."""
        return sum(cpu_ticks(Path(f"/proc/{p.pid}/stat").read_text()) for p in self.procs) * TICK_S

    def wait_for(self, done: Callable[[list[Call]], bool], deadline: float) -> bool:
        while time.time() < deadline:
            if done(self.calls):
                return True
            time.sleep(0.05)
        return done(self.calls)

    def stop(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()  # ours: stop; the JVM ignores it
            if self.name != "ours":
                p.terminate()  # Spring: SIGTERM runs its graceful shutdown
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_side(
    args: argparse.Namespace, made: benchlib.Topics, side: str, w: Workload, tag: str
) -> Side:
    n = f"{tag}-{w.name}-{side}"
    source = made.make(f"bench-peer-{n}", args.partitions)
    if side == "ours":
        topo = Topology(
            pipeline=f"bench/{n}",
            bootstrap_servers=args.bootstrap,
            source_topic=source,
            consumer_group=f"svc-{n}",
            tiers=[
                ResolvedTier(
                    name="retry-1",
                    topic=made.make(f"{source}-retry", args.partitions),
                    delay_seconds=w.delay_s,
                    consumer_group=f"svc-{n}.retry-1",
                )
            ],
            dlq_topic=made.make(f"{source}-dlq", args.partitions),
            classification=Classification(),
            handler=Handler(python=PythonHandler(image="bench", callable="bench:peer")),
        )
        spec = {"topology": topo.to_json(), "fail_percent": w.fail_percent}
        spec["handler_ms"] = w.handler_ms
        commands = [
            [sys.executable, __file__, "--child", json.dumps({**spec, "stage": stage})]
            for stage in (0, 1)
        ]
    else:  # @RetryableTopic's names for one fixed delay: <topic>-retry, <topic>-dlt
        made.make(f"{source}-retry", args.partitions)
        made.make(f"{source}-dlt", args.partitions)
        commands = [
            [
                args.java,
                "-jar",
                args.jar,
                f"--spring.kafka.bootstrap-servers={args.bootstrap}",
                f"--peer.topic={source}",
                f"--peer.group=svc-{n}",
                f"--peer.partitions={args.partitions}",
                "--peer.attempts=2",
                f"--peer.delay-ms={w.delay_s * 1000}",
                f"--peer.fail-percent={w.fail_percent}",
                f"--peer.handler-micros={round(w.handler_ms * 1000)}",
                *(TUNED if side == "spring-tuned" else ()),
            ]
        ]
    return Side(side, source, commands)


def value(event_id: int) -> bytes:
    return b"%d,%d" % (event_id, time.time_ns())


def produce(bootstrap: str, topic: str, events: int, rate: float | None, first_id: int = 0) -> None:
    """`events` values (ids from `first_id`), at `rate` per second on schedule, or at once."""
    producer = Producer(producer_config(bootstrap, {"linger.ms": 5}))
    start = time.monotonic()
    for i in range(first_id, first_id + events):
        if rate is not None:
            wait = start + (i - first_id) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        while True:
            try:
                producer.produce(topic, value(i), b"order-%d" % i)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    assert producer.flush(60) == 0


# --------------------------------------------------------------------------- the workloads


def run_retry(
    args: argparse.Namespace, made: benchlib.Topics, side: str, tag: str, rate: float
) -> dict[str, Any]:
    w = Workload(f"retry{rate:g}", int(rate * args.seconds), rate, args.delay, -1, 0.0)
    s = start_side(args, made, side, w, tag)
    try:
        s.wait_ready(args.start_timeout)
        # Warm-up: the same path first (a JVM compiles its hot code as it runs), not measured.
        warm = int(rate * args.warmup)
        produce(args.bootstrap, s.source, warm, w.rate)
        s.wait_for(lambda calls: retried(calls, 0) >= warm, time.time() + w.delay_s + args.settle)
        cpu0, load0 = s.cpu_s(), benchlib.load_average()
        produce(args.bootstrap, s.source, w.events, w.rate, first_id=warm)
        done = s.wait_for(
            lambda calls: retried(calls, warm) >= w.events,
            time.time() + w.delay_s + args.settle,
        )
        cpu, end_us = s.cpu_s() - cpu0, time.time_ns() // 1000
        n = retried(s.calls, warm)
        measured = [c for c in s.calls if c.event_id >= warm]
        late = Lateness.of(lateness_ms(measured, w.delay_s, end_us), unretried(measured))
        return {
            "events": w.events,
            "retried": n,
            "complete": done,
            "cpu_s": round(cpu, 3),
            "cpu_us_per_retried": round(cpu / max(1, n) * 1e6, 1),
            "lateness": asdict(late),
            "repeated_calls": repeated(measured),
            "load_average": [load0, benchlib.load_average()],
            **s.log_summary(),
        }
    finally:
        s.stop()


def run_idle(
    args: argparse.Namespace, made: benchlib.Topics, side: str, tag: str
) -> dict[str, Any]:
    w = Workload("idle", args.idle_events, None, args.idle_delay, -1, 0.0)
    s = start_side(args, made, side, w, tag)
    try:
        s.wait_ready(args.start_timeout)
        produce(args.bootstrap, s.source, w.events, None)
        failed = s.wait_for(
            lambda calls: sum(1 for c in calls if c.stage == 0) >= w.events,
            time.time() + args.idle_wait,
        )
        time.sleep(args.idle_settle)  # the forwards' acknowledgements, commits, JIT: not idle
        load0, cpu0, t0 = benchlib.load_average(), s.cpu_s(), time.monotonic()
        time.sleep(args.idle_window)
        cpu, seconds = s.cpu_s() - cpu0, time.monotonic() - t0
        waiting = w.events - retried(s.calls, 0)
        return {
            "events": w.events,
            "all_failed_first": failed,
            "waiting": waiting,
            "window_s": round(seconds, 2),
            # still failing first attempts: busy, not idle
            "cpu_ms_per_s": round(cpu / seconds * 1000, 2) if failed else None,
            "busy_cpu_ms_per_s": None if failed else round(cpu / seconds * 1000, 2),
            "load_average": [load0, benchlib.load_average()],
            **s.log_summary(),
        }
    finally:
        s.stop()


def run_isolation(
    args: argparse.Namespace, made: benchlib.Topics, side: str, tag: str, percent: int
) -> dict[str, Any]:
    w = Workload(f"iso{percent}", args.backlog, None, args.delay, percent, args.handler_ms)
    s = start_side(args, made, side, w, tag)
    try:
        produce(args.bootstrap, s.source, w.events, None)
        s.wait_ready(args.start_timeout)
        done = s.wait_for(
            lambda calls: sum(1 for c in calls if c.stage == 0) >= w.events,
            time.time() + args.capacity_window,
        )
        live = [c for c in s.calls if c.stage == 0]
        return {
            "events": w.events,
            "failing_percent": percent,
            "live_calls": len(live),
            "complete": done,
            "live_rate": None if (r := live_rate(live)) is None else round(r, 1),
            "repeated_calls": repeated(live),
            **s.log_summary(),
        }
    finally:
        s.stop()


# --------------------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jar", default=str(benchlib.ROOT / "bench/peers/target/spring-peer.jar"))
    parser.add_argument("--java", default="java")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--workloads", default="retry,idle,isolation")
    parser.add_argument("--rates", default="20,200", help="retry: events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="retry: production time")
    parser.add_argument("--delay", type=int, default=2, help="retry and isolation: delay, s")
    parser.add_argument("--warmup", type=float, default=5.0, help="retry: warm-up time, s")
    parser.add_argument("--settle", type=float, default=30.0, help="wait after the last is due")
    parser.add_argument("--idle-events", type=int, default=200)
    parser.add_argument("--idle-wait", type=float, default=180.0, help="idle: for the failures")
    parser.add_argument("--idle-delay", type=int, default=120, help="idle: the delay, s")
    parser.add_argument("--idle-settle", type=float, default=5.0)
    parser.add_argument("--idle-window", type=float, default=15.0)
    parser.add_argument("--backlog", type=int, default=3000, help="isolation: events")
    parser.add_argument("--handler-ms", type=float, default=1.5, help="isolation: handler I/O")
    parser.add_argument("--capacity-window", type=float, default=60.0, help="isolation: at most")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--report", help="print the tables of a saved run's JSON, run nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return 0
    args.bootstrap = benchlib.bootstrap()
    sides = args.sides.split(",")
    workloads = args.workloads.split(",")
    if any(s != "ours" for s in sides) and not Path(args.jar).is_file():
        parser.error(f"{args.jar} is missing: build it with `make bench-peers`")
    tag = benchlib.unique("p").split("-", 1)[1]
    load_before = benchlib.load_average()
    results: dict[str, dict[str, Any]] = {s: {} for s in sides}
    with benchlib.topics(args.bootstrap) as made:
        for i, (name, run) in enumerate(
            _plan(workloads, [float(r) for r in args.rates.split(",")])
        ):
            for side in sides[i % len(sides) :] + sides[: i % len(sides)]:  # rotate the order
                results[side][name] = run(args, made, side, tag)
                benchlib.log(f"{name} {side}: {json.dumps(results[side][name])}")
    result = {
        "benchmark": "peers",
        "environment": benchlib.environment(),
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "parameters": {k: v for k, v in vars(args).items() if k not in ("child", "report")},
        "spring_tuned_properties": list(TUNED),
        "results": results,
    }
    path = benchlib.write_result("peers", result)
    report(result)
    print(f"\nresults: {path.relative_to(benchlib.ROOT)}")
    return 0


def report(result: dict[str, Any]) -> None:
    """The tables of a run (`--report bench/results/peers.json` prints a saved one again)."""
    results = result["results"]
    sides = list(results)
    load = result["load_average"]
    print(f"\nOurs vs Spring Kafka @RetryableTopic (load {load['before']} -> {load['after']})")
    print(benchlib.table(["measure", *sides], _measure_rows(results, sides)))
    if "ours" in sides and len(sides) > 1:
        peers = [s for s in sides if s != "ours"]
        flat = {s: _flat(results[s]) for s in sides}
        print()
        print(
            benchlib.table(
                ["ours / peer", *peers],
                ratio_rows(flat["ours"], {p: flat[p] for p in peers}, list(flat["ours"])),
            )
        )


Runner = Callable[[argparse.Namespace, benchlib.Topics, str, str], dict[str, Any]]


def _plan(workloads: Sequence[str], rates: Sequence[float]) -> list[tuple[str, Runner]]:
    plan: list[tuple[str, Runner]] = []
    if "retry" in workloads:
        plan += [(f"retry {r:g}/s", _retry(r)) for r in rates]
    if "idle" in workloads:
        plan.append(("idle", run_idle))
    if "isolation" in workloads:
        plan += [(f"isolation-{p}", _isolation(p)) for p in (0, 20)]
    return plan


def _retry(rate: float) -> Runner:
    def run(a: argparse.Namespace, made: benchlib.Topics, side: str, tag: str) -> dict[str, Any]:
        return run_retry(a, made, side, tag, rate)

    return run


def _isolation(percent: int) -> Runner:
    def run(a: argparse.Namespace, made: benchlib.Topics, side: str, tag: str) -> dict[str, Any]:
        return run_isolation(a, made, side, tag, percent)

    return run


def _flat(r: dict[str, Any]) -> dict[str, float | None]:
    """The compared figures of one side: lower is better, but for the live rate's share."""
    out: dict[str, float | None] = {}
    for name, run in r.items():
        if name.startswith("retry"):
            at = name.removeprefix("retry ")
            out[f"lateness p50 ms, {at}"] = run["lateness"]["p50_ms"]
            out[f"lateness p99 ms, {at}"] = run["lateness"]["p99_ms"]
            out[f"CPU us per retried event, {at}"] = run["cpu_us_per_retried"]
    if "idle" in r:
        out["idle CPU ms/s"] = r["idle"]["cpu_ms_per_s"]
    if "isolation-0" in r and "isolation-20" in r:
        out["live rate 20% / 0%"] = benchlib.ratio(
            r["isolation-20"]["live_rate"], r["isolation-0"]["live_rate"]
        )
    return out


def _measure_rows(results: dict[str, dict[str, Any]], sides: Sequence[str]) -> list[list[Any]]:
    """The figures, then what qualifies them: events not retried by the end (their lateness is
    a lower bound), early retries, the live rates."""
    flat = {s: _flat(results[s]) for s in sides}
    rows: list[list[Any]] = [
        [n, *(flat[s].get(n) for s in sides)]
        for n in dict.fromkeys(n for s in sides for n in flat[s])
    ]
    for name in dict.fromkeys(n for s in sides for n in results[s] if n.startswith("retry")):
        runs = [results[s].get(name) for s in sides]
        at = name.removeprefix("retry ")
        rows.append(
            [f"not retried by the end, {at}", *(r and r["lateness"]["censored"] for r in runs)]
        )
        rows.append([f"early retries, {at}", *(r and r["lateness"]["early"] for r in runs)])
        rows.append(
            [f"retried / events, {at}", *(r and f"{r['retried']}/{r['events']}" for r in runs)]
        )
        rows.append([f"repeated handler calls, {at}", *(r and r["repeated_calls"] for r in runs)])
    for key in ("isolation-0", "isolation-20"):
        rows.append(
            [f"live rate ev/s, {key.split('-')[1]}% failing"]
            + [results[s].get(key, {}).get("live_rate") for s in sides]
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
