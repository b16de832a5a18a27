"""The train stage of a run: prepared examples -> trained weights in ``staging/``, on every rank.

Input: the :class:`~kubetune_trainer.context.RunContext`, fetch's ``Inputs`` (base model, teacher),
the inputs digest (it names the checkpoint prefix, so a restarted run finds its own checkpoints),
the tokenizer, the data stage's ``StageData`` and a :class:`Carry` (what a previous
``spec.stages`` entry hands over). Output: :class:`Trained` — the recipe's
:class:`~kubetune_trainer.train.recipe.TrainOutcome` (``staging/adapter`` or ``staging/merged``),
the model still in memory for the next stage, and the checkpoint prefix to delete once published.

Raises TrainingDivergedError, PreemptedError (after a checkpoint on SIGTERM),
UnsupportedHardwareError, AdapterConfigError and DistillationError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api.runconfig import RunConfig
from kubetune_registry.storage import StoreSettings, join_key, open_uri
from kubetune_trainer.context import RunContext
from kubetune_trainer.data import PreparedData
from kubetune_trainer.data.stage import StageData
from kubetune_trainer.fetch.inputs import Inputs
from kubetune_trainer.train.checkpoint import CheckpointManager
from kubetune_trainer.train.distill import build_distiller
from kubetune_trainer.train.peak import PeakMemory
from kubetune_trainer.train.recipe import SFTRecipe, TrainOutcome


@dataclass
class Carry:
    """What the next stage starts from: a trained model in memory, fetched weights, or the base."""

    model: Any = None
    weights: Path | None = None  # a published stage's adapter/ (peft) or merged/ (full) folder


@dataclass
class Trained:
    """One trained stage: its data, the recipe's outcome, the model (for the next stage) and the
    checkpoint prefix that is spent once the version is published."""

    prepared: PreparedData
    outcome: TrainOutcome
    model: Any
    ckpt_prefix: str
    peak_memory: dict[str, Any] | None = None  # what the stage really used (train/peak.py)


def checkpoint_prefix(rc: RunConfig, store: StoreSettings, inputs_digest: str) -> str:
    """Where the run with these inputs keeps its checkpoints (one prefix per stage)."""
    _, out_prefix = open_uri(rc.output.uri, store)
    return join_key(*([out_prefix] if out_prefix else []), rc.model.name, "checkpoints", inputs_digest[:16])


def train_stage(
    ctx: RunContext,
    inputs: Inputs,
    inputs_digest: str,
    tokenizer: Any,
    data: StageData,
    carried: Carry,
    *,
    label: str = "",
) -> Trained:
    """Train ``ctx.rc`` on ``data`` in ``ctx.workdir`` (stage ``Training``), resuming from the
    newest complete checkpoint of these inputs; rank 0 saves the tokenizer next to the weights."""
    rc, runtime = ctx.rc, ctx.runtime
    ctx.reporter.stage("Training", label)
    out_store, _ = open_uri(rc.output.uri, ctx.store)
    ckpt_prefix = checkpoint_prefix(rc, ctx.store, inputs_digest)
    if ctx.trial is not None:  # the sweep deletes a losing trial's checkpoints, keeps the winner's
        ctx.trial.inputs_digest = inputs_digest
    # Per-rank scratch: ranks on one machine share the workdir and must not upload each other's
    # half-written files (each rank uploads only what it wrote; the keys merge in the store).
    checkpoints = CheckpointManager(
        out_store,
        ckpt_prefix,
        keep=rc.training.checkpoint.keep,
        runtime=runtime,
        scratch=ctx.workdir / "checkpoints" / f"rank-{runtime.rank}",
    )
    weights = carried.weights
    peak = PeakMemory(runtime.device)  # from before the model is loaded: the plan estimates the same
    distiller = build_distiller(
        rc,
        runtime,
        inputs.teacher,
        tokenizer,
        data.prepared.train,
        student_dir=inputs.base_dir,
        stream=ctx.reporter.stream,
    )
    recipe = SFTRecipe(
        rc,
        runtime,
        base_dir=weights if weights is not None and rc.method.type == "full" else inputs.base_dir,
        train_examples=data.prepared.train,
        eval_examples=data.prepared.eval,
        pad_token_id=int(tokenizer.pad_token_id),
        checkpoints=checkpoints,
        reporter=ctx.reporter,
        workdir=ctx.workdir,
        train_order_keys=data.order_keys,
        model=carried.model,
        init_adapter_dir=weights if weights is not None and rc.method.type != "full" else None,
        distiller=distiller,
        on_eval=ctx.trial.on_eval if ctx.trial is not None else None,
    )
    carried.model = None  # the recipe owns it now
    recipe.setup()
    outcome = recipe.train()
    measured = peak.read()
    model = recipe.release_model()
    del recipe
    if runtime.is_main:
        tokenizer.save_pretrained(str(outcome.saved_dir))
    return Trained(
        prepared=data.prepared, outcome=outcome, model=model, ckpt_prefix=ckpt_prefix, peak_memory=measured
    )
