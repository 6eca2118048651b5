"""Operator scale: N RetryPipelines applied at once to the real API server and Kafka.

For each N in `--sizes`: a fresh namespace, the operator as a subprocess scoped to it (one
process, as deployed), and hack/podrunner.py standing in for the deployment controller (tier
workers at 0 replicas: N worker processes would measure this machine, not the operator; the
Deployments' status is still real). Each pipeline has one tier and one partition per topic,
with deletionPolicy Delete, so N pipelines make 2N real topics. Measured:

- time until all N are Ready (from the first create; they are created by 16 threads at once);
- one full status-refresh pass: the operator's batched Kafka pass over every pipeline (lag,
  DLQ depth), as it reports it on /metrics (`kafka_retry_operator_status_refresh_*`); and end
  to end, from one event written to every DLQ until every pipeline's status shows its depth
  (a pass, then each pipeline's status timer: at most about twice `--status-interval`);
- the operator's resident memory after Ready and its peak (VmHWM), and its CPU time;
- the time to delete all N pipelines, topics included.

    python bench/operator_scale.py [--sizes 50,200,500] [--status-interval 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import benchlib

ROOT = benchlib.ROOT
GROUP, VERSION, PLURAL = "kafkaretry.io", "v1alpha1", "retrypipelines"
REFRESH_METRIC = "kafka_retry_operator_status_refresh"
# Under the status interval, so every pass is seen; not twice a second: a scrape of 2,000
# pipelines' series is work for the operator (7% of its samples at 0.5 s), and Prometheus
# scrapes every 15-60 s.
SCRAPE_S = 2.0


def local_env() -> dict[str, str]:
    """KUBECONFIG and the rest from hack/localenv.py (the shared local servers)."""
    if os.environ.get("KUBECONFIG") and os.environ.get("KRO_KAFKA_BOOTSTRAP"):
        return dict(os.environ)
    out = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "localenv.py"), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        m = re.match(r'export (\w+)="?(.*?)"?$', line.strip())
        if m and m.group(1) != "PATH":
            env[m.group(1)] = m.group(2)
    return env


def kubectl(env: dict[str, str], *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    binary = env.get("KRO_KUBECTL", "kubectl")
    return subprocess.run([binary, *args], env=env, capture_output=True, text=True, **kw)


def install_crds(env: dict[str, str]) -> None:
    kubectl(
        env, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"), check=True
    )
    for name in ("retrypipelines.kafkaretry.io", "dlqreplays.kafkaretry.io"):
        kubectl(env, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


def pipeline(name: str, bootstrap: str, source: str, group: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RetryPipeline",
        "metadata": {"name": name},
        "spec": {
            "kafka": {"bootstrapServers": bootstrap},
            "source": {"topic": source, "consumerGroup": group},
            "tiers": [{"name": "retry-1", "delaySeconds": 10}],
            "dlq": {"retentionHours": 24},
            "topics": {"partitions": 1, "deletionPolicy": "Delete"},
            "handler": {"http": {"url": "http://svc.bench.svc:8080/events", "timeoutSeconds": 5}},
            "workers": {"replicas": 0},
        },
    }


class Operator:
    """`kafka-retry-operator -n NS` as a subprocess, logging to a file; its /metrics scraped
    every `SCRAPE_S` for the batched status-refresh passes it reports."""

    def __init__(self, env: dict[str, str], namespace: str, log_path: Path, interval: float):
        self.log_path = log_path
        self.port = _free_port()
        self.env = {
            **env,
            "KAFKA_RETRY_OPERATOR_STATUS_INTERVAL": str(interval),
            "KAFKA_RETRY_OPERATOR_KAFKA_TIMEOUT": "10",
            "KAFKA_RETRY_OPERATOR_MAX_BACKOFF": "10",
            "KAFKA_RETRY_METRICS_PORT": str(self.port),
            "KAFKA_RETRY_METRICS_ADDRESS": "127.0.0.1",
        }
        binary = Path(sys.executable).parent / "kafka-retry-operator"
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(binary), "--namespace", namespace],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.passes: dict[float, tuple[int, float]] = {}  # ended at -> (pipelines, seconds)
        self._stop = threading.Event()
        self._scraper = threading.Thread(target=self._scrape, daemon=True)
        self._scraper.start()

    def _scrape(self) -> None:
        while not self._stop.wait(SCRAPE_S):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/metrics", timeout=5
                ) as r:
                    text = r.read().decode()
            except OSError:
                continue
            found = {}
            for line in text.splitlines():
                if line.startswith(REFRESH_METRIC):
                    name, _, value = line.rpartition(" ")
                    found[name] = float(value)
            ended = found.get(f"{REFRESH_METRIC}_timestamp_seconds")
            if ended is not None:
                self.passes[ended] = (
                    int(found.get(f"{REFRESH_METRIC}_pipelines", 0)),
                    found.get(f"{REFRESH_METRIC}_duration_seconds", 0.0),
                )

    def refresh_passes(self, pipelines: int, since: float = 0.0) -> list[float]:
        """Durations of the passes seen that measured `pipelines` and ended after `since`."""
        return [
            s for ended, (n, s) in sorted(self.passes.items()) if n == pipelines and ended > since
        ]

    def memory_kb(self) -> tuple[int, int]:
        """(current, peak) resident set size."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def podrunner(kubeconfig: str, namespace: str, log_dir: Path) -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "hack"))
    import podrunner as pr

    with pr.running(
        kubeconfig=kubeconfig, namespace=namespace, log_dir=log_dir, grace_cap=5.0
    ) as runner:
        yield runner


