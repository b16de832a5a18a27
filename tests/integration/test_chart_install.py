"""The chart installed into a real kube-apiserver (v1.20, tests/cluster) with the real Helm engine.

Then a `kubectl auth can-i` matrix, asked by the operator's own ServiceAccount token through
SelfSubjectAccessReview: the account can do what the operator needs and nothing more (no Secrets,
no pods/exec, nothing outside its namespaces in namespaced mode).

v1.20 limits (tests/cluster/README.md): no scheduler or kubelet here, so the operator pod stays
Pending (its probes and runtime are not exercised by this test); CEL rules in the CRDs are ignored,
and through Helm v4's server-side apply v1.20 rejects ``x-kubernetes-validations`` that >= 1.29
accepts. So the test installs a copy of the chart whose crds/ hold the same CRDs without those rules
(:func:`for_v1_20`); every template is the chart's own.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.cluster import LocalCluster
from tests.unit.test_chart import CHART, chart_crds

pytestmark = pytest.mark.integration

#: (verb, group, resource, subresource, namespaced?) the operator needs.
ALLOWED = [
    ("list", "apiextensions.k8s.io", "customresourcedefinitions", "", False),
    ("watch", "", "namespaces", "", False),
    ("patch", "kopf.dev", "clusterkopfpeerings", "", False),
    ("watch", "kubetune.io", "finetunejobs", "", True),
    ("patch", "kubetune.io", "finetunejobs", "status", True),
    ("create", "kubetune.io", "modelversions", "", True),
    ("create", "kubetune.io", "finetunejobs", "", True),
    ("delete", "kubetune.io", "finetunejobs", "", True),
    ("watch", "kubetune.io", "finetunesweeps", "", True),
    ("patch", "kubetune.io", "finetunesweeps", "status", True),
    ("create", "batch", "jobs", "", True),
    ("delete", "batch", "jobs", "", True),
    ("list", "", "pods", "", True),
    ("create", "", "configmaps", "", True),
    ("create", "", "services", "", True),
    ("create", "", "serviceaccounts", "", True),
    ("create", "rbac.authorization.k8s.io", "roles", "", True),
    ("create", "rbac.authorization.k8s.io", "rolebindings", "", True),
    ("create", "", "events", "", True),
]
#: What the operator must never be able to do.
DENIED = [
    ("get", "", "secrets", "", True),
    ("list", "", "secrets", "", True),
    ("watch", "", "secrets", "", True),
    ("create", "", "pods", "exec", True),
    ("create", "", "pods", "attach", True),
    ("get", "", "pods", "log", True),
    ("create", "", "pods", "", True),
    ("update", "kubetune.io", "finetunejobs", "", True),
    ("delete", "kubetune.io", "finetunesweeps", "", True),
    ("create", "kubetune.io", "finetunesweeps", "", True),
    ("delete", "kubetune.io", "modelversions", "", True),
    ("update", "kubetune.io", "modelversions", "", True),
    ("create", "rbac.authorization.k8s.io", "clusterroles", "", False),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", "", False),
    ("escalate", "rbac.authorization.k8s.io", "roles", "", True),
    ("bind", "rbac.authorization.k8s.io", "clusterroles", "", False),
    ("impersonate", "", "serviceaccounts", "", True),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", "", False),
    ("delete", "", "namespaces", "", False),
    ("create", "apps", "deployments", "", True),
]


def for_v1_20(node: Any) -> Any:
    """A CRD as v1.20 accepts it through server-side apply: no CEL rules (v1.20 ignores them anyway)."""
    if isinstance(node, dict):
        return {k: for_v1_20(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [for_v1_20(v) for v in node]
    return node


def chart_for_v1_20(tmp_path: Path) -> Path:
    """A copy of the chart whose crds/ hold :func:`for_v1_20` CRDs; the templates are the chart's own."""
    copy = tmp_path / "kubetune"
    if copy.exists():
        return copy
    shutil.copytree(CHART, copy)
    for path in (copy / "crds").glob("*.yaml"):
        docs = [for_v1_20(d) for d in yaml.safe_load_all(path.read_text()) if d]
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return copy


def install_crds(kube_api: Any) -> None:
    """The chart's CRDs (see the module docstring for the v1.20 adjustment), Established. Idempotent."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(kube_api)
    for crd in chart_crds():
        try:
            ext.create_custom_resource_definition(for_v1_20(crd))
        except ApiException as exc:
            if exc.status != 409:
                raise
    for crd in chart_crds():
        _wait_established(kube_api, crd["metadata"]["name"])


def helm_config(cluster: LocalCluster, namespace: str) -> Any:
    import helm_python as helm

    return helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=namespace)


@pytest.fixture
def release(
    kube_cluster: LocalCluster, kube_api: Any, tmp_path: Path
) -> Iterator[tuple[str, str, list[str]]]:
    """The chart installed in namespaced mode for two fresh team namespaces; uninstalled afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    suffix = uuid.uuid4().hex[:6]
    system, teams = f"kubetune-{suffix}", [f"team-a-{suffix}", f"team-b-{suffix}"]
    for ns in (system, *teams, f"other-{suffix}"):
        core.create_namespace({"metadata": {"name": ns}})
    name = f"kt-{suffix}"
    chart = chart_for_v1_20(tmp_path)
    config = helm_config(kube_cluster, system)
    installed = False
    try:
        config.install(chart, name, {"watchNamespaces": teams}, namespace=system, timeout=120)
        installed = True
        yield name, system, teams
    finally:
        try:
            if installed:
                config.uninstall(name)
        finally:
            config.close()
            for ns in (system, *teams, f"other-{suffix}"):
                core.delete_namespace(ns)


