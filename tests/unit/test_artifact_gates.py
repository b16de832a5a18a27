"""What ships is what is judged (issue 17 item 6): gates can name a published artifact.

* the API accepts ``<artifact>.<metric>`` gate keys (and ``maxDropVsTuned`` on them) only for an
  artifact the version publishes — the pydantic models and the CRD's CEL rules alike;
* :func:`check_artifact_gates` reads each artifact's own metrics, and ``maxDropVsTuned`` bounds it
  relative to the tuned model in the metric's bad direction;
* :func:`evaluate_artifact` scores an artifact with the evaluator's own functions on the same
  examples: an ONNX-style runner (logits only) gets the same eval_loss as the torch model it wraps;
* the model card and report.json show each artifact beside the tuned model, and each gate with
  the artifact it judged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kubetune_api.loader import SpecError, parse_finetunejob
from kubetune_api.models import FineTuneJob, QuantFormat
from kubetune_api.rules import GATE_ARTIFACTS, split_gate_key
from kubetune_api.runconfig import RunConfig, resolve_run_config
from kubetune_trainer.artifacts.report import render_model_card, write_eval_report
from kubetune_trainer.evaluate.evaluator import (
    ArtifactEvaluation,
    EvalReport,
    artifact_metrics,
    evaluate_artifact,
    loss_and_perplexity,
)
from kubetune_trainer.evaluate.gates import (
    GateReport,
    artifact_gates,
    check_artifact_gates,
    check_gates,
    tuned_gates,
)
from kubetune_trainer.evaluate.quality import default_gates, promotable
from tests.support.crd_schema import validate
from tests.unit.test_evaluate import PAIRS, build_tiny_llama, build_tiny_tokenizer, make_examples

MINIMAL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo"},
    "spec": {
        "model": {"name": "demo-model", "base": {"uri": "s3://models/base/llama"}},
        "data": {"train": {"uri": "s3://data/train.jsonl"}},
        "quantization": {"formats": ["int8", "onnx-int8"]},
        "output": {"uri": "s3://models/registry"},
    },
}


def job(gates: dict[str, Any], **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(MINIMAL)
    obj["spec"].update(spec)
    obj["spec"]["evaluation"] = {"gates": gates}
    return obj


def model_error(obj: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        FineTuneJob.model_validate(obj)
    return str(exc.value)


# ------------------------------------------------------------------------------------------- the API


def test_gate_artifacts_are_merged_and_every_quantization_format() -> None:
    assert ("merged", *get_args(QuantFormat)) == GATE_ARTIFACTS
    assert split_gate_key("onnx-int8.rouge_l") == ("onnx-int8", "rouge_l")
    assert split_gate_key("latency_p95_ms") == (None, "latency_p95_ms")


def test_gates_on_published_artifacts_are_accepted_by_models_and_crd() -> None:
    obj = job(
        {
            "rouge_l": {"min": 0.3},
            "int8.rouge_l": {"maxDropVsTuned": 0.02},
            "onnx-int8.latency_p95_ms": {"max": 500},
            "merged.eval_loss": {"max": 2.0, "maxDropVsTuned": 0.01},
        }
    )
    spec = FineTuneJob.model_validate(obj).spec
    assert validate(obj) == []
    assert spec.evaluation.gates["int8.rouge_l"].max_drop_vs_tuned == 0.02
    assert spec.evaluation.gate_metrics() == ["rouge_l", "latency_p95_ms", "eval_loss"]
    # A full fine-tune always publishes merged/ (its trained weights), output.merge or not.
    full = job(
        {"merged.rouge_l": {"min": 0.3}},
        method={"type": "full"},
        output={"uri": "s3://models/registry", "merge": False},
    )
    FineTuneJob.model_validate(full)
    assert validate(full) == []


REFUSED = [
    (
        "format not requested",
        {"int4.rouge_l": {"min": 0.3}},
        {},
        "spec.evaluation.gates: int4.rouge_l: artifact int4 is not in spec.quantization.formats "
        "(int8, onnx-int8)",
    ),
    (
        "merged not published",
        {"merged.rouge_l": {"min": 0.3}},
        {"output": {"uri": "s3://models/registry", "merge": False}},
        "spec.evaluation.gates: merged.rouge_l: the merged model is not published",
    ),
    (
        "drop on the tuned model",
        {"rouge_l": {"maxDropVsTuned": 0.02}},
        {},
        "spec.evaluation.gates: rouge_l: maxDropVsTuned compares an artifact with the tuned model",
    ),
    ("unknown artifact", {"fp8.rouge_l": {"min": 0.3}}, {}, "unknown gate 'fp8.rouge_l'"),
    ("unknown metric on an artifact", {"int8.vibes": {"min": 0.3}}, {}, "unknown gate 'int8.vibes'"),
]


@pytest.mark.parametrize(("case", "gates", "spec", "expected"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_gate_on_an_artifact_the_version_lacks_is_refused_naming_the_gate(
    case: str, gates: dict[str, Any], spec: dict[str, Any], expected: str
) -> None:
    obj = job(gates, **spec)
    assert expected in model_error(obj), case
    crd = "\n".join(validate(obj))
    assert "spec.evaluation.gates" in crd, (case, crd)


def test_kubetune_run_points_at_the_gates_line() -> None:
    text = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: demo}
spec:
  model: {name: demo-model, base: {uri: s3://models/base/llama}}
  data: {train: {uri: s3://data/train.jsonl}}
  output: {uri: s3://models/registry}
  evaluation:
    gates:
      int8.rouge_l: {maxDropVsTuned: 0.02}
"""
    with pytest.raises(SpecError) as err:
        parse_finetunejob(text, "job.yaml")
    (problem,) = err.value.problems
    assert problem.startswith("job.yaml:10: spec.evaluation.gates: int8.rouge_l: artifact int8 is not in")


