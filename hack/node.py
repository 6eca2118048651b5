"""The local node: a one-node Kubernetes cluster whose pods are real containers.

containerd and runc (Debian packages) run the containers, the bridge CNI plugin wires pods to
a host bridge, and kubelet, kube-scheduler and kube-proxy (built from the same module as
kube-apiserver) run beside a control plane of the node's own: etcd, kube-apiserver and a
kube-controller-manager running every controller. The run's other API server stays as it is
(no kubelet, hack/podrunner.py runs its pods), so the two never compete for Deployments.

There is one node per machine, whichever checkout started it; its state lives in
`CACHE/node` and its ports are fixed (`PORTS`). Pods reach the host at the bridge's gateway
address: the node's API server and each run's Kafka listener for pods bind to it.

While it runs, the node changes the host; `down` (and a later `up` after a killed run)
restores it all:
- sysctls (kubelet: vm.overcommit_memory, vm.panic_on_oom, kernel.panic, kernel.panic_on_oops,
  kernel.keys.root_max*; bridge plugin: net.ipv4.ip_forward; net.bridge.bridge-nf-call-*):
  their values from before the first start are kept in `CACHE/node/host-sysctls.json`;
- iptables chains KUBE-* (kubelet, kube-proxy), CNI-* (portmap) and KRO-NODE (ours: pod
  traffic never leaves the machine) in every table, IPv4 and IPv6;
- the bridge `kro0` (and the pods' veths with their network namespaces, /run/netns/cni-*);
- mounts under `CACHE/node` (pod volumes, container root filesystems, sandbox /dev/shm);
- the `kubepods` cgroups in every hierarchy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import images
from localenv import (
    CACHE,
    KUBE_VERSION,
    Server,
    SetupError,
    _ensure_go_build,
    _https_get,
    _token,
    apiserver_command,
    apiserver_ready,
    cache_lock,
    ensure_ca,
    etcd_command,
    etcd_ready,
    healthz_ready,
    issue_cert,
    kcm_command,
    log,
    timed,
    write_kubeconfig,
)

NODE = CACHE / "node"
NODE_NAME = "kro-node"
BRIDGE = "kro0"
POD_CIDR = "10.244.0.0/24"
GATEWAY = "10.244.0.1"  # the host, as pods see it
KUBERNETES_SERVICE_IP = "10.96.0.1"  # first address of localenv's --service-cluster-ip-range
NODE_BIN = CACHE / f"kube-node-{KUBE_VERSION}-r1" / "bin"
PACKAGES = (
    *("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack"),
    *("buildah", "mmdebstrap"),  # the image (hack/images.py)
)
CNI_BIN = Path("/usr/lib/cni")


@dataclass(frozen=True)
class Ports:
    etcd: int = 18379  # and 18380 for peers
    apiserver: int = 18443
    controller_manager: int = 18444
    scheduler: int = 18445
    kubelet: int = 18450
    kubelet_healthz: int = 18451
    proxy_healthz: int = 18452
    proxy_metrics: int = 18453


PORTS = Ports()
PKI = NODE / "pki"
KUBECONFIG = NODE / "kubeconfig"
SOCKET = NODE / "containerd.sock"
SYSCTLS_SAVED = NODE / "host-sysctls.json"
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
)
OUR_CHAINS = ("KUBE-", "CNI-", "KRO-")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS = Path("/run/netns")
CNI_RESULTS = Path("/var/lib/cni/results")

CONTAINERD = Server("containerd", NODE)
ETCD = Server("etcd", NODE)
APISERVER = Server("kube-apiserver", NODE)
KCM = Server("kube-controller-manager", NODE)
SCHEDULER = Server("kube-scheduler", NODE)
PROXY = Server("kube-proxy", NODE)
KUBELET = Server("kubelet", NODE)
SERVERS = (CONTAINERD, ETCD, APISERVER, KCM, SCHEDULER, KUBELET, PROXY)


def enabled() -> bool:
    """KRO_NODE=0 leaves the node out (a machine where another checkout runs it)."""
    return os.environ.get("KRO_NODE", "1") != "0"


def api_url() -> str:
    return f"https://{GATEWAY}:{PORTS.apiserver}"


def ctr() -> list[str]:
    return ["ctr", f"--address={SOCKET}", "--namespace=k8s.io"]


def admin_token() -> str:
    return _token("admin", PKI)


# --------------------------------------------------------------------------- installing


def ensure_packages() -> None:
    """The Debian packages the node and the image build use (apt-get, once per machine)."""
    query = ["dpkg-query", "-W", "-f=${db:Status-Abbrev}\\n", *PACKAGES]
    status = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")
    if len(status) >= len(PACKAGES) and all(s.startswith("ii") for s in status[: len(PACKAGES)]):
        return
    with cache_lock("apt"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        logfile = CACHE / "logs" / "apt.log"

        def install() -> None:
            with logfile.open("w") as out:
                subprocess.run(["apt-get", "update", "-qq"], stdout=out, stderr=out, env=env)
                cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
                if subprocess.call(cmd, stdout=out, stderr=out, env=env) != 0:
                    raise SetupError(f"apt-get install failed; log: {logfile}")

        timed(f"apt-get install {' '.join(PACKAGES)}", install)


def ensure_binaries() -> None:
    with cache_lock("build"):
        _ensure_go_build(
            NODE_BIN / "kube-proxy",
            "build-kube.sh",
            KUBE_VERSION,
            "kubelet",
            "kube-scheduler",
            "kube-proxy",
        )


# --------------------------------------------------------------------------- host state


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _save_sysctls() -> None:
    """The host's values before the node's first start; a killed run's saved values stay."""
    if SYSCTLS_SAVED.exists():
        return
    values = {
        name: _sysctl_path(name).read_text().strip()
        for name in SYSCTLS
        if _sysctl_path(name).exists()
    }
    SYSCTLS_SAVED.write_text(json.dumps(values, indent=2))


