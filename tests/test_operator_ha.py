"""Two operator replicas with leader election, on the real API server and Kafka, at the
chart's Lease settings.

- kill -9 of the leader while pipelines are being created and changed: the standby takes the
  Lease within its duration and finishes the work; no child is duplicated or left behind, and
  no pipeline's status goes backwards or flaps (watched event by event throughout).
- A leader frozen (SIGSTOP) past its renew deadline loses the Lease to the standby, and when it
  wakes up (SIGCONT) it exits at once instead of reconciling beside the new leader.
"""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name
from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import CHART
from operator_support import (
    Kubectl,
    OperatorProcess,
    StatusRecorder,
    apply,
    pipeline,
    podrunner,
    release_pipelines,
    wait_condition,
    wait_for,
)

# What the chart deploys (values.yaml), so the takeover is measured at the deployed settings.
ELECTION = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["leaderElection"]
LEASE_S = ELECTION["leaseDurationSeconds"]
RETRY_S = ELECTION["retryPeriodSeconds"]


def election_args(lease: str, namespace: str, identity: str) -> list[str]:
    return [
        f"--leader-election-lease={lease}",
        f"--leader-election-namespace={namespace}",
        f"--leader-election-identity={identity}",
        f"--lease-duration-seconds={ELECTION['leaseDurationSeconds']}",
        f"--renew-deadline-seconds={ELECTION['renewDeadlineSeconds']}",
        f"--retry-period-seconds={ELECTION['retryPeriodSeconds']}",
    ]