def test_the_run_config_of_an_artifact_gate_survives_its_json_round_trip() -> None:
    """The operator writes the RunConfig as JSON for the pod: the gate's metric (not the gate key)
    must be what resolution adds to evaluation.metrics."""
    obj = job({"int8.latency_p95_ms": {"max": 500}})
    rc = resolve_run_config(FineTuneJob.model_validate(obj))
    again = RunConfig.model_validate_json(rc.to_json())
    assert "latency_p95_ms" in again.evaluation.metrics
    assert "int8.latency_p95_ms" in again.evaluation.gates


# ------------------------------------------------------------------------------------------ the gates

TUNED = {"rouge_l": 0.80, "latency_p95_ms": 100.0, "eval_loss": 1.0}


def test_max_drop_vs_tuned_bounds_an_artifact_in_the_metric_s_bad_direction() -> None:
    gates = {
        "int8.rouge_l": {"maxDropVsTuned": 0.02},  # needs >= 0.784
        "onnx-int8.rouge_l": {"maxDropVsTuned": 0.02},
        "int8.latency_p95_ms": {"maxDropVsTuned": 0.10, "max": 500},  # needs <= 110
        "onnx-int8.eval_loss": {"maxDropVsTuned": 0.05},  # needs <= 1.05
    }
    artifacts = {
        "int8": {"rouge_l": 0.79, "latency_p95_ms": 104.0},
        "onnx-int8": {"rouge_l": 0.70, "eval_loss": 1.2},
    }
    results = {r.metric: r for r in check_artifact_gates(gates, TUNED, artifacts)}
    assert list(results) == list(gates)
    assert results["int8.rouge_l"].passed and results["int8.rouge_l"].min == pytest.approx(0.784)
    assert "within 2.0% of the tuned model's 0.8" in results["int8.rouge_l"].message
    failed = results["onnx-int8.rouge_l"]
    assert not failed.passed and failed.value == 0.70
    assert failed.message == (
        "onnx-int8.rouge_l = 0.7 is below min 0.784; required within 2.0% of the tuned model's 0.8"
    )
    assert results["int8.latency_p95_ms"].passed and results["int8.latency_p95_ms"].max == pytest.approx(110)
    assert not results["onnx-int8.eval_loss"].passed
    assert results["onnx-int8.eval_loss"].max == pytest.approx(1.05)