def statuses(api: Any, namespace: str) -> list[dict[str, Any]]:
    """Every pipeline of the namespace (asked again when a busy API server answers 504)."""
    from kubernetes.client.exceptions import ApiException

    for attempt in range(5):
        try:
            items = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            return [dict(i) for i in items]
        except ApiException as e:
            if e.status != 504 or attempt == 4:
                raise
    raise AssertionError("unreachable")


class Pipelines:
    """The namespace's pipelines as a watch keeps them (listed once, then only changes): the
    bench asks after every one of them every second or two, and listing 2,000 pipelines (10
    MB of JSON) that often was load on the API server that the operator then waited for."""

    def __init__(self, api: Any, namespace: str) -> None:
        self._api, self._namespace = api, namespace
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            try:
                listed = self._api.list_namespaced_custom_object(
                    GROUP, VERSION, self._namespace, PLURAL
                )
                with self._lock:
                    self._items = {i["metadata"]["name"]: i for i in listed["items"]}
                w = watch.Watch()
                for event in w.stream(
                    self._api.list_namespaced_custom_object,
                    GROUP, VERSION, self._namespace, PLURAL,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                ):  # fmt: skip
                    obj = event["object"]
                    with self._lock:
                        if event["type"] == "DELETED":
                            self._items.pop(obj["metadata"]["name"], None)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self._items[obj["metadata"]["name"]] = obj
                    if self._stop.is_set():
                        w.stop()
            except (ApiException, OSError, ValueError) as e:  # 410 Gone, a 504: list again
                benchlib.log(f"watching the pipelines: {e}; listing them again")
                time.sleep(1)


