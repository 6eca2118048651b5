"""The managed live lane (`spec.liveLane`) end to end: the operator (a subprocess) runs the live
lane as a Deployment beside the tier workers, all run by hack/podrunner.py as real
`kafka-retry worker` processes on the real broker, in front of a service that only answers
HTTP (no SDK anywhere)."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import go_example
from dataplane_support import produce, produce_ids
from http_service_support import RecordingService, serving
from kafka_retry.http_handler import KEY
from operator_support import (
    ROOT,
    Kubectl,
    OperatorProcess,
    apply,
    cleanup_topics,
    condition,
    free_port,
    get,
    operator,
    pipeline,
    podrunner,
    shown,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.e2e

N = 5  # events of each kind


@dataclass
class Service(RecordingService):
    """Keys `ok-*` succeed; `flaky-*` answer 503 before attempt 3 (the live lane's attempt 1
    and retry-1's fail, retry-2's succeeds); `dead-*` answer 422 (non-retriable) until
    `fixed`."""

    fixed: bool = False

    def status(self, key: str, attempt: int) -> int:
        if key.startswith("flaky-"):
            return 200 if attempt >= 3 else 503
        if key.startswith("dead-"):
            return 200 if self.fixed else 422
        return 200


@pytest.fixture
def service() -> Iterator[Service]:
    with serving(Service()) as svc:
        yield svc


def _status(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    return dict((get(kubectl, namespace, "rp", "orders") or {}).get("status") or {})


def _deployments(kubectl: Kubectl, namespace: str) -> dict[str, dict[str, Any]]:
    found = json.loads(kubectl("get", "deployments", "-n", namespace, "-o", "json").stdout)
    return {d["metadata"]["name"]: d for d in found["items"]}


def _replay_after_fix(kubectl: Kubectl, namespace: str) -> None:
    """A DLQReplay of the pipeline's whole DLQ, run to Succeeded."""
    apply(kubectl, namespace, {
        "apiVersion": "kafkaretry.io/v1alpha1", "kind": "DLQReplay",
        "metadata": {"name": "after-fix"}, "spec": {"pipeline": "orders"},
    })  # fmt: skip

    def succeeded() -> bool:
        replay = get(kubectl, namespace, "dlqreplay", "after-fix") or {}
        return bool((replay.get("status") or {}).get("phase") == "Succeeded")

    wait_for(succeeded, 60, "the replay Succeeded")


