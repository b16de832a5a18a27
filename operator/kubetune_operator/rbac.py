"""The operator's RBAC (``rbac.yaml``) and the bindings that grant it to a ServiceAccount.

One file is the truth for the Helm chart and the integration tests, which run the operator under
exactly these rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import yaml

CLUSTER_ROLE = "kubetune-operator-cluster"
NAMESPACED_ROLE = "kubetune-operator"


def operator_cluster_roles() -> list[dict[str, Any]]:
    """The two ClusterRoles of ``rbac.yaml`` (cluster-scoped rules, namespaced rules)."""
    text = resources.files("kubetune_operator").joinpath("rbac.yaml").read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def operator_bindings(
    account_namespace: str, account_name: str, namespaces: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Bindings granting :func:`operator_cluster_roles` to a ServiceAccount.

    ``namespaces`` empty: the namespaced rules apply everywhere (ClusterRoleBinding); otherwise one
    RoleBinding per served namespace, so the operator can touch nothing elsewhere.
    """
    subject = [{"kind": "ServiceAccount", "name": account_name, "namespace": account_namespace}]

    def cluster_binding(role: str) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{role}-{account_namespace}-{account_name}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": subject,
        }

    out = [cluster_binding(CLUSTER_ROLE)]
    if not namespaces:
        out.append(cluster_binding(NAMESPACED_ROLE))
        return out
    for ns in namespaces:
        out.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{NAMESPACED_ROLE}-{account_name}", "namespace": ns},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": NAMESPACED_ROLE,
                },
                "subjects": subject,
            }
        )
    return out