def _restore_sysctls() -> None:
    if not SYSCTLS_SAVED.exists():
        return
    for name, value in json.loads(SYSCTLS_SAVED.read_text()).items():
        try:
            _sysctl_path(name).write_text(value)
        except OSError as e:
            log(f"could not restore sysctl {name}={value}: {e}")
    SYSCTLS_SAVED.unlink()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _iptables(binary: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True)


def ensure_bridge() -> None:
    """The pods' bridge with the host's address on it, before anything binds to that address;
    pod traffic stays on this machine (KRO-NODE drops what would be forwarded elsewhere)."""
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    if GATEWAY not in _ip("-4", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    # kube-proxy's service rules must see bridged pod-to-pod traffic.
    for name in ("net/bridge/bridge-nf-call-iptables", "net/ipv4/ip_forward"):
        if _sysctl_path(name).exists():
            _sysctl_path(name).write_text("1")
    if _iptables("iptables", "-S", "KRO-NODE").returncode != 0:
        _iptables("iptables", "-N", "KRO-NODE")
        _iptables("iptables", "-A", "KRO-NODE", "-s", POD_CIDR, "-d", POD_CIDR, "-j", "RETURN")
        _iptables("iptables", "-A", "KRO-NODE", "-s", POD_CIDR, "-j", "DROP")
    if _iptables("iptables", "-C", "FORWARD", "-j", "KRO-NODE").returncode != 0:
        _iptables("iptables", "-I", "FORWARD", "1", "-j", "KRO-NODE")


def bridge_exists() -> bool:
    return _ip("-4", "addr", "show", "dev", BRIDGE, check=False).stdout.count(GATEWAY) > 0


def _remove_chains() -> None:
    """Every KUBE-*, CNI-* and KRO-* chain, and the rules that jump to them."""
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary) is None:
            continue
        for table in ("filter", "nat", "mangle", "raw"):
            listing = _iptables(binary, "-t", table, "-S")
            if listing.returncode != 0:
                continue
            ours: list[str] = []
            for line in listing.stdout.splitlines():
                words = line.split()
                if words[:1] == ["-N"] and words[1].startswith(OUR_CHAINS):
                    ours.append(words[1])
                elif words[:1] == ["-A"] and not words[1].startswith(OUR_CHAINS):
                    target = words[words.index("-j") + 1] if "-j" in words else ""
                    if target.startswith(OUR_CHAINS):
                        _iptables(binary, "-t", table, "-D", *words[1:])
            for chain in ours:
                _iptables(binary, "-t", table, "-F", chain)
            for chain in ours:
                _iptables(binary, "-t", table, "-X", chain)


def _unmount_ours() -> None:
    """Unmount, deepest first, whatever the node mounted: pod volumes, container root
    filesystems and /dev/shm under CACHE/node, the pods' network namespaces."""
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target.startswith(f"{NODE}/") or target.startswith(f"{NETNS}/cni-"):
            targets.append(target)
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
    if NETNS.is_dir():
        for ns in NETNS.glob("cni-*"):
            ns.unlink(missing_ok=True)


def _pod_cgroups() -> list[Path]:
    """The kubepods cgroups of every hierarchy, children before parents."""
    found: list[Path] = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        top = hierarchy / "kubepods"
        if top.is_dir():
            found += sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            found.append(top)
    return found


def _kill_pods() -> None:
    """SIGKILL every process left in a kubepods cgroup (the containers of this node)."""
    for _ in range(20):
        pids = set()
        for cgroup in _pod_cgroups():
            procs = cgroup / "cgroup.procs"
            if procs.exists():
                pids |= {int(p) for p in procs.read_text().split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)
    log("some pod processes did not die")


