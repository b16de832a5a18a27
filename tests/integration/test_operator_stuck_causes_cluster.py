"""More stuck states that say why (issue 16, deliverable 3), end to end on the real v1.20 API server.

- An unschedulable pod, reported as kube-scheduler reports it (the fake kubelet's
  ``set_unschedulable``: ``PodScheduled=False``, reason ``Unschedulable``, the scheduler's message).
- A missing per-job ServiceAccount: the ServiceAccount admission plugin refuses the Job's pods
  (``FailedCreate``: ``error looking up service account``); the operator recreates the account.
- A 403 from RBAC (the operator runs under a ServiceAccount that may not create Jobs): Stalled
  ``Forbidden`` with the API server's message, recovering once the permission is granted.

Each asserts what a user sees (the condition with reason, message and observedGeneration, a Warning
Event) and the recovery on its own when the cause is removed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator import rbac
from tests.fixtures.operator import Api, OperatorProcess, finetunejob, wait_for
from tests.integration.test_operator_cluster import STUB_COMMAND

pytestmark = pytest.mark.integration


def _stalled(api: Api, name: str, reason: str) -> dict[str, Any] | None:
    cond = api.condition(name, "Stalled") or {}
    return cond if cond.get("status") == "True" and cond.get("reason") == reason else None


def _warnings(api: Api, name: str, reason: str) -> list[Any]:
    return [e for e in api.events(name) if e.reason == reason and e.type == "Warning"]


def _succeeded(api: Api, name: str) -> bool:
    return api.status(name).get("phase") == "Succeeded"


def test_an_unschedulable_pod_is_stalled_with_the_schedulers_message_and_recovers(
    api: Api, operator_factory: Callable[..., OperatorProcess], fake_kubelet: Any
) -> None:
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    fake_kubelet.set_unschedulable(api.ns, message, labels={"kubetune.io/finetunejob": "nogpu"})
    try:
        op = operator_factory(STUB_COMMAND)
        api.create_ftj(finetunejob("nogpu", "tiny-nogpu"))
        cond = wait_for("Stalled/Unschedulable", lambda: _stalled(api, "nogpu", "Unschedulable"), 90, op.log)
        assert message in cond["message"], cond
        assert cond["observedGeneration"] == 1
        st = api.status("nogpu")
        assert (st["phase"], st["reason"]) == ("Pending", "Unschedulable")
        assert message in st["message"]
        events = wait_for("Warning Unschedulable", lambda: _warnings(api, "nogpu", "Unschedulable"), 30)
        assert message in events[0].message
        pods = api.core.list_namespaced_pod(api.ns, label_selector="kubetune.io/finetunejob=nogpu").items
        assert pods and all(not p.spec.node_name for p in pods)
    finally:
        fake_kubelet.clear_unschedulable(api.ns)
    wait_for("Succeeded once the pod schedules", lambda: _succeeded(api, "nogpu"), 120, op.log)
    stalled = api.condition("nogpu", "Stalled")
    assert stalled is not None and stalled["status"] == "False" and stalled["observedGeneration"] == 1


def test_a_missing_service_account_is_stalled_and_the_operator_recreates_it(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    # A pods quota holds the Job's pod back while the per-job ServiceAccount is deleted, so the Job
    # controller's next pod creation meets the ServiceAccount admission plugin, not the kubelet.
    api.core.create_namespaced_resource_quota(
        api.ns, {"metadata": {"name": "hold"}, "spec": {"hard": {"pods": "0"}}}
    )
    wait_for(
        "quota in force",
        lambda: bool(api.core.read_namespaced_resource_quota("hold", api.ns).status.hard),
        30,
    )
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("nosa", "tiny-nosa"))
    wait_for("Stalled/QuotaExceeded", lambda: _stalled(api, "nosa", "QuotaExceeded"), 90, op.log)
    accounts = api.core.list_namespaced_service_account(api.ns, label_selector="kubetune.io/finetunejob=nosa")
    assert len(accounts.items) == 1
    account = accounts.items[0].metadata.name
    api.core.delete_namespaced_service_account(account, api.ns)
    api.core.delete_namespaced_resource_quota("hold", api.ns)

    seen: list[dict[str, Any]] = []

    def stalled_or_done() -> bool:
        cond = _stalled(api, "nosa", "ServiceAccountMissing")
        if cond is not None:
            seen.append(cond)
        return bool(seen) and _succeeded(api, "nosa")

    wait_for("Stalled/ServiceAccountMissing, then Succeeded", stalled_or_done, 180, op.log)
    cond = seen[0]
    assert "service account" in cond["message"] and account in cond["message"], cond
    assert cond["observedGeneration"] == 1
    events = _warnings(api, "nosa", "ServiceAccountMissing")
    assert events and account in events[0].message
    recreated = [e for e in api.events("nosa") if e.reason == "Created" and "recreated" in e.message]
    assert recreated and f"ServiceAccount/{account}" in recreated[0].message
    assert (api.condition("nosa", "Stalled") or {}).get("status") == "False"


@pytest.fixture
def limited_operator(
    kube_cluster: Any, api: Api, crds_installed: None, fake_kubelet: Any, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, str]]:
    """An operator whose ServiceAccount holds rbac.yaml's rules except ``create`` on Jobs."""
    from kubernetes import utils

    ns = api.ns
    sa = "kubetune-operator-limited"
    api.core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    roles = {r["metadata"]["name"]: r for r in rbac.operator_cluster_roles()}
    limited = copy.deepcopy(roles[rbac.NAMESPACED_ROLE])
    for rule in limited["rules"]:
        if "batch" in rule.get("apiGroups", []) and "jobs" in rule.get("resources", []):
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role"}
    role.update(
        {"metadata": {"name": "kubetune-operator-limited", "namespace": ns}, "rules": limited["rules"]}
    )
    utils.create_from_dict(api.core.api_client, role)
    for binding in rbac.operator_bindings(ns, sa, [ns]):
        if binding["kind"] == "RoleBinding":
            binding["roleRef"] = {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": role["metadata"]["name"],
            }
        utils.create_from_dict(api.core.api_client, binding)
    token = kube_cluster.service_account_token(ns, sa)
    kubeconfig = kube_cluster.kubeconfig_for_token(token, name=f"operator-limited-{ns}")
    op = OperatorProcess(kubeconfig, ns, tmp_path / "operator.log", {}, STUB_COMMAND)
    op.start()
    try:
        yield op, sa
    finally:
        op.stop()
        rbac_api = api.rbac
        for binding in rbac.operator_bindings(ns, sa, [ns]):
            if binding["kind"] == "ClusterRoleBinding":
                rbac_api.delete_cluster_role_binding(binding["metadata"]["name"])


