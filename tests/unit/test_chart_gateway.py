"""The chart's optional gateway, rendered by the real Helm engine: off by default, least RBAC, no Secret read."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import yaml

from kubetune_gateway import rbac
from tests.unit.test_chart import CHART, by_kind, render, render_objects

VALUES: dict[str, Any] = {
    "gateway": {
        "enabled": True,
        "tenantNamespaces": ["team-a", "team-b"],
        "tenantsSecret": "gateway-tenants",
        "storeCredentialsSecret": "gateway-s3",
        "settings": {
            "files": {"uri": "s3://files/gateway"},
            "baseModels": {"llama-3-8b": "s3://models/base/llama-3-8b"},
            "outputUri": "s3://registry/openai",
        },
    }
}


def _gateway_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [o for o in render_objects(values) if "gateway" in o["metadata"]["name"]]


def test_the_gateway_is_off_by_default() -> None:
    assert _gateway_objects() == []


def test_enabled_it_renders_valid_objects_with_a_role_per_tenant_namespace() -> None:
    objs = _gateway_objects(VALUES)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        ["ServiceAccount", "ConfigMap", "Deployment", "Service", *["Role", "RoleBinding"] * 2]
    )
    for obj in objs:
        kubernetes_validate.validate(obj, "1.34", strict=True)
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:  # exactly the rules the integration test runs the gateway under
        assert role["rules"] == [rule for _, rule in rbac.RULES]
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"] and "*" not in rule["verbs"] + rule["resources"]
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")


def test_every_gateway_rule_has_a_reason() -> None:
    lines = (CHART / "templates" / "gateway.yaml").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("  - apiGroups")]
    assert len(starts) == len(rbac.RULES)
    for i in starts:  # the comment block right above each rule opens with its reason
        j = i - 1
        while lines[j].startswith("  #") and not lines[j].startswith("  # Application:"):
            j -= 1
        assert lines[j].startswith("  # Application:"), lines[i]


def test_settings_reach_the_pod_and_secrets_come_by_mount_and_env_only() -> None:
    objs = _gateway_objects(VALUES)
    (cm,) = by_kind(objs, "ConfigMap")
    settings = yaml.safe_load(cm["data"]["gateway.yaml"])
    assert settings["tenantsFile"] == "/etc/kubetune-gateway/tenants/tenants.yaml"
    assert settings["baseModels"] == {"llama-3-8b": "s3://models/base/llama-3-8b"}
    (deploy,) = by_kind(objs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}[
        "tenants"
    ] == "gateway-tenants"
    env = pod["containers"][0]["env"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env} == {"gateway-s3"}
    assert "--config" in pod["containers"][0]["args"]


def test_enabling_it_without_a_tenants_secret_fails_naming_the_key() -> None:
    values = {"gateway": {**VALUES["gateway"], "tenantsSecret": ""}}
    try:
        render(values)
    except Exception as e:
        assert "gateway.tenantsSecret" in str(e)
    else:
        raise AssertionError("rendering without gateway.tenantsSecret should fail")
