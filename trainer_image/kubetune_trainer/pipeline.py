"""The trainer pipeline, top to bottom: fetch -> data -> train -> evaluate -> artifacts -> publish.

:func:`run` is what ``python -m kubetune_trainer`` (in a pod, under torchrun) and ``kubetune run``
(on a laptop) both call with a :class:`~kubetune_api.runconfig.RunConfig`. Every rank fetches
(local rank 0 per node), prepares data and trains; rank 0 alone evaluates, quantizes, publishes
and reports the :class:`~kubetune_api.reports.TrainerResult`.

Before any training the inputs digest (base-model digest, data digests, RunConfig digest, trainer
version) is looked up in the registry: a match means this exact run was already published, so the
existing version is reused and nothing trains (a GitOps re-sync is free). ``spec.stages`` train
first, in order, each continuing from the weights of the one before (a stage with ``publish`` is
evaluated and published as ``<model>-<stage>``, and reused like a job when its inputs match); the
job's own data trains last.

A sweep's trial (``trial=``, docs/adr/0001) trains and evaluates its objective, reports its
intermediate eval_loss to the sweep (which may prune it) and publishes nothing; the sweep's winner
(``sweep=``, its lineage) is an ordinary run whose inputs digest is the winning trial's, so it
resumes from that trial's final checkpoint and is published with the sweep in its manifest and card.

Each stage is one function of its stage package, taking the :class:`~kubetune_trainer.context.RunContext`
and a small named input and returning a named output:

========================================  =====================================================
``fetch.inputs.fetch_inputs``             -> ``Inputs`` (``identify`` -> ``Identity``: the digest)
``data.stage.prepare_stage_data``         -> ``StageData`` (examples, curriculum order)
``train.stage.train_stage``               -> ``Trained`` (weights in ``staging/``)
``evaluate.stage.evaluate_stage``         -> ``Evaluation`` (metrics, gates)
``artifacts.stage.build_artifacts``       -> ``Artifacts`` (merged and quantized models)
``publish.stage.publish_stage``           -> ``Published`` (the version, the result)
========================================  =====================================================
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.reports import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_GATES_FAILED,
    EXIT_OK,
    TrainerResult,
)
from kubetune_api.runconfig import RunConfig
from kubetune_registry.storage import UnsafeKeyError, bytes_read
from kubetune_trainer.artifacts.quantize import UnsupportedFormatError
from kubetune_trainer.artifacts.stage import build_artifacts
from kubetune_trainer.context import BadInputError, RunContext, Trial, make_reporter, store_settings
from kubetune_trainer.data import DataValidationError, TemplateError
from kubetune_trainer.data.stage import load_tokenizer, prepare_stage_data
from kubetune_trainer.evaluate.stage import evaluate_stage
from kubetune_trainer.fetch.fingerprints import recall_identity, remember_models
from kubetune_trainer.fetch.inputs import (
    Identity,
    Inputs,
    fetch_data,
    fetch_models,
    fetch_stage_weights,
    identify,
    inputs_record,
)
from kubetune_trainer.fetch.sources import FetchError, UnsafeModelError
from kubetune_trainer.plan.memory import human_bytes
from kubetune_trainer.plan.plan import Plan
from kubetune_trainer.plan.stage import WillNotFitError, plan_stage, write_plan_report
from kubetune_trainer.publish.stage import (
    Published,
    delete_checkpoints,
    find_published,
    lineage_entry,
    publish_stage,
    reuse_version,
)
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.runtime import UnsupportedHardwareError, init_runtime
from kubetune_trainer.train.adapters import AdapterConfigError
from kubetune_trainer.train.checkpoint import CheckpointMismatchError
from kubetune_trainer.train.distill import DistillationError
from kubetune_trainer.train.peak import mark_run_start
from kubetune_trainer.train.recipe import PreemptedError, TrainingDivergedError
from kubetune_trainer.train.stage import Carry, Trained, checkpoint_prefix, train_stage
from kubetune_trainer.train.trial import TrialPrunedError

__all__ = [
    "EXIT_PREEMPTED",
    "BadInputError",
    "RunOutcome",
    "Trial",
    "inputs_record",
    "make_reporter",
    "run",
    "store_settings",
]

log = logging.getLogger("kubetune.trainer")

EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a shell would report it


@dataclass
class RunOutcome:
    """What :func:`run` returns: the result (rank 0 only) and the process exit code."""

    exit_code: int
    result: TrainerResult | None = None
    version_uri: str | None = None
    notes: list[str] = field(default_factory=list)
    objective: float | None = None
    """A sweep trial's objective (``trial=``); None for ordinary runs and pruned trials."""
    pruned: TrialPrunedError | None = None
    """A sweep trial stopped by the pruner: where and at what eval_loss."""


