"""The local Kubernetes API is real: CRDs, Deployments, RBAC enforcement, garbage collection,
and helm all behave as on a cluster."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

Kubectl = Callable[..., subprocess.CompletedProcess[str]]

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.foundation.kafkaretry.io}
spec:
  group: foundation.kafkaretry.io
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
              x-kubernetes-validations:
                - {rule: "self.size <= 10", message: "spec.size must be at most 10"}
"""

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - {name: web, image: "example.invalid/web:1", args: ["--port", "8080"]}
"""


def _widget(name: str, size: int) -> str:
    return (
        "apiVersion: foundation.kafkaretry.io/v1\nkind: Widget\n"
        f"metadata: {{name: {name}}}\nspec: {{size: {size}}}\n"
    )


def test_crd_apply_and_validation(kubectl: Kubectl, k8s_api: Any, namespace: str) -> None:
    kubectl("apply", "-f", "-", input=WIDGET_CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.foundation.kafkaretry.io")
    kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=_widget("w", 3),
    )
    objs = client.CustomObjectsApi(k8s_api)
    w = objs.get_namespaced_custom_object(
        "foundation.kafkaretry.io", "v1", namespace, "widgets", "w"
    )
    assert w["spec"] == {"size": 3}

    # CEL rules run in the API server: a bad object is refused with our message.
    bad = kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        check=False,
        input=_widget("x", 11),
    )
    assert bad.returncode != 0
    assert "spec.size must be at most 10" in bad.stderr


def test_deployment_apply_read_back(kubectl: Kubectl, k8s_api: Any, namespace: str) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT)
    dep = client.AppsV1Api(k8s_api).read_namespaced_deployment("web", namespace)
    assert dep.spec.replicas == 2
    assert dep.spec.template.spec.containers[0].args == ["--port", "8080"]


def test_rbac_is_enforced(kubeconfig: str, localenv_up: dict[str, str], namespace: str) -> None:
    nobody = config.new_client_from_config(config_file=localenv_up["KRO_UNPRIVILEGED_KUBECONFIG"])
    with pytest.raises(ApiException) as denied:
        client.CoreV1Api(nobody).list_namespaced_config_map(namespace)
    assert denied.value.status == 403

    # Granting a Role makes exactly that request pass.
    admin = config.new_client_from_config(config_file=kubeconfig)
    rbac = client.RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "cm-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "cm-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "cm-reader",
            },
            "subjects": [
                {"kind": "User", "name": "kro-nobody", "apiGroup": "rbac.authorization.k8s.io"}
            ],
        },
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            client.CoreV1Api(nobody).list_namespaced_config_map(namespace)
            break
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with pytest.raises(ApiException) as still_denied:
        client.CoreV1Api(nobody).list_namespaced_secret(namespace)
    assert still_denied.value.status == 403


def test_owner_references_are_garbage_collected(k8s_api: Any, namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner.metadata.uid,
                    }
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        if "child" not in names:
            return
        time.sleep(0.5)
    pytest.fail("kube-controller-manager's garbage collector did not delete the orphaned child")


def test_service_account_token_is_accepted(
    kubectl: Kubectl, namespace: str, tmp_path: Path, kubeconfig: str
) -> None:
    kubectl("create", "serviceaccount", "bot", "-n", namespace)
    token = kubectl("create", "token", "bot", "-n", namespace).stdout.strip()
    import localenv

    cfg = tmp_path / "bot.kubeconfig"
    localenv.write_kubeconfig(cfg, token, "bot", namespace)
    who = subprocess.run(
        [localenv.kubectl_binary(), "--kubeconfig", str(cfg), "auth", "whoami", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        json.loads(who.stdout)["status"]["userInfo"]["username"]
        == f"system:serviceaccount:{namespace}:bot"
    )


def test_helm_version_and_template(
    helm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    assert helm("version", "--short").stdout.startswith("v3.")
    chart = tmp_path / "throwaway"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: throwaway\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {{ .Release.Name }}-cm}\n"
        "data: {greeting: {{ .Values.greeting | quote }}}\n"
    )
    out = helm("template", "demo", str(chart), "--set", "greeting=hi").stdout
    assert "name: demo-cm" in out and 'greeting: "hi"' in out
