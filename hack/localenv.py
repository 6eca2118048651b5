"""The local environment: a real Kafka broker, etcd, kube-apiserver and kube-controller-manager.

Tests, the demo and benchmarks all start the same servers through this module, so that what
passes here ran against real parts. Artifacts are fetched or built once into a per-user cache
keyed by version (outside any checkout); `up` and `down` are idempotent.

    python hack/localenv.py ensure   # fetch and build everything (cached)
    python hack/localenv.py up       # start what is not running, wait until ready
    python hack/localenv.py down     # stop everything
    python hack/localenv.py env      # print shell exports for clients
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.25.3"
SLF4J_VERSION = "2.0.17"
ETCD_VERSION = "v3.6.16"
KUBE_VERSION = "v1.34.4"
HELM_VERSION = "v3.19.5"
# Prometheus's Go module versions are v0.<major*100+minor>.<patch>: v0.316.0 is 3.16.0.
PROMTOOL_VERSION = "v0.316.0"
# KEDA (its Go module): its CRDs validate the ScaledObjects we generate, and its operator, built
# from source, scales a tier on its lag in a test.
KEDA_VERSION = "v2.18.1"

HACK = Path(__file__).resolve().parent
CACHE = Path(
    os.environ.get("KRO_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kafka-retry-operator"
)
RUN = Path(os.environ.get("KRO_RUN", CACHE / "run"))

KAFKA_PORT = int(os.environ.get("KRO_KAFKA_PORT", "19092"))
KAFKA_CONTROLLER_PORT = KAFKA_PORT + 1
KAFKA_POD_PORT = KAFKA_PORT + 2  # the listener for pods, on the local node's bridge
ETCD_PORT = int(os.environ.get("KRO_ETCD_PORT", "12379"))
APISERVER_PORT = int(os.environ.get("KRO_APISERVER_PORT", "16443"))
KCM_PORT = APISERVER_PORT + 1

ADMIN_TOKEN_USER = "kro-admin"
UNPRIVILEGED_USER = "kro-nobody"

KAFKA_DIR = CACHE / f"kafka-{KAFKA_VERSION}"
ETCD_BIN = CACHE / f"etcd-{ETCD_VERSION}" / "bin" / "etcd"
BUILD_REVISION = "r2"  # bump when a build script changes, so caches rebuild
KUBE_BIN = CACHE / f"kube-{KUBE_VERSION}-{BUILD_REVISION}" / "bin"
HELM_BIN = CACHE / f"helm-{HELM_VERSION}" / "bin" / "helm"
PROMTOOL_BIN = CACHE / f"promtool-{PROMTOOL_VERSION}" / "bin" / "promtool"
KEDA_CRDS = CACHE / f"keda-crds-{KEDA_VERSION}"
KEDA_OPERATOR_BIN = CACHE / f"keda-operator-{KEDA_VERSION}" / "bin" / "keda-operator"

KAFKA_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local</groupId><artifactId>kafka-broker</artifactId><version>1</version>
<dependencies>
<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
  <version>{KAFKA_VERSION}</version></dependency>
<dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-storage</artifactId>
  <version>{KAFKA_VERSION}</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
  <version>{LOG4J_VERSION}</version></dependency>
<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
  <version>{LOG4J_VERSION}</version></dependency>
<dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
  <version>{SLF4J_VERSION}</version></dependency>
</dependencies></project>
"""

LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders><Console name="out" target="SYSTEM_OUT">
    <PatternLayout pattern="[%d] %p %m (%c)%n"/></Console></Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/><Logger name="org.apache.kafka" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="out"/></Root>
  </Loggers>
