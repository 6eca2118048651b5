"""The local node (hack/node.py): one Ready node whose kubelet runs containers, and a `down`
that gives the host back as it was."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import images
import localenv
import node
from conftest import NODE_IN_USE


def test_one_node_is_ready_on_the_bridge(node_kubectl: Any) -> None:
    nodes = json.loads(node_kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [node.NODE_NAME]
    status = nodes[0]["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True", conditions
    addresses = {a["type"]: a["address"] for a in status["addresses"]}
    assert addresses["InternalIP"] == node.GATEWAY
    assert status["nodeInfo"]["kubeletVersion"] == localenv.KUBE_VERSION
    assert status["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def _host_state() -> dict[str, Any]:
    chains = []
    for binary in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            out = subprocess.run(
                [binary, "-w", "5", "-t", table, "-S"], capture_output=True, text=True
            ).stdout
            chains += [
                f"{binary}/{table}/{line.split()[1]}"
                for line in out.splitlines()
                if line.startswith("-N") and line.split()[1].startswith(node.OUR_CHAINS)
            ]
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith((f"{node.NODE}/", "/run/netns/cni-"))
    ]
    return {
        "bridge": node.bridge_exists(),
        "chains": sorted(chains),
        "mounts": mounts,
        "cgroups": [str(p) for p in node._pod_cgroups()],
        "sysctls": {
            name: Path("/proc/sys", name).read_text().strip()
            for name in node.SYSCTLS
            if Path("/proc/sys", name).exists()
        },
    }


def test_down_restores_the_host_and_up_brings_the_node_back(
    node_kubectl: Any, node_namespace: str, image: str, request: pytest.FixtureRequest
) -> None:
    # A running pod first, so that there are mounts, cgroups and a network namespace to undo.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper", "namespace": node_namespace},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "sleeper",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", "import time; time.sleep(3600)"],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    node_kubectl("apply", "-f", "-", input=json.dumps(pod))
    node_kubectl("wait", "pod/sleeper", "-n", node_namespace, "--for=condition=Ready")
    saved = json.loads(node.SYSCTLS_SAVED.read_text())
    running = _host_state()
    assert running["bridge"] and running["mounts"] and running["cgroups"], running
    assert {"iptables/filter/KUBE-FIREWALL", "iptables/nat/KUBE-SERVICES"} <= set(
        running["chains"]
    ), running["chains"]
    changed = {k for k, v in running["sysctls"].items() if saved.get(k) != v}
    assert "vm/overcommit_memory" in changed or saved["vm/overcommit_memory"] == "1", changed

    using = request.session.stash[NODE_IN_USE]
    using.__exit__(None, None, None)  # `down` waits for other sessions, not for this one
    node.down()
    try:
        after = _host_state()
        assert after == {
            "bridge": False,
            "chains": [],
            "mounts": [],
            "cgroups": [],
            "sysctls": saved,
        }
        assert not node.SYSCTLS_SAVED.exists()
        assert all(s.pid() is None for s in node.SERVERS)
    finally:
        localenv.up()  # the node again, for the tests after this one
        request.session.stash[NODE_IN_USE] = using = node.in_use()
        using.__enter__()
    assert node.running() and node.node_ready()
    # Images stay cached across a restart: nothing is rebuilt or imported again.
    assert images.containerd_has(node.ctr(), image)