def _remove_cgroups() -> None:
    for cgroup in _pod_cgroups():
        try:
            cgroup.rmdir()
        except OSError as e:
            log(f"could not remove cgroup {cgroup}: {e}")


def _shim_pids() -> list[int]:
    """containerd-shim processes of our containerd (they outlive it by design)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and str(SOCKET).encode() in cmdline:
            found.append(int(proc.name))
    return found


def _delete_bridge() -> None:
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        _ip("link", "delete", BRIDGE, check=False)


def restore_host() -> None:
    """Undo what a node (running or killed) changed on this machine. Safe to repeat."""
    _kill_pods()
    for pid in _shim_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if (NODE_BIN / "kube-proxy").exists():
        subprocess.run([str(NODE_BIN / "kube-proxy"), "--cleanup"], capture_output=True)
    _remove_chains()
    _unmount_ours()
    _remove_cgroups()
    _delete_bridge()
    _restore_sysctls()
    for state in ("containerd", "kubelet", "etcd", "pod-logs", "cni-ipam", "cni"):
        shutil.rmtree(NODE / state, ignore_errors=True)
    if CNI_RESULTS.is_dir():
        for result in CNI_RESULTS.glob("kro-*"):
            result.unlink(missing_ok=True)


# --------------------------------------------------------------------------- configuration


def _write_pki() -> None:
    ensure_ca(PKI)
    sans = [f"IP:{ip}" for ip in (GATEWAY, KUBERNETES_SERVICE_IP, "127.0.0.1")]
    sans += [
        f"DNS:{n}"
        for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
    ]
    sans.append("DNS:kubernetes.default.svc.cluster.local")
    issue_cert(PKI, "serving", "/CN=kube-apiserver", "subjectAltName=" + ",".join(sans))
    # The API server's client certificate towards the kubelet (logs, exec).
    issue_cert(
        PKI,
        "kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "extendedKeyUsage=clientAuth",
    )
    (PKI / "tokens.csv").write_text(f'{admin_token()},kro-admin,uid-admin,"system:masters"\n')
    write_kubeconfig(KUBECONFIG, admin_token(), "kro-admin", server=api_url(), ca=PKI / "ca.crt")


def _write_containerd_config() -> Path:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    config = f"""version = 2
root = "{CACHE / "containerd"}"
state = "{NODE / "containerd"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{SOCKET}"