</Configuration>
"""


class SetupError(RuntimeError):
    """A part could not be built or started; the message names the log to read."""


class ServerExited(SetupError):
    """A server process died before it became ready."""


def log(msg: str) -> None:
    print(f"[localenv] {msg}", file=sys.stderr, flush=True)


def timed(what: str, fn: Callable[[], None]) -> None:
    start = time.monotonic()
    fn()
    log(f"{what}: {time.monotonic() - start:.1f}s")


# --------------------------------------------------------------------------- artifacts


@contextlib.contextmanager
def cache_lock(name: str, shared: bool = False, holder: str = "another build") -> Iterator[None]:
    """Hold CACHE/<name>.lock: one builder per artifact across every checkout and run dir
    (or, `shared`, one of many users that exclude an exclusive holder). A wait says so on
    the terminal (then every 30 s), never silently."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{name}.lock").open("w") as lock:
        _flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, holder)
        yield


def _flock(lock: IO[str], mode: int, holder: str) -> None:
    start = time.monotonic()
    said = -30.0
    while True:
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - start
            if waited - said >= 30:
                log(f"waiting for {holder} holding {lock.name} ({waited:.0f}s so far)")
                said = waited
            time.sleep(1)
    if time.monotonic() - start >= 1:
        log(f"got {lock.name} after {time.monotonic() - start:.0f}s")


def _atomic_build(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling and rename, so an interrupted build never looks cached."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _run_logged(cmd: list[str], logfile: Path, cwd: Path | None = None) -> None:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("w") as out:
        rc = subprocess.call(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise SetupError(f"{' '.join(cmd[:3])} failed (exit {rc}); log: {logfile}\n{tail}")


def ensure_kafka() -> None:
    if (KAFKA_DIR / "libs").is_dir():
        return

    def build(tmp: Path) -> None:
        (tmp / "pom.xml").write_text(KAFKA_POM)
        cmd = ["mvn", "-q", "-B", "dependency:copy-dependencies", "-DincludeScope=runtime"]
        _run_logged([*cmd, f"-DoutputDirectory={tmp / 'libs'}"], CACHE / "logs" / "mvn.log", tmp)

    timed(
        f"fetch Kafka {KAFKA_VERSION} jars from Maven Central",
        lambda: _atomic_build(KAFKA_DIR, build),
    )


def _ensure_go_build(binary: Path, script: str, *args: str) -> None:
    """Build `binary`'s cache folder with hack/`script` OUT_DIR `args`..., unless it is there."""
    if binary.exists():
        return
    root = binary.parent.parent

    def build(tmp: Path) -> None:
        _run_logged(
            ["bash", str(HACK / script), str(tmp), *args], CACHE / "logs" / f"{root.name}.log"
        )

    timed(f"go build {root.name}", lambda: _atomic_build(root, build))


def _ensure_go_install(binary: Path, package: str, version: str) -> None:
    """`go install package@version` into the cache (one binary, built once)."""
    if binary.exists():
        return
    root = binary.parent.parent

    def build(tmp: Path) -> None:
        env = {**os.environ, "GOBIN": str(tmp / "bin"), "CGO_ENABLED": "0"}
        cmd = ["go", "install", "-trimpath", "-ldflags", "-s -w", f"{package}@{version}"]
        logfile = CACHE / "logs" / f"{binary.name}-build.log"
        with logfile.open("w") as out:
            if subprocess.call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT) != 0:
                raise SetupError(f"{binary.name} build failed; log: {logfile}")

    timed(f"go install {binary.name} {version}", lambda: _atomic_build(root, build))


def ensure_helm() -> None:
    _ensure_go_install(HELM_BIN, "helm.sh/helm/v3/cmd/helm", HELM_VERSION)


def ensure_promtool() -> None:
    """Prometheus's promtool, for the unit tests of the chart's alert rules."""
    package = "github.com/prometheus/prometheus/cmd/promtool"
    _ensure_go_install(PROMTOOL_BIN, package, PROMTOOL_VERSION)


def ensure_keda_crds() -> Path:
    """KEDA's CRD manifests, from its module zip on the Go module proxy (no KEDA build)."""
    if not KEDA_CRDS.is_dir():

        def fetch(tmp: Path) -> None:
            import io
            import zipfile

            proxy = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0]
            url = f"{proxy}/github.com/kedacore/keda/v2/@v/{KEDA_VERSION}.zip"
            with urllib.request.urlopen(url, timeout=120) as r:
                archive = zipfile.ZipFile(io.BytesIO(r.read()))
            prefix = f"github.com/kedacore/keda/v2@{KEDA_VERSION}/config/crd/bases/"
            for name in archive.namelist():
                if name.startswith(prefix) and name.endswith(".yaml"):
                    (tmp / name.removeprefix(prefix)).write_bytes(archive.read(name))

        timed(f"fetch KEDA {KEDA_VERSION} CRDs", lambda: _atomic_build(KEDA_CRDS, fetch))
    return KEDA_CRDS


