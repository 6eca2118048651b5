"""Tier workers exactly as the operator deploys them, run as local processes, for fault tests
at the deployed settings. Not a test module (no `test_` prefix).

- The pipeline is a real `RetryPipelineSpec`; its topology is `spec.topology(...)`.
- Its topics get the operator's configuration (`topics.plan` + `topics.ensure` aligns the
  settings it owns onto the test's fresh topics, which `make_topic` deletes afterwards).
- A worker's command, args and environment come from the operator's Deployment
  (`children.tier_deployment`), with `valueFrom` resolved and the topology ConfigMap's volume
  written as the kubelet does (the ConfigMap key as a file, the downward API's pod name). No
  client setting is added: what runs is what the operator deploys. Only test plumbing is
  added (PYTHONPATH for the handler module, the record file, a free metrics port).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka_retry.model import LIVE_LANE, RetryPipelineSpec, Topology
from kafka_retry.topology_source import CONFIGMAP_KEY
from kafka_retry_operator import children, topics

TESTS = Path(__file__).resolve().parent
NAMESPACE = "faults"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployed:
    name: str
    spec: RetryPipelineSpec
    topology: Topology


def deploy_pipeline(
    bootstrap: str,
    kafka_admin: Any,
    make_topic: Callable[..., str],
    *,
    tiers: Sequence[tuple[str, int]] = (("retry-1", 1),),
    partitions: int = 1,
    callable_path: str = "dataplane_handlers:record",
    handler: Mapping[str, Any] | None = None,
    source_topic: str | None = None,
    delivery: str = "AtLeastOnce",
) -> Deployed:
    """A pipeline on fresh topics configured as the operator configures them."""
    source = source_topic or make_topic("src", partitions)
    name = f"p-{source.rsplit('-', 2)[-2]}"
    spec = RetryPipelineSpec.model_validate(
        {
            "kafka": {"bootstrapServers": bootstrap},
            "source": {"topic": source, "consumerGroup": f"svc-{name}"},
            "tiers": [
                {"name": t, "delaySeconds": d, "topic": make_topic(t, partitions)} for t, d in tiers
            ],
            "dlq": {"topic": make_topic("dlq", partitions)},
            "topics": {"partitions": partitions},
            "handler": handler or {"python": {"image": "test", "callable": callable_path}},
            "delivery": delivery,
        }
    )
    topology = spec.topology(NAMESPACE, name)
    plans = topics.plan(spec, topology)
    deadline = time.monotonic() + 30
    while True:  # a topic just created may not be in the metadata yet
        verdict = topics.ensure(kafka_admin, plans, source, bootstrap, 30)
        if verdict.ready or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert verdict.ready, verdict.message
    return Deployed(name, spec, topology)


def deployed_command(
    d: Deployed, tier: str, volumes: Path
) -> tuple[list[str], list[dict[str, Any]]]:
    """The container's argv (command mapped to this venv's console script) and env list;
    `tier` `live-lane`: the managed live lane's. The topology ConfigMap's volume is written
    under `volumes` (its `topology.json`), where the argv's mounted path points."""
    defaults = children.WorkerDefaults("test", {})
    if tier == LIVE_LANE:
        deployment = children.live_lane_deployment(NAMESPACE, d.name, d.spec, d.topology, defaults)
    else:
        deployment = children.tier_deployment(
            NAMESPACE, d.name, d.spec, d.topology.tier(tier), d.topology, defaults
        )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = list(container["command"])
    script = Path(sys.executable).parent / command[0]
    command[0] = str(script) if script.exists() else command[0]
    volumes.mkdir(parents=True, exist_ok=True)
    (volumes / CONFIGMAP_KEY).write_text(d.topology.to_json())  # the ConfigMap's topology.json
    mounted = f"{children.TOPOLOGY_DIR}/"
    args = [
        str(volumes / a[len(mounted) :]) if a.startswith(mounted) else a for a in container["args"]
    ]
    return [*command, *args], list(container["env"])


def deployed_env(d: Deployed, env_list: Sequence[Mapping[str, Any]], pod: str) -> dict[str, str]:
    """The container's environment as the kubelet resolves it for pod `pod`."""
    env: dict[str, str] = {}
    for var in env_list:
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        source = var["valueFrom"]
        if "configMapKeyRef" in source:
            env[var["name"]] = d.topology.to_json()  # the ConfigMap's topology.json
        elif "fieldRef" in source:
            fields = {"metadata.name": pod, "metadata.namespace": NAMESPACE}
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


class WorkerPod:
    """One tier-worker pod: its container process, restartable under the same pod name (a
    container restart, as the kubelet does after a crash or a kill)."""

    def __init__(
        self,
        d: Deployed,
        tier: str,
        pod: str,
        log_dir: Path,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        argv, env_list = deployed_command(d, tier, log_dir / f"{pod}-volume")
        self.argv = argv
        self.port = free_port()
        self.pod = pod
        self.log = log_dir / f"{pod}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")},
            **deployed_env(d, env_list, pod),
            children.METRICS_PORT_ENV: str(self.port),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerPod:
        with self.log.open("ab") as out:
            out.write(f"--- start #{self.starts + 1}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out)
        self.starts += 1
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self.proc.returncode

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200


def records(path: Path) -> list[dict[str, Any]]:
    """The handler's record file (tests/dataplane_handlers.py); a line cut by kill -9 skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def stream_ids(bootstrap: str, topic: str, ids: list[str], seconds: float, rate: int) -> None:
    """`rate` events/s for `seconds`, each `{"id": "e<n>"}` keyed by its id and appended to
    `ids` as it is sent (a thread target: the caller reads `ids` as it grows)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        while len(ids) < elapsed * rate:
            i = f"e{len(ids)}"
            producer.produce(topic, key=i.encode(), value=json.dumps({"id": i}).encode())
            ids.append(i)
        producer.poll(0)
        time.sleep(0.05)
    assert producer.flush(120) == 0