def test_an_artifact_gate_never_passes_for_lack_of_a_value() -> None:
    gates = {
        "int4.rouge_l": {"min": 0.1},
        "int8.json_validity": {"min": 0.9},
        "int8.bleu": {"maxDropVsTuned": 0.1},
    }
    results = check_artifact_gates(
        gates,
        TUNED,
        {"int8": {"rouge_l": 0.8}},
        not_computed={"int8": {"json_validity": "spec.evaluation.jsonSchema is not set"}},
        not_evaluated={"int4": "this version publishes no int4 artifact"},
    )
    assert [r.passed for r in results] == [False, False, False]
    assert results[0].message == "int4.rouge_l cannot pass: this version publishes no int4 artifact"
    assert "(spec.evaluation.jsonSchema is not set)" in results[1].message
    assert "tuned model's value was not computed" in results[2].message


def test_a_failed_artifact_gate_makes_the_version_not_promotable() -> None:
    spec_gates = {"rouge_l": {"min": 0.5}, "int8.rouge_l": {"maxDropVsTuned": 0.02}}
    assert list(tuned_gates(spec_gates)) == ["rouge_l"] and list(artifact_gates(spec_gates)) == [
        "int8.rouge_l"
    ]
    tuned_report = check_gates(TUNED, tuned_gates(spec_gates))
    # The default gates add <metric>_vs_base for the tuned model's gates only.
    defaults = default_gates(
        TUNED,
        {"rouge_l": 0.1, "eval_loss": 2.0},
        spec_gates,
        learning=None,
        min_loss_decrease=0,
        learning_rate=1,
    )
    assert [r.metric for r in defaults] == ["eval_loss_vs_base", "rouge_l_vs_base", "train_loss_decrease"]
    assert tuned_report.passed
    report = tuned_report.plus(check_artifact_gates(spec_gates, TUNED, {"int8": {"rouge_l": 0.5}}))
    ok, why = promotable(report)
    assert not report.passed and not ok
    assert "int8.rouge_l = 0.5 is below min 0.784" in why
    assert promotable(tuned_report.plus(check_artifact_gates(spec_gates, TUNED, {"int8": {"rouge_l": 0.8}})))[
        0
    ]


# ------------------------------------------------------------------------------- artifact evaluation