def run(
    rc: RunConfig,
    *,
    workdir: Path,
    reporter: Reporter | None = None,
    trial: Trial | None = None,
    sweep: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run the whole pipeline for this process's rank. Never raises for expected failures:
    they become a TrainerResult with a reason and the exit code of :mod:`kubetune_api.reports`.

    ``trial``: run as a sweep's trial (train, evaluate the objective, publish nothing);
    ``sweep``: the winner's sweep lineage, recorded with its version."""
    workdir.mkdir(parents=True, exist_ok=True)
    mark_run_start()  # the CPU baseline of the measured peak the plan is compared with
    try:
        runtime = init_runtime(rc.training.precision, rc.distributed.strategy)
    except UnsupportedHardwareError as exc:
        rep = reporter or Reporter(termination_message_path=rc.reporting.termination_message_path)
        return _fail(rep, rc, EXIT_BAD_INPUT, "UnsupportedHardware", str(exc))
    reporter = reporter or make_reporter(rc, runtime)
    in_pod_trial = trial is None and rc.trial is not None
    if in_pod_trial:
        trial = _pod_trial(rc, reporter, runtime.is_main)
    sweep = sweep if sweep is not None else rc.sweep
    try:
        ctx = dataclasses.replace(RunContext.create(rc, runtime, workdir, reporter), trial=trial, sweep=sweep)
        if trial is None:
            return _run(ctx)
        outcome = _run_trial(ctx)
        if in_pod_trial and runtime.is_main:
            _report_trial(ctx, outcome)
        return outcome
    except TrialPrunedError as exc:
        print(f"[kubetune] trial {trial.number if trial else '?'} {exc}", file=sys.stderr, flush=True)
        return RunOutcome(exit_code=EXIT_OK, pruned=exc)
    except (DataValidationError, TemplateError, UnsafeKeyError, BadInputError) as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "InvalidData", str(exc))
    except UnsafeModelError as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "UnsafeModel", str(exc))
    except (AdapterConfigError, DistillationError, CheckpointMismatchError) as exc:
        # A checkpoint from another plan: restarting would refuse again, so it is permanent.
        return _fail(reporter, rc, EXIT_BAD_INPUT, "InvalidSpec", str(exc))
    except FetchError as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "FetchFailed", str(exc))
    except WillNotFitError as exc:  # the plan: nothing downloaded yet, and retrying cannot help
        return _fail(reporter, rc, EXIT_BAD_INPUT, "WillNotFit", str(exc))
    except (UnsupportedHardwareError, UnsupportedFormatError) as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "UnsupportedHardware", str(exc))
    except TrainingDivergedError as exc:
        return _fail(reporter, rc, EXIT_DIVERGED, "Diverged", str(exc))
    except PreemptedError as exc:
        print(f"[kubetune] {exc}", file=sys.stderr, flush=True)
        return RunOutcome(exit_code=EXIT_PREEMPTED)
    except Exception as exc:  # the pod restarts and resumes; the message says what broke
        log.exception("trainer failed")
        return _fail(reporter, rc, EXIT_ERROR, "Error", f"{type(exc).__name__}: {exc}")
    finally:
        runtime.shutdown()


