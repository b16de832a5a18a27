"""The evaluate stage of a run (rank 0): the trained weights scored against the base, and gated.

Input: the :class:`~kubetune_trainer.context.RunContext`, fetch's ``Inputs`` (base model, extra
eval sets), the train stage's ``Trained`` (weights in ``staging/``, eval examples) and the
tokenizer. Output: :class:`Evaluation` — the
:class:`~kubetune_trainer.evaluate.evaluator.EvalReport` and the
:class:`~kubetune_trainer.evaluate.gates.GateReport` of ``spec.evaluation.gates`` followed by the
default gates of :mod:`~kubetune_trainer.evaluate.quality` (unless ``requireImprovement: false``) — and the
``eval:``/``base:``/``gates:`` console lines. Gates on a published artifact (``<artifact>.<metric>``)
are not checked here: the artifacts do not exist yet (see :mod:`kubetune_trainer.publish.stage`).

Raises ValueError (no eval example, unknown metric), RuntimeError (a memory measurement failed)
and what :func:`~kubetune_trainer.data.prepare_data` raises for an extra eval set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_trainer.context import RunContext
from kubetune_trainer.data import TokenizedExample, prepare_data
from kubetune_trainer.evaluate.evaluator import EvalReport, evaluate_model
from kubetune_trainer.evaluate.gates import GateReport, artifact_gates, check_gates, tuned_gates
from kubetune_trainer.evaluate.loading import ModelSource, load_model
from kubetune_trainer.evaluate.quality import default_gates, with_default_gates
from kubetune_trainer.evaluate.terminology import load_glossary
from kubetune_trainer.fetch.inputs import DataInputs, Inputs
from kubetune_trainer.train.stage import Trained


@dataclass
class Evaluation:
    """The tuned (and base) metrics and whether they pass the gates."""

    report: EvalReport
    gates: GateReport


def evaluate_stage(ctx: RunContext, inputs: Inputs, trained: Trained, tokenizer: Any) -> Evaluation:
    """Load the tuned model (and, for full fine-tuning with compareBase, the base), evaluate both
    on the eval examples and the extra sets, and check the gates (stage ``Evaluating``)."""
    rc, reporter, device = ctx.rc, ctx.reporter, ctx.device
    reporter.stage("Evaluating")
    saved_dir = trained.outcome.saved_dir
    if rc.method.type == "full":
        tuned_source = ModelSource("transformers", saved_dir)
    else:
        tuned_source = ModelSource("peft", saved_dir, base_path=inputs.base_dir)
    base_source = ModelSource("transformers", inputs.base_dir)
    tuned = load_model(tuned_source, device=device)
    base = (
        load_model(base_source, device=device)
        if rc.method.type == "full" and rc.evaluation.compare_base
        else None
    )
    extra_sets = _extra_sets(ctx, inputs, tokenizer)
    measure = "peak_memory_ratio" in rc.evaluation.metrics
    glossary = glossary_terms(inputs)
    report = evaluate_model(
        tuned,
        base,
        tokenizer,
        trained.prepared.eval,
        rc.evaluation,
        extra_sets=extra_sets or None,
        device=device,
        seed=rc.training.seed,
        batch_size=rc.training.batch_size,
        tuned_source=tuned_source if measure else None,
        base_source=base_source if measure else None,
        glossary=glossary,
        progress=lambda which: print(
            f"[kubetune] evaluating {which} on {len(trained.prepared.eval)} examples "
            f"({min(len(trained.prepared.eval), rc.evaluation.max_samples)} answered)",
            file=reporter.stream,
            flush=True,
        ),
    )
    del tuned, base
    gate_specs: dict[str, Any] = dict(rc.evaluation.gates.items())
    # Gates on an artifact (int8.rouge_l) are checked once the artifacts exist and were evaluated
    # (publish.stage): here only the tuned model's.
    gates = check_gates(
        report.gate_metrics(), tuned_gates(gate_specs), not_computed=report.skipped, paired=report.paired
    )
    if rc.evaluation.require_improvement:
        # The default gates (quality.py): better than the base, and the training loss fell.
        gates = with_default_gates(
            gates,
            default_gates(
                report.tuned,
                report.base,
                gate_specs,
                learning=trained.outcome.learning,
                min_loss_decrease=rc.evaluation.min_train_loss_decrease,
                learning_rate=rc.learning_rate,
            ),
        )
    print(
        "[kubetune] eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.tuned.items())),
        file=reporter.stream,
    )
    if report.base:
        print(
            "[kubetune] base: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.base.items())),
            file=reporter.stream,
        )
    if report.paired:
        pct = round(rc.evaluation.significance.confidence * 100)
        print(
            f"[kubetune] tuned - base ({pct}% paired bootstrap CI, n={next(iter(report.paired.values()))['n']}): "
            + "; ".join(_paired_line(d) for d in report.paired.values()),
            file=reporter.stream,
        )
    pending = len(artifact_gates(gate_specs))
    later = f" ({pending} artifact gate(s) are checked after quantizing)" if pending else ""
    print(f"[kubetune] gates: {gates.summary()}{later}", file=reporter.stream, flush=True)
    return Evaluation(report=report, gates=gates)


def glossary_terms(inputs: DataInputs) -> list[str] | None:
    """The terms of ``spec.evaluation.glossary`` as fetched (None without a glossary). Raises
    GlossaryError, naming the file, for an unreadable or empty glossary."""
    return None if inputs.glossary is None else load_glossary(inputs.glossary)


def _paired_line(d: dict[str, Any]) -> str:
    mark = ("better" if d["improved"] else "worse") if d["significant"] else "not significant"
    return f"{d['metric']} {d['difference']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}] {mark}"


def _extra_sets(ctx: RunContext, inputs: Inputs, tokenizer: Any) -> dict[str, list[TokenizedExample]]:
    """``spec.evaluation.extraSets``, each prepared whole as an eval set (no split)."""
    rc = ctx.rc
    extra_sets: dict[str, list[TokenizedExample]] = {}
    if inputs.extra_files:
        no_split = rc.data.model_copy(update={"eval_split": None})
        for name, files in inputs.extra_files.items():
            extra_sets[name] = prepare_data(
                files,
                files,
                tokenizer,
                no_split,
                max_seq_length=rc.training.max_seq_length,
                seed=rc.training.seed,
                display_names=inputs.display_names,
            ).eval
    return extra_sets
