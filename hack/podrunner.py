"""Runs Deployments' pods as local processes: a stand-in for the kubelet and the deployment
controller, neither of which runs in the local environment (hack/localenv.py).

It watches Deployments (optionally one namespace and a label selector) and, for each, keeps
`spec.replicas` pods running. A pod is one local process per container, started from the pod
template's `command` + `args` and `env`/`envFrom` (ConfigMap and Secret references are read from
the API, `$(VAR)` references expanded), with the image's entry point mapped to this checkout's
installed console scripts (the venv's `bin/`, e.g. `kafka-retry`), so the real manifests the
operator writes are what runs. Each container port gets a free local port; environment
variables that name a container port (`KAFKA_RETRY_METRICS_PORT` by default) are rewritten to
it, and the probes use it.

- readiness: the readinessProbe's httpGet (or tcpSocket) on the mapped port; without a probe,
  a running process is ready. A livenessProbe that keeps failing restarts the container.
- crashes: a container that exits is restarted with a growing back-off (1 s .. 30 s).
- scaling: up and down to `spec.replicas`; stopping is SIGTERM to the process group, then
  SIGKILL after the pod's terminationGracePeriodSeconds (capped, see `grace_cap`).
- rollouts: a changed pod template starts new pods; old ones stop when the new are ready.
- status: the Deployment's `status` (replicas, readyReplicas, availableReplicas,
  updatedReplicas, observedGeneration, an Available condition) is patched when it changes.
- logs: each pod's output goes to `<log-dir>/<namespace>_<pod>.log`.

- ConfigMap volumes: the keys (or the `items` asked for) are written as files in a directory of
  the pod's, and arguments and variables that name a path under the mount are rewritten to it.
  Like the kubelet, the files are rewritten when the ConfigMap changes, each atomically (a
  reader sees the old file or the new), at most `configmap_sync_s` later (the kubelet's is a
  minute or more: a test that needs that slowness sets it).

Not emulated: init containers, other volumes (containers share this machine's file system),
exec probes (treated as passing), resource limits, security contexts.

As a library (tests):

    with PodRunner(kubeconfig=path, namespace="t-1234", log_dir=tmp_path) as runner:
        runner.wait_ready("t-1234", "billing-orders-retry-1", timeout=60)
        runner.pods("t-1234", "billing-orders-retry-1")   # names, pids, ports, readiness

As a command (the local demo):

    python hack/podrunner.py --kubeconfig $KUBECONFIG [--namespace shop] \\
        [--selector app.kubernetes.io/name=kafka-retry-worker] [--log-dir /tmp/pods] \\
        [--map kafka-retry="python -m kafka_retry.cli"] [--env KAFKA_RETRY_LOG_LEVEL=DEBUG]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("podrunner")

DEFAULT_PORT_ENVS = ("KAFKA_RETRY_METRICS_PORT",)
REPORTERS = 5  # threads writing Deployment statuses (kube-controller-manager's default syncs)
# Environment a real container would not get from the host, but a local process needs.
_INHERITED_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodConfigError(Exception):
    """A pod cannot be started as specified (missing ConfigMap key, unknown command...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- containers


@dataclass
class Probe:
    kind: str  # "http", "tcp" or "none"
    path: str = "/"
    port: int = 0
    failure_threshold: int = 3
    initial_delay: float = 0.0

    def check(self) -> bool:
        if self.kind == "http":
            try:
                url = f"http://127.0.0.1:{self.port}{self.path}"
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    return 200 <= int(r.status) < 400
            except (urllib.error.URLError, OSError, ValueError):
                return False
        if self.kind == "tcp":
            with socket.socket() as s:
                s.settimeout(1.0)
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        return True


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    readiness: Probe | None
    liveness: Probe | None
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    not_before: float = 0.0  # crash back-off
    ready: bool = False
    probe_failures: int = 0
    live_failures: int = 0
    next_probe: float = 0.0
    _log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._log.write(f"--- {stamp} start {self.name}: {shlex.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group per container: kill the whole tree
        )
        self.started_at = time.monotonic()
        self.ready = False
        self.probe_failures = self.live_failures = 0
        self.next_probe = 0.0

    def stop(self, grace: float) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.ready = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def tend(self, now: float, probe_interval: float) -> None:
        """Restart after a crash (with back-off), probe readiness and liveness."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self.proc = None
            self.ready = False
            self.restarts += 1
            self.not_before = now + min(30.0, 2.0 ** min(self.restarts - 1, 5))
            log.warning("%s exited with %s; restart #%d", self.name, code, self.restarts)
            if self._log is not None:
                self._log.write(f"--- exited with {code}\n".encode())
                self._log.close()
                self._log = None
        if self.proc is None:
            if now >= self.not_before:
                self.start()
            return
        if now < self.next_probe:
            return
        self.next_probe = now + probe_interval
        age = now - self.started_at
        if self.readiness is None:
            self.ready = True
        elif age >= self.readiness.initial_delay:
            if self.readiness.check():
                self.ready, self.probe_failures = True, 0
            else:
                self.probe_failures += 1
                if self.probe_failures >= self.readiness.failure_threshold or not self.ready:
                    self.ready = False
        if self.liveness is not None and age >= self.liveness.initial_delay:
            if self.liveness.check():
                self.live_failures = 0
            else:
                self.live_failures += 1
                if self.live_failures >= self.liveness.failure_threshold:
                    log.warning("%s failed its liveness probe: restarting", self.name)
                    self.stop(grace=5.0)
                    self.proc = None
                    self.restarts += 1
                    self.not_before = now + 1.0


@dataclass
class ConfigVolume:
    """A ConfigMap volume: its files in `directory`, as last written."""

    namespace: str
    configmap: str
    items: list[Mapping[str, str]]  # key -> path; empty: every key, under its own name
    optional: bool
    directory: Path
    written: dict[str, str] = field(default_factory=dict)  # path -> content

    def files(self, data: Mapping[str, str]) -> dict[str, str]:
        if not self.items:
            return dict(data)
        missing = [i["key"] for i in self.items if i["key"] not in data]
        if missing and not self.optional:
            raise PodConfigError(f"keys {missing} not found in {self.configmap}")
        return {i["path"]: data[i["key"]] for i in self.items if i["key"] in data}

    def write(self, data: Mapping[str, str]) -> bool:
        """The files for `data`, each replaced atomically; True when any changed."""
        files = self.files(data)
        if files == self.written:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        for path, content in files.items():
            target = self.directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{target.name}.tmp")
            staged.write_text(content)
            os.replace(staged, target)
        for path in self.written.keys() - files.keys():
            (self.directory / path).unlink(missing_ok=True)
        self.written = files
        return True


@dataclass
class Pod:
    namespace: str
    name: str
    template_hash: str
    containers: list[Container]
    grace: float
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    terminating: bool = False
    volumes: list[ConfigVolume] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.terminating and all(c.running and c.ready for c in self.containers)

    @property
    def running(self) -> bool:
        return any(c.running for c in self.containers)

    def stop(self) -> None:
        self.terminating = True
        for c in self.containers:
            c.stop(self.grace)


@dataclass(frozen=True)
class PodInfo:
    name: str
    template_hash: str
    ready: bool
    pids: list[int]
    restarts: int
    ports: dict[int, int]
    log_paths: list[Path]


# --------------------------------------------------------------------------- the runner


class PodRunner:
    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        api_client: Any = None,
        namespace: str | None = None,
        selector: str | None = None,
        log_dir: Path | str = "podrunner-logs",
        command_map: Mapping[str, Sequence[str]] | None = None,
        bin_dirs: Sequence[Path | str] | None = None,
        port_envs: Sequence[str] = DEFAULT_PORT_ENVS,
        extra_env: Mapping[str, str] | None = None,
        tick: float = 0.25,
        probe_interval: float = 0.5,
        grace_cap: float = 10.0,
        configmap_sync_s: float = 2.0,
    ) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        if api_client is None:
            config: Any = kube_config  # partly untyped upstream
            api_client = config.new_client_from_config(config_file=kubeconfig)
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self.namespace = namespace
        self.selector = selector
        self.log_dir = Path(log_dir)
        self.command_map = {k: list(v) for k, v in (command_map or {}).items()}
        self.bin_dirs = [Path(p) for p in (bin_dirs or [Path(sys.executable).parent])]
        self.port_envs = tuple(port_envs)
        self.extra_env = dict(extra_env or {})
        self.tick = tick
        self.probe_interval = probe_interval
        self.grace_cap = grace_cap
        self.configmap_sync_s = configmap_sync_s
        self._next_configmap_sync = 0.0
        self._lock = threading.RLock()
        self._deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], list[Pod]] = {}
        self._reported: dict[tuple[str, str], dict[str, Any]] = {}
        self._config_errors: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reporters = ThreadPoolExecutor(REPORTERS, thread_name_prefix="podrunner-status")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> PodRunner:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for target, name in ((self._watch, "podrunner-watch"), (self._control, "podrunner")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if not self._synced.wait(30):
            raise RuntimeError("podrunner: could not list Deployments within 30s")
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
        self._reporters.shutdown(wait=True)
        with self._lock:
            pods = [p for ps in self._pods.values() for p in ps]
            self._pods.clear()
        self._stop_all(pods, wait=True)

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def pods(self, namespace: str, deployment: str) -> list[PodInfo]:
        with self._lock:
            return [
                PodInfo(
                    name=p.name,
                    template_hash=p.template_hash,
                    ready=p.ready,
                    pids=[c.proc.pid for c in p.containers if c.proc is not None],
                    restarts=sum(c.restarts for c in p.containers),
                    ports=dict(p.ports),
                    log_paths=[c.log_path for c in p.containers],
                )
                for p in self._pods.get((namespace, deployment), [])
                if not p.terminating
            ]

    def wait_ready(self, namespace: str, deployment: str, timeout: float = 60) -> list[PodInfo]:
        """Until the Deployment's desired replicas all run its current template and are ready.

        "Current" is the Deployment as the API server has it now, not as last watched: a
        change made just before this call is waited for."""
        latest = self._apps.read_namespaced_deployment(deployment, namespace)
        generation = int((latest.metadata.generation if latest.metadata else None) or 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                d = self._deployments.get((namespace, deployment))
                if d is not None and int(d["metadata"].get("generation") or 0) >= generation:
                    want = _replicas(d)
                    current = template_hash(d["spec"]["template"])
                    pods = self.pods(namespace, deployment)
                    good = [p for p in pods if p.ready and p.template_hash == current]
                    if len(good) == want and len(pods) == want:
                        return pods
            time.sleep(0.1)
        raise TimeoutError(f"{namespace}/{deployment} not ready within {timeout}s")

    # ------------------------------------------------------------------ watching

    def _list(self) -> tuple[list[Any], str]:
        if self.namespace:
            result = self._apps.list_namespaced_deployment(
                self.namespace, label_selector=self.selector or ""
            )
        else:
            result = self._apps.list_deployment_for_all_namespaces(
                label_selector=self.selector or ""
            )
        meta = result.metadata
        return list(result.items), str(meta.resource_version if meta else "")

    def _watch(self) -> None:
        from kubernetes import watch as kube_watch
        from kubernetes.client.exceptions import ApiException

        watch: Any = kube_watch  # untyped upstream
        client = self._apps.api_client
        while not self._stop.is_set():
            try:
                items, version = self._list()
                with self._lock:
                    self._deployments = {
                        _key(d): client.sanitize_for_serialization(d) for d in items
                    }
                self._synced.set()
                w = watch.Watch()
                kwargs: dict[str, Any] = {
                    "label_selector": self.selector or "",
                    "resource_version": version,
                    "timeout_seconds": 5,  # short, so stop() is noticed
                }
                while not self._stop.is_set():
                    if self.namespace:
                        stream = w.stream(
                            self._apps.list_namespaced_deployment, self.namespace, **kwargs
                        )
                    else:
                        stream = w.stream(self._apps.list_deployment_for_all_namespaces, **kwargs)
                    for event in stream:
                        obj = event["raw_object"]
                        kwargs["resource_version"] = obj["metadata"]["resourceVersion"]
                        with self._lock:
                            if event["type"] == "DELETED":
                                self._deployments.pop(_key_raw(obj), None)
                            elif event["type"] in ("ADDED", "MODIFIED"):
                                self._deployments[_key_raw(obj)] = obj
                        if self._stop.is_set():
                            w.stop()
                            break
            except ApiException as e:
                if e.status != 410:  # 410 Gone: our version is too old, list again
                    log.warning("watch failed: %s", e)
                    self._stop.wait(1.0)
            except Exception as e:
                log.warning("watch failed: %s", e)
                self._stop.wait(1.0)

    # ------------------------------------------------------------------ controlling

    def _control(self) -> None:
        self._synced.wait()
        while not self._stop.is_set():
            try:
                self._control_once()
            except Exception:
                log.exception("control pass failed")
            self._stop.wait(self.tick)

    def _control_once(self) -> None:
        now = time.monotonic()
        with self._lock:
            deployments = dict(self._deployments)
            gone = [k for k in self._pods if k not in deployments]
        for key in gone:
            with self._lock:
                pods = self._pods.pop(key, [])
                self._reported.pop(key, None)
            log.info("deployment %s/%s gone: stopping %d pods", *key, len(pods))
            self._stop_all(pods)
        changed = []
        for key, d in deployments.items():
            if d["metadata"].get("deletionTimestamp"):
                with self._lock:
                    pods = self._pods.pop(key, [])
                self._stop_all(pods)
                continue
            self._converge(key, d, now)
            status = self._status(key, d)
            if status is not None:
                changed.append((key, status))
        # Written by several threads, as the deployment controller's workers do: one at a
        # time, 2,000 Deployments' statuses would take minutes on a busy API server.
        list(self._reporters.map(lambda change: self._report(*change), changed))
        if now >= self._next_configmap_sync:
            self._next_configmap_sync = now + self.configmap_sync_s
            self.sync_volumes()

    def sync_volumes(self) -> None:
        """Rewrite ConfigMap volumes whose ConfigMap changed (every `configmap_sync_s`, or now):
        one list per namespace in use."""
        with self._lock:
            volumes = [v for ps in self._pods.values() for p in ps for v in p.volumes]
        for namespace in {v.namespace for v in volumes}:
            listed = self._core.list_namespaced_config_map(namespace).items
            data = {cm.metadata.name: dict(cm.data or {}) for cm in listed if cm.metadata}
            for v in volumes:
                if v.namespace != namespace or (v.configmap not in data and not v.optional):
                    continue
                try:
                    if v.write(data.get(v.configmap, {})):
                        log.info("volume of %s rewritten in %s", v.configmap, v.directory)
                except PodConfigError as e:
                    log.warning("cannot update %s: %s", v.directory, e)

    def _converge(self, key: tuple[str, str], d: dict[str, Any], now: float) -> None:
        want = _replicas(d)
        template = d["spec"]["template"]
        current = template_hash(template)
        with self._lock:
            pods = self._pods.setdefault(key, [])
        new = [p for p in pods if p.template_hash == current]
        old = [p for p in pods if p.template_hash != current]
        # Scale the current template's pods to `want`.
        used = {p.name for p in pods}
        while len(new) < want:
            if now < self._config_errors.get(key, 0.0):
                break
            name = next(
                n
                for i in range(len(pods) + want + 1)
                if (n := f"{key[1]}-{current}-{i}") not in used
            )
            try:
                pod = self._make_pod(key[0], name, current, template)
            except PodConfigError as e:
                log.warning("cannot start a pod of %s/%s: %s", *key, e)
                self._config_errors[key] = now + 2.0
                break
            self._config_errors.pop(key, None)
            used.add(name)
            new.append(pod)
            with self._lock:
                pods.append(pod)
            log.info("starting pod %s/%s", key[0], name)
        surplus = sorted(new, key=lambda p: p.name)[want:]
        # Old pods go when the new ones are ready (or when there should be none).
        if want == 0 or sum(p.ready for p in new) >= want:
            surplus += old
        if surplus:
            with self._lock:
                for p in surplus:
                    pods.remove(p)
            self._stop_all(surplus)
        for pod in list(pods):
            for c in pod.containers:
                c.tend(now, self.probe_interval)

    def _stop_all(self, pods: Sequence[Pod], wait: bool = False) -> None:
        """Stop pods in parallel, each in its own thread (each may take its grace period);
        the control loop goes on meanwhile unless `wait`."""
        threads = [threading.Thread(target=p.stop, daemon=True) for p in pods]
        for p in pods:
            p.terminating = True
        for t in threads:
            t.start()
        if wait:
            for t in threads:
                t.join()

    def _status(self, key: tuple[str, str], d: dict[str, Any]) -> dict[str, Any] | None:
        """The Deployment's status as its pods make it, or None when it was reported so."""
        want = _replicas(d)
        current = template_hash(d["spec"]["template"])
        with self._lock:
            pods = [p for p in self._pods.get(key, []) if not p.terminating]
        ready = sum(p.ready for p in pods)
        status: dict[str, Any] = {
            "observedGeneration": d["metadata"].get("generation", 0),
            "replicas": len(pods),
            "updatedReplicas": sum(p.template_hash == current for p in pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, want - ready),
        }
        available = ready >= want
        cond_status = "True" if available else "False"
        if self._reported.get(key) == status and _available(d) == cond_status:
            return None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status["conditions"] = [
            {
                "type": "Available",
                "status": cond_status,
                "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                "message": f"{ready}/{want} replicas ready (podrunner)",
                "lastUpdateTime": stamp,
                "lastTransitionTime": stamp,
            }
        ]
        return status

    def _report(self, key: tuple[str, str], status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._apps.patch_namespaced_deployment_status(key[1], key[0], {"status": status})
            status.pop("conditions")
            self._reported[key] = status
        except ApiException as e:
            if e.status != 404:
                log.warning("cannot patch the status of %s/%s: %s", *key, e)

    # ------------------------------------------------------------------ pods

    def _make_pod(self, namespace: str, name: str, thash: str, template: Mapping[str, Any]) -> Pod:
        spec = template.get("spec", {})
        grace = min(float(spec.get("terminationGracePeriodSeconds", 30)), self.grace_cap)
        pod = Pod(namespace, name, thash, [], grace)
        volumes = self._config_volumes(namespace, name, spec)
        pod.volumes = list(volumes.values())
        for c in spec.get("containers", []):
            declared = [int(p["containerPort"]) for p in c.get("ports", []) if "containerPort" in p]
            ports = {port: free_port() for port in declared}
            pod.ports.update(ports)
            mounts = {
                m["mountPath"].rstrip("/"): volumes[m["name"]].directory
                for m in c.get("volumeMounts", [])
                if m.get("name") in volumes
            }
            env = {
                k: _remount(v, mounts)
                for k, v in self._container_env(namespace, name, c, ports).items()
            }
            argv = [_remount(a, mounts) for a in self._argv(c, env)]
            pod.containers.append(
                Container(
                    name=f"{namespace}/{name}/{c['name']}",
                    argv=argv,
                    env=env,
                    readiness=_probe(c.get("readinessProbe"), c, ports),
                    liveness=_probe(c.get("livenessProbe"), c, ports),
                    log_path=self.log_dir / f"{namespace}_{name}.log",
                    cwd=self.log_dir / "pods" / f"{namespace}_{name}" / c["name"],
                )
            )
        return pod

    def _config_volumes(
        self, namespace: str, pod_name: str, spec: Mapping[str, Any]
    ) -> dict[str, ConfigVolume]:
        """The pod's ConfigMap volumes by name, their files written."""
        found = {}
        for v in spec.get("volumes", []):
            source = v.get("configMap")
            if source is None:
                continue
            optional = bool(source.get("optional", False))
            volume = ConfigVolume(
                namespace, source["name"], list(source.get("items") or []), optional,
                self.log_dir / "pods" / f"{namespace}_{pod_name}" / "volumes" / v["name"],
            )  # fmt: skip
            volume.write(self._configmap(namespace, source["name"], optional))
            found[v["name"]] = volume
        return found

    def _argv(self, container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
        command = list(container.get("command") or [])
        args = list(container.get("args") or [])
        if not command:
            image = container.get("image", "")
            if image not in self.command_map:
                raise PodConfigError(
                    f"container {container['name']} has no command and image {image!r} has no "
                    "mapped entry point (--map IMAGE=COMMAND)"
                )
            command = list(self.command_map[image])
        elif command[0] in self.command_map:
            command = [*self.command_map[command[0]], *command[1:]]
        else:
            command[0] = self._resolve(command[0])
        return [_expand(a, env) for a in [*command, *args]]

    def _resolve(self, program: str) -> str:
        """An image's program name -> this checkout's console script (venv bin/ first)."""
        if "/" in program:
            base = Path(program).name
            for d in self.bin_dirs:
                if (d / base).exists():
                    return str(d / base)
            return program
        for d in self.bin_dirs:
            if (d / program).exists():
                return str(d / program)
        found = shutil.which(program)
        if found is None:
            raise PodConfigError(f"program {program!r} not found in {self.bin_dirs} or PATH")
        return found

    def _container_env(
        self,
        namespace: str,
        pod_name: str,
        container: Mapping[str, Any],
        ports: Mapping[int, int],
    ) -> dict[str, str]:
        path = os.pathsep.join([*map(str, self.bin_dirs), os.environ.get("PATH", "")])
        env = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env.update({"PATH": path, "HOSTNAME": pod_name, "PYTHONUNBUFFERED": "1"})
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._configmap(namespace, ref["name"], ref.get("optional", False))
            elif "secretRef" in source:
                ref = source["secretRef"]
                data = self._secret(namespace, ref["name"], ref.get("optional", False))
            else:
                continue
            env.update({f"{prefix}{k}": v for k, v in data.items()})
        for var in container.get("env", []):
            value = self._env_value(namespace, pod_name, var, env)
            if value is not None:
                env[var["name"]] = value
        env.update(self.extra_env)
        # Container ports are local ports here: point the variables that name one at it.
        for name in self.port_envs:
            if name in env and env[name].isdigit() and int(env[name]) in ports:
                env[name] = str(ports[int(env[name])])
        return env

    def _env_value(
        self, namespace: str, pod_name: str, var: Mapping[str, Any], env: Mapping[str, str]
    ) -> str | None:
        if "value" in var:
            return _expand(str(var["value"]), env)
        source = var.get("valueFrom")
        if not source:
            return ""
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = self._configmap(namespace, ref["name"], ref.get("optional", False))
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = self._secret(namespace, ref["name"], ref.get("optional", False))
        elif "fieldRef" in source:
            field_path = source["fieldRef"]["fieldPath"]
            fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
            return fields.get(field_path, "")
        else:
            return None
        if ref["key"] not in data:
            if ref.get("optional", False):
                return None
            raise PodConfigError(f"key {ref['key']!r} not found in {ref['name']}")
        return data[ref["key"]]

    def _configmap(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        try:
            return dict(self._core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise PodConfigError(f"ConfigMap {namespace}/{name}: {e.reason}") from None

    def _secret(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        try:
            data = self._core.read_namespaced_secret(name, namespace).data or {}
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise PodConfigError(f"Secret {namespace}/{name}: {e.reason}") from None
        return {k: base64.b64decode(v).decode() for k, v in data.items()}


# --------------------------------------------------------------------------- helpers


def _key(d: Any) -> tuple[str, str]:
    return (d.metadata.namespace, d.metadata.name)


def _key_raw(d: Mapping[str, Any]) -> tuple[str, str]:
    return (d["metadata"]["namespace"], d["metadata"]["name"])


def _replicas(d: Mapping[str, Any]) -> int:
    value = d.get("spec", {}).get("replicas")
    return 1 if value is None else int(value)


def _available(d: Mapping[str, Any]) -> str | None:
    for c in d.get("status", {}).get("conditions") or []:
        if c.get("type") == "Available":
            return str(c.get("status"))
    return None


def _remount(text: str, mounts: Mapping[str, Path]) -> str:
    """A path under a volume's mount path -> the same path in the volume's local directory."""
    for mount, local in mounts.items():
        if text == mount or text.startswith(mount + "/"):
            return str(local) + text[len(mount) :]
    return text


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables are replaced, others left as they are."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _probe(
    spec: Mapping[str, Any] | None,
    container: Mapping[str, Any],
    ports: Mapping[int, int],
) -> Probe | None:
    if not spec:
        return None

    def local(port: Any) -> int:
        if isinstance(port, str) and not port.isdigit():
            named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            if port not in named:
                raise PodConfigError(f"probe port {port!r} is not a named container port")
            port = named[port]
        return ports.get(int(port), int(port))

    probe = Probe(
        "none",
        failure_threshold=int(spec.get("failureThreshold", 3)),
        # Local processes start in well under a real pod's initial delay: keep it short.
        initial_delay=min(float(spec.get("initialDelaySeconds", 0)), 2.0),
    )
    if "httpGet" in spec:
        get = spec["httpGet"]
        probe.kind, probe.path, probe.port = "http", get.get("path", "/"), local(get["port"])
    elif "tcpSocket" in spec:
        probe.kind, probe.port = "tcp", local(spec["tcpSocket"]["port"])
    return probe


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[PodRunner]:
    """`with running(kubeconfig=..., namespace=...) as runner:` — start, yield, stop."""
    runner = PodRunner(**kwargs).start()
    try:
        yield runner
    finally:
        runner.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--namespace", "-n", default=None, help="default: all namespaces")
    parser.add_argument("--selector", "-l", default=None, help="label selector of Deployments")
    parser.add_argument("--log-dir", default="podrunner-logs", type=Path)
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="run COMMAND for a container command (or an image without one)",
    )
    parser.add_argument(
        "--bin-dir", action="append", default=[], help="where console scripts are looked up"
    )
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--grace-cap", type=float, default=10.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command_map = {k: shlex.split(v) for k, v in (m.split("=", 1) for m in args.map)}
    extra_env = dict(e.split("=", 1) for e in args.env)
    runner = PodRunner(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        selector=args.selector,
        log_dir=args.log_dir,
        command_map=command_map,
        bin_dirs=args.bin_dir or None,
        extra_env=extra_env,
        grace_cap=args.grace_cap,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    runner.start()
    log.info(
        "running pods of Deployments in %s; logs in %s",
        args.namespace or "all namespaces",
        args.log_dir,
    )
    stopped.wait()
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