def _pod_trial(rc: RunConfig, reporter: Reporter, is_main: bool) -> Trial:
    """A sweep's trial run by its own FineTuneJob (RunConfig.trial, docs/sweeps.md): each
    intermediate eval_loss goes to ``status.trial`` at once (not throttled), where the operator's
    pruner reads it; a pruned trial is stopped by the operator deleting its FineTuneJob (SIGTERM)."""
    assert rc.trial is not None
    reports: dict[str, float] = {}

    def on_eval(step: int, eval_loss: float) -> bool:
        if is_main:
            reports[str(step)] = eval_loss
            reporter.trial(
                {"number": trial.number, "inputsDigest": trial.inputs_digest, "intermediate": dict(reports)}
            )
        return False

    trial = Trial(number=rc.trial.number, objective=rc.trial.objective, on_eval=on_eval)
    return trial


def _report_trial(ctx: RunContext, outcome: RunOutcome) -> None:
    """A pod trial's result for the operator: its objective and inputs digest, nothing published."""
    assert ctx.trial is not None
    metric, value = ctx.trial.objective, outcome.objective
    if outcome.exit_code != EXIT_OK or outcome.result is not None:
        return  # a failure already reported its own result
    # The final report carries the inputs digest even when no intermediate eval ran: the winner
    # resumes from this trial's checkpoint and deletes every trial's checkpoints by it.
    # (A merge patch: the intermediate reports already in status.trial stay.)
    ctx.reporter.trial({"number": ctx.trial.number, "inputsDigest": ctx.trial.inputs_digest})
    if value is None:
        outcome.result = _fail(
            ctx.reporter, ctx.rc, EXIT_ERROR, "Error", f"trial {ctx.trial.number}: no {metric} was measured"
        ).result
        outcome.exit_code = EXIT_ERROR
        return
    result = TrainerResult(
        outcome="Succeeded",
        reason="TrialComplete",
        message=f"trial {ctx.trial.number} of sweep {ctx.rc.trial.sweep if ctx.rc.trial else '?'}: "
        f"{metric} {value:.6g}; nothing published (only the sweep's winner is)",
        model=ctx.rc.model.name,
        base=ctx.rc.model.base.uri,
        method=ctx.rc.method.type,
        inputs_digest=ctx.trial.inputs_digest,
        metrics={metric: value} if math.isfinite(value) else {},
    )
    outcome.result = result
    ctx.reporter.result(result)


def _sweep_checkpoints(ctx: RunContext) -> list[str]:
    """A cluster sweep's winner (RunConfig.sweep): every trial's checkpoint prefix, spent once the
    winner is published or reused. Found from each trial's inputs digest under this job's output."""
    lineage = ctx.rc.sweep or {}
    digests = {t.get("inputsDigest") for t in lineage.get("trials", []) if isinstance(t, dict)}
    return [checkpoint_prefix(ctx.rc, ctx.store, d) for d in sorted(d for d in digests if isinstance(d, str))]


def _fail(reporter: Reporter, rc: RunConfig, code: int, reason: Any, message: str) -> RunOutcome:
    result = TrainerResult(
        outcome="Failed",
        reason=reason,
        message=message[:1500],
        model=rc.model.name,
        base=rc.model.base.uri,
        method=rc.method.type,
    )
    reporter.result(result)
    print(f"[kubetune] FAILED ({reason}): {message}", file=sys.stderr, flush=True)
    return RunOutcome(exit_code=code, result=result)


