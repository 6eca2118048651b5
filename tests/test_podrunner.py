"""hack/podrunner.py runs a Deployment's pods as local processes, as a kubelet and the
deployment controller would: env from ConfigMaps/Secrets, mapped ports, readiness, scaling,
restarts, rollouts, and the Deployment's status."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import podrunner as pr
from operator_support import wait_for

STUB = r"""
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
out = os.path.join(os.environ["OUT_DIR"], os.environ["HOSTNAME"] + ".json")
with open(out, "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv}, f)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/readyz" and not os.path.exists(os.environ["OUT_DIR"] + "/unready")
        self.send_response(200 if ok else 503); self.end_headers()
    def log_message(self, *a): pass
server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["KAFKA_RETRY_METRICS_PORT"])), H)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
server.serve_forever()
"""


def _deployment(name: str, script: Path, out_dir: Path, replicas: int = 2) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "stub",
                            "image": "stub:1",
                            "command": ["python3"],
                            "args": [str(script), "--mode=$(MODE)"],
                            "envFrom": [{"prefix": "KAFKA_CLIENT_", "secretRef": {"name": "s"}}],
                            "env": [
                                {"name": "OUT_DIR", "value": str(out_dir)},
                                {"name": "MODE", "value": "one"},
                                {
                                    "name": "FROM_CM",
                                    "valueFrom": {
                                        "configMapKeyRef": {"name": "cm", "key": "topology.json"}
                                    },
                                },
                                {
                                    "name": "FROM_SECRET",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "s", "key": "sasl.password"}
                                    },
                                },
                                {
                                    "name": "POD",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                                {"name": "KAFKA_RETRY_METRICS_PORT", "value": "9400"},
                            ],
                            "ports": [{"name": "metrics", "containerPort": 9400}],
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "metrics"},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def _status(apps: Any, namespace: str, name: str) -> dict[str, Any]:
    d = apps.read_namespaced_deployment(name, namespace)
    return dict(apps.api_client.sanitize_for_serialization(d).get("status") or {})


def _seen(out_dir: Path, pod: str) -> dict[str, Any]:
    return dict(json.loads((out_dir / f"{pod}.json").read_text()))


def test_podrunner_runs_deployments_as_processes(
    k8s_api: Any, kubeconfig: str, namespace: str, tmp_path: Path
) -> None:
    from kubernetes import client

    core, apps = client.CoreV1Api(k8s_api), client.AppsV1Api(k8s_api)
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cm"}, "data": {"topology.json": '{"t": 1}'}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "s"}, "stringData": {"sasl.password": "pw"}}
    )
    apps.create_namespaced_deployment(namespace, _deployment("stub", script, out_dir))

    with pr.running(
        kubeconfig=kubeconfig, namespace=namespace, log_dir=tmp_path / "logs", grace_cap=5.0
    ) as runner:
        pods = runner.wait_ready(namespace, "stub", timeout=30)
        assert len(pods) == 2
        ports = [p.ports[9400] for p in pods]
        assert len(set(ports)) == 2, "each pod gets its own local port"
        seen = _seen(out_dir, pods[0].name)
        env = seen["env"]
        assert env["FROM_CM"] == '{"t": 1}'
        assert env["FROM_SECRET"] == "pw"
        assert env["KAFKA_CLIENT_sasl.password"] == "pw"  # envFrom with a prefix
        assert env["POD"] == pods[0].name
        assert env["KAFKA_RETRY_METRICS_PORT"] == str(pods[0].ports[9400])
        assert seen["argv"][1:] == ["--mode=one"]  # $(VAR) expanded
        assert Path(env["PATH"].split(os.pathsep)[0]) == Path(sys.executable).parent
        assert pods[0].log_paths[0].exists()

        status = wait_for(
            lambda: (s := _status(apps, namespace, "stub")).get("readyReplicas") == 2 and s,
            10,
            "status patched",
        )
        assert status["replicas"] == status["updatedReplicas"] == status["availableReplicas"] == 2
        assert status["observedGeneration"] == 1

        # Readiness follows the probe.
        (out_dir / "unready").touch()
        wait_for(
            lambda: _status(apps, namespace, "stub").get("readyReplicas", 0) == 0, 10, "not ready"
        )
        (out_dir / "unready").unlink()
        runner.wait_ready(namespace, "stub", timeout=10)

        # A crashed container is restarted.
        victim = pods[0]
        os.kill(victim.pids[0], signal.SIGKILL)
        wait_for(
            lambda: any(
                p.name == victim.name and p.restarts == 1 and p.ready
                for p in runner.pods(namespace, "stub")
            ),
            15,
            "restarted",
        )

        # A new pod template rolls the pods.
        apps.patch_namespaced_deployment(
            "stub",
            namespace,
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/env/1/value",
                    "value": "two",
                }
            ],
        )
        wait_for(
            lambda: (
                {p.template_hash for p in runner.pods(namespace, "stub")} != {pods[0].template_hash}
                and len(runner.pods(namespace, "stub")) == 2
            ),
            15,
            "rolled",
        )
        rolled = runner.wait_ready(namespace, "stub", timeout=15)
        assert _seen(out_dir, rolled[0].name)["argv"][1:] == ["--mode=two"]
        wait_for(
            lambda: _status(apps, namespace, "stub").get("observedGeneration") == 2,
            10,
            "observedGeneration 2",
        )

        # Scale down and up.
        apps.patch_namespaced_deployment_scale("stub", namespace, {"spec": {"replicas": 0}})
        wait_for(lambda: runner.pods(namespace, "stub") == [], 15, "scaled to 0")
        pids = [pid for p in rolled for pid in p.pids]
        wait_for(lambda: not any(_alive(pid) for pid in pids), 15, "processes gone")
        wait_for(lambda: _status(apps, namespace, "stub").get("replicas", 0) == 0, 10, "status 0")
        apps.patch_namespaced_deployment_scale("stub", namespace, {"spec": {"replicas": 1}})
        (pod,) = runner.wait_ready(namespace, "stub", timeout=15)

        # Deleting the Deployment stops its pods.
        apps.delete_namespaced_deployment("stub", namespace)
        wait_for(lambda: not _alive(pod.pids[0]), 15, "deleted deployment's pod stopped")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_entry_points_map_to_this_checkouts_console_scripts(kubeconfig: str) -> None:
    runner = pr.PodRunner(kubeconfig=kubeconfig, command_map={"legacy": ["python3", "-m", "x"]})
    bin_dir = Path(sys.executable).parent
    argv = runner._argv(
        {"name": "w", "command": ["kafka-retry", "worker"], "args": ["--tier", "retry-1"]}, {}
    )
    assert argv == [str(bin_dir / "kafka-retry"), "worker", "--tier", "retry-1"]
    absolute = runner._argv({"name": "w", "command": ["/usr/local/bin/kafka-retry"]}, {})
    assert absolute == [str(bin_dir / "kafka-retry")]
    assert runner._argv({"name": "w", "command": ["legacy", "a"]}, {}) == [
        "python3",
        "-m",
        "x",
        "a",
    ]
    try:
        runner._argv({"name": "w", "image": "unknown:1"}, {})
    except pr.PodConfigError as e:
        assert "no mapped entry point" in str(e)
    else:
        raise AssertionError("a container without a command needs a mapped image")
    time.sleep(0)


VOLUME_STUB = r"""
import sys, time
while True:  # the mounted file's content, as a worker following it would read it
    time.sleep(0.1)
