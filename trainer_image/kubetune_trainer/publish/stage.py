"""The publish stage of a run (rank 0): ``staging/`` becomes a version, and the run's result.

* :func:`find_published` — input: the context and an inputs digest; output: the version already
  published with those inputs, or None (every rank gets rank 0's answer).
* :func:`reuse_version` — input: that version; output: the ``Reused`` TrainerResult, after moving
  ``output.promote``'s alias when the rule now says so (nothing trains).
* :func:`publish_stage` — input: the context, fetch's ``Inputs`` and ``Identity``, and the
  ``Trained``, ``Evaluation`` and ``Artifacts`` of the stages before; output: :class:`Published`
  (the TrainerResult — Published, Reused or GateFailed — and the version's URI). The gates on a
  published artifact (``<artifact>.<metric>``) are checked here, against each artifact's own
  evaluation on the eval set, and join the evaluate stage's gates: one failed makes the version
  GateFailed (exit 4) and not promotable like any other. The reports and the model card are
  written into ``staging/`` once the registry has named the version.
* :func:`lineage_entry` — one ``spec.stages`` entry as the manifest's ``extra.stages`` records it.
* :func:`delete_checkpoints` — the spent checkpoint prefixes, once the version is published.

Raises the registry's errors (RegistryError, StorageError, AliasConflict) and what
:func:`~kubetune_trainer.artifacts.stage.write_reports` raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from kubetune_api.models import GateResult, GatesStatus, VersionRef
from kubetune_api.reports import Reason, TrainerResult
from kubetune_api.rules import GATE_ARTIFACTS
from kubetune_api.runconfig import RunConfig
from kubetune_registry.storage import open_uri
from kubetune_registry.versions import PublishedVersion
from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.artifacts.stage import Artifacts, write_reports
from kubetune_trainer.artifacts.standalone import make_standalone
from kubetune_trainer.context import RunContext
from kubetune_trainer.evaluate.gates import GateReport, check_artifact_gates
from kubetune_trainer.evaluate.quality import promotable
from kubetune_trainer.evaluate.stage import Evaluation
from kubetune_trainer.fetch.inputs import Identity, Inputs
from kubetune_trainer.publish.serving import write_serving_manifests
from kubetune_trainer.reporting import now_rfc3339
from kubetune_trainer.train.adapters import adapter_record
from kubetune_trainer.train.distill import distillation_manifest_extra
from kubetune_trainer.train.recipe import TrainOutcome
from kubetune_trainer.train.stage import Trained


@dataclass
class Published:
    """What publishing a stage produced: the result to report and the version's URI."""

    result: TrainerResult
    version_uri: str


def find_published(ctx: RunContext, inputs_digest: str) -> PublishedVersion | None:
    """The version of ``ctx.registry`` published with these inputs (rank 0 asks, every rank gets it)."""
    runtime = ctx.runtime
    return runtime.broadcast(ctx.registry.find_by_inputs_digest(inputs_digest) if runtime.is_main else None)


def reuse_version(
    ctx: RunContext, version: PublishedVersion, inputs_digest: str, parent: str | None
) -> TrainerResult:
    """The result of a run whose inputs were published before: that version, reused."""
    rc = ctx.rc
    result = _reused_result(rc, version, inputs_digest, parent)
    if rc.output.promote and ctx.runtime.is_main:
        # Promotion is a commit: a changed promote rule on the same inputs moves the alias
        # without retraining (moving it to where it already points records nothing).
        # gatesPassed never passes vacuously: a version that ran no gate is not promoted by it.
        gates_passed = result.gates is not None and result.gates.passed and bool(result.gates.results)
        moved = ctx.registry.promote(
            rc.output.promote.alias, version.name, gates_passed, rc.output.promote.when
        )
        if moved is not None:
            result = result.model_copy(update={"promoted_alias": rc.output.promote.alias})
    return result


