"""The artifacts stage of a run (rank 0): what ``staging/`` holds besides the trained weights.

:func:`build_artifacts` — input: the :class:`~kubetune_trainer.context.RunContext`, fetch's
``Inputs`` and the train stage's ``Trained``; output:
:class:`Artifacts` (``merged/`` when ``output.merge`` or quantization needs it, and one
:class:`~kubetune_trainer.artifacts.quantize.ArtifactReport` per ``spec.quantization.formats``
entry under ``quantized/``), and each published artifact — ``merged/`` (when it ships) and every
quantized format — reloaded from disk and evaluated on the tuned model's eval set
(:func:`~kubetune_trainer.evaluate.evaluator.evaluate_artifact`: the same loss examples, the same
generation samples — or the first ``spec.evaluation.artifactMaxSamples`` of them, the tuned model
then re-scored from its recorded answers on those — and seed), which ``<artifact>.<metric>`` gates
read. Raises
UnsupportedFormatError, ArtifactSmokeTestError and FileExistsError (from
:func:`~kubetune_trainer.artifacts.quantize.quantize_artifacts`), and what evaluation raises.

:func:`write_reports` — input: the same plus the evaluate stage's ``Evaluation``, the inputs
record and the version name (called once the registry has allocated it) — writes ``eval/``
(report.json, samples.jsonl), ``training/`` (run-config.json, metrics.jsonl, loss.png, training
health) and the model card ``README.md``. Raises ValueError for a value that is not JSON.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.artifacts.merge import merge_adapter
from kubetune_trainer.artifacts.quantize import ArtifactReport, quantize_artifacts, source_kind
from kubetune_trainer.artifacts.report import plot_loss, render_model_card, write_eval_report
from kubetune_trainer.artifacts.sweep_report import write_sweep_report
from kubetune_trainer.context import RunContext
from kubetune_trainer.evaluate.evaluator import (
    ArtifactEvaluation,
    EvalReport,
    ModelSource,
    evaluate_artifact,
    load_model,
    measure_peak_memory,
)
from kubetune_trainer.evaluate.stage import Evaluation, glossary_terms
from kubetune_trainer.fetch.inputs import Inputs
from kubetune_trainer.train.adapters import describe
from kubetune_trainer.train.distill import describe_distillation
from kubetune_trainer.train.health import plot_grad_norms
from kubetune_trainer.train.recipe import TrainOutcome
from kubetune_trainer.train.stage import Trained


@dataclass
class Artifacts:
    """The merged model (None when nothing needed it), the quantized artifacts' reports, and each
    published artifact's evaluation on the eval set (``merged`` first, then the formats in spec
    order). ``merged_is_tuned``: full fine-tuning, where ``merged/`` holds the very weights the
    evaluate stage scored as the tuned model, so its metrics are the tuned model's."""

    merged_dir: Path | None = None
    quantized: list[ArtifactReport] = field(default_factory=list)
    evaluations: list[ArtifactEvaluation] = field(default_factory=list)
    merged_is_tuned: bool = False

    @property
    def formats(self) -> list[str]:
        """The quantized formats written, in spec order."""
        return [a.format for a in self.quantized]

    def judged(self, tuned: EvalReport) -> list[ArtifactEvaluation]:
        """Every published artifact's evaluation, what ``<artifact>.<metric>`` gates read: for a
        full fine-tune ``merged`` is the tuned model's own evaluation (the same files)."""
        if not self.merged_is_tuned:
            return list(self.evaluations)
        merged = ArtifactEvaluation(
            artifact="merged",
            path="merged",
            metrics=dict(tuned.tuned),
            skipped=dict(tuned.skipped),
            settings={"same_as": "tuned (full fine-tuning: merged/ is the trained model)"},
        )
        return [merged, *self.evaluations]