def _run(ctx: RunContext) -> RunOutcome:
    rc, runtime = ctx.rc, ctx.runtime
    read_before = bytes_read()
    data = fetch_data(ctx)
    # The models' digests from their manifests or listing fingerprints: a re-run is reused before
    # a single weight is downloaded, when the stores can say what the models are.
    recall = recall_identity(ctx, data)
    existing = find_published(ctx, recall.digest) if recall.digest is not None else None
    digest = recall.digest
    plan: Plan | None = None
    if existing is not None:
        if runtime.is_main:
            print(
                f"[kubetune] {recall.describe(bytes_read() - read_before)}",
                file=ctx.reporter.stream,
                flush=True,
            )
    else:
        # Pre-flight: will it fit, how long — from the base's config alone, before any weight.
        plan = plan_stage(ctx, data)
        inputs = fetch_models(ctx, data)
        identity = identify(ctx, inputs)
        remember_models(ctx, recall, inputs, identity)
        existing, digest = find_published(ctx, identity.digest), identity.digest
    if existing is not None and digest is not None:  # this exact run was published before: nothing trains
        result = reuse_version(ctx, existing, digest, data.parent)
        if runtime.is_main and ctx.rc.sweep:
            delete_checkpoints(ctx, _sweep_checkpoints(ctx))
        ctx.reporter.result(result)
        # The outcome is remembered: a digest whose version failed its gates fails again (exit 4).
        code = EXIT_GATES_FAILED if result.reason == "GateFailed" else EXIT_OK
        return RunOutcome(exit_code=code, result=result, version_uri=existing.uri)

    tokenizer = load_tokenizer(ctx, inputs.base_dir)
    carried, lineage, spent_checkpoints = _train_stages(ctx, inputs, tokenizer)
    label = f"stage {len(rc.stages) + 1}/{len(rc.stages) + 1}: final" if rc.stages else ""
    trained = _prepare_and_train(ctx, inputs, identity, tokenizer, carried, label)
    spent_checkpoints.append(trained.ckpt_prefix)
    trained.model = None  # free the weights before evaluation loads its own
    if not runtime.is_main:
        return RunOutcome(exit_code=EXIT_OK)
    # A run resumed at its final step (a sweep's winner, a restart after the last step) trained
    # nothing here: its measured peak says nothing about the plan.
    outcome = trained.outcome
    trained_here = outcome.resumed_from_step is None or outcome.steps > outcome.resumed_from_step
    _report_plan_accuracy(ctx, plan, trained.peak_memory if trained_here else None)

    published = _evaluate_and_publish(ctx, inputs, identity, trained, tokenizer, lineage)
    # The version is published: its checkpoints are spent (a cluster sweep's winner: every trial's).
    delete_checkpoints(ctx, spent_checkpoints + (_sweep_checkpoints(ctx) if rc.sweep else []))
    ctx.reporter.result(published.result)
    code = EXIT_GATES_FAILED if published.result.reason == "GateFailed" else EXIT_OK
    return RunOutcome(exit_code=code, result=published.result, version_uri=published.version_uri)


def _run_trial(ctx: RunContext) -> RunOutcome:
    """A sweep's trial: the job's training (resumed from its own checkpoint when one exists) and
    its objective; no version, no reuse lookup, checkpoints kept (the winner resumes from them)."""
    assert ctx.trial is not None
    if ctx.rc.stages:
        raise BadInputError("a sweep trial cannot have spec.stages")
    data = fetch_data(ctx)
    plan_stage(ctx, data)  # will it fit: refused before any weight is downloaded, as for a job
    inputs = fetch_models(ctx, data)
    identity = identify(ctx, inputs)
    tokenizer = load_tokenizer(ctx, inputs.base_dir)
    label = f"trial {ctx.trial.number}"
    trained = _prepare_and_train(ctx, inputs, identity, tokenizer, Carry(), label)
    if not ctx.runtime.is_main:
        return RunOutcome(exit_code=EXIT_OK)
    metric = ctx.trial.objective
    if metric == "eval_loss":
        value = trained.outcome.final_eval_loss
    else:  # measured after training, as the job's evaluation would (spec.evaluation)
        trained.model = None
        value = evaluate_stage(ctx, inputs, trained, tokenizer).report.tuned.get(metric)
    return RunOutcome(exit_code=EXIT_OK, objective=None if value is None else float(value))


