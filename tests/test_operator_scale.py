"""Fifty pipelines applied at once all become Ready under one operator process; reported:
the time to Ready, the time to delete them all (with their topics), and the operator's peak RSS.

Tier workers are scaled to 0 (`workers.replicas: 0`): 100 worker processes would measure this
machine, not the operator. The podrunner still acts as the deployment controller, so
WorkersReady is real (the Deployments' status is observed)."""

# ruff: noqa: F401, F811 - pytest fixtures are imported from operator_support by name

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from operator_support import (
    Kubectl,
    OperatorProcess,
    cleanup_topics,
    pipeline,
    podrunner,
    release_pipelines,
    wait_for,
)

pytestmark = pytest.mark.e2e

COUNT = 50


def _ready_count(kubectl: Kubectl, namespace: str) -> int:
    items = json.loads(kubectl("get", "rp", "-n", namespace, "-o", "json").stdout)["items"]
    ready = 0
    for rp in items:
        status = rp.get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
        if conds.get("Ready") == "True" and "dlq" in status:
            ready += 1
    return ready


def _posted(kubectl: Kubectl, namespace: str) -> Counter[tuple[str, str]]:
    """Events posted about the namespace's pipelines: (pipeline, reason) -> how many."""
    found = kubectl("get", "events", "-n", namespace, "--field-selector",
                    "involvedObject.kind=RetryPipeline", "-o", "json").stdout  # fmt: skip
    posted: Counter[tuple[str, str]] = Counter()
    for e in json.loads(found)["items"]:
        posted[(e["involvedObject"]["name"], e["reason"])] += e.get("count") or 1
    return posted


def test_fifty_pipelines_become_ready(
    crds: None,
    kubeconfig: str,
    kubectl: Kubectl,
    namespace: str,
    podrunner: Any,
    kafka_bootstrap: str,
    kafka_admin: Any,
    make_topic: Any,
    unique: str,
    tmp_path: Path,
    cleanup_topics: list[str],
) -> None:
    source = make_topic("orders")
    docs = []
    for i in range(COUNT):
        group = f"svc{i}-{unique}"
        doc = pipeline(
            f"p{i:02d}",
            kafka_bootstrap,
            source,
            group,
            topics={"partitions": 1, "deletionPolicy": "Delete"},
            workers={"replicas": 0},
        )
        docs.append(doc)
        cleanup_topics.extend(f"{group}.{source}.{t}" for t in ("retry-1", "retry-2", "dlq"))

    op = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log", verbose=False)
    op.start()
    try:
        started = time.monotonic()
        kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
        )
        wait_for(
            lambda: _ready_count(kubectl, namespace) == COUNT,
            180,
            f"{COUNT} pipelines Ready",
            every=0.5,
        )
        to_ready = time.monotonic() - started
        rss, peak = op.rss_kb()
        table = kubectl("get", "rp", "-n", namespace, "--no-headers").stdout.splitlines()
        assert len(table) == COUNT and all(row.split()[4] == "True" for row in table)
        topics = kafka_admin.list_topics(timeout=10).topics
        assert all(t in topics for t in cleanup_topics)

        # Events mark transitions: each pipeline's topics were created once and its workers
        # became ready once, however far the operator's watch runs behind its own status
        # writes (fifty timers at a 1 s interval; a timer that took its last write for not
        # written would write it again and announce the same transition again).
        names = [d["metadata"]["name"] for d in docs]
        wait_for(
            lambda: all(_posted(kubectl, namespace)[(n, "WorkersReady")] for n in names),
            60,
            "a WorkersReady Event for every pipeline",
        )
        time.sleep(5)  # five status intervals: time for a repeated announcement to be posted
        posted = _posted(kubectl, namespace)
        repeated = {k: v for k, v in posted.items() if v > 1}
        assert not repeated, f"transitions announced more than once: {repeated}"
        assert all(posted[(n, "TopicsCreated")] == 1 for n in names), posted

        started = time.monotonic()
        release_pipelines(kubectl, namespace, timeout=120)
        to_delete = time.monotonic() - started
        remaining = kafka_admin.list_topics(timeout=10).topics
        left = [t for t in cleanup_topics if t in remaining]
        assert not left, f"Delete policy left {len(left)} topics"
    finally:
        op.stop()
    print(
        f"\n{COUNT} pipelines ({3 * COUNT} topics): Ready in {to_ready:.1f}s, deleted with "
        f"their topics in {to_delete:.1f}s; operator RSS {rss / 1024:.0f} MiB after Ready, "
        f"peak {max(peak, op.peak_rss_kb) / 1024:.0f} MiB"
    )
    assert to_ready < 120
    assert peak < 400 * 1024