class LogitsOnly:
    """An ONNX-like runner (the TokenGenerator protocol) around a torch model: logits of one sequence."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def logits(self, input_ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([input_ids])).logits[0].float().numpy()

    def generate_token_ids(
        self, prompt_ids: Any, *, max_new_tokens: int, eos_token_id: Any, **_: Any
    ) -> list[int]:
        sequence, new = list(prompt_ids), []
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        for _step in range(max_new_tokens):
            token = int(self.logits(sequence)[-1].argmax())
            new.append(token)
            sequence.append(token)
            if token in stops:
                break
        return new


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("artifact-eval")
    tokenizer = build_tiny_tokenizer(root / "m")
    model = build_tiny_llama(root / "m", len(tokenizer), seed=3)
    return {"tokenizer": tokenizer, "model": model, "examples": make_examples(tokenizer, PAIRS)}


def test_an_artifact_is_scored_like_the_tuned_model_on_the_same_examples(tiny: dict[str, Any]) -> None:
    eval_cfg = {
        "metrics": ["eval_loss", "perplexity", "exact_match", "rouge_l", "latency_p95_ms", "consistency"],
        "maxSamples": 2,
        "maxNewTokens": 4,
        "gates": {"onnx-int8.rouge_l": {"maxDropVsTuned": 0.02}, "int8.consistency": {"min": 0.5}},
    }
    # consistency (sampled 5x) only where a gate on that artifact asks for it.
    assert "consistency" not in artifact_metrics(eval_cfg, "onnx-int8")
    assert "consistency" in artifact_metrics(eval_cfg, "int8")
    examples = tiny["examples"]
    torch_eval = evaluate_artifact(
        "merged", tiny["model"], tiny["tokenizer"], examples, eval_cfg, path="merged", seed=7
    )
    runner_eval = evaluate_artifact(
        "onnx-int8",
        LogitsOnly(tiny["model"]),
        tiny["tokenizer"],
        examples,
        eval_cfg,
        path="quantized/onnx-int8",
        seed=7,
        extra_metrics={"peak_memory_ratio": 0.4},
    )
    # eval_loss over every example (maxSamples bounds generation only), from the runner's own logits.
    loss, _ = loss_and_perplexity(tiny["model"], examples)
    assert runner_eval.metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert torch_eval.metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)
    # Greedy answers of the same samples: the same text metrics.
    assert runner_eval.metrics["exact_match"] == torch_eval.metrics["exact_match"]
    assert runner_eval.metrics["rouge_l"] == pytest.approx(torch_eval.metrics["rouge_l"])
    assert runner_eval.metrics["latency_p95_ms"] > 0 and runner_eval.metrics["peak_memory_ratio"] == 0.4
    assert runner_eval.settings["generation_examples"] == 2 and runner_eval.settings["num_examples"] == 3
    skipped = evaluate_artifact(
        "int8",
        tiny["model"],
        tiny["tokenizer"],
        examples,
        {**eval_cfg, "metrics": ["eval_loss"], "gates": {}},
        path="quantized/int8",
        extra_metrics={"peak_memory_ratio": None},
    )
    assert "peak_memory_ratio" in skipped.skipped and "peak_memory_ratio" not in skipped.metrics


def test_artifact_max_samples_judges_an_artifact_on_fewer_answers_against_the_tuned_on_the_same(
    tiny: dict[str, Any],
) -> None:
    """spec.evaluation.artifactMaxSamples: the artifact answers the first N of the tuned model's
    maxSamples; its eval_loss still covers every example, and maxDropVsTuned compares with the
    tuned model's recorded answers to those N, not with its score on all of them."""
    examples = tiny["examples"]
    eval_cfg = {
        "metrics": ["eval_loss", "exact_match", "rouge_l"],
        "maxSamples": 3,
        "artifactMaxSamples": 1,
        "maxNewTokens": 4,
        "gates": {"int8.rouge_l": {"maxDropVsTuned": 0.0}},
    }
    spec = FineTuneJob.model_validate(
        {**MINIMAL, "spec": {**MINIMAL["spec"], "evaluation": eval_cfg}}
    ).spec.evaluation
    assert spec.artifact_max_samples == 1
    # The tuned model's recorded answers: the first is the reference itself, the others are wrong.
    tuned_answers = [examples[0].answer_text, "zzz", "zzz"]
    result = evaluate_artifact(
        "int8",
        tiny["model"],
        tiny["tokenizer"],
        examples,
        spec,
        path="quantized/int8",
        seed=7,
        tuned_answers=tuned_answers,
    )
    loss, _ = loss_and_perplexity(tiny["model"], examples)
    assert result.metrics["eval_loss"] == pytest.approx(loss, rel=1e-5)  # every example
    assert result.settings["generation_examples"] == 1
    assert result.settings["tuned_generation_examples"] == 3
    # The tuned model on that one example: a perfect answer (the whole-sample score would be 1/3).
    assert result.tuned_on_same == {"exact_match": 1.0, "rouge_l": pytest.approx(1.0)}
    tuned_all = {"eval_loss": loss, "exact_match": 1 / 3, "rouge_l": 1 / 3}
    reference = result.tuned_reference(tuned_all)
    assert reference["eval_loss"] == loss and reference["rouge_l"] == pytest.approx(1.0)
    artifact = {"int8": {**result.metrics, "rouge_l": 0.5}}
    # Against the whole-sample tuned score 0.5 would pass; against the same example it is a drop.
    assert check_artifact_gates(eval_cfg["gates"], tuned_all, artifact)[0].passed
    judged = check_artifact_gates(eval_cfg["gates"], tuned_all, artifact, tuned_for={"int8": reference})
    assert not judged[0].passed
    # Without a subset the tuned model's own figures stand and nothing is re-scored.
    full = evaluate_artifact(
        "int8",
        tiny["model"],
        tiny["tokenizer"],
        examples,
        {**eval_cfg, "artifactMaxSamples": None},
        path="quantized/int8",
        tuned_answers=tuned_answers,
    )
    assert full.tuned_on_same == {} and "tuned_on_same" not in full.to_dict()
    assert full.settings["generation_examples"] == 3