def test_managed_live_lane_handles_retries_dead_letters_and_replays(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
    service: Service,
) -> None:
    source = make_topic("orders")
    group = f"svc-{unique}"
    prefix = f"{group}.{source}"
    cleanup_topics.extend(f"{prefix}.{t}" for t in ("retry-1", "retry-2", "dlq"))
    doc = pipeline(
        "orders", kafka_bootstrap, source, group,
        handler={"http": {"url": service.url, "timeoutSeconds": 5}},
        workers={"replicas": 1, "resources": {"limits": {"memory": "256Mi"}}},
        liveLane={},
    )  # fmt: skip
    apply(kubectl, namespace, doc)
    rp = wait_condition(kubectl, namespace, "orders", timeout=120)

    # The live lane is a Deployment like the tiers': same pod settings, its own role.
    deployments = _deployments(kubectl, namespace)
    assert sorted(deployments) == ["orders-live-lane", "orders-retry-1", "orders-retry-2"]
    live = deployments["orders-live-lane"]
    tier = deployments["orders-retry-1"]
    assert live["metadata"]["ownerReferences"][0]["uid"] == rp["metadata"]["uid"]
    live_pod, tier_pod = live["spec"]["template"]["spec"], tier["spec"]["template"]["spec"]
    assert live_pod["containers"][0]["args"] == [
        "--live", "--topology-file", "/etc/kafka-retry/topology.json"
    ]  # fmt: skip
    for key in ("securityContext", "resources", "image", "command", "volumeMounts"):
        assert live_pod["containers"][0][key] == tier_pod["containers"][0][key], key
    assert live_pod["securityContext"] == tier_pod["securityContext"]
    assert live["spec"]["replicas"] == tier["spec"]["replicas"] == 1
    status = rp["status"]
    assert status["liveLane"]["topic"] == source
    assert status["liveLane"]["consumerGroup"] == group
    assert status["liveLane"]["readyReplicas"] == 1
    assert "tiers and live lane" in condition(rp, "WorkersReady")["message"]

    ok, flaky, dead = ([f"{kind}-{i}" for i in range(N)] for kind in ("ok", "flaky", "dead"))
    produce_ids(kafka_bootstrap, source, ok + flaky + dead)

    def settled() -> bool:
        s = _status(kubectl, namespace)
        return (
            service.handled() >= set(ok + flaky)
            and (s.get("dlq") or {}).get("depth") == N
            and (s.get("liveLane") or {}).get("lag") == 0
        )

    wait_for(settled, 120, "ok and flaky handled, dead in the DLQ, the source consumed", every=1)
    calls = service.snapshot()
    # The live lane called the service first, for every event, as the SDK would.
    first = {c.key: c for c in reversed(calls)}
    assert {k: c.tier for k, c in first.items()} == dict.fromkeys(ok + flaky + dead, "source")
    assert all(c.attempt == 1 for c in first.values())
    # flaky: retried on retry-1 then retry-2, each no sooner than its delay; none early.
    for key in flaky:
        tiers = [(c.tier, c.attempt, c.status) for c in calls if c.key == key]
        assert tiers == [("source", 1, 503), ("retry-1", 2, 503), ("retry-2", 3, 200)], tiers
    early = [c for c in calls if c.due_ms is not None and c.at_ms < c.due_ms]
    assert not early, early
    for key in flaky:
        live_at, r1, r2 = (c for c in calls if c.key == key)
        assert r1.at_ms - live_at.at_ms >= 1000 and r2.at_ms - r1.at_ms >= 2000, (live_at, r1, r2)
    # dead: non-retriable, so straight to the DLQ: called once, on the live lane.
    assert sorted(c.key for c in calls if c.key.startswith("dead-")) == sorted(dead)

    # The service is fixed; the DLQ is replayed into the first tier and handled there.
    service.fixed = True
    _replay_after_fix(kubectl, namespace)
    wait_for(lambda: service.handled() >= set(dead), 60, "the replayed events handled")
    wait_for(
        lambda: (_status(kubectl, namespace).get("dlq") or {}).get("depth") == 0,
        30,
        "an empty DLQ",
    )
    replayed = [c for c in service.snapshot() if c.key in dead and c.status == 200]
    assert {c.tier for c in replayed} == {"retry-1"}
    # Lost 0: every event produced was handled, each once.
    succeeded = [c.key for c in service.snapshot() if c.status == 200]
    assert sorted(succeeded) == sorted(ok + flaky + dead)

    # Deleted by hand, the live lane's Deployment comes back, as a tier's does.
    uid = _deployments(kubectl, namespace)["orders-live-lane"]["metadata"]["uid"]
    kubectl("delete", "deployment", "orders-live-lane", "-n", namespace)
    wait_for(
        lambda: (
            (d := _deployments(kubectl, namespace).get("orders-live-lane"))
            and d["metadata"]["uid"] != uid
        ),
        30,
        "the live lane's Deployment recreated",
    )

    # Without liveLane, the service consumes the source itself again: the Deployment goes.
    del doc["spec"]["liveLane"]
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=60)
    wait_for(
        lambda: "orders-live-lane" not in _deployments(kubectl, namespace),
        30,
        "the live lane's Deployment removed",
    )
    wait_for(lambda: "liveLane" not in _status(kubectl, namespace), 30, "status.liveLane removed")
    assert (
        "tiers and live lane"
        not in condition(get(kubectl, namespace, "rp", "orders"), "WorkersReady")["message"]
    )


# --------------------------------------------------------------------------- the Go example


@dataclass
class GoService:
    url: str
    token: str
    flags: Path
    log: Path

    def answers(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]

    def handled(self) -> set[str]:
        return {a["order"] for a in self.answers() if a["status"] == 200}


