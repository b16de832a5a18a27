"""Guard rails a tenant cannot walk around (issue 16, deliverable 5): each bypass refused, the field named.

Pure: :func:`kubetune_operator.validation.validate_job` on FineTuneJob bodies as the API server returns
them. tests/integration/test_operator_guard_rails_cluster.py shows the same refusals end to end.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validation import SpecInvalid, uri_under, validate_job

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "t", "namespace": "team-a", "uid": "u", "generation": 1},
    "spec": {
        "model": {"name": "tiny", "base": {"uri": "s3://models/base/tiny"}},
        "data": {"train": {"uri": "s3://data/train.jsonl"}, "eval": {"uri": "s3://data/eval.jsonl"}},
        "distributed": {"gpusPerNode": 0},
        "output": {"uri": "s3://models/registry"},
    },
}

LOCKED = OperatorSettings(
    allowed_base_model_prefixes=("s3://models",),
    allowed_output_prefixes=("s3://models/registry",),
    allowed_data_prefixes=("s3://data",),
    allowed_storage_endpoints=("https://s3.internal.example.com",),
    allowed_credentials_secrets=("s3-*",),
    allowed_priority_classes=("training",),
    allowed_toleration_keys=("nvidia.com/gpu",),
    allowed_gpu_resource_names=("nvidia.com/gpu",),
)


def body(namespace: str = "team-a", **changes: Any) -> dict[str, Any]:
    obj = copy.deepcopy(BASE)
    obj["metadata"]["namespace"] = namespace
    for dotted, value in changes.items():
        node = obj["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return obj


def refused_fields(obj: dict[str, Any], settings: OperatorSettings = LOCKED) -> list[str]:
    with pytest.raises(SpecInvalid) as err:
        validate_job(obj, settings)
    return [field for field, _ in err.value.problems]


def test_the_baseline_passes_every_guard_rail() -> None:
    validate_job(body(), LOCKED)
    validate_job(
        body(
            **{
                "storage.endpoint": "https://s3.internal.example.com",
                "storage.credentialsSecret": "s3-team-a",
                "resources.priorityClassName": "training",
                "resources.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            }
        ),
        LOCKED,
    )


@pytest.mark.parametrize(
    ("uri", "prefix", "under"),
    [
        ("s3://models/base/x", "s3://models", True),
        ("s3://models", "s3://models", True),
        ("s3://models-attacker/base/x", "s3://models", False),
        ("s3://models/registry-evil", "s3://models/registry", False),
        ("s3://models/registry/a", "s3://models/registry/", True),
        ("s3://models/registry/../../other", "s3://models/registry", False),
        ("gs://models/x", "s3://models", False),
        ("S3://models/x", "s3://models", True),
        ("s3://models/x?y=1", "s3://models", False),
        ("s3://anything/x", "s3://", True),
        ("https://s3.internal.example.com:9000", "https://s3.internal.example.com", False),
        ("https://s3.internal.example.com.attacker.net", "https://s3.internal.example.com", False),
    ],
)
def test_uri_prefixes_compare_scheme_bucket_and_whole_segments(uri: str, prefix: str, under: bool) -> None:
    assert uri_under(uri, prefix) is under


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model.base.uri": "s3://models-attacker/base/x"}, "spec.model.base.uri"),
        ({"output.uri": "s3://models/registry-evil"}, "spec.output.uri"),
        ({"data.train.uri": "s3://attacker/train.jsonl"}, "spec.data.train.uri"),
        ({"data.eval.uri": "s3://data-evil/eval.jsonl"}, "spec.data.eval.uri"),
        ({"storage.endpoint": "https://attacker.example.com"}, "spec.storage.endpoint"),
        ({"storage.credentialsSecret": "admin-kubeconfig"}, "spec.storage.credentialsSecret"),
        (
            {
                "tracking": {
                    "mlflow": {
                        "trackingUri": "https://mlflow.example.com",
                        "credentialsSecret": "admin-token",
                    }
                }
            },
            "spec.tracking.mlflow.credentialsSecret",
        ),
        ({"resources.priorityClassName": "system-cluster-critical"}, "spec.resources.priorityClassName"),
        ({"resources.tolerations": [{"operator": "Exists"}]}, "spec.resources.tolerations[0]"),
        (
            {
                "resources.tolerations": [
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
                ]
            },
            "spec.resources.tolerations[0].key",
        ),
        ({"resources.gpuResourceName": "memory"}, "spec.resources.gpuResourceName"),
        ({"resources.gpuResourceName": "amd.com/gpu"}, "spec.resources.gpuResourceName"),
    ],
)
def test_each_bypass_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    assert field in refused_fields(body(**changes))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"resources.priorityClassName": "system-node-critical"}, "spec.resources.priorityClassName"),
        ({"resources.tolerations": [{"operator": "Exists"}]}, "spec.resources.tolerations[0]"),
        (
            {"resources.tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists"}]},
            "spec.resources.tolerations[0].key",
        ),
        ({"resources.gpuResourceName": "memory"}, "spec.resources.gpuResourceName"),
        ({"resources.gpuResourceName": "cpu"}, "spec.resources.gpuResourceName"),
        ({"resources.gpuResourceName": "kubernetes.io/batteries"}, "spec.resources.gpuResourceName"),
        ({"resources.gpuResourceName": "hugepages-2Mi"}, "spec.resources.gpuResourceName"),
    ],
)
def test_safe_defaults_refuse_what_no_tenant_needs(changes: dict[str, Any], field: str) -> None:
    """Without any admin setting: system priority classes, every-taint tolerations, Kubernetes-owned
    taints and native resources as "GPU" are refused."""
    assert field in refused_fields(body(**changes), OperatorSettings())


def test_safe_defaults_still_allow_ordinary_jobs() -> None:
    validate_job(
        body(
            **{
                "resources.priorityClassName": "batch-low",
                "resources.tolerations": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}],
                "resources.gpuResourceName": "amd.com/gpu",
            }
        ),
        OperatorSettings(),
    )


def test_system_namespaces_are_refused_by_default() -> None:
    assert "metadata.namespace" in refused_fields(body(namespace="kube-system"), OperatorSettings())
    validate_job(body(namespace="kube-system"), OperatorSettings(denied_namespaces=()))


def test_a_wildcard_toleration_needs_an_explicit_star() -> None:
    validate_job(
        body(**{"resources.tolerations": [{"operator": "Exists"}]}),
        OperatorSettings(allowed_toleration_keys=("*",)),
    )


def test_unknown_fields_from_a_newer_crd_are_ignored_not_invalid() -> None:
    """CRDs are upgraded before the operator: a field the API server defaulted but this operator does
    not know must not fail (or replace) a job that was valid."""
    obj = body(**{"training.warmupShape": "linear"})
    job = validate_job(obj, OperatorSettings())
    assert job.spec.output.uri == "s3://models/registry"
    # A value that is wrong for a field the operator knows is still invalid.
    assert "spec.training.epochs" in refused_fields(body(**{"training.epochs": -1}), OperatorSettings())


def test_child_watches_are_label_filtered_server_side() -> None:
    """kopf's handler labels= filter is client-side: without a server-side selector a cluster-wide
    operator would stream every pod and Job of the cluster. The startup handler sets one."""
    import kopf
    from kopf._cogs.structs import references

    from kubetune_operator import handlers

    settings = kopf.OperatorSettings()
    memo: dict[str, Any] = {}
    startup = handlers.make_startup(OperatorSettings(metrics_port=None), lambda: object())
    startup(settings=settings, memo=memo)

    def resource(group: str, version: str, plural: str) -> references.Resource:
        return references.Resource(group=group, version=version, plural=plural, namespaced=True)

    selector = "app.kubernetes.io/managed-by=kubetune-operator"
    collect = settings.watching.label_selectors.collect
    assert list(collect(resource("", "v1", "pods"))) == [selector]
    assert list(collect(resource("batch", "v1", "jobs"))) == [selector]
    assert list(collect(resource("kubetune.io", "v1alpha1", "finetunejobs"))) == []
