"""The gateway's own RBAC, each rule with its reason (the chart renders the same rules).

A Role per tenant namespace (bound to the gateway's ServiceAccount by a RoleBinding there): the
gateway can touch nothing outside the namespaces of its tenants, and reads no Secret — the tenants
file and the object-store credentials reach it as files and environment the kubelet mounts.
"""

from __future__ import annotations

from typing import Any

RULES: list[tuple[str, dict[str, Any]]] = [
    (
        "Application: create, list, read FineTuneJobs for tenants and mark one cancelled "
        "(patch: the cancel annotation and spec.runPolicy.suspend)",
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs"],
            "verbs": ["get", "list", "create", "patch"],
        },
    ),
    (
        "Application: published versions are the tenant's models (GET /v1/models)",
        {"apiGroups": ["kubetune.io"], "resources": ["modelversions"], "verbs": ["get", "list"]},
    ),
    (
        "Application: a job's Kubernetes Events are part of its event list",
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    ),
]


def gateway_role(namespace: str, name: str = "kubetune-gateway") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": [rule for _, rule in RULES],
    }


def gateway_role_binding(
    namespace: str, sa_namespace: str, sa_name: str = "kubetune-gateway", name: str = "kubetune-gateway"
) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}],
    }