def can_i(
    cluster: LocalCluster, token: str, verb: str, group: str, resource: str, sub: str, ns: str | None
) -> bool:
    """`kubectl auth can-i` as the token's owner (SelfSubjectAccessReview)."""
    from kubernetes import client

    with cluster.api_client(cluster.kubeconfig_for_token(token)) as api:
        review = client.AuthorizationV1Api(api).create_self_subject_access_review(
            {
                "spec": {
                    "resourceAttributes": {
                        "verb": verb,
                        "group": group,
                        "resource": resource,
                        "subresource": sub or None,
                        "namespace": ns,
                    }
                }
            }
        )
        return bool(review.status.allowed)


def _wait_established(kube_api: Any, name: str, timeout: float = 30) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube_api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return
        time.sleep(0.2)
    raise AssertionError(f"CRD {name} not Established after {timeout}s")


def test_chart_installs_and_the_operator_account_can_do_exactly_what_it_needs(
    kube_cluster: LocalCluster, kube_api: Any, release: tuple[str, str, list[str]]
) -> None:
    from kubernetes import client

    name, system, teams = release
    for crd in (
        "finetunejobs.kubetune.io",
        "modelversions.kubetune.io",
        "finetunesweeps.kubetune.io",
        "kopfpeerings.kopf.dev",
    ):
        _wait_established(kube_api, crd)
    apps = client.AppsV1Api(kube_api)
    deploy = apps.read_namespaced_deployment(f"{name}-kubetune-operator", system)
    assert deploy.spec.template.spec.security_context.run_as_non_root is True
    cm = client.CoreV1Api(kube_api).read_namespaced_config_map(f"{name}-kubetune-operator-settings", system)
    assert cm.data["KUBETUNE_OPERATOR_NAMESPACES"] == f'["{teams[0]}","{teams[1]}"]'
    custom = client.CustomObjectsApi(kube_api)
    for ns in teams:
        peering = custom.get_namespaced_custom_object(
            "kopf.dev", "v1", ns, "kopfpeerings", f"{name}-kubetune-operator"
        )
        assert peering["metadata"]["name"] == cm.data["KUBETUNE_OPERATOR_PEERING_NAME"]

    token = kube_cluster.service_account_token(system, f"{name}-kubetune-operator")
    other = teams[0].replace("team-a", "other")
    problems: list[str] = []
    scopes: list[Any]
    for verb, group, resource, sub, namespaced in ALLOWED:
        scopes = [*teams] if namespaced else [None]
        for ns in scopes:
            if not can_i(kube_cluster, token, verb, group, resource, sub, ns):
                problems.append(f"cannot {verb} {group}/{resource}/{sub} in {ns}")
    for verb, group, resource, sub, namespaced in DENIED:
        scopes = [*teams, system] if namespaced else [None]
        for ns in scopes:
            if can_i(kube_cluster, token, verb, group, resource, sub, ns):
                problems.append(f"CAN {verb} {group}/{resource}/{sub} in {ns}")
    # Namespaced mode: nothing in a namespace it does not serve.
    for verb, group, resource, sub, namespaced in ALLOWED:
        if namespaced and can_i(kube_cluster, token, verb, group, resource, sub, other):
            problems.append(f"CAN {verb} {group}/{resource}/{sub} in unserved namespace {other}")
    assert problems == []


def test_chart_upgrade_to_cluster_wide_mode(
    kube_cluster: LocalCluster, kube_api: Any, release: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    name, system, _teams = release
    config = helm_config(kube_cluster, system)
    try:
        rel = config.upgrade(
            chart_for_v1_20(tmp_path), name, {"watchNamespaces": []}, namespace=system, timeout=120
        )
    finally:
        config.close()
    assert "kind: ClusterKopfPeering" in rel["manifest"]
    token = kube_cluster.service_account_token(system, f"{name}-kubetune-operator")
    fresh = f"fresh-{uuid.uuid4().hex[:6]}"
    from kubernetes import client

    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": fresh}})
    try:
        assert can_i(kube_cluster, token, "watch", "kubetune.io", "finetunejobs", "", fresh)
        assert not can_i(kube_cluster, token, "get", "", "secrets", "", fresh)
    finally:
        client.CoreV1Api(kube_api).delete_namespace(fresh)


def test_chart_path_is_the_repository_chart() -> None:
    assert (Path(CHART) / "Chart.yaml").is_file()