def _report_plan_accuracy(ctx: RunContext, plan: Plan | None, measured: dict[str, Any] | None) -> None:
    """``training/plan.json`` and one log line: the plan's peak beside the one measured."""
    report = write_plan_report(ctx.staging, plan, measured)
    if plan is None or report is None or measured is None or not measured.get("peakBytes"):
        return
    print(
        f"[kubetune] plan vs measured: peak {human_bytes(plan.memory.peak)} estimated, "
        f"{human_bytes(measured['peakBytes'])} measured ({report['estimateError']:+.0%})",
        file=ctx.reporter.stream,
        flush=True,
    )


def _train_stages(
    ctx: RunContext, inputs: Inputs, tokenizer: Any
) -> tuple[Carry, list[dict[str, Any]], list[str]]:
    """``spec.stages`` in order, each continuing from the one before. Returns what the job's own
    training starts from, the stages' lineage and their checkpoint prefixes."""
    carried, lineage, spent = Carry(), [], []
    total = len(ctx.rc.stages) + 1
    for index, stage in enumerate(ctx.rc.stages):
        stage_ctx, stage_inputs = ctx.for_stage(index), inputs.for_stage(index)
        identity = identify(stage_ctx, stage_inputs)
        label = f"stage {index + 1}/{total}: {stage.name}"
        found = find_published(stage_ctx, identity.digest) if stage.publish else None
        if found is not None:
            # Published before with the same inputs: continue from its weights, train nothing.
            carried = Carry(weights=fetch_stage_weights(ctx, found.uri, stage.name))
            lineage.append(lineage_entry(stage.name, identity.digest, found, None, reused=True))
            # An interrupted run may have left checkpoints under this stage's prefix.
            spent.append(checkpoint_prefix(stage_ctx.rc, stage_ctx.store, identity.digest))
            if ctx.runtime.is_main:
                print(
                    f"[kubetune] {label}: reusing {found.uri} (same inputs)",
                    file=ctx.reporter.stream,
                    flush=True,
                )
            continue
        trained = _prepare_and_train(stage_ctx, stage_inputs, identity, tokenizer, carried, label)
        spent.append(trained.ckpt_prefix)
        version = None
        if stage.publish and ctx.runtime.is_main:
            published = _evaluate_and_publish(
                stage_ctx, stage_inputs, identity, trained, tokenizer, list(lineage)
            )
            version = published.result.version
            print(f"[kubetune] {label}: {published.result.message}", file=ctx.reporter.stream, flush=True)
        ctx.runtime.barrier()  # the other ranks wait while rank 0 evaluates and publishes the stage
        lineage.append(lineage_entry(stage.name, identity.digest, version, trained.outcome))
        carried = Carry(model=trained.model)
    return carried, lineage, spent


def _prepare_and_train(
    ctx: RunContext, inputs: Inputs, identity: Identity, tokenizer: Any, carried: Carry, label: str
) -> Trained:
    """data -> train, on every rank: one stage's examples, then its weights in ``staging/``."""
    data = prepare_stage_data(ctx, inputs, tokenizer, label=label)
    return train_stage(ctx, inputs, identity.digest, tokenizer, data, carried, label=label)


def _evaluate_and_publish(
    ctx: RunContext,
    inputs: Inputs,
    identity: Identity,
    trained: Trained,
    tokenizer: Any,
    lineage: list[dict[str, Any]],
) -> Published:
    """evaluate -> artifacts -> publish, on rank 0: one trained stage becomes a version."""
    evaluation = evaluate_stage(ctx, inputs, trained, tokenizer)
    tuned_answers = [row.tuned for row in evaluation.report.samples if row.set == "eval"]
    artifacts = build_artifacts(ctx, inputs, trained, tuned_answers)
    return publish_stage(ctx, inputs, identity, trained, evaluation, artifacts, stages=lineage)