@pytest.fixture
def go_service(tmp_path: Path) -> Iterator[GoService]:
    binary = go_example.binary()
    port = free_port()
    svc = GoService(
        f"http://127.0.0.1:{port}/orders", "t0ken-" + os.urandom(8).hex(),
        tmp_path / "flags.json", tmp_path / "go-service.log",
    )  # fmt: skip
    env = {**os.environ, "ORDER_SERVICE_TOKEN": svc.token, "ORDER_SERVICE_FLAGS": str(svc.flags)}
    with svc.log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "-addr", f"127.0.0.1:{port}"], env=env, stdout=out,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        health = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: _get_status(health) == 200, 10, "the Go service listening")
        yield svc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _get_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _order(order_id: str, bank: str, coupon: str | None = None) -> dict[str, Any]:
    items = [{"sku": "kettle", "qty": 1, "unit_cents": 3999}]
    return {"id": order_id, "items": items, "coupon": coupon, "bank": bank}


def test_a_go_service_behind_the_managed_live_lane(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
    go_service: GoService,
) -> None:
    """examples/go_order_service (no SDK, stdlib Go) behind `liveLane` with a shared secret:
    its 503s are retried on the tiers after their delays, its 500s marked non-retriable go to
    the DLQ at once and are replayed after the fix, and nothing is lost."""
    source = make_topic("orders")
    group = f"go-{unique}"
    prefix = f"{group}.{source}"
    cleanup_topics.extend(f"{prefix}.{t}" for t in ("retry-1", "retry-2", "dlq"))
    kubectl("create", "secret", "generic", "order-service-token", "-n", namespace,
            f"--from-literal=token={go_service.token}")  # fmt: skip
    doc = pipeline(
        "orders", kafka_bootstrap, source, group, liveLane={},
        handler={"http": {"url": go_service.url, "timeoutSeconds": 5,
                          "secretRef": {"name": "order-service-token", "key": "token"}}},
    )  # fmt: skip
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", timeout=120)
    # Only the pipeline's workers are served: another caller is refused.
    body = json.dumps(_order("intruder", "contoso")).encode()
    assert _get_status(go_service.url, body) == 401
    assert _get_status(go_service.url, body, {"Authorization": "Bearer guess"}) == 401

    orders = (
        [_order(f"ok-{i}", "contoso", "SAVE10") for i in range(3)]
        + [_order(f"northwind-{i}", "northwind") for i in range(2)]  # fails attempt 1
        + [_order(f"fabrikam-{i}", "fabrikam") for i in range(2)]  # fails attempts 1 and 2
        + [_order(f"bug-{i}", "contoso", "SAVE15%") for i in range(2)]  # the pricing bug
    )
    ids = [o["id"] for o in orders]
    produce(
        kafka_bootstrap, source,
        ((o["id"].encode(), json.dumps(o).encode(), []) for o in orders),
    )  # fmt: skip
    bugs = {i for i in ids if i.startswith("bug-")}

    def settled() -> bool:
        depth = (_status(kubectl, namespace).get("dlq") or {}).get("depth")
        return go_service.handled() >= set(ids) - bugs and depth == len(bugs)

    wait_for(settled, 120, "orders handled but the bugs, which wait in the DLQ", every=1)
    answers = go_service.answers()
    refused = [a for a in answers if a["status"] == 401]
    assert [a["tier"] for a in refused] == ["", ""], "only the intruder refused: workers sent it"
    path = {i: [(a["tier"], a["attempt"], a["status"]) for a in answers if a["order"] == i]
            for i in ids}  # fmt: skip
    for i in ids:
        if i.startswith("ok-"):
            assert path[i] == [("source", 1, 200)], path[i]
        elif i.startswith("northwind-"):
            assert path[i] == [("source", 1, 503), ("retry-1", 2, 200)], path[i]
        elif i.startswith("fabrikam-"):
            assert path[i] == [("source", 1, 503), ("retry-1", 2, 503), ("retry-2", 3, 200)]
        else:  # a 500 is retriable by default: the service's header sent it to the DLQ at once
            assert path[i] == [("source", 1, 500)], path[i]
    early = [a for a in answers if a.get("dueMs") and a["atMs"] < a["dueMs"]]
    assert not early, early

    # Fixed (the flag), then the DLQ replayed: the bugs go through on the first tier.
    go_service.flags.write_text(json.dumps({"couponPercentFix": True}))
    _replay_after_fix(kubectl, namespace)
    wait_for(lambda: go_service.handled() >= set(ids), 60, "the replayed orders handled")
    wait_for(
        lambda: (_status(kubectl, namespace).get("dlq") or {}).get("depth") == 0, 30, "empty DLQ"
    )
    answers = go_service.answers()
    assert {
        (a["tier"], a["status"]) for a in answers if a["order"] in bugs and a["attempt"] > 1
    } == {("retry-1", 200)}
    # Lost 0, each order charged once.
    assert sorted(a["order"] for a in answers if a["status"] == 200) == sorted(ids)


