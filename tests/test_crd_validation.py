"""`kubectl apply` rejects bad RetryPipelines with a message naming the field, by schema
bounds and CEL rules in the generated CRD; the pydantic models reject the same specs offline."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import ValidationError

from kafka_retry.model import RetryPipelineSpec
from operator_support import Kubectl, wait_for

VALID: dict[str, Any] = {
    "apiVersion": "kafkaretry.io/v1alpha1",
    "kind": "RetryPipeline",
    "metadata": {"name": "valid"},
    "spec": {
        "kafka": {"bootstrapServers": "kafka:9092"},
        "source": {"topic": "orders", "consumerGroup": "billing"},
        "tiers": [
            {"name": "retry-1", "delaySeconds": 30},
            {"name": "retry-2", "delaySeconds": 300},
        ],
        "handler": {"http": {"url": "http://billing.shop.svc/events"}},
    },
}

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """Set `a.b.0.c` (list indices as numbers) in the document."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        for m in mutations:
            m(doc)

    return mutate


_DELETE = object()

# (case id, mutation, substrings the API server's message must contain)
INVALID: list[tuple[str, Mutation, list[str]]] = [
    ("no-tiers", _set("spec.tiers", []), ["spec.tiers"]),
    ("tiers-missing", _set("spec.tiers", _DELETE), ["spec.tiers", "Required"]),
    (
        "too-many-tiers",
        _set("spec.tiers", [{"name": f"t{i}", "delaySeconds": 1} for i in range(11)]),
        ["spec.tiers"],
    ),
    ("delay-zero", _set("spec.tiers.0.delaySeconds", 0), ["spec.tiers[0].delaySeconds"]),
    # a handler deadline longer than the workers can wait without polling their group
    (
        "http-timeout-over-the-poll-budget",
        _set("spec.handler.http.timeoutSeconds", 900),
        ["spec.handler.http.timeoutSeconds"],
    ),
    # concurrent calls per partition: at least 1, at most 64 (a thread and a connection each)
    (
        "http-max-in-flight-zero",
        _set("spec.handler.http.maxInFlight", 0),
        ["spec.handler.http.maxInFlight"],
    ),
    (
        "http-max-in-flight-over-64",
        _set("spec.handler.http.maxInFlight", 65),
        ["spec.handler.http.maxInFlight"],
    ),
    (
        "http-ordering-unknown",
        _set("spec.handler.http.ordering", "Partition"),
        ["spec.handler.http.ordering", "None", "Key"],
    ),
    ("delay-negative", _set("spec.tiers.1.delaySeconds", -5), ["spec.tiers[1].delaySeconds"]),
    (
        "delay-over-a-week",
        _set("spec.tiers.0.delaySeconds", 8 * 86400),
        ["spec.tiers[0].delaySeconds"],
    ),
    (
        "duplicate-tier-names",
        _set("spec.tiers.1.name", "retry-1"),
        ["spec.tiers", "tier names must be unique"],
    ),
    ("tier-name-uppercase", _set("spec.tiers.0.name", "Retry1"), ["spec.tiers[0].name"]),
    ("tier-name-too-long", _set("spec.tiers.0.name", "r" * 40), ["spec.tiers[0].name"]),
    ("source-topic-invalid-chars", _set("spec.source.topic", "orders!"), ["spec.source.topic"]),
    ("source-topic-too-long", _set("spec.source.topic", "o" * 250), ["spec.source.topic"]),
    ("source-topic-dot", _set("spec.source.topic", ".."), ["spec.source.topic", "'..'"]),
    (
        "consumer-group-invalid",
        _set("spec.source.consumerGroup", "bill ing"),
        ["spec.source.consumerGroup"],
    ),
    ("tier-topic-invalid", _set("spec.tiers.0.topic", "a/b"), ["spec.tiers[0].topic"]),
    (
        "tier-topic-is-source",
        _set("spec.tiers.0.topic", "orders"),
        ["spec.tiers", "differ from the source topic"],
    ),
    ("dlq-topic-invalid", _set("spec.dlq.topic", "dlq topic"), ["spec.dlq.topic"]),
    # Collisions only visible once defaults are resolved (`<consumerGroup>.<sourceTopic>.<x>`).
    (
        "tier-named-dlq",
        _set("spec.tiers.1.name", "dlq"),
        ["spec.tiers", "differ from the source topic, the DLQ topic"],
    ),
    (
        "tier-topic-is-another-tiers-default",
        _set("spec.tiers.0.topic", "billing.orders.retry-2"),
        ["spec.tiers", "the other tiers' topics"],
    ),
    (
        "tier-topic-is-default-dlq",
        _set("spec.tiers.0.topic", "billing.orders.dlq"),
        ["spec.tiers", "the DLQ topic"],
    ),
    (
        "dlq-topic-is-a-tiers-default",
        _set("spec.dlq", {"topic": "billing.orders.retry-1"}),
        ["spec.dlq.topic", "every tier's topic"],
    ),
    (
        "dlq-topic-is-source",
        _set("spec.dlq.topic", "orders"),
        ["spec.dlq.topic", "differ from the source topic"],
    ),
    (
        "both-handler-kinds",
        _set("spec.handler.python", {"image": "billing:1", "callable": "billing.h:handle"}),
        ["spec.handler", "exactly one of `python` or `http`"],
    ),
    (
        "tier-named-like-the-live-lane",
        _both(_set("spec.liveLane", {}), _set("spec.tiers.1.name", "live-lane")),
        ["spec.tiers", "no tier may be named `live-lane` with `liveLane`"],
    ),
    ("no-handler-kind", _set("spec.handler", {}), ["spec.handler", "exactly one"]),
    ("handler-missing", _set("spec.handler", _DELETE), ["spec.handler", "Required"]),
    (
        "bad-callable",
        _set("spec.handler", {"python": {"image": "b:1", "callable": "handle"}}),
        ["spec.handler.python.callable"],
    ),
    (
        "http-url-not-http",
        _set("spec.handler.http.url", "ftp://billing/events"),
        ["spec.handler.http.url"],
    ),
    ("partitions-zero", _set("spec.topics", {"partitions": 0}), ["spec.topics.partitions"]),
    (
        "replication-factor-zero",
        _set("spec.topics", {"replicationFactor": 0}),
        ["spec.topics.replicationFactor"],
    ),
    (
        "deletion-policy-unknown",
        _set("spec.topics", {"deletionPolicy": "Sometimes"}),
        ["spec.topics.deletionPolicy"],
    ),
    ("retention-zero", _set("spec.dlq", {"retentionHours": 0}), ["spec.dlq.retentionHours"]),
    ("replicas-too-many", _set("spec.workers", {"replicas": 101}), ["spec.workers.replicas"]),
    (
        "memory-not-a-quantity",
        _set("spec.workers", {"resources": {"requests": {"memory": "lots"}}}),
        ["spec.workers.resources.requests.memory"],
    ),
    ("bootstrap-empty", _set("spec.kafka.bootstrapServers", ""), ["spec.kafka.bootstrapServers"]),
    (
        "unknown-errors-value",
        _set("spec.classification", {"unknownErrors": "Sometimes"}),
        ["spec.classification.unknownErrors"],
    ),
    (
        "typo-in-field-name",
        _set("spec.tier", [{"name": "x", "delaySeconds": 1}]),
        ['unknown field "spec.tier"'],
    ),
]
# Rules on metadata exist only in the CRD (the spec model never sees the name).
CRD_ONLY: list[tuple[str, Mutation, list[str]]] = [
    ("name-too-long", _set("metadata.name", "p" * 64), ["metadata.name", "at most 63"]),
]