"""


def test_a_configmap_volume_is_a_file_rewritten_when_the_configmap_changes(
    k8s_api: Any, kubeconfig: str, namespace: str, tmp_path: Path
) -> None:
    """As the kubelet does for a ConfigMap volume: the key as a file under the mount path
    (arguments naming it point at the pod's copy), rewritten atomically when the ConfigMap
    changes, with the process left running (no restart, no roll)."""
    from kubernetes import client

    core, apps = client.CoreV1Api(k8s_api), client.AppsV1Api(k8s_api)
    script = tmp_path / "stub.py"
    script.write_text(VOLUME_STUB)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cm"}, "data": {"topology.json": "one", "other": "x"}}
    )
    labels = {"app": "vol"}
    container = {
        "name": "stub",
        "image": "stub:1",
        "command": ["python3"],
        "args": [str(script), "--topology-file", "/etc/kafka-retry/topology.json"],
        "volumeMounts": [{"name": "topology", "mountPath": "/etc/kafka-retry", "readOnly": True}],
    }
    volume = {
        "name": "topology",
        "configMap": {"name": "cm", "items": [{"key": "topology.json", "path": "topology.json"}]},
    }
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "vol", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [container], "volumes": [volume]},
                },
            },
        },
    )
    with pr.running(
        kubeconfig=kubeconfig,
        namespace=namespace,
        log_dir=tmp_path / "logs",
        grace_cap=5.0,
        configmap_sync_s=0.5,
    ) as runner:
        (pod,) = runner.wait_ready(namespace, "vol", timeout=30)
        argv = Path(f"/proc/{pod.pids[0]}/cmdline").read_bytes().decode().split("\0")
        path = Path(argv[argv.index("--topology-file") + 1])
        assert path.name == "topology.json" and path.parent != Path("/etc/kafka-retry")
        assert path.read_text() == "one"
        assert sorted(p.name for p in path.parent.iterdir()) == ["topology.json"]  # items only

        core.patch_namespaced_config_map("cm", namespace, {"data": {"topology.json": "two"}})
        wait_for(lambda: path.read_text() == "two", 10, "the file rewritten")
        (same,) = runner.pods(namespace, "vol")
        assert (same.name, same.pids, same.restarts) == (pod.name, pod.pids, 0)