# --------------------------------------------------------------------------- a rotated token


@dataclass
class TokenService(RecordingService):
    """Answers 200 to callers presenting one of `tokens`, 401 to others; records the token
    each call presented (a service mid-rotation accepts the old and the new)."""

    tokens: tuple[str, ...] = ()
    presented: list[tuple[str, str]] = field(default_factory=list)  # (key, token)

    def status(self, key: str, attempt: int) -> int:
        return 200

    def answer(self, headers: Any) -> int:
        token = (headers.get("Authorization") or "").removeprefix("Bearer ")
        with self.lock:
            self.presented.append((headers.get(KEY, ""), token))
        return super().answer(headers) if token in self.tokens else 401


def test_a_rotated_http_secret_rolls_the_workers(
    operator: OperatorProcess,
    podrunner: Any,
    kubectl: Kubectl,
    namespace: str,
    kafka_bootstrap: str,
    make_topic: Any,
    unique: str,
    cleanup_topics: list[str],
) -> None:
    """`handler.http.secretRef`'s Secret changes: the operator notices it (its metadata, with
    only `get`), writes the new version into the live lane's and the tiers' pod templates, so
    they roll and call with the new token. It never shows the token anywhere."""
    old, new = f"old-{os.urandom(6).hex()}", f"new-{os.urandom(6).hex()}"
    source = make_topic("orders")
    group = f"tok-{unique}"
    cleanup_topics.extend(f"{group}.{source}.{t}" for t in ("retry-1", "retry-2", "dlq"))
    secret = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "svc-token"},
        "stringData": {"token": old},
    }  # fmt: skip
    apply(kubectl, namespace, secret)
    with serving(TokenService(tokens=(old, new))) as svc:
        doc = pipeline(
            "orders", kafka_bootstrap, source, group, liveLane={},
            handler={"http": {"url": svc.url, "timeoutSeconds": 5,
                              "secretRef": {"name": "svc-token", "key": "token"}}},
        )  # fmt: skip
        apply(kubectl, namespace, doc)
        wait_condition(kubectl, namespace, "orders", timeout=120)
        produce_ids(kafka_bootstrap, source, ["before"])
        wait_for(lambda: "before" in svc.handled(), 60, "the first event handled")
        assert ("before", old) in svc.presented

        apply(kubectl, namespace, {**secret, "stringData": {"token": new}})
        version = (get(kubectl, namespace, "secret", "svc-token") or {})["metadata"][
            "resourceVersion"
        ]

        def rolled() -> bool:
            deployments = _deployments(kubectl, namespace)
            stamped = all(
                d["spec"]["template"]["metadata"]["annotations"].get(
                    "kafkaretry.io/http-secret-version"
                )
                == version
                for d in deployments.values()
            )
            pods = [p for p in podrunner.pods(namespace, "orders-live-lane") if p.pids]
            return stamped and len(pods) == 1 and _has_env(pods[0].pids[0], new)

        wait_for(rolled, 90, "the workers rolled with the new token", every=1)
        wait_condition(kubectl, namespace, "orders", timeout=60)
        produce_ids(kafka_bootstrap, source, ["after"])
        wait_for(lambda: "after" in svc.handled(), 60, "an event after the rotation handled")
    assert [t for k, t in svc.presented if k == "after"] == [new]
    rp = get(kubectl, namespace, "retrypipeline", "orders") or {}
    assert rp["metadata"]["annotations"]["operator.kafkaretry.io/http-secret-version"] == version
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "HttpSecretRotated" in events
    assert shown(operator, kubectl, namespace, [old, new]) == []


def _has_env(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"KAFKA_RETRY_HTTP_TOKEN={token}".encode() in environ