def _doc(mutation: Mutation, name: str) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    mutation(doc)
    doc["metadata"].setdefault("name", name)
    if doc["metadata"]["name"] == "valid":
        doc["metadata"]["name"] = name
    return doc


def test_at_least_fifteen_cases() -> None:
    assert len(INVALID) + len(CRD_ONLY) >= 15


def test_kubectl_apply_rejects_invalid_specs_naming_the_field(
    crds: None,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    cases = INVALID + CRD_ONLY

    def attempt(case: tuple[str, Mutation, list[str]]) -> tuple[str, int, str]:
        case_id, mutation, _ = case
        doc = _doc(mutation, case_id)
        proc = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
        return case_id, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = {case_id: (rc, err) for case_id, rc, err in pool.map(attempt, cases)}
    failures = []
    for case_id, _, expected in cases:
        rc, err = results[case_id]
        if rc == 0:
            failures.append(f"{case_id}: accepted")
            continue
        missing = [s for s in expected if s not in err]
        if missing:
            failures.append(f"{case_id}: message lacks {missing}: {err.strip()}")
    assert not failures, "\n".join(failures)
    listed = kubectl("get", "retrypipelines", "-n", namespace, "-o", "name").stdout
    assert listed.strip() == "", "a rejected pipeline was stored"


def test_kubectl_apply_accepts_the_valid_spec_and_the_examples(
    crds: None,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    from operator_support import EXAMPLES

    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(VALID))
    for path in sorted(EXAMPLES.glob("retrypipeline-*.yaml")):
        kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))