def test_a_403_from_rbac_is_stalled_forbidden_and_recovers_when_granted(
    api: Api, limited_operator: tuple[OperatorProcess, str]
) -> None:
    op, sa = limited_operator
    api.create_ftj(finetunejob("norbac", "tiny-norbac"))
    cond = wait_for("Stalled/Forbidden", lambda: _stalled(api, "norbac", "Forbidden"), 90, op.log)
    assert "403" in cond["message"] and "cannot create resource" in cond["message"], cond
    assert f"system:serviceaccount:{api.ns}:{sa}" in cond["message"] and '"jobs"' in cond["message"]
    assert cond["observedGeneration"] == 1
    st = api.status("norbac")
    assert (st["phase"], st["reason"]) == ("Pending", "Forbidden")
    events = wait_for("Warning Forbidden", lambda: _warnings(api, "norbac", "Forbidden"), 30)
    assert "cannot create resource" in events[0].message
    assert api.jobs("norbac") == []

    api.rbac.create_namespaced_role(
        api.ns,
        {
            "metadata": {"name": "grant-job-create"},
            "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]}],
        },
    )
    api.rbac.create_namespaced_role_binding(
        api.ns,
        {
            "metadata": {"name": "grant-job-create"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "grant-job-create"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": api.ns}],
        },
    )
    wait_for("Succeeded once granted", lambda: _succeeded(api, "norbac"), 120, op.log)
    stalled = api.condition("norbac", "Stalled")
    assert stalled is not None and stalled["status"] == "False" and stalled["observedGeneration"] == 1