def publish_stage(
    ctx: RunContext,
    inputs: Inputs,
    identity: Identity,
    trained: Trained,
    evaluation: Evaluation,
    artifacts: Artifacts,
    *,
    stages: list[dict[str, Any]],
) -> Published:
    """Publish ``staging/`` as the next version of ``ctx.registry`` (stage ``Publishing``) and apply
    ``output.promote``. ``stages`` is the lineage of the stages trained before this one (recorded
    in the manifest's ``extra.stages`` and the model card)."""
    rc, registry = ctx.rc, ctx.registry
    record = identity.record or {}
    evaluation = _with_artifact_gates(ctx, evaluation, artifacts)
    outcome, gates = trained.outcome, evaluation.gates
    ctx.reporter.stage("Publishing")
    extra = _manifest_extra(ctx, outcome, artifacts, record) | ({"stages": stages} if stages else {})
    if ctx.sweep:  # a sweep's winner: every trial, its parameters and objective (docs/adr/0001)
        extra["sweep"] = ctx.sweep
    judged = artifacts.judged(evaluation.report)
    if judged:
        # Each published artifact's metrics on the eval set (what <artifact>.<metric> gates read).
        extra["artifactMetrics"] = {e.artifact: _finite(e.metrics) for e in judged}
    version = registry.publish(
        ctx.staging,
        inputs=record,
        inputs_digest=identity.digest,
        metrics=_finite(evaluation.report.tuned),
        gates=gates.to_dict(),
        parent=inputs.parent,
        extra=extra,
        # The card names its own version, which the registry allocates: write it once claimed.
        before_upload=lambda name, uri: _finish_staging(
            ctx, outcome, evaluation, artifacts, record, name, stages, uri, extra
        ),
    )
    promoted: str | None = None
    if rc.output.promote and not version.reused:
        ok, why = promotable(gates)
        moved = registry.promote(rc.output.promote.alias, version.name, ok, rc.output.promote.when)
        promoted = rc.output.promote.alias if moved is not None else None
        if moved is None and ctx.runtime.is_main:
            print(
                f"[kubetune] alias {rc.output.promote.alias} not moved (promote.when "
                f"{rc.output.promote.when}): {why}",
                file=ctx.reporter.stream,
                flush=True,
            )
    reason: Reason = "GateFailed" if not gates.passed else ("Reused" if version.reused else "Published")
    message = f"published {version.uri}" if not version.reused else f"reused {version.uri}"
    if not gates.passed:
        message = f"published {version.uri} but it is not promotable: {gates.summary()}"
    result = TrainerResult(
        outcome="Failed" if not gates.passed else "Succeeded",
        reason=reason,
        message=message,
        model=rc.model.name,
        base=rc.model.base.uri,
        parent=inputs.parent,
        method=rc.method.type,
        version=VersionRef(
            name=version.name, uri=version.uri, manifest_digest=version.manifest_digest, reused=version.reused
        ),
        inputs_digest=identity.digest,
        metrics=_finite(evaluation.report.tuned),
        gates=gates_status(gates),
        quantized=artifacts.formats,
        promoted_alias=promoted,
        resumed_from_step=outcome.resumed_from_step,
        created=now_rfc3339(),
    )
    return Published(result=result, version_uri=version.uri)


def _with_artifact_gates(ctx: RunContext, evaluation: Evaluation, artifacts: Artifacts) -> Evaluation:
    """The evaluation with the ``<artifact>.<metric>`` gates appended, checked against each
    artifact's evaluation (``maxDropVsTuned`` against the tuned model's metrics)."""
    rc = ctx.rc
    judged = artifacts.judged(evaluation.report)
    not_evaluated = {a: f"this version publishes no {a} artifact" for a in GATE_ARTIFACTS}
    results = check_artifact_gates(
        dict(rc.evaluation.gates.items()),
        evaluation.report.tuned,
        {e.artifact: e.metrics for e in judged},
        not_computed={e.artifact: e.skipped for e in judged},
        not_evaluated=not_evaluated,
        tuned_for={e.artifact: e.tuned_reference(evaluation.report.tuned) for e in judged},
    )
    if not results:
        return evaluation
    checked = GateReport(passed=all(r.passed for r in results), results=results)
    print(f"[kubetune] artifact gates: {checked.summary()}", file=ctx.reporter.stream, flush=True)
    return replace(evaluation, gates=evaluation.gates.plus(results))


def lineage_entry(
    name: str,
    digest: str,
    version: PublishedVersion | VersionRef | None,
    outcome: TrainOutcome | None,
    *,
    reused: bool = False,
) -> dict[str, Any]:
    """A trained (or reused) ``spec.stages`` entry, as ``extra.stages`` of the final manifest."""
    entry: dict[str, Any] = {
        "name": name,
        "inputsDigest": digest,
        "version": version.uri if version else None,
    }
    if outcome is not None:
        entry.update(
            {"steps": outcome.steps, "finalLoss": outcome.final_loss, "evalLoss": outcome.final_eval_loss}
        )
    if reused:
        entry["reused"] = True
    return entry