def ensure_all() -> None:
    (CACHE / "logs").mkdir(parents=True, exist_ok=True)
    with cache_lock("build"):
        ensure_kafka()
        _ensure_go_build(ETCD_BIN, "build-etcd.sh", ETCD_VERSION)
        _ensure_go_build(KUBE_BIN / "kube-controller-manager", "build-kube.sh", KUBE_VERSION)
        ensure_helm()
        ensure_promtool()
        ensure_keda_crds()
        _ensure_go_build(KEDA_OPERATOR_BIN, "build-keda.sh", KEDA_VERSION)


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Server:
    name: str
    home: Path = RUN  # holds <name>.pid and logs/<name>.log
    marker: str = ""  # a word of its command line; its name by default

    @property
    def pidfile(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The server's pid if it runs; a stale pidfile whose pid was reused is ignored."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        return pid if (self.marker or self.name).encode() in cmdline else None

    def start(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # survives the caller; stopped by `down`
            )
        self.pidfile.write_text(str(proc.pid))

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.2)
            if self.pid() is not None:
                os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)

    def bring_up(
        self, start: Callable[[], None], ready: Callable[[], bool], timeout: float
    ) -> None:
        """Start and wait; a server that dies during start-up (a port still held by a
        process that is going away, say) gets one more try before the run fails."""
        start()
        try:
            self.wait(ready, timeout)
        except ServerExited as e:
            log(f"{e}; starting it once more")
            start()
            self.wait(ready, timeout)

    def _started_alive(self) -> bool:
        """Liveness of the process we just started. Not `pid()`: right after Popen the child
        may still be inside execve, its cmdline empty, so the name check would call it dead."""
        try:
            stat = Path(f"/proc/{int(self.pidfile.read_text())}/stat").read_text()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")

    def wait(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._started_alive():
                raise ServerExited(f"{self.name} exited during start-up; log: {self.logfile}")
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise SetupError(f"{self.name} not ready after {timeout:.0f}s; log: {self.logfile}")


KAFKA = Server("kafka", marker="kafka.Kafka")
ETCD = Server("etcd")
APISERVER = Server("kube-apiserver")
KCM = Server("kube-controller-manager")
ALL = (KAFKA, ETCD, APISERVER, KCM)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kafka_listeners(port: int, controller_port: int, pod_listener: str | None) -> list[str]:
    """Host clients use 127.0.0.1; pods on the local node use `pod_listener` (address:port
    on the bridge's gateway)."""
    advertised = f"PLAINTEXT://127.0.0.1:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if pod_listener:
        advertised += f",POD://{pod_listener}"
        protocols += ",POD:PLAINTEXT"
    return [
        f"listeners={advertised},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners={advertised}",
        f"listener.security.protocol.map={protocols}",
    ]


def kafka_serves_pods(pod_address: str) -> bool:
    """Whether the running broker has the listener for pods (a broker started while the
    node was off has not, and must restart)."""
    props = RUN / "kafka" / "server.properties"
    return props.exists() and f"POD://{pod_address}:" in props.read_text()


def start_kafka(pod_address: str | None = None) -> None:
    if KAFKA.pid() is not None:
        return
    pod_listener = f"{pod_address}:{KAFKA_POD_PORT}" if pod_address else None
    _start_broker(
        KAFKA, RUN / "kafka", KAFKA_PORT, KAFKA_CONTROLLER_PORT, pod_listener=pod_listener
    )


def _start_broker(
    server: Server,
    data: Path,
    port: int,
    controller_port: int,
    overrides: dict[str, str] | None = None,
    pod_listener: str | None = None,
) -> None:
    """A single-node KRaft broker in `data` (emptied first); `overrides` are broker settings
    added to (or replacing) ours; `pod_listener` (address:port) is a listener for pods."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    props = data / "server.properties"
    props.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                *_kafka_listeners(port, controller_port, pod_listener),
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={data / 'logs'}",
                # One node: every internal topic must accept replication factor 1,
                # or transactions and consumer groups never become available.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=10",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "group.consumer.heartbeat.interval.ms=1000",
                "group.consumer.min.heartbeat.interval.ms=500",
                "group.consumer.session.timeout.ms=10000",
                "group.consumer.min.session.timeout.ms=6000",
                "group.min.session.timeout.ms=1000",
                "auto.create.topics.enable=false",
                "delete.topic.enable=true",
                "num.partitions=1",
                "log.segment.bytes=16777216",
                *(f"{k}={v}" for k, v in (overrides or {}).items()),
            ]
        )
        + "\n"
    )
    (data / "log4j2.xml").write_text(LOG4J2_XML)
    java = _broker_java(data)
    # StorageTool wants a base64 (22 chars) cluster id, not a dashed UUID; one in 64 starts
    # with "-", which argparse would read as an option unless joined with "=".
    cluster_id = _kafka_uuid()
    _run_logged(
        [
            *java,
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(props),
        ],
        RUN / "logs" / f"{server.name}-format.log",
    )
    server.start([*java, "kafka.Kafka", str(props)])


def _broker_java(data: Path) -> list[str]:
    cp = str(KAFKA_DIR / "libs" / "*")
    java = ["java", "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-cp", cp]
    return [*java, f"-Dlog4j2.configurationFile={data / 'log4j2.xml'}"]


def restart_extra_kafka(name: str, timeout: float = 180) -> None:
    """Restart a broker of `extra_kafka` on its data and ports, as a rolling restart does
    (SIGTERM: a clean shutdown), and wait until it serves again."""
    server = Server(name)
    data = RUN / name
    props = data / "server.properties"
    port = int(props.read_text().split("PLAINTEXT://127.0.0.1:", 1)[1].split(",", 1)[0])
    server.stop()
    server.bring_up(
        lambda: server.start([*_broker_java(data), "kafka.Kafka", str(props)]),
        lambda: _broker_ready(f"127.0.0.1:{port}"),
        timeout,
    )


@contextlib.contextmanager
def extra_kafka(name: str, overrides: dict[str, str], timeout: float = 180) -> Iterator[str]:
    """Another broker, for a test that needs broker settings ours do not have (a Kafka
    setting that is cluster-wide and read-only, like offsets.retention.minutes); yields its
    bootstrap servers and stops it after."""
    server = Server(name)
    server.stop()
    port = _free_port()
    data = RUN / name
    server.bring_up(
        lambda: _start_broker(server, data, port, _free_port(), overrides),
        lambda: _broker_ready(f"127.0.0.1:{port}"),
        timeout,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kafka_uuid() -> str:
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def kafka_ready() -> bool:
    return _broker_ready(kafka_bootstrap())


def _broker_ready(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    # log_level 2: "connection refused" while the broker boots is expected, not news.
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "log_level": 2})
    md = admin.list_topics(timeout=2)
    return bool(md.brokers)


def kafka_bootstrap() -> str:
    return f"127.0.0.1:{KAFKA_PORT}"


# --------------------------------------------------------------------------- kubernetes


PKI = RUN / "pki"
KUBECONFIG = RUN / "kubeconfig"


def _token(name: str, pki: Path = PKI) -> str:
    """A static bearer token, made once per fresh cluster (the PKI folder is reset with it)."""
    token_file = pki / f"{name}.token"
    if not token_file.exists():
        token_file.write_text(uuid.uuid4().hex)
    return token_file.read_text().strip()


def _admin_token() -> str:
    return _token("admin")


def _unprivileged_token() -> str:
    return _token("nobody")


def issue_cert(pki: Path, name: str, subject: str, extensions: str) -> None:
    """pki/<name>.crt and .key, signed by pki/ca.crt, unless they exist."""
    if (pki / f"{name}.crt").exists():
        return
    logfile = pki / "openssl.log"
    ext = pki / f"{name}.ext"
    ext.write_text(extensions + "\n")
    key, csr = str(pki / f"{name}.key"), str(pki / f"{name}.csr")
    ca, ca_key, crt = str(pki / "ca.crt"), str(pki / "ca.key"), str(pki / f"{name}.crt")
    _run_logged(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", subject],
        logfile,
    )  # fmt: skip
    _run_logged(
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "3650", "-extfile", str(ext), "-out", crt],
        logfile,
    )  # fmt: skip


def ensure_ca(pki: Path) -> None:
    """A CA and the service-account signing key pair in `pki`, unless they exist."""
    pki.mkdir(parents=True, exist_ok=True)
    logfile = pki / "openssl.log"
    if not (pki / "sa.key").exists():
        _run_logged(["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], logfile)
        _run_logged(
            ["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
            logfile,
        )
    if not (pki / "ca.crt").exists():
        _run_logged(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
             "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
             "-subj", "/CN=kro-local-ca"],
            logfile,
        )  # fmt: skip


def ensure_pki() -> None:
    ensure_ca(PKI)
    issue_cert(
        PKI,
        "serving",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc",
    )
    tokens = PKI / "tokens.csv"
    tokens.write_text(
        f'{_admin_token()},{ADMIN_TOKEN_USER},uid-admin,"system:masters"\n'
        f"{_unprivileged_token()},{UNPRIVILEGED_USER},uid-nobody\n"
    )


def write_kubeconfig(
    path: Path,
    token: str,
    user: str,
    namespace: str = "default",
    server: str = "",
    ca: Path = PKI / "ca.crt",
) -> None:
    """A kubeconfig for `user` (of this run's API server unless `server` names another): JSON
    is valid YAML, and needs no YAML library here."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kro-local",
                "cluster": {
                    "server": server or f"https://127.0.0.1:{APISERVER_PORT}",
                    "certificate-authority": str(ca),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": "kro-local",
                "context": {"cluster": "kro-local", "user": user, "namespace": namespace},
            }
        ],
        "current-context": "kro-local",
    }
    # Replaced in one step: every `make up` (and each pytest-xdist worker's session) writes it
    # again while other processes of the run read it.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(config, indent=2))
    partial.chmod(0o600)
    os.replace(partial, path)