[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  # This machine's bounding set lacks CAP_SYS_RESOURCE: runc could not lower oom_score_adj.
  restrict_oom_score_adj = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{NODE / "cni"}"
"""
    path = NODE / "containerd.toml"
    path.write_text(config)
    cni = NODE / "cni"
    cni.mkdir(parents=True, exist_ok=True)
    (cni / "10-kro.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "kro",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(NODE / "cni-ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                ],
            },
            indent=2,
        )
    )
    return path


def _write_kubelet_config() -> Path:
    # No DNS server for pods: a name lookup fails at once instead of leaving the machine.
    resolv = NODE / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    config = {
        "kind": "KubeletConfiguration",
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "address": GATEWAY,
        "port": PORTS.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": PORTS.kubelet_healthz,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(PKI / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{SOCKET}",
        "resolvConf": str(resolv),
        "clusterDomain": "cluster.local",
        "podLogsDir": str(NODE / "pod-logs"),
        # A busy shared machine: evict nothing, collect no image.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "5s",
    }
    path = NODE / "kubelet.json"
    path.write_text(json.dumps(config, indent=2))
    return path


# --------------------------------------------------------------------------- servers


def _client_flags(port: int) -> list[str]:
    return [
        f"--kubeconfig={KUBECONFIG}",
        f"--authentication-kubeconfig={KUBECONFIG}",
        f"--authorization-kubeconfig={KUBECONFIG}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        "--leader-elect=false",
    ]


def containerd_ready() -> bool:
    return subprocess.run([*ctr(), "version"], capture_output=True).returncode == 0


def node_ready() -> bool:
    status, body = _https_get(
        f"{api_url()}/api/v1/nodes/{NODE_NAME}", admin_token(), ca=PKI / "ca.crt"
    )
    if status != 200:
        return False
    conditions = json.loads(body).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _forget_old_containers() -> None:
    """A killed run leaves containers in containerd's metadata; remove them (and restart
    containerd, whose CRI plugin read them at start) so the kubelet starts clean."""
    listing = subprocess.run([*ctr(), "containers", "ls", "-q"], capture_output=True, text=True)
    ids = listing.stdout.split()
    if not ids:
        return
    log(f"removing {len(ids)} containers left by an earlier node")
    for cid in ids:
        subprocess.run([*ctr(), "tasks", "rm", "-f", cid], capture_output=True)
        subprocess.run([*ctr(), "containers", "rm", cid], capture_output=True)
    CONTAINERD.stop()
    _start_containerd()


def _start_containerd() -> None:
    config = NODE / "containerd.toml"
    CONTAINERD.bring_up(
        lambda: CONTAINERD.start(["containerd", f"--config={config}"]), containerd_ready, 60
    )


def running() -> bool:
    return all(s.pid() is not None for s in SERVERS)


def up() -> None:
    """Start the node unless it runs; wait until it is Ready with the pause image."""
    ensure_packages()
    ensure_binaries()
    NODE.mkdir(parents=True, exist_ok=True)
    with cache_lock("node"):
        if running() and node_ready():
            ensure_bridge()
            return
        timed("local node up", _start)


def _start() -> None:
    for server in reversed(SERVERS):
        server.stop()
    restore_host()  # whatever a killed node left
    _save_sysctls()
    ensure_bridge()
    _write_pki()
    _write_containerd_config()
    kubelet_config = _write_kubelet_config()
    _start_containerd()
    _forget_old_containers()
    images.ensure_in_containerd(ctr(), images.PAUSE_IMAGE)

    ETCD.bring_up(lambda: ETCD.start(etcd_command(NODE / "etcd", PORTS.etcd)), _etcd_ready, 60)
    apiserver = apiserver_command(PORTS.etcd, GATEWAY, PORTS.apiserver, PKI)
    apiserver += [
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        f"--kubelet-client-certificate={PKI / 'kubelet-client.crt'}",
        f"--kubelet-client-key={PKI / 'kubelet-client.key'}",
    ]
    APISERVER.bring_up(lambda: APISERVER.start(apiserver), _apiserver_ready, 120)
    kcm = kcm_command(KUBECONFIG, PORTS.controller_manager, PKI, "*")
    KCM.bring_up(lambda: KCM.start(kcm), lambda: _healthz(PORTS.controller_manager), 180)
    scheduler = [str(NODE_BIN / "kube-scheduler"), *_client_flags(PORTS.scheduler)]
    SCHEDULER.bring_up(lambda: SCHEDULER.start(scheduler), lambda: _healthz(PORTS.scheduler), 120)
    kubelet = [
        str(NODE_BIN / "kubelet"),
        f"--config={kubelet_config}",
        f"--kubeconfig={KUBECONFIG}",
        f"--root-dir={NODE / 'kubelet'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={GATEWAY}",
        "--v=1",
    ]
    KUBELET.bring_up(lambda: KUBELET.start(kubelet), node_ready, 120)
    # kube-proxy after the kubelet: it waits for its Node to exist.
    proxy = [
        str(NODE_BIN / "kube-proxy"),
        f"--kubeconfig={KUBECONFIG}",
        "--proxy-mode=iptables",
        f"--hostname-override={NODE_NAME}",
        f"--cluster-cidr={POD_CIDR}",
        f"--healthz-bind-address=127.0.0.1:{PORTS.proxy_healthz}",
        f"--metrics-bind-address=127.0.0.1:{PORTS.proxy_metrics}",
        # Leave the host's conntrack settings alone.
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0s",
        "--conntrack-tcp-timeout-close-wait=0s",
        "--v=1",
    ]
    PROXY.bring_up(lambda: PROXY.start(proxy), _proxy_ready, 120)


def _etcd_ready() -> bool:
    return etcd_ready(PORTS.etcd)


def _apiserver_ready() -> bool:
    return apiserver_ready(api_url(), admin_token(), PKI / "ca.crt")


def _healthz(port: int) -> bool:
    return healthz_ready(port, admin_token())


def _proxy_ready() -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{PORTS.proxy_healthz}/healthz", timeout=2):
        return True


def down() -> None:
    """Stop the node and restore the host (see the module docstring), once no test session
    uses it (they hold `users.lock` shared, see `in_use`)."""
    if not NODE.exists():
        return
    with cache_lock("node-users", holder="test sessions using the node"), cache_lock("node"):
        KUBELET.stop()  # first: nothing restarts the containers killed next
        _kill_pods()
        for server in reversed(SERVERS):
            server.stop()
        restore_host()


def in_use() -> contextlib.AbstractContextManager[None]:
    """Held by a test session that uses the node: `down` (another checkout's, say) waits."""
    return cache_lock("node-users", shared=True, holder="`make down` of the node")


def status() -> list[tuple[str, int | None]]:
    return [(f"node {s.name}", s.pid()) for s in SERVERS]


def env_vars() -> dict[str, str]:
    return {"KRO_NODE_KUBECONFIG": str(KUBECONFIG)}