def lease_spec(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    proc = kubectl("get", "lease", name, "-n", namespace, "-o", "json", check=False)
    return dict(json.loads(proc.stdout)["spec"]) if proc.returncode == 0 else {}


@pytest.fixture
def candidates(
    crds: None, kubeconfig: str, kubectl: Kubectl, namespace: str, tmp_path: Path, unique: str
) -> Iterator[Callable[..., OperatorProcess]]:
    """Make operator replicas (not started) that elect a leader on one Lease."""
    made: list[OperatorProcess] = []

    def make(identity: str, *extra: str) -> OperatorProcess:
        args = [*election_args(f"kro-{unique}", namespace, identity), *extra]
        op = OperatorProcess(
            kubeconfig, [namespace], tmp_path / f"operator-{identity}.log", args=args
        )
        made.append(op)
        return op

    yield make
    for op in made:  # thaw a frozen one, so that it can be stopped
        if op.proc is not None and op.proc.poll() is None:
            op.kill(signal.SIGCONT)
    live = [op for op in made if op.proc is not None and op.proc.poll() is None]
    if live:
        release_pipelines(kubectl, namespace)
    for op in made:
        op.stop()


def _holder(kubectl: Kubectl, namespace: str, unique: str) -> str:
    return str(lease_spec(kubectl, namespace, f"kro-{unique}").get("holderIdentity") or "")


def _children(kubectl: Kubectl, namespace: str) -> tuple[dict[str, list[str]], list[str]]:
    """Tier Deployments by pipeline (with the uid of their one controller), and ConfigMaps."""
    deployments = json.loads(kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)[
        "items"
    ]
    by_pipeline: dict[str, list[str]] = {}
    for d in deployments:
        (owner,) = [o for o in d["metadata"]["ownerReferences"] if o.get("controller")]
        by_pipeline.setdefault(owner["name"], []).append(d["metadata"]["name"])
    configmaps = kubectl(
        "get", "configmaps", "-n", namespace, "-o", "name",
        "-l", "app.kubernetes.io/component=topology",
    ).stdout.split()  # fmt: skip
    return {k: sorted(v) for k, v in by_pipeline.items()}, sorted(configmaps)


def test_standby_takes_over_from_a_killed_leader_and_a_frozen_one(
    candidates: Callable[..., OperatorProcess],
    podrunner: Any,
    k8s_api: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    a, b = candidates("op-a"), candidates("op-b")
    a.start()
    wait_for(lambda: _holder(kubectl, namespace, unique) == "op-a", 30, "op-a leads")
    b.start()
    wait_for(lambda: "standby; op-a holds the Lease" in b.log(), 30, "op-b stands by")

    def make(i: int, **spec: Any) -> dict[str, Any]:
        doc = pipeline(f"p{i}", kafka_bootstrap, make_topic(f"src{i}"), f"g{i}-{unique}", **spec)
        doc["spec"]["workers"] = {"replicas": 0}  # the work here is the control plane's
        doc["spec"]["topics"]["deletionPolicy"] = "Delete"  # the teardown's finalizers clean up
        return doc

    docs = [make(i) for i in range(3)]
    for doc in docs:
        apply(kubectl, namespace, doc)
    for doc in docs:
        wait_condition(kubectl, namespace, doc["metadata"]["name"], timeout=90)
    assert "leads" not in b.log(), "the standby reconciled while op-a led"

    with StatusRecorder(k8s_api, namespace) as recorder:
        # Changes in flight when the leader dies: a tier added, a tier removed, a delay changed
        # and a new pipeline.
        docs[0]["spec"]["tiers"].append({"name": "retry-3", "delaySeconds": 3})
        docs[1]["spec"]["tiers"] = docs[1]["spec"]["tiers"][:1]
        docs[2]["spec"]["tiers"][0]["delaySeconds"] = 5
        docs.append(make(3))
        for doc in docs:
            apply(kubectl, namespace, doc)
        a.kill()
        killed = time.monotonic()
        wait_for(lambda: _holder(kubectl, namespace, unique) == "op-b", LEASE_S + 10, "takeover")
        takeover = time.monotonic() - killed
        assert takeover <= LEASE_S + RETRY_S + 1, f"took {takeover:.1f}s (lease {LEASE_S}s)"
        for doc in docs:
            wait_condition(kubectl, namespace, doc["metadata"]["name"], timeout=90)
        # p1's removed tier drains (its worker is removed once empty), still watched.
        wait_for(
            lambda: not any("-drain-" in n for ns in _children(kubectl, namespace)[0].values()
                            for n in ns),
            60, "the removed tier's drain finished",
        )  # fmt: skip
        time.sleep(3)  # a few status refreshes (1 s apart here) more, still watched
    print(f"takeover after kill -9: {takeover:.1f}s (lease duration {LEASE_S}s)")

    assert recorder.events and recorder.watched_throughout, f"watch failed: {recorder.error}"
    assert not recorder.flaps(), recorder.flaps()
    deployments, configmaps = _children(kubectl, namespace)
    assert deployments == {
        doc["metadata"]["name"]: sorted(
            f"{doc['metadata']['name']}-{t['name']}" for t in doc["spec"]["tiers"]
        )
        for doc in docs
    }
    assert len(configmaps) == len(docs), configmaps
    spec = lease_spec(kubectl, namespace, f"kro-{unique}")
    assert spec["leaseTransitions"] == 1, spec

    # A frozen leader: op-b stops (SIGSTOP) past its renew deadline; a new op-a takes over;
    # op-b, thawed, finds its deadline passed and exits before doing anything else.
    a2 = candidates("op-a2", "--log-format=json").start()
    wait_for(lambda: "standby; op-b holds the Lease" in a2.log(), 30, "op-a2 stands by")
    b.kill(signal.SIGSTOP)
    wait_for(lambda: _holder(kubectl, namespace, unique) == "op-a2", LEASE_S + 10, "takeover")
    b.kill(signal.SIGCONT)
    assert b.proc is not None
    assert b.proc.wait(timeout=10) == 1
    assert "lost the Lease" in b.log(), b.log()[-2000:]
    docs[3]["spec"]["tiers"][0]["delaySeconds"] = 7
    apply(kubectl, namespace, docs[3])
    wait_condition(kubectl, namespace, "p3", timeout=90)

    # Log lines carry a time and a level: text by default, JSON objects with --log-format=json.
    text_line = re.compile(
        r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] \S+ +\[(DEBUG|INFO|WARNING|ERROR|CRITICAL) *\] "
    )
    lines = [line for line in b.log().splitlines() if line.startswith("[")]
    assert lines and all(text_line.match(line) for line in lines), lines[:5]
    objects = [json.loads(line) for line in a2.log().splitlines() if line.startswith("{")]
    assert any("leads" in o["message"] for o in objects), objects[:5]
    assert all(o["timestamp"] and o["severity"] for o in objects)


def test_replay_lock_holds_across_a_leader_handover(
    candidates: Callable[..., OperatorProcess],
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Callable[..., str],
    unique: str,
) -> None:
    """A DLQReplay running on the leader when it is killed (-9) is finished by the new leader:
    every DLQ event replayed exactly once, and the replay lease (status.replayLease) never held
    by the new leader before the dead one's had expired."""
    from datetime import datetime

    from dlq_support import fill_dlq, replayed_records, source_of

    a, b = candidates("op-a"), candidates("op-b")
    a.start()
    wait_for(lambda: _holder(kubectl, namespace, unique) == "op-a", 30, "op-a leads")
    b.start()
    source = make_topic("orders", partitions=3)
    group = f"svc-{unique}"
    doc = pipeline(
        "orders", kafka_bootstrap, source, group, topics={"partitions": 3,
        "deletionPolicy": "Delete"}, handler={"http": {"url": "http://127.0.0.1:9/unused"}},
    )  # fmt: skip
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", "TopicsReady", timeout=60)
    count = 400
    fill_dlq(kafka_bootstrap, f"{group}.{source}.dlq", count)
    replay = {"apiVersion": "kafkaretry.io/v1alpha1", "kind": "DLQReplay",
              "metadata": {"name": "handover"},
              "spec": {"pipeline": "orders", "maxMessagesPerSecond": 25}}  # fmt: skip
    apply(kubectl, namespace, replay)

    leases: list[dict[str, Any]] = []

    def status() -> dict[str, Any]:
        rp = json.loads(kubectl("get", "rp", "orders", "-n", namespace, "-o", "json").stdout)
        lease = (rp.get("status") or {}).get("replayLease")
        if lease and (not leases or leases[-1] != lease):
            leases.append(lease)
        got = kubectl("get", "dlqreplay", "handover", "-n", namespace, "-o", "json").stdout
        return dict(json.loads(got).get("status") or {})

    wait_for(lambda: status().get("replayed", 0) >= 60, 60, "60 replayed")
    a.kill()
    done = wait_for(lambda: (s := status()).get("phase") == "Succeeded" and s, 120, "Succeeded",
                    every=0.5)  # fmt: skip
    assert _holder(kubectl, namespace, unique) == "op-b"
    assert done["replayed"] == count
    records = replayed_records(
        kafka_bootstrap, f"{group}.{source}.retry-1", done["replayId"], expect=count
    )
    sources = [source_of(r) for r in records]
    assert len(sources) == count == len(set(sources)), "an event replayed twice or lost"

    holders = [lease["holder"] for lease in leases]
    assert len(set(holders)) == 2, f"one holder per operator expected: {leases}"
    first = next(lease for lease in leases if lease["holder"] == holders[0])
    last_of_first = [lease for lease in leases if lease["holder"] == holders[0]][-1]
    second = next(lease for lease in leases if lease["holder"] != holders[0])
    expiry = datetime.fromisoformat(last_of_first["renewTime"]).timestamp() + int(
        first["leaseDurationSeconds"]
    )
    taken = datetime.fromisoformat(second["acquireTime"]).timestamp()
    assert taken >= expiry - 1, f"the lease was taken before it expired: {leases}"