def etcd_command(data: Path, port: int) -> list[str]:
    """A one-member etcd on 127.0.0.1:`port` (peers on `port` + 1), data in `data`."""
    return [
        str(ETCD_BIN),
        "--name=kro",
        f"--data-dir={data}",
        f"--listen-client-urls=http://127.0.0.1:{port}",
        f"--advertise-client-urls=http://127.0.0.1:{port}",
        f"--listen-peer-urls=http://127.0.0.1:{port + 1}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{port + 1}",
        f"--initial-cluster=kro=http://127.0.0.1:{port + 1}",
        "--unsafe-no-fsync",  # tests only: speed over durability
        "--quota-backend-bytes=2147483648",
        "--log-level=warn",
    ]


def start_etcd() -> None:
    if ETCD.pid() is not None:
        return
    data = RUN / "etcd"
    shutil.rmtree(data, ignore_errors=True)
    ETCD.start(etcd_command(data, ETCD_PORT))


def etcd_ready(port: int = ETCD_PORT) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        return bool(json.load(r).get("health") == "true")


def apiserver_command(etcd_port: int, address: str, port: int, pki: Path) -> list[str]:
    """kube-apiserver on `address`:`port`, certificates and static tokens from `pki`."""
    return [
        str(KUBE_BIN / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        f"--bind-address={address}",
        f"--advertise-address={address}",
        f"--secure-port={port}",
        f"--tls-cert-file={pki / 'serving.crt'}",
        f"--tls-private-key-file={pki / 'serving.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--token-auth-file={pki / 'tokens.csv'}",
        "--authorization-mode=Node,RBAC",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        "--api-audiences=https://kubernetes.default.svc",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--allow-privileged=true",
        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount",
        "--disable-admission-plugins=DefaultStorageClass,StorageObjectInUseProtection",
        f"--cert-dir={pki / 'apiserver-certs'}",
        "--v=1",
    ]


def start_apiserver() -> None:
    if APISERVER.pid() is not None:
        return
    APISERVER.start(apiserver_command(ETCD_PORT, "127.0.0.1", APISERVER_PORT, PKI))


def _https_get(
    url: str, token: str, verify: bool = True, ca: Path = PKI / "ca.crt"
) -> tuple[int, str]:
    if verify:
        ctx = ssl.create_default_context(cafile=str(ca))
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def apiserver_ready(url: str = "", token: str = "", ca: Path = PKI / "ca.crt") -> bool:
    url = url or f"https://127.0.0.1:{APISERVER_PORT}"
    status, body = _https_get(f"{url}/readyz", token or _admin_token(), ca=ca)
    return status == 200 and body.strip() == "ok"


# Garbage collection, namespaces, service-account tokens and ClusterRole aggregation (the
# chart's roles aggregated into view/edit/admin), but not the workload controllers: no kubelet
# serves this API server (the local node has its own, see hack/node.py), and
# hack/podrunner.py owns Deployment status here.
KCM_CONTROLLERS = (
    "garbagecollector,namespace,serviceaccount,serviceaccount-token,"
    "root-ca-certificate-publisher-controller,clusterrole-aggregation"
)


def kcm_command(kubeconfig: Path, port: int, pki: Path, controllers: str) -> list[str]:
    return [
        str(KUBE_BIN / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        "--use-service-account-credentials=false",
        f"--controllers={controllers}",
        "--leader-elect=false",
        "--v=1",
    ]


def start_kcm() -> None:
    pid = KCM.pid()
    if pid is not None:
        # One started before the controller list last changed is replaced.
        if f"--controllers={KCM_CONTROLLERS}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        log("kube-controller-manager runs other controllers: restarting it")
        KCM.stop()
    KCM.start(kcm_command(KUBECONFIG, KCM_PORT, PKI, KCM_CONTROLLERS))


def healthz_ready(port: int, token: str = "") -> bool:
    """A control-plane component's /healthz on 127.0.0.1:`port`: it serves a self-signed
    certificate of its own (not our CA)."""
    status, _ = _https_get(
        f"https://127.0.0.1:{port}/healthz", token or _admin_token(), verify=False
    )
    return status == 200


def kcm_ready() -> bool:
    return healthz_ready(KCM_PORT)


# --------------------------------------------------------------------------- commands


def kubectl_binary() -> str:
    """This machine's `kubectl` dispatches to an old client; prefer the newest versioned one
    beside it that is within the supported skew of our API server."""
    found = shutil.which("kubectl")
    if found:
        real = Path(found).resolve().parent
        for minor in (34, 33):
            candidate = real / f"kubectl.1.{minor}"
            if candidate.exists():
                return str(candidate)
        return found
    return "kubectl"


# This project's commands, from the venv that runs this script: `kubectl retry` is kubectl
# finding the `kubectl-retry` plugin on PATH.
PROJECT_COMMANDS = ("kafka-retry", "kubectl-retry", "kafka-retry-operator")


def tool_bin_dir() -> Path:
    """A bin/ to put first on PATH: `kubectl` and `helm` of the right versions, and this
    checkout's commands (links into its venv; not the venv's bin/ itself, whose `python` and
    `pip` would shadow the user's)."""
    bindir = RUN / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    venv_bin = Path(sys.executable).parent
    tools = [("kubectl", kubectl_binary()), ("helm", str(HELM_BIN))]
    tools += [(name, str(venv_bin / name)) for name in PROJECT_COMMANDS]
    for name, target in tools:
        link = bindir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return bindir


def env_vars() -> dict[str, str]:
    env = {
        "KRO_KUBECTL": kubectl_binary(),
        "KUBECONFIG": str(KUBECONFIG),
        "KRO_KAFKA_BOOTSTRAP": kafka_bootstrap(),
        "KRO_HELM": str(HELM_BIN),
        "KRO_PROMTOOL": str(PROMTOOL_BIN),
        "KRO_KEDA_CRDS": str(KEDA_CRDS),
        "KRO_KEDA_OPERATOR": str(KEDA_OPERATOR_BIN),
        "KRO_UNPRIVILEGED_KUBECONFIG": str(RUN / "kubeconfig-nobody"),
        "KRO_RUN": str(RUN),
    }
    if node.enabled():
        env["KRO_NODE_KUBECONFIG"] = str(node.KUBECONFIG)
        env["KRO_POD_KAFKA_BOOTSTRAP"] = f"{node.GATEWAY}:{KAFKA_POD_PORT}"
        env["KRO_IMAGE"] = images.project_image()
    return env


def up() -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    # Several test runs may start at once: one sets up, the others wait and then reuse.
    with (RUN / "up.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _up_locked()


def _up_locked() -> None:
    ensure_all()
    pod_address = None
    if node.enabled():
        node.up()
        pod_address = node.GATEWAY
        if KAFKA.pid() is not None and not kafka_serves_pods(pod_address):
            log("restarting Kafka with a listener for pods")
            KAFKA.stop()
    if not any(s.pid() for s in (ETCD, APISERVER)):
        shutil.rmtree(PKI, ignore_errors=True)  # fresh tokens per fresh cluster
    ensure_pki()
    write_kubeconfig(KUBECONFIG, _admin_token(), ADMIN_TOKEN_USER)
    write_kubeconfig(RUN / "kubeconfig-nobody", _unprivileged_token(), UNPRIVILEGED_USER)

    def kafka() -> None:
        KAFKA.bring_up(lambda: start_kafka(pod_address), kafka_ready, 90)

    def kube() -> None:
        ETCD.bring_up(start_etcd, etcd_ready, 60)
        APISERVER.bring_up(start_apiserver, apiserver_ready, 120)
        KCM.bring_up(start_kcm, kcm_ready, 60)

    timed("kafka up", kafka)
    timed("etcd + kube-apiserver + kube-controller-manager up", kube)
    if node.enabled():
        images.ensure_in_containerd(node.ctr(), images.project_image())
    (RUN / "env.sh").write_text(shell_exports())


def shell_exports() -> str:
    exports = "".join(f"export {k}={v}\n" for k, v in env_vars().items())
    return exports + f'export PATH="{tool_bin_dir()}:$PATH"\n'


def down() -> None:
    for server in reversed(ALL):
        server.stop()
    if node.enabled():
        node.down()


def status() -> int:
    servers = [(s.name, s.pid()) for s in ALL]
    if node.enabled():
        servers += node.status()
    for name, pid in servers:
        print(f"{name:31} {'running pid ' + str(pid) if pid else 'stopped'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "command", choices=["ensure", "up", "down", "status", "env", "image", "node-down"]
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "ensure":
            ensure_all()
        elif args.command == "up":
            up()
        elif args.command == "down":
            down()
        elif args.command == "node-down":
            node.down()
        elif args.command == "image":
            if not node.enabled():
                raise SetupError("KRO_NODE=0: no local node to import the image into")
            node.up()
            images.ensure_in_containerd(node.ctr(), images.project_image())
        elif args.command == "status":
            return status()
        elif args.command == "env":
            print(shell_exports(), end="")
    except SetupError as e:
        log(f"ERROR: {e}")
        return 1
    return 0


# The node and its images build on the helpers above (imported last: they import this module).
import images  # noqa: E402
import node  # noqa: E402

if __name__ == "__main__":
    # Run as the `localenv` module that node.py and images.py import, not as a second copy
    # named __main__ (whose SetupError would be another class).
    import localenv

    sys.exit(localenv.main())
