"""The FineTuneJob API: defaults, and every class of bad input rejected with the field named —
by the pydantic models and by the generated CRD schema alike."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_api.models import FineTuneJob, FineTuneJobSpec
from tests.support.crd_schema import validate

MINIMAL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo"},
    "spec": {
        "model": {"name": "demo-model", "base": {"uri": "s3://models/base/llama"}},
        "data": {"train": {"uri": "s3://data/train.jsonl"}},
        "output": {"uri": "s3://models/registry"},
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path changes applied to spec, e.g. with_spec(**{"training.batchSize": 0})."""
    obj = copy.deepcopy(MINIMAL)
    for path, value in changes.items():
        node = obj["spec"]
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return obj


def model_errors(obj: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        FineTuneJob.model_validate(obj)
    return str(exc.value)


def test_minimal_spec_gets_the_documented_sft_defaults() -> None:
    spec = FineTuneJob.model_validate(MINIMAL).spec
    assert spec.method.type == "lora"
    assert (spec.method.lora.r, spec.method.lora.alpha, spec.method.lora.dropout) == (16, 32, 0.1)
    assert spec.method.lora.target_modules == ["all-linear"]
    assert spec.training.scheduler == "cosine" and spec.training.warmup_ratio > 0
    assert spec.training.epochs == 3 and spec.training.max_seq_length == 512
    assert spec.training.batch_size == 8 and spec.training.gradient_accumulation_steps > 1
    assert spec.training.precision == "auto"
    assert spec.model.base.trust_remote_code is False and spec.model.base.allow_pickle is False


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = []

    def visit(cls: type, path: str) -> None:
        for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{path}.{name}")
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    visit(arg, f"{path}.{name}")
                for inner in getattr(arg, "__args__", ()) or ():
                    if isinstance(inner, type) and hasattr(inner, "model_fields"):
                        visit(inner, f"{path}.{name}")

    visit(FineTuneJobSpec, "spec")
    assert missing == []


BAD_INPUTS = [
    # (case, change, field path the message must name, words of the broken rule)
    ("wrong type", {"training.batchSize": "eight"}, "spec.training.batchSize", "integer"),
    ("unknown enum", {"method.type": "prefix-tuning"}, "spec.method.type", "lora"),
    ("out of range", {"training.batchSize": 0}, "spec.training.batchSize", "1"),
    ("out of range float", {"method.lora.dropout": 1.5}, "spec.method.lora.dropout", "0.9"),
    ("name with slash", {"model.name": "team/model"}, "spec.model.name", "match"),
    ("name with dotdot", {"model.name": "a..b"}, "spec.model.name", "match"),
    ("name traversal", {"model.name": "../../etc"}, "spec.model.name", "match"),
    ("alias with slash", {"output.promote": {"alias": "prod/../x"}}, "spec.output.promote.alias", "match"),
    ("bad uri scheme", {"model.base.uri": "ftp://host/model"}, "spec.model.base.uri", "match"),
    (
        "qlora on cpu",
        {"method.type": "qlora", "distributed.gpusPerNode": 0},
        "spec.method.type",
        "qlora needs a GPU",
    ),
    (
        "both eval sources",
        {"data.eval": {"uri": "s3://data/eval.jsonl"}, "data.evalSplit": 0.1},
        "spec.data.evalSplit",
        "not both",
    ),
    ("multi-node without strategy", {"distributed.nodes": 2}, "spec.distributed.strategy", "nodes > 1"),
    ("gate on unknown metric", {"evaluation.gates": {"vibes": {"min": 1}}}, "spec.evaluation.gates", "vibes"),
    ("gate without bound", {"evaluation.gates": {"accuracy": {}}}, "spec.evaluation.gates", "min or max"),
    (
        "nf4 on cpu",
        {"quantization.formats": ["nf4"], "distributed.gpusPerNode": 0},
        "spec.quantization.formats",
        "nf4",
    ),
]


@pytest.mark.parametrize(("case", "change", "field", "rule"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_by_models_and_crd_naming_the_field(
    case: str, change: dict[str, Any], field: str, rule: str
) -> None:
    obj = with_spec(**change)
    # pydantic: locations are relative to the object, so 'spec.training.batchSize' appears as-is,
    # and cross-field rule messages start with the spec path.
    msg = model_errors(obj)
    assert field in msg.replace("\n", ".").replace(" ", "") or field in msg, msg
    crd = validate(obj)
    assert crd, f"CRD schema accepted {case}"
    joined = "\n".join(crd)
    assert field.removeprefix("spec.").split(".")[0] in joined
    if case not in ("gate on unknown metric",):
        assert rule.split()[0] in joined or rule in msg


def test_unknown_field_is_an_error_not_silently_dropped() -> None:
    msg = model_errors(with_spec(**{"training.learningrate": 0.1}))
    assert "training.learningrate" in msg.replace("\n", ".").replace(" ", "") or "learningrate" in msg
    assert "Extra inputs are not permitted" in msg


def test_crd_and_models_agree_on_valid_specs() -> None:
    assert validate(MINIMAL) == []
    FineTuneJob.model_validate(MINIMAL)
    big = with_spec(
        **{
            "distributed.nodes": 4,
            "distributed.gpusPerNode": 8,
            "distributed.strategy": "ddp",
            "evaluation.gates": {"accuracy": {"min": 0.9}, "latency_p95_ms": {"max": 500}},
        }
    )
    assert validate(big) == []
    FineTuneJob.model_validate(big)