def artifact_card(report: EvalReport, gates: GateReport, evaluations: list[ArtifactEvaluation]) -> str:
    """The model card of a version ``m v1`` with these evaluations and nothing else."""
    return render_model_card(
        model_name="m",
        version="v1",
        base_model="s3://models/base",
        data_digests={},
        hyperparameters={},
        report=report,
        gates=gates,
        artifacts=[],
        artifact_evaluations=evaluations,
    )


def test_the_card_compares_a_subset_artifact_with_the_tuned_model_on_the_same_examples() -> None:
    report = EvalReport(
        tuned={"eval_loss": 1.0, "rouge_l": 0.4}, base=None, samples=[], num_examples=10, settings={}
    )
    int8 = ArtifactEvaluation(
        "int8",
        "quantized/int8",
        {"eval_loss": 1.0, "rouge_l": 0.45},
        settings={"generation_examples": 5, "tuned_generation_examples": 10},
        tuned_on_same={"rouge_l": 0.5},
    )
    card = artifact_card(report, GateReport(passed=True, results=[]), [int8])
    # -10% against the tuned model's 0.5 on the same 5 answers (not +12.5% against its 0.4 on 10).
    assert "| rouge_l | 0.4 | 0.45 (-10.0%) |" in card
    assert "are on the first 5 of the tuned model's 10 answered examples" in card
    assert int8.to_dict()["tuned_on_same"] == {"rouge_l": 0.5}


# ------------------------------------------------------------------------------- the card and report


def test_card_and_report_show_each_artifact_and_the_gate_that_judged_it(tmp_path: Path) -> None:
    report = EvalReport(
        tuned={"eval_loss": 1.0, "rouge_l": 0.8},
        base={"eval_loss": 2.0, "rouge_l": 0.2},
        samples=[],
        num_examples=10,
        settings={},
    )
    evaluations = [
        ArtifactEvaluation("merged", "merged", {"eval_loss": 1.0, "rouge_l": 0.8}),
        ArtifactEvaluation(
            "int8", "quantized/int8", {"eval_loss": 1.1, "rouge_l": 0.7, "perplexity": float("inf")}
        ),
    ]
    spec_gates = {"rouge_l": {"min": 0.5}, "int8.rouge_l": {"maxDropVsTuned": 0.02}}
    gates = check_gates(report.tuned, tuned_gates(spec_gates)).plus(
        check_artifact_gates(spec_gates, report.tuned, {e.artifact: e.metrics for e in evaluations})
    )
    card = artifact_card(report, gates, evaluations)
    assert "**Quality gates FAILED: this version is not promotable.**" in card
    assert "### What ships, on the same eval set" in card
    assert "| Metric | Tuned | `merged` | `int8` |" in card
    assert "| rouge_l | 0.8 | 0.8 (+0.0%) | 0.7 (-12.5%) |" in card
    assert "| int8.rouge_l | spec, on int8 | >= 0.784 | 0.7 | FAIL |" in card
    assert "| rouge_l | spec | >= 0.5 | 0.8 | pass |" in card
    assert "judge that published artifact (`int8`)" in card
    write_eval_report(tmp_path, report, gates, [], artifact_evaluations=evaluations)
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["passed"] is False
    int8 = document["artifact_evaluations"][1]
    assert int8["artifact"] == "int8" and int8["metrics"]["rouge_l"] == 0.7
    assert int8["metrics"]["perplexity"] is None  # inf is not JSON
    assert isinstance(gates, GateReport)
