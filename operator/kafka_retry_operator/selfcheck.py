"""`python -m kafka_retry_operator.selfcheck`: the chart's `helm test` hook.

Checks what a fresh install must have, from inside the cluster with a ServiceAccount that may
read only these things: the CRDs are served (both kinds listed in the API group's discovery,
and RetryPipelines can be listed in the release namespace), and the operator Deployment is
rolled out and available. Exit 0 when all hold, 1 with one line per failed check otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kafka_retry.model import GROUP, VERSION
from kafka_retry_operator.kube import api_client

KINDS = {"retrypipelines": "RetryPipeline", "dlqreplays": "DLQReplay"}


def crds_served(api: client.ApiClient, namespace: str) -> list[str]:
    """Problems with the CRDs; empty when both kinds are served."""
    try:
        resources = client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION)
    except ApiException as e:
        return [f"API group {GROUP}/{VERSION} is not served ({e.status} {e.reason}): CRDs missing"]
    served = {r.name for r in resources.resources}
    problems = [f"{kind} ({plural}.{GROUP}) is not served" for plural, kind in KINDS.items()
                if plural not in served]  # fmt: skip
    if not problems:
        try:
            client.CustomObjectsApi(api).list_namespaced_custom_object(
                GROUP, VERSION, namespace, "retrypipelines", limit=1
            )
        except ApiException as e:
            problems.append(f"cannot list RetryPipelines in {namespace}: {e.status} {e.reason}")
    return problems


def operator_available(api: client.ApiClient, namespace: str, deployment: str) -> list[str]:
    """Problems with the operator Deployment; empty when its current spec is rolled out and at
    least one replica is available."""
    try:
        found: Any = client.AppsV1Api(api).read_namespaced_deployment(deployment, namespace)
    except ApiException as e:
        return [f"cannot read Deployment {namespace}/{deployment}: {e.status} {e.reason}"]
    status = found.status
    problems = []
    if (status.observed_generation or 0) < (found.metadata.generation or 0):
        problems.append(f"Deployment {deployment}: its current spec is not rolled out yet")
    if not status.available_replicas:
        wanted = found.spec.replicas
        problems.append(
            f"Deployment {deployment}: no available replica of {wanted} "
            f"(kubectl -n {namespace} describe deployment {deployment})"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kafka_retry_operator.selfcheck")
    parser.add_argument("--namespace", required=True, help="the release namespace")
    parser.add_argument("--deployment", required=True, help="the operator Deployment's name")
    args = parser.parse_args(argv)
    api = api_client(pool_size=2)
    problems = crds_served(api, args.namespace)
    problems += operator_available(api, args.namespace, args.deployment)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: {', '.join(sorted(KINDS.values()))} served; operator {args.deployment} available")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