def build_artifacts(
    ctx: RunContext, inputs: Inputs, trained: Trained, tuned_answers: list[str] | None = None
) -> Artifacts:
    """Merge the adapter into the base and write the quantized formats (stage ``Quantizing``).
    ``tuned_answers``: the tuned model's greedy answers on the eval set, in order (the evaluate
    stage's samples table), for artifacts judged on fewer examples."""
    rc, reporter, staging = ctx.rc, ctx.reporter, ctx.staging
    outcome = trained.outcome
    merged_dir: Path | None = None
    if rc.method.type == "full":
        merged_dir = outcome.saved_dir
    elif rc.output.merge or rc.quantization.formats:
        reporter.stage("Quantizing", "merging the adapter into the base")
        target = staging / "merged" if rc.output.merge else ctx.workdir / "merged-unpublished"
        merged_dir = merge_adapter(inputs.base_dir, outcome.saved_dir, target)
    quantized: list[ArtifactReport] = []
    if rc.quantization.formats and merged_dir is not None:
        reporter.stage("Quantizing", ", ".join(rc.quantization.formats))
        quantized = quantize_artifacts(
            merged_dir,
            list(rc.quantization.formats),
            staging / "quantized",
            sample_prompt_ids=[list(e.prompt_ids) for e in trained.prepared.eval[:4]],
            device=ctx.device,
            template=trained.prepared.report.template,  # the gguf-* Modelfile's TEMPLATE
        )
    # What ships is what is judged: each published artifact on the tuned model's eval set.
    evaluations: list[ArtifactEvaluation] = []
    if merged_dir is not None and rc.output.merge and rc.method.type != "full":
        evaluations.append(_evaluate_merged(ctx, inputs, trained, merged_dir, tuned_answers))
    for report in quantized:
        evaluations.append(
            _evaluate_one(
                ctx,
                trained,
                report.format,
                ModelSource(source_kind(report.format), staging / "quantized" / report.path),
                f"quantized/{report.path}",
                {"peak_memory_ratio": report.peak_memory_ratio} if _memory_wanted(ctx) else None,
                glossary_terms(inputs),
                tuned_answers,
            )
        )
    return Artifacts(
        merged_dir=merged_dir,
        quantized=quantized,
        evaluations=evaluations,
        merged_is_tuned=rc.method.type == "full",
    )


def _memory_wanted(ctx: RunContext) -> bool:
    ev = ctx.rc.evaluation
    return "peak_memory_ratio" in ev.metrics or "peak_memory_ratio" in ev.gate_metrics()


def _evaluate_merged(
    ctx: RunContext, inputs: Inputs, trained: Trained, merged_dir: Path, tuned_answers: list[str] | None
) -> ArtifactEvaluation:
    """merged/ on the eval set; its peak_memory_ratio (when asked for) against the base, each
    measured in a fresh process as the tuned model's is."""
    extra: dict[str, float | None] | None = None
    if _memory_wanted(ctx):
        prompts = [list(e.prompt_ids) for e in trained.prepared.eval[:4]]
        new_tokens = ctx.rc.evaluation.max_new_tokens
        merged = measure_peak_memory(
            ModelSource("transformers", merged_dir), prompts, max_new_tokens=new_tokens, device=ctx.device
        )
        base = measure_peak_memory(
            ModelSource("transformers", inputs.base_dir),
            prompts,
            max_new_tokens=new_tokens,
            device=ctx.device,
        )
        extra = {"peak_memory_ratio": merged.peak_bytes / base.peak_bytes}
    return _evaluate_one(
        ctx,
        trained,
        "merged",
        ModelSource("transformers", merged_dir),
        "merged",
        extra,
        glossary_terms(inputs),
        tuned_answers,
    )


def _evaluate_one(
    ctx: RunContext,
    trained: Trained,
    artifact: str,
    source: ModelSource,
    path: str,
    extra: dict[str, float | None] | None,
    glossary: list[str] | None,
    tuned_answers: list[str] | None = None,
) -> ArtifactEvaluation:
    """Load one artifact from disk (with its own tokenizer), score it, print its ``eval`` line."""
    ctx.reporter.stage("Quantizing", f"evaluating {artifact} on the eval set")
    model = load_model(source, device=ctx.device)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    try:
        result = evaluate_artifact(
            artifact,
            model,
            tokenizer,
            trained.prepared.eval,
            ctx.rc.evaluation,
            path=path,
            seed=ctx.rc.training.seed,
            batch_size=ctx.rc.training.batch_size,
            extra_metrics=extra,
            glossary=glossary,
            tuned_answers=tuned_answers,
        )
    finally:
        del model
    print(
        f"[kubetune] {artifact}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())),
        file=ctx.reporter.stream,
        flush=True,
    )
    return result


