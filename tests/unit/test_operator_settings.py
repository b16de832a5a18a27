"""Operator settings, guard rails, the operator's RBAC and metrics (all pure or in-process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from prometheus_client import generate_latest

from kubetune_operator import rbac
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings, SettingsError
from kubetune_operator.validation import SpecInvalid, validate_job


def body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "tiny", "base": {"uri": "s3://models/base/tiny"}},
        "data": {"train": {"uri": "s3://data/train.jsonl"}},
        "distributed": {"gpusPerNode": 0},
        "output": {"uri": "s3://registry/models"},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": base,
        "status": {"phase": "Running", "anything": "the operator ignores status when validating"},
    }


# --- settings ---------------------------------------------------------------------------------


def test_settings_from_env_lists_json_and_none() -> None:
    s = OperatorSettings.from_env(
        {
            "KUBETUNE_OPERATOR_TRAINER_IMAGE": "reg/trainer:1",
            "KUBETUNE_OPERATOR_NAMESPACES": "team-a, team-b",
            "KUBETUNE_OPERATOR_ALLOWED_IMAGES": '["reg/"]',
            "KUBETUNE_OPERATOR_MAX_NODES": "4",
            "KUBETUNE_OPERATOR_METRICS_PORT": "none",
            "KUBETUNE_OPERATOR_EXTRA_ENV": '{"NCCL_DEBUG": "WARN"}',
            "KUBETUNE_OPERATOR_COMPAT_K8S_1_20": "true",
            "UNRELATED": "ignored",
        }
    )
    assert s.trainer_image == "reg/trainer:1"
    assert s.namespaces == ("team-a", "team-b")
    assert s.allowed_images == ("reg/",)
    assert s.max_nodes == 4 and s.metrics_port is None and s.compat_k8s_1_20 is True
    assert s.extra_env == {"NCCL_DEBUG": "WARN"}


def test_unknown_or_invalid_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="KUBETUNE_OPERATOR_MAX_NODS: unknown setting"):
        OperatorSettings.from_env({"KUBETUNE_OPERATOR_MAX_NODS": "4"})
    with pytest.raises(SettingsError, match="KUBETUNE_OPERATOR_MAX_NODES"):
        OperatorSettings.from_env({"KUBETUNE_OPERATOR_MAX_NODES": "zero"})
    with pytest.raises(SettingsError, match="KUBETUNE_OPERATOR_EXTRA_ENV: not valid JSON"):
        OperatorSettings.from_env({"KUBETUNE_OPERATOR_EXTRA_ENV": "{oops"})
    with pytest.raises(SettingsError, match="empty prefix"):
        OperatorSettings.from_env({"KUBETUNE_OPERATOR_ALLOWED_IMAGES": '[""]'})


# --- validation and guard rails ---------------------------------------------------------------


def test_valid_spec_passes() -> None:
    job = validate_job(body(), OperatorSettings())
    assert job.metadata.name == "demo" and job.spec.model.name == "tiny"


def test_schema_violation_names_the_field() -> None:
    with pytest.raises(SpecInvalid) as err:
        validate_job(body(training={"batchSize": 0}), OperatorSettings())
    assert err.value.field == "spec.training.batchSize"


def test_cross_field_rule_names_the_field() -> None:
    with pytest.raises(SpecInvalid) as err:
        validate_job(body(method={"type": "qlora"}), OperatorSettings())
    assert err.value.field == "spec.method.type"
    assert "qlora needs a GPU" in str(err.value)


@pytest.mark.parametrize(
    ("spec", "settings", "field", "words"),
    [
        (
            {"distributed": {"nodes": 4, "gpusPerNode": 1, "strategy": "ddp"}},
            {"max_nodes": 2},
            "spec.distributed.nodes",
            "limit of 2",
        ),
        (
            {"distributed": {"nodes": 2, "gpusPerNode": 8, "strategy": "ddp"}},
            {"max_gpus_per_job": 8},
            "spec.distributed.gpusPerNode",
            "16 GPUs",
        ),
        (
            {"output": {"uri": "s3://elsewhere/x"}},
            {"allowed_output_prefixes": ("s3://registry/",)},
            "spec.output.uri",
            "allowed prefix",
        ),
        (
            {"model": {"name": "t", "base": {"uri": "hf://org/m"}}},
            {"allowed_base_model_prefixes": ("s3://models/",)},
            "spec.model.base.uri",
            "allowed prefix",
        ),
        (
            {"distillation": {"teacher": {"uri": "hf://org/teacher"}}},
            {"allowed_base_model_prefixes": ("s3://models/",)},
            "spec.distillation.teacher.uri",
            "allowed prefix",
        ),
        (
            {"distillation": {"teacher": {"uri": "s3://models/t", "trustRemoteCode": True}}},
            {},
            "spec.distillation.teacher.trustRemoteCode",
            "disabled",
        ),
        ({"image": "evil/trainer:1"}, {}, "spec.image", "disabled"),
        ({"image": "evil/trainer:1"}, {"allowed_images": ("reg/",)}, "spec.image", "allowed prefix"),
        (
            {"model": {"name": "t", "base": {"uri": "s3://models/m", "trustRemoteCode": True}}},
            {},
            "spec.model.base.trustRemoteCode",
            "disabled",
        ),
        (
            {"distributed": {"nodes": 2, "gpusPerNode": 0, "strategy": "ddp"}},
            {"compat_k8s_1_20": True},
            "spec.distributed.nodes",
            "Indexed",
        ),
    ],
)
def test_guard_rails(spec: dict[str, Any], settings: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecInvalid) as err:
        validate_job(body(**spec), OperatorSettings(**settings))
    assert err.value.field == field
    assert words in str(err.value)


def test_guard_rails_allow_what_is_within_limits() -> None:
    settings = OperatorSettings(
        allowed_images=("reg/",), allowed_output_prefixes=("s3://registry/",), max_nodes=2
    )
    validate_job(
        body(image="reg/trainer:2", distributed={"nodes": 2, "gpusPerNode": 1, "strategy": "ddp"}), settings
    )


# --- the operator's RBAC ----------------------------------------------------------------------


def test_operator_rbac_is_valid_least_privilege_and_has_no_secret_access() -> None:
    roles = rbac.operator_cluster_roles()
    assert {r["metadata"]["name"] for r in roles} == {rbac.CLUSTER_ROLE, rbac.NAMESPACED_ROLE}
    for role in roles:
        kubernetes_validate.validate(role, "1.31.0", strict=True)
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], rule
            assert "secrets" not in rule["resources"]
    text = Path(rbac.__file__).with_name("rbac.yaml").read_text()
    rules_with_reason = text.count("  # ")
    assert rules_with_reason >= sum(len(r["rules"]) for r in roles)


def test_operator_holds_what_the_trainer_role_grants() -> None:
    """RBAC forbids creating a Role with rights its creator lacks (escalation check)."""
    namespaced = next(
        r for r in rbac.operator_cluster_roles() if r["metadata"]["name"] == rbac.NAMESPACED_ROLE
    )
    status_rule = next(r for r in namespaced["rules"] if r["resources"] == ["finetunejobs/status"])
    assert {"get", "patch"} <= set(status_rule["verbs"])


@pytest.mark.parametrize("namespaces", [(), ("a", "b")])
def test_bindings(namespaces: tuple[str, ...]) -> None:
    bindings = rbac.operator_bindings("kubetune-system", "kubetune-operator", namespaces)
    for binding in bindings:
        kubernetes_validate.validate(binding, "1.31.0", strict=True)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": "kubetune-system"}
        ]
    kinds = [b["kind"] for b in bindings]
    assert kinds == (
        ["ClusterRoleBinding", "ClusterRoleBinding"]
        if not namespaces
        else ["ClusterRoleBinding", "RoleBinding", "RoleBinding"]
    )


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_count_jobs_by_phase_and_errors() -> None:
    import kopf

    m = OperatorMetrics()
    m.observe_phase("ns", "a", "Running")
    m.observe_phase("ns", "b", "Running")
    m.observe_phase("ns", "b", "Succeeded")
    m.observe_phase("ns", "a", None)
    with m.timed("reconcile"):
        pass
    with pytest.raises(kopf.PermanentError), m.timed("reconcile"):
        raise kopf.PermanentError("bad spec")
    text = generate_latest(m.registry).decode()
    assert 'kubetune_finetunejobs{phase="Running"} 0.0' in text
    assert 'kubetune_finetunejobs{phase="Succeeded"} 1.0' in text
    assert 'kubetune_reconcile_errors_total{handler="reconcile",kind="permanent"} 1.0' in text
    assert 'kubetune_reconcile_duration_seconds_count{handler="reconcile"} 2.0' in text


# --- wiring -----------------------------------------------------------------------------------


def test_register_attaches_handlers_without_import_time_side_effects() -> None:
    import kopf

    from kubetune_operator.handlers import register

    registry = kopf.OperatorRegistry()
    built: list[object] = []
    register(registry, OperatorSettings(resync_seconds=7), lambda: built.append(1))
    assert built == []  # the context is built at operator start-up, not at registration
    ids = {h.id for h in registry._changing.get_all_handlers()}  # kopf has no public listing
    assert {"reconcile", "forget", "sweep"} <= ids
    timers = {t.id: getattr(t, "interval", None) for t in registry._spawning.get_all_handlers()}
    assert timers == {"resync": 7, "sweep-resync": 7}  # a FineTuneJob's and a FineTuneSweep's


def test_main_refuses_bad_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune_operator.__main__ import main

    monkeypatch.setenv("KUBETUNE_OPERATOR_MAX_NODS", "3")
    assert main() == 2
    assert "KUBETUNE_OPERATOR_MAX_NODS" in capsys.readouterr().err