def delete_checkpoints(ctx: RunContext, prefixes: list[str]) -> None:
    """The version is published: the checkpoints of every stage that led to it are spent."""
    out_store, _ = open_uri(ctx.rc.output.uri, ctx.store)
    for prefix in prefixes:
        out_store.delete_prefix(prefix + "/")


def gates_status(report: GateReport) -> GatesStatus:
    """The gate results as the FineTuneJob status and the TrainerResult show them."""
    results = [
        GateResult(
            metric=r.metric,
            value=r.value if r.value is not None and math.isfinite(r.value) else None,
            min=r.min,
            max=r.max,
            passed=r.passed,
            message=r.message,
        )
        for r in report.results
    ]
    failed = sum(not r.passed for r in results)
    summary = "none" if not results else ("passed" if not failed else f"failed {failed}/{len(results)}")
    return GatesStatus(passed=report.passed, summary=summary, results=results)


def _manifest_extra(
    ctx: RunContext, outcome: TrainOutcome, artifacts: Artifacts, record: dict[str, Any]
) -> dict[str, Any]:
    rc = ctx.rc
    return {
        "model": rc.model.name,
        "method": rc.method.type,
        "base": rc.model.base.uri,
        "quantized": artifacts.formats,
        "job": rc.job.to_api(),
        "trainerVersion": TRAINER_VERSION,
        "steps": outcome.steps,
        "resumedFromStep": outcome.resumed_from_step,
        "precision": ctx.runtime.precision,
        "adapter": adapter_record(rc.method),
        **distillation_manifest_extra(rc, record),
    }


def _finish_staging(
    ctx: RunContext,
    outcome: TrainOutcome,
    evaluation: Evaluation,
    artifacts: Artifacts,
    record: dict[str, Any],
    name: str,
    stages: list[dict[str, Any]],
    uri: str,
    extra: dict[str, Any],
) -> None:
    """The reports and the model card, then no scratch path or boilerplate README left in the
    version, then the serving manifests (serving/: KServe and vLLM)."""
    write_reports(ctx, outcome, evaluation, artifacts, record, name, stages)
    make_standalone(
        ctx.staging,
        base_uri=ctx.rc.model.base.uri,
        base_digest=(record.get("base") or {}).get("digest"),
        template=ctx.rc.data.template,  # the chat template the model was trained with, for the card's snippets
    )
    write_serving_manifests(ctx, name, uri, extra)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def _reused_result(
    rc: RunConfig, version: PublishedVersion, inputs_digest: str, parent: str | None
) -> TrainerResult:
    manifest = version.manifest
    gates = manifest.get("gates") or {}
    gate_results = [GateResult.model_validate(r) for r in gates.get("results", [])] if gates else []
    failed = sum(not r.passed for r in gate_results)
    passed = bool(gates.get("passed", True))
    # The digest remembers its outcome: a version that failed its gates stays GateFailed on re-runs.
    message = f"inputs digest matches published version {version.name}: nothing was trained"
    if not passed:
        why = "; ".join(r.message for r in gate_results if not r.passed)
        message = (
            f"inputs digest matches version {version.name}, which failed its gates ({why}); nothing was "
            "trained. Change the data, the hyperparameters or the gates to train again"
        )
    return TrainerResult(
        outcome="Succeeded" if passed else "Failed",
        reason="Reused" if passed else "GateFailed",
        message=message[:1500],
        model=rc.model.name,
        base=rc.model.base.uri,
        parent=parent,
        method=rc.method.type,
        version=VersionRef(
            name=version.name, uri=version.uri, manifest_digest=version.manifest_digest, reused=True
        ),
        inputs_digest=inputs_digest,
        metrics=_finite(manifest.get("metrics", {})),
        gates=GatesStatus(
            passed=passed,
            summary="none"
            if not gate_results
            else ("passed" if not failed else f"failed {failed}/{len(gate_results)}"),
            results=gate_results,
        ),
        quantized=list((manifest.get("extra") or {}).get("quantized", [])),
        created=manifest.get("created"),
    )
