"""`kafka-retry top` against the real API server: the pipelines of a namespace with what their
status says (written here as the operator would), once, as JSON, and as a live view on a
terminal that refreshes and computes rates."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from typing import Any

from dlq_support import BIN, cli
from kafka_retry.top import History, Row
from operator_support import Kubectl, apply, pipeline


def _pipeline_with_status(
    kubectl: Kubectl, namespace: str, name: str, depth: int, lags: list[int], ready: str
) -> None:
    doc = pipeline(name, "kafka:9092", f"{name}-orders", name)
    apply(kubectl, namespace, doc)
    _set_status(kubectl, namespace, name, depth, lags, ready)


def _set_status(
    kubectl: Kubectl, namespace: str, name: str, depth: int, lags: list[int], ready: str = "True"
) -> None:
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": ready,
                        "reason": "Ready" if ready == "True" else "KafkaUnreachable",
                        "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}],
        "tiers": [{"name": f"retry-{i + 1}", "topic": f"t{i}", "lag": lag, "readyReplicas": 1}
                  for i, lag in enumerate(lags)],
        "dlq": {"depth": depth, "oldestTimestamp": "2024-01-01T00:00:00.000Z"},
    }  # fmt: skip
    kubectl("patch", "rp", name, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))  # fmt: skip


def test_top_lists_the_namespace_deepest_dlq_first(
    kubectl: Kubectl, namespace: str, kubeconfig: str, crds: None
) -> None:
    _pipeline_with_status(kubectl, namespace, "billing", 3, [1, 0], "True")
    _pipeline_with_status(kubectl, namespace, "shipping", 40, [7, 2], "False")
    where = ["-n", namespace, "--kubeconfig", kubeconfig]

    proc = cli("top", *where, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["name"], r["dlqDepth"], r["lag"], r["ready"]) for r in rows] == [
        ("shipping", 40, 9, "False"),
        ("billing", 3, 1, "True"),
    ]
    assert rows[0]["tiers"] == [{"name": "retry-1", "lag": 7}, {"name": "retry-2", "lag": 2}]

    once = cli("top", *where, "--once")  # not a terminal: one table
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert lines[0].startswith(f"kafka-retry top · namespace {namespace}")
    header = next(line for line in lines if "PIPELINE" in line).split()
    assert header[:5] == ["NAMESPACE", "PIPELINE", "SOURCE", "READY", "DLQ"]
    body = [line.split() for line in lines if namespace in line.split()[:1]]
    assert [row[1] for row in body] == ["shipping", "billing"]
    assert body[0][3:6] == ["False", "(KafkaUnreachable)", "40"]
    assert "retry-1 7 · retry-2 2" in once.stdout


def test_top_refreshes_on_a_terminal_and_shows_rates(
    kubectl: Kubectl, namespace: str, kubeconfig: str, crds: None
) -> None:
    _pipeline_with_status(kubectl, namespace, "billing", 0, [0], "True")
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "kafka-retry"), "top", "-n", namespace, "--kubeconfig", kubeconfig,
         "--interval", "1", "--iterations", "6"],
        stdin=child, stdout=child, stderr=child, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    os.close(child)
    screen = b""
    deadline = time.monotonic() + 60
    grew = False
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([main], [], [], 0.2)[0]:
            try:
                screen += os.read(main, 65536)
            except OSError:
                break
        if not grew and screen.count(b"kafka-retry top") >= 2:
            _set_status(kubectl, namespace, "billing", 30, [5])  # the DLQ fills meanwhile
            grew = True
    proc.wait(timeout=30)
    os.close(main)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))  # no colours
    assert proc.returncode == 0, text
    assert grew and text.count("kafka-retry top") >= 3, "refreshed in place"
    last = next(
        line.split() for line in reversed(text.splitlines()) if line.strip().startswith(namespace)
    )
    assert last[1] == "billing" and last[4] == "30", last
    assert last[5].startswith("+"), f"the DLQ grew: a positive rate per minute: {last}"


def test_rates_are_the_change_over_the_last_minute() -> None:
    def row(depth: int, lag: int) -> Row:
        return Row("ns", "p", "orders", "True", "Ready", depth, None, (("retry-1", lag),))

    history = History()
    history.add([row(10, 4)], at=0.0)
    assert history.rates(("ns", "p")).dlq_per_minute is None, "one sample: no rate yet"
    history.add([row(40, 2)], at=30.0)
    rates = history.rates(("ns", "p"))
    assert (rates.dlq_per_minute, rates.lag_per_minute) == (60.0, -4.0)
    history.add([row(40, 2)], at=80.0)
    history.add([row(40, 2)], at=100.0)  # the first two are now older than a minute
    assert history.rates(("ns", "p")).dlq_per_minute == 0.0
    history.add([], at=101.0)
    assert history.rates(("ns", "p")).dlq_per_minute is None, "a deleted pipeline is forgotten"