def test_source_cannot_change_after_creation(
    crds: None,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    doc = _doc(lambda d: None, "immutable-source")
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    for field, value in (("topic", "payments"), ("consumerGroup", "billing-v2")):
        changed = copy.deepcopy(doc)
        changed["spec"]["source"][field] = value
        proc = kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(changed), check=False)
        assert proc.returncode != 0, f"source.{field} changed"
        assert "spec.source" in proc.stderr and "source is immutable" in proc.stderr
    grown = copy.deepcopy(doc)
    grown["spec"]["tiers"].append({"name": "retry-3", "delaySeconds": 900})
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(grown))  # the rest may change
    stored = json.loads(
        kubectl("get", "rp", "immutable-source", "-n", namespace, "-o", "json").stdout
    )
    assert stored["spec"]["source"] == doc["spec"]["source"]
    assert len(stored["spec"]["tiers"]) == 3


@pytest.mark.parametrize(("case_id", "mutation", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_models_reject_the_same_specs_offline(
    case_id: str, mutation: Mutation, expected: list[str]
) -> None:
    doc = _doc(mutation, case_id)
    with pytest.raises(ValidationError):
        RetryPipelineSpec.model_validate(doc["spec"])


def test_models_accept_the_valid_spec() -> None:
    spec = RetryPipelineSpec.model_validate(VALID["spec"])
    assert [t.topic for t in spec.topology("shop", "p").tiers] == [
        "billing.orders.retry-1",
        "billing.orders.retry-2",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "retrypipeline",
        "retrypipeline.spec",
        "retrypipeline.spec.kafka",
        "retrypipeline.spec.source",
        "retrypipeline.spec.tiers",
        "retrypipeline.spec.handler",
        "retrypipeline.spec.workers.resources",
        "retrypipeline.status",
        "retrypipeline.status.conditions",
        "dlqreplay.spec",
        "dlqreplay.status",
    ],
)
def test_kubectl_explain_describes_every_field(kubectl: Kubectl, crds: None, path: str) -> None:
    """What `kubectl explain` shows comes from the models' docstrings and descriptions (the
    API server publishes a changed CRD's schema within seconds)."""

    def described() -> str | None:
        out = kubectl("explain", path).stdout
        return None if "<no description>" in out or "<empty>" in out else out

    out = wait_for(described, 30, f"kubectl explain {path} without <no description>")
    description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0]
    assert description.strip(), out