def write_reports(
    ctx: RunContext,
    outcome: TrainOutcome,
    evaluation: Evaluation,
    artifacts: Artifacts,
    record: dict[str, Any],
    version_name: str,
    stages: list[dict[str, Any]],
) -> None:
    """eval/, training/ and the model card, into the staging folder that becomes the version.

    ``record`` is the inputs record (its digests go on the card), ``stages`` the lineage of the
    ``spec.stages`` entries trained before this one."""
    rc, staging = ctx.rc, ctx.staging
    precision = ctx.runtime.precision
    report, gates = evaluation.report, evaluation.gates
    training = staging / "training"
    training.mkdir(parents=True, exist_ok=True)
    run_config = json.loads(rc.to_json())
    run_config["resolved"] = {"precision": precision, "trainerVersion": TRAINER_VERSION}
    (training / "run-config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
    shutil.copyfile(outcome.metrics_path, training / "metrics.jsonl")
    plot_loss(training / "metrics.jsonl", training / "loss.png")
    _copy_health(outcome.metrics_path.parent, training)
    judged = artifacts.judged(report)
    write_eval_report(staging / "eval", report, gates, artifacts.quantized, artifact_evaluations=judged)
    data_digests = {
        f"{role} {name}": digest
        for role, files in record.get("data", {}).items()
        for name, digest in files.items()
    }
    t = rc.training
    hyper = {
        "method": rc.method.type,
        "learning rate": rc.learning_rate,
        "scheduler": f"{t.scheduler} (warm-up {t.warmup_ratio:g})",
        "epochs" if t.max_steps is None else "max steps": t.epochs if t.max_steps is None else t.max_steps,
        "steps run": outcome.steps,
        "batch size x grad accumulation": f"{t.batch_size} x {t.gradient_accumulation_steps}",
        "max sequence length": t.max_seq_length,
        "packing": t.packing,
        "precision": precision,
        "seed": t.seed,
        "distributed": f"{rc.distributed.nodes} node(s) x {rc.distributed.gpus_per_node} GPU(s), {rc.distributed.strategy}",
    }
    gguf = record.get("base", {}).get("gguf")
    if gguf:  # the base was a GGUF file: the card says what was trained on (dequantised weights)
        hyper["base model file"] = (
            f"GGUF {gguf['file']} ({gguf['fileType']}, {gguf['architecture']}, sha256 {gguf['sha256']}), "
            f"dequantised to {gguf['dequantizedTo']} by transformers {gguf['transformers']} for training"
        )
    hyper.update(describe(rc.method))  # LoRA / DoRA / rsLoRA / (IA)^3 and the adapted layers
    hyper.update(describe_distillation(rc, record))  # teacher, loss mix, temperature
    if stages:
        hyper["trained after stages"] = " -> ".join(
            f"{st['name']} ({'reused ' + st['version'] if st.get('reused') else str(st.get('steps')) + ' steps'})"
            for st in stages
        )
    (staging / "README.md").write_text(
        render_model_card(
            model_name=rc.model.name,
            version=version_name,
            base_model=rc.model.base.uri,
            data_digests=data_digests,
            hyperparameters=hyper,
            report=report,
            gates=gates,
            artifacts=artifacts.quantized,
            artifact_evaluations=judged,
            base_model_digest=record.get("base", {}).get("digest"),
            lora_rank=rc.method.lora.r if rc.method.type != "full" else None,
            vllm_lora=rc.method.type in ("lora", "qlora") and rc.method.lora.variant in ("lora", "rslora"),
        )
        + (("\n" + write_sweep_report(staging, ctx.sweep)) if ctx.sweep else "")
    )


def _copy_health(source: Path, training: Path) -> None:
    """grad-norms.jsonl + its heat map and health.json (training health), when the run wrote them."""
    grad_norms = source / "grad-norms.jsonl"
    if grad_norms.exists() and grad_norms.read_text().strip():
        shutil.copyfile(grad_norms, training / "grad-norms.jsonl")
        plot_grad_norms(training / "grad-norms.jsonl", training / "grad-norms.png")
    if (source / "health.json").exists():
        shutil.copyfile(source / "health.json", training / "health.json")