def is_ready(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    current = status.get("observedGeneration") == obj["metadata"].get("generation")
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return current and ready and "dlq" in status


def delete_all(api: Any, namespace: str) -> None:
    """Delete every pipeline of the namespace. A busy API server may answer 504 to marking
    thousands of objects for deletion within its request timeout: ask again (marking is
    idempotent) until one request gets through."""
    from kubernetes.client.exceptions import ApiException

    for attempt in range(5):
        try:
            api.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            return
        except ApiException as e:
            if e.status != 504 or attempt == 4:
                raise
            benchlib.log(f"deleting the pipelines: {e.status} {e.reason}, asking again")


def wait_until(check: Any, timeout: float, what: str, every: float = 1.0) -> float:
    """Seconds until `check()` is true."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def measure(args: argparse.Namespace, env: dict[str, str], api: Any, n: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    namespace = f"bench-op-{n}-{tag}"
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    topics = benchlib.Topics(admin)
    source = topics.make(f"bench-op-{tag}-orders")
    from kubernetes import client

    core = client.CoreV1Api(api.api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    log_dir = benchlib.RESULTS / f"operator-scale-{n}-{tag}"
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = benchlib.load_average()
    out: dict[str, Any] = {"pipelines": n, "topics": 2 * n, "namespace": namespace}
    operator = Operator(env, namespace, log_dir / "operator.log", args.status_interval)
    pipelines = Pipelines(api, namespace)
    try:
        with podrunner(env["KUBECONFIG"], namespace, log_dir / "pods"):
            docs = [pipeline(f"p{i:04d}", args.bootstrap, source, f"g{i}-{tag}") for i in range(n)]
            started = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                list(
                    pool.map(
                        lambda d: api.create_namespaced_custom_object(
                            GROUP, VERSION, namespace, PLURAL, d
                        ),
                        docs,
                    )
                )
            out["create_s"] = round(time.monotonic() - started, 1)
            milestones: dict[str, float] = {}

            def all_ready() -> bool:
                ready = sum(is_ready(o) for o in pipelines.items())
                elapsed = round(time.monotonic() - started, 1)
                for share in (0.5, 0.9):
                    if ready >= share * n:
                        milestones.setdefault(f"{int(share * 100)}%", elapsed)
                return ready == n

            wait_until(all_ready, args.timeout, f"{n} pipelines Ready", every=0.5)
            out["ready_s"] = round(time.monotonic() - started, 1)
            out["ready_milestones_s"] = milestones
            rss, _ = operator.memory_kb()
            out["rss_after_ready_mib"] = round(rss / 1024)

            # One event into every DLQ; then every status must show it.
            dlqs = [o["status"]["topics"]["dlq"] for o in pipelines.items()]
            ready_at = time.time()
            producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 20})
            for topic in dlqs:
                producer.produce(topic, b"{}", b"bench")
            producer.flush(60)

            def all_counted() -> bool:
                depths = [
                    ((o.get("status") or {}).get("dlq") or {}).get("depth")
                    for o in pipelines.items()
                ]
                return all(d == 1 for d in depths)

            counted_s = wait_until(all_counted, args.timeout, "DLQ depth in statuses", 0.5)
            out["dlq_change_to_all_statuses_s"] = round(counted_s, 1)
            passes = operator.refresh_passes(n, since=ready_at) or operator.refresh_passes(n)
            out["refresh_pass_s"] = {
                "median": round(benchlib.median(passes), 3) if passes else None,
                "max": round(max(passes), 3) if passes else None,
                "passes": len(passes),
            }
            rss, peak = operator.memory_kb()
            out["rss_mib"] = round(rss / 1024)
            out["peak_rss_mib"] = round(peak / 1024)
            out["operator_cpu_s"] = round(operator.cpu_seconds(), 1)

            started = time.monotonic()
            delete_all(api, namespace)
            out["delete_s"] = round(
                wait_until(lambda: not pipelines.items(), args.timeout, "deletion"), 1
            )
            out["peak_rss_mib"] = round(operator.memory_kb()[1] / 1024)
            names = admin.list_topics(timeout=30).topics
            out["topics_left_after_delete"] = sum(f"-{tag}." in t for t in names)
    finally:
        pipelines.stop()
        operator.stop()
        _cleanup(env, api, namespace, admin, topics, tag)
    out["load_average"] = [load_before, benchlib.load_average()]
    out["operator_log"] = str((log_dir / "operator.log").relative_to(ROOT))
    return out


def _cleanup(
    env: dict[str, str], api: Any, namespace: str, admin: Any, topics: benchlib.Topics, tag: str
) -> None:
    """Best effort: pipelines left (finalizers stripped, the operator being gone), the
    namespace, and any topic of this run still there."""
    with contextlib.suppress(Exception):
        for obj in statuses(api, namespace):
            api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                obj["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )
    kubectl(env, "delete", "namespace", namespace, "--wait=false", check=False)
    with contextlib.suppress(Exception):
        left = [t for t in admin.list_topics(timeout=30).topics if f"-{tag}." in t]
        topics.created.extend(left)
    topics.delete_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,200,500", help="pipelines per run, comma-separated")
    parser.add_argument("--status-interval", type=float, default=5.0, help="operator, seconds")
    parser.add_argument("--timeout", type=float, default=300.0, help="per wait, seconds")
    args = parser.parse_args(argv)
    env = local_env()
    os.environ["KUBECONFIG"] = env["KUBECONFIG"]
    args.bootstrap = env.get("KRO_KAFKA_BOOTSTRAP", benchlib.DEFAULT_BOOTSTRAP)
    from kubernetes import client, config

    config.load_kube_config(env["KUBECONFIG"])
    api = client.CustomObjectsApi()
    install_crds(env)
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = benchlib.load_average()
    runs = []
    for n in sizes:
        benchlib.log(f"{n} pipelines ...")
        run = measure(args, env, api, n)
        benchlib.log(
            f"{n} pipelines: Ready in {run['ready_s']} s, status-refresh pass "
            f"{run['refresh_pass_s']['median']} s, DLQ change in every status after "
            f"{run['dlq_change_to_all_statuses_s']} s, peak RSS {run['peak_rss_mib']} MiB, "
            f"deleted in {run['delete_s']} s"
        )
        runs.append(run)
    result = {
        "benchmark": "operator_scale",
        "environment": benchlib.environment(),
        "load_average": {"before": load_before, "after": benchlib.load_average()},
        "parameters": {"sizes": sizes, "status_interval_s": args.status_interval},
        "runs": runs,
        "target": "200 pipelines Ready under one process; DLQ depths in one batched pass",
    }
    path = benchlib.write_result("operator_scale", result)
    print(
        f"\nOperator scale (status interval {args.status_interval} s, 1 tier, 1 partition; "
        f"load {load_before} -> {result['load_average']['after']})"
    )
    print(
        benchlib.table(
            [
                "pipelines",
                "topics",
                "Ready s",
                "50%/90% s",
                "refresh pass s",
                "DLQ->status s",
                "RSS MiB",
                "peak MiB",
                "CPU s",
                "delete s",
            ],
            [
                (
                    r["pipelines"],
                    r["topics"],
                    r["ready_s"],
                    f"{r['ready_milestones_s'].get('50%')}/{r['ready_milestones_s'].get('90%')}",
                    r["refresh_pass_s"]["median"],
                    r["dlq_change_to_all_statuses_s"],
                    r["rss_after_ready_mib"],
                    r["peak_rss_mib"],
                    r["operator_cpu_s"],
                    r["delete_s"],
                )
                for r in runs
            ],
        )
    )
    print(f"\nresults: {path.relative_to(benchlib.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
