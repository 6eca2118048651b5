"""DLQReplay end to end: the operator as a subprocess (`kafka-retry-operator -n <ns>`), the real
broker and API server, tier workers run by hack/podrunner.py, the CLI as users run it."""

from __future__ import annotations

import bisect
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Any

import pytest

from dlq_support import (
    BIN,
    FixedService,
    cli,
    fill_dlq,
    fixed_service,  # noqa: F401 - fixture
    replayed_records,
    source_of,
)
from kafka_retry import headers as h
from kafka_retry import replay_lease
from kafka_retry.dlq import KafkaAccess, partition_states
from operator_support import (  # noqa: F401 - fixtures
    Kubectl,
    OperatorProcess,
    apply,
    cleanup_topics,
    get,
    operator,
    pipeline,
    podrunner,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.e2e

PARTITIONS = 3


def _pipeline(
    kubectl: Kubectl, namespace: str, bootstrap: str, make_topic: Any, unique: str,
    cleanup: list[str], url: str = "http://127.0.0.1:9/unused",
) -> tuple[str, str]:  # fmt: skip
    """A pipeline `orders` with 3-partition topics; returns (dlq topic, retry-1 topic)."""
    source = make_topic("orders")
    group = f"svc-{unique}"
    prefix = f"{group}.{source}"
    cleanup.extend(f"{prefix}.{t}" for t in ("retry-1", "retry-2", "dlq"))
    doc = pipeline(
        "orders", bootstrap, source, group,
        topics={"partitions": PARTITIONS},
        handler={"http": {"url": url, "timeoutSeconds": 5}},
    )  # fmt: skip
    apply(kubectl, namespace, doc)
    wait_condition(kubectl, namespace, "orders", "TopicsReady", timeout=60)
    return f"{prefix}.dlq", f"{prefix}.retry-1"


def _replay(
    kubectl: Kubectl, namespace: str, name: str, pipeline_name: str = "orders", **spec: Any
) -> None:
    doc = {
        "apiVersion": "kafkaretry.io/v1alpha1",
        "kind": "DLQReplay",
        "metadata": {"name": name},
        "spec": {"pipeline": pipeline_name, **spec},
    }
    apply(kubectl, namespace, doc)


def _status(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return dict((get(kubectl, namespace, "dlqreplay", name) or {}).get("status") or {})


def _wait_phase(
    kubectl: Kubectl, namespace: str, name: str, phase: str, op: OperatorProcess,
    timeout: float = 60,
) -> dict[str, Any]:  # fmt: skip
    try:
        return dict(
            wait_for(
                lambda: (s := _status(kubectl, namespace, name)).get("phase") == phase and s,
                timeout,
                f"{name} {phase}",
            )
        )
    except AssertionError:
        print(op.log()[-5000:])
        raise


def _depth(bootstrap: str, dlq: str) -> int:
    return sum(s.waiting for s in partition_states(KafkaAccess(bootstrap), dlq))


def _exactly_once(records: list[Any], count: int) -> None:
    """Every DLQ event once, in DLQ order within each partition (same partition numbers)."""
    sources = [source_of(r) for r in records]
    assert len(sources) == count and len(set(sources)) == count, "an event replayed twice"
    last: dict[int, int] = defaultdict(lambda: -1)
    for r, (p, o) in zip(records, sources, strict=True):
        assert r.partition == p, "same key, same partition"
        assert o > last[p], f"partition {p} out of order"
        last[p] = o


def test_replay_of_1000_events_reaches_the_fixed_service_once_and_empties_the_dlq(
    operator: OperatorProcess, podrunner: Any, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str,
    cleanup_topics: list[str], fixed_service: FixedService,  # noqa: F811
) -> None:  # fmt: skip
    dlq, retry1 = _pipeline(
        kubectl, namespace, kafka_bootstrap, make_topic, unique, cleanup_topics,
        fixed_service.url,
    )  # fmt: skip
    fill_dlq(kafka_bootstrap, dlq, 1000)

    def rp_depth() -> int | None:
        rp = get(kubectl, namespace, "rp", "orders") or {}
        return ((rp.get("status") or {}).get("dlq") or {}).get("depth")

    wait_for(lambda: rp_depth() == 1000, 30, "status.dlq.depth == 1000")

    started = time.monotonic()
    proc = cli("dlq", "replay", "orders", "-n", namespace, "--kubeconfig", kubeconfig)
    assert proc.returncode == 0, proc.stderr + operator.log()[-3000:]
    assert "Succeeded: 1000 replayed, 0 skipped" in proc.stdout
    print(f"replay of 1000 events followed in {time.monotonic() - started:.1f}s")
    name = proc.stdout.split()[0].removeprefix("dlqreplay/")
    status = _status(kubectl, namespace, name)
    assert status["progress"] == "1000 replayed, 0 skipped of 1000" and status["total"] == 1000
    assert status["conditions"][0]["reason"] == "Replayed"
    assert status["startTime"] and status["completionTime"]

    replay_id = status["replayId"]
    records = replayed_records(kafka_bootstrap, retry1, replay_id, expect=1000)
    _exactly_once(records, 1000)
    for r in records[:50]:
        assert r.header(h.ATTEMPT) == "1" and r.header(h.TIER) == "retry-2"
        assert r.header("trace-id") == f"t{json.loads(r.value or b'')['id'][1:]}"

    # The tier worker (a real process run from the Deployment) hands them to the fixed service.
    wait_for(lambda: len(set(fixed_service.ids())) == 1000, 90, "1000 events handled")
    assert set(fixed_service.ids()) == {f"e{i}" for i in range(1000)}
    assert {c.replay_id for c in fixed_service.calls} == {replay_id}
    assert {(c.attempt, c.tier) for c in fixed_service.calls} == {(2, "retry-1")}
    wait_for(lambda: rp_depth() == 0, 30, "status.dlq.depth == 0")
    assert _depth(kafka_bootstrap, dlq) == 0

    table = kubectl("get", "dlqreplays", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PIPELINE", "PHASE", "REPLAYED", "SKIPPED", "TOTAL", "AGE"]
    assert table[1].split()[:6] == [name, "orders", "Succeeded", "1000", "0", "1000"]
    shown = cli("status", "orders", "-n", namespace, "--kubeconfig", kubeconfig)
    assert name in shown.stdout and "0 event(s) waiting" in shown.stdout, shown.stdout


def test_rate_limit_is_a_lower_bound_on_the_duration(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    dlq, retry1 = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique,
                            cleanup_topics)  # fmt: skip
    count, rate = 60, 20
    fill_dlq(kafka_bootstrap, dlq, count)
    started = time.monotonic()
    _replay(kubectl, namespace, "slow", maxMessagesPerSecond=rate)
    status = _wait_phase(kubectl, namespace, "slow", "Succeeded", operator)
    elapsed = time.monotonic() - started
    assert status["replayed"] == count
    assert elapsed >= count / rate, elapsed
    records = replayed_records(kafka_bootstrap, retry1, status["replayId"], expect=count)
    # When each was sent: the replay stamps `due-ms` as it sends (tier topics keep the
    # broker's append time, which batching may bunch up).
    stamps = sorted(int(r.header(h.DUE) or 0) for r in records)
    assert (stamps[-1] - stamps[0]) / 1000 >= (count - 1) / rate - 0.05, "paced, not a burst"
    busiest = max(bisect.bisect_left(stamps, t + 1000) - i for i, t in enumerate(stamps))
    assert busiest <= rate, f"{busiest} events in one second"


def test_a_replay_that_matches_nothing_says_so_everywhere(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    """15 events, none of the error class asked for: 0 replayed and 15 skipped, in the
    columns of `kubectl get`, an Event from the operator, and `dlq cancel` has nothing to do."""
    dlq, _ = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique, cleanup_topics)
    fill_dlq(kafka_bootstrap, dlq, 15)
    _replay(kubectl, namespace, "none", filter={"errorClasses": ["NoSuchError"]})
    status = _wait_phase(kubectl, namespace, "none", "Succeeded", operator)
    assert (status["replayed"], status["skipped"], status["total"]) == (0, 15, 15)
    assert status["progress"] == "0 replayed, 15 skipped of 15"
    table = kubectl("get", "dlqreplays", "none", "-n", namespace).stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "PIPELINE", "PHASE", "REPLAYED", "SKIPPED", "TOTAL"]
    assert table[1].split()[:6] == ["none", "orders", "Succeeded", "0", "15", "15"]

    def events() -> list[dict[str, Any]]:
        out = kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=none,involvedObject.kind=DLQReplay",
            "-o",
            "json",
        )
        return list(json.loads(out.stdout)["items"])  # fmt: skip

    posted = wait_for(events, 30, "an Event about the finished replay")
    assert [(e["type"], e["reason"]) for e in posted] == [("Normal", "Replayed")], posted
    assert posted[0]["message"] == "Succeeded: 0 replayed, 15 skipped"
    assert posted[0]["source"]["component"] == "kafka-retry-operator"

    proc = cli("dlq", "cancel", "none", "-n", namespace, "--kubeconfig", kubeconfig)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert (
        "dlqreplay/none has already ended (Succeeded, 0 replayed, 15 skipped): nothing to "
        "cancel" in proc.stderr
    )
    assert not (get(kubectl, namespace, "dlqreplay", "none") or {})["spec"].get("cancel")


def test_cancel_mid_replay_loses_nothing_and_the_next_replay_takes_the_rest(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    dlq, retry1 = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique,
                            cleanup_topics)  # fmt: skip
    count = 300
    fill_dlq(kafka_bootstrap, dlq, count)
    _replay(kubectl, namespace, "first", maxMessagesPerSecond=30)
    wait_for(lambda: _status(kubectl, namespace, "first").get("phase") == "Running", 30, "run")
    _replay(kubectl, namespace, "second")
    second = _wait_phase(kubectl, namespace, "second", "Pending", operator)
    wait_for(
        lambda: (_status(kubectl, namespace, "second").get("conditions") or [{}])[0].get("reason")
        == "WaitingForReplay", 30, "second waits for first",
    )  # fmt: skip
    wait_for(lambda: _status(kubectl, namespace, "first").get("replayed", 0) >= 30, 30, "30")

    proc = cli("dlq", "cancel", "first", "-n", namespace, "--kubeconfig", kubeconfig)
    assert proc.returncode == 0, proc.stderr
    first = _wait_phase(kubectl, namespace, "first", "Cancelled", operator)
    replayed = first["replayed"]
    assert 30 <= replayed < count and first["conditions"][0]["reason"] == "Cancelled"
    assert f"{replayed} replayed" in first["conditions"][0]["message"]
    mine = replayed_records(kafka_bootstrap, retry1, first["replayId"], expect=replayed)
    _exactly_once(mine, replayed)
    # Nothing lost: the cursor passed exactly what was replayed, the rest stayed counted.
    # (The queued replay starts at once and moves the cursor on: read what `first` recorded.)
    done = set(source_of(r) for r in mine)
    for part in first["partitions"]:
        replayed_here = {o for p, o in done if p == part["partition"]}
        assert replayed_here == set(range(part["startOffset"], part["cursorOffset"]))
        assert part["cursorOffset"] == part["nextOffset"], "no filter: the prefix is all"
    assert sum(p["endOffset"] - p["cursorOffset"] for p in first["partitions"]) == count - replayed

    # The queued replay runs now and takes exactly the rest.
    second = _wait_phase(kubectl, namespace, "second", "Succeeded", operator)
    assert second["replayed"] == count - replayed
    theirs = replayed_records(kafka_bootstrap, retry1, second["replayId"], expect=count)
    _exactly_once(theirs, count - replayed)
    assert done.isdisjoint(source_of(r) for r in theirs)
    assert _depth(kafka_bootstrap, dlq) == 0


def test_operator_restarted_or_killed_mid_replay_resumes_without_replaying_twice(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    dlq, retry1 = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique,
                            cleanup_topics)  # fmt: skip
    count = 500
    fill_dlq(kafka_bootstrap, dlq, count)
    _replay(kubectl, namespace, "crash", maxMessagesPerSecond=50)

    def replayed(at_least: int) -> bool:
        return int(_status(kubectl, namespace, "crash").get("replayed", 0)) >= at_least

    # A rolling update: SIGTERM, the replay writes a last checkpoint and stays Running.
    wait_for(lambda: replayed(50), 30, "50 replayed")
    operator.stop()
    stopped = _status(kubectl, namespace, "crash")
    assert stopped["phase"] == "Running" and 50 <= stopped["replayed"] < count
    operator.start()
    # A crash: no drain, no last checkpoint; events sent after the last one are on the tier.
    wait_for(lambda: replayed(stopped["replayed"] + 60), 60, "60 more replayed")
    assert operator.proc is not None
    os.killpg(operator.proc.pid, signal.SIGKILL)
    operator.proc.wait()
    assert _status(kubectl, namespace, "crash")["phase"] == "Running"
    operator.start()

    status = _wait_phase(kubectl, namespace, "crash", "Succeeded", operator, timeout=90)
    assert status["replayed"] == count
    records = replayed_records(kafka_bootstrap, retry1, status["replayId"], expect=count)
    _exactly_once(records, count)
    assert _depth(kafka_bootstrap, dlq) == 0


def test_missing_pipeline_and_unknown_tier_are_rejected_with_a_reason(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique, cleanup_topics)
    _replay(kubectl, namespace, "orphan", pipeline_name="no-such-pipeline")
    _replay(kubectl, namespace, "wrong-tier", targetTier="retry-9")
    orphan = _wait_phase(kubectl, namespace, "orphan", "Failed", operator)
    assert orphan["conditions"][0]["reason"] == "PipelineNotFound"
    assert "no-such-pipeline not found" in orphan["conditions"][0]["message"]

    def warned() -> list[str]:
        out = kubectl(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "involvedObject.name=orphan,reason=PipelineNotFound",
            "-o",
            "json",
        )
        return [e["type"] for e in json.loads(out.stdout)["items"]]  # fmt: skip

    assert wait_for(warned, 30, "a PipelineNotFound Event") == ["Warning"]
    wrong = _wait_phase(kubectl, namespace, "wrong-tier", "Failed", operator)
    assert wrong["conditions"][0]["reason"] == "UnknownTier"
    assert "no tier 'retry-9'" in wrong["conditions"][0]["message"]

    # The schema refuses what is not a tier name at all; the CLI checks before creating.
    bad = kubectl("apply", "-n", namespace, "-f", "-", check=False, input=json.dumps({
        "apiVersion": "kafkaretry.io/v1alpha1", "kind": "DLQReplay",
        "metadata": {"name": "bad"}, "spec": {"pipeline": "orders", "targetTier": "Retry_1"},
    }))  # fmt: skip
    assert bad.returncode != 0 and "targetTier" in bad.stderr
    # Only `cancel` changes after creation, and only one way.
    for patch, message in (
        ({"maxMessagesPerSecond": 5}, "only `cancel` can change"),
        ({"filter": {"keys": ["k1"]}}, "only `cancel` can change"),
        ({"cancel": True}, None),
        ({"cancel": False}, "cancel: cannot be undone"),
    ):
        proc = kubectl("patch", "dlqreplay", "orphan", "-n", namespace, "--type=merge",
                       "-p", json.dumps({"spec": patch}), check=False)  # fmt: skip
        if message is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    proc = cli("dlq", "replay", "orders", "--target-tier", "retry-9", "-n", namespace,
               "--kubeconfig", kubeconfig)  # fmt: skip
    assert proc.returncode == 1 and "has no tier 'retry-9'" in proc.stderr


def _lease(kubectl: Kubectl, namespace: str) -> dict[str, Any] | None:
    rp = get(kubectl, namespace, "rp", "orders") or {}
    lease = (rp.get("status") or {}).get("replayLease")
    return dict(lease) if lease else None


def test_the_lease_is_renewed_and_released_while_status_is_written_meanwhile(
    crds: None, kubectl: Kubectl, namespace: str, k8s_api: Any, unique: str
) -> None:
    """The operator's status refresh writes the pipeline's status every few seconds (every
    second with two operators, or here in a tight loop): the lease on the same status is still
    taken, renewed and given back at the first try of each, never left to expire."""
    from kubernetes import client

    apply(kubectl, namespace, pipeline("orders", "127.0.0.1:9", f"src-{unique}", f"g-{unique}"))
    custom = client.CustomObjectsApi(k8s_api)
    lease = replay_lease.Lease(k8s_api, namespace, "orders", "r1", "test/holder")
    assert lease.acquire() is None
    stop = threading.Event()
    writes = 0

    def refresh_status() -> None:  # as kopf does: merge patches, no resourceVersion
        nonlocal writes
        while not stop.is_set():
            body = {"status": {"dlq": {"depth": writes, "lastUpdated": f"T{writes}"}}}
            custom.patch_namespaced_custom_object_status(
                "kafkaretry.io", "v1alpha1", namespace, "retrypipelines", "orders", body
            )
            writes += 1

    writer = threading.Thread(target=refresh_status, daemon=True)
    writer.start()
    try:
        # At least 20 renewals, and on until the writer has written 40 times: each renewal
        # meets writes in between however the two threads are scheduled.
        renewals, deadline = 0, time.monotonic() + 60
        while (renewals < 20 or writes < 40) and time.monotonic() < deadline:
            lease.renew()
            renewals += 1
        lease.release()
    finally:
        stop.set()
        writer.join(10)
    assert writes >= 40, "the status was hardly written meanwhile"
    assert _lease(kubectl, namespace) is None, "the lease was not given back"
    assert (get(kubectl, namespace, "rp", "orders") or {})["status"]["dlq"]["depth"] == writes - 1


def test_two_operators_run_one_replay_once(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str, tmp_path: Any,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    """The replay lock is the lease on the pipeline's status, not a process's memory: a second
    operator watching the same namespace does not replay the same DLQ again."""
    dlq, retry1 = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique,
                            cleanup_topics)  # fmt: skip
    count = 300
    fill_dlq(kafka_bootstrap, dlq, count)
    second = OperatorProcess(kubeconfig, [namespace], tmp_path / "second.log").start()

    def second_watches() -> bool:  # it has seen the pipeline: its watches are up
        try:
            with urllib.request.urlopen(second.metrics_url, timeout=5) as r:
                return 'pipeline="orders"' in r.read().decode()
        except OSError:
            return False

    wait_for(second_watches, 60, "the second operator watching", every=1)
    leases = []

    def succeeded() -> dict[str, Any] | None:
        leases.append(_lease(kubectl, namespace))
        status = _status(kubectl, namespace, "once")
        return status if status.get("phase") == "Succeeded" else None

    try:
        _replay(kubectl, namespace, "once", maxMessagesPerSecond=30)
        status = wait_for(succeeded, 90, "once Succeeded")
        time.sleep(3)  # a second replayer, if any, would still be sending
    finally:
        second.stop()
    records = replayed_records(kafka_bootstrap, retry1, status["replayId"], expect=count)
    _exactly_once(records, count)
    assert status["replayed"] == count
    held = [lease for lease in leases if lease]
    assert held and {lease["replay"] for lease in held} == {"once"}, held
    assert all(lease["holder"].startswith("operator/") for lease in held)
    wait_for(lambda: _lease(kubectl, namespace) is None, 30, "the lease released")


def test_direct_replays_and_dlqreplays_honour_one_lease(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    dlq, retry1 = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique,
                            cleanup_topics)  # fmt: skip
    count = 150
    fill_dlq(kafka_bootstrap, dlq, count)
    kube = ("-n", namespace, "--kubeconfig", kubeconfig)

    # A direct replay holds the lease: a DLQReplay waits for it, naming it.
    direct = subprocess.Popen(
        [str(BIN / "kafka-retry"), "dlq", "replay", "orders", "--direct", "--rate", "15", *kube],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _depth(kafka_bootstrap, dlq) < count, 30, "the direct replay going")
        _replay(kubectl, namespace, "after")
        waiting = wait_for(
            lambda: (s := _status(kubectl, namespace, "after")).get("conditions") and s, 30,
            "after's status",
        )  # fmt: skip
        reason = waiting["conditions"][0]
        assert waiting["phase"] == "Pending", waiting
        assert reason["reason"] == "WaitingForReplay" and "direct:" in reason["message"], reason
        held = _lease(kubectl, namespace)
        assert held is not None and held["replay"].startswith("direct:")
        assert held["holder"].startswith("kafka-retry/")
        _out, err = direct.communicate(timeout=60)
    finally:
        if direct.poll() is None:
            direct.kill()
    assert direct.returncode == 0, err
    direct_id = held["replay"].removeprefix("direct:")
    after = _wait_phase(kubectl, namespace, "after", "Succeeded", operator)
    assert after["replayed"] == 0, "the direct replay took them all"
    _exactly_once(replayed_records(kafka_bootstrap, retry1, direct_id, expect=count), count)

    # A DLQReplay holds it: a direct replay refuses; deleting the DLQReplay stops it and
    # gives the lease back, so the next replay starts at once and takes exactly the rest.
    fill_dlq(kafka_bootstrap, dlq, count, first=count)
    _replay(kubectl, namespace, "slow", maxMessagesPerSecond=5)  # 30 s for all
    wait_for(lambda: _status(kubectl, namespace, "slow").get("replayed", 0) >= 10, 60, "10")
    refused = cli("dlq", "replay", "orders", "--direct", *kube)
    assert refused.returncode == 1 and "slow" in refused.stderr, refused.stderr
    kubectl("delete", "dlqreplay", "slow", "-n", namespace, "--timeout=60s")
    wait_for(lambda: _lease(kubectl, namespace) is None, 30, "the lease released")
    _replay(kubectl, namespace, "rest")
    rest = _wait_phase(kubectl, namespace, "rest", "Succeeded", operator)
    assert 0 < rest["replayed"] < count
    theirs = replayed_records(kafka_bootstrap, retry1, rest["replayId"], expect=rest["replayed"])
    _exactly_once(theirs, rest["replayed"])
    assert _depth(kafka_bootstrap, dlq) == 0


def test_events_a_filtered_replay_sent_past_its_cursor_are_marked(
    operator: OperatorProcess, kubectl: Kubectl, namespace: str,  # noqa: F811
    kafka_bootstrap: str, make_topic: Any, unique: str, kubeconfig: str,
    cleanup_topics: list[str],  # noqa: F811
) -> None:  # fmt: skip
    """A replay of the timeouts only: after the first bad order of a partition, the timeouts
    it replays stay counted as waiting. `dlq list` and `status` say which, and by whom."""
    dlq, _ = _pipeline(kubectl, namespace, kafka_bootstrap, make_topic, unique, cleanup_topics)
    fill_dlq(kafka_bootstrap, dlq, 40)  # every fourth a BadOrder, the others ReadTimeouts
    _replay(kubectl, namespace, "timeouts", filter={"errorClasses": ["ReadTimeout"]})
    status = _wait_phase(kubectl, namespace, "timeouts", "Succeeded", operator)
    past = sum(p.get("replayedPastCursor", 0) for p in status["partitions"])
    assert past > 0, status["partitions"]
    kube = ("-n", namespace, "--kubeconfig", kubeconfig)

    listed = cli("dlq", "list", "orders", "-o", "json", "--limit", "0", *kube)
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)
    marked = [e for e in events if e.get("replayedBy") == "timeouts"]
    assert len(marked) == past
    assert all(e["errorClass"].endswith("ReadTimeout") for e in marked)
    unmarked = [e for e in events if "replayedBy" not in e]
    assert all(e["errorClass"].endswith("BadOrder") for e in unmarked)
    assert f"{past} waiting event(s) were replayed already ({past} by timeouts)" in listed.stderr

    table = cli("dlq", "list", "orders", "--limit", "0", *kube)
    assert table.stdout.splitlines()[0].split()[-1] == "STATE"
    assert table.stdout.count("replayed by timeouts") == past, table.stdout
    shown = cli("status", "orders", *kube)
    assert f"{past} waiting event(s) were replayed already" in shown.stdout, shown.stdout
