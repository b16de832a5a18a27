"""Checkpoint bookkeeping, precision resolution, DeepSpeed config and reporting, without training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubetune_api.loader import load_finetunejob
from kubetune_api.reports import TERMINATION_MESSAGE_LIMIT, TrainerResult
from kubetune_api.runconfig import resolve_run_config
from kubetune_registry.storage import LocalStore
from kubetune_trainer.reporting import Reporter
from kubetune_trainer.runtime import Runtime, UnsupportedHardwareError, resolve_precision
from kubetune_trainer.train.checkpoint import (
    MARKER,
    CheckpointManager,
    CheckpointMismatchError,
    ResumePlan,
    check_resume_plan,
)

REPO = Path(__file__).resolve().parents[2]


def _runtime(world: int = 1) -> Runtime:
    import torch

    return Runtime(
        rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), precision="fp32", strategy="none"
    )


def _manager(tmp_path: Path, keep: int = 2, world: int = 1) -> tuple[CheckpointManager, LocalStore]:
    store = LocalStore(tmp_path / "store")
    return CheckpointManager(
        store, "m/checkpoints/run1", keep=keep, runtime=_runtime(world), scratch=tmp_path / "s"
    ), store


def _save(mgr: CheckpointManager, step: int) -> None:
    local = mgr.local_dir(step)
    (local / "state.json").write_text(json.dumps({"step": step}))
    mgr.commit(step, local, {"configDigest": "abc"})


def test_newest_complete_checkpoint_wins_and_incomplete_ones_are_ignored(tmp_path: Path) -> None:
    mgr, store = _manager(tmp_path)
    assert mgr.latest() is None
    _save(mgr, 10)
    _save(mgr, 20)
    # A checkpoint whose upload was cut off: files but no marker.
    store.put_bytes("m/checkpoints/run1/step-00000030/state.json", b"{}")
    latest = mgr.latest()
    assert latest is not None and latest.step == 20 and latest.meta["configDigest"] == "abc"
    local = mgr.download(latest)
    assert json.loads((local / "state.json").read_text()) == {"step": 20}


def test_only_the_newest_k_complete_checkpoints_are_kept(tmp_path: Path) -> None:
    mgr, store = _manager(tmp_path, keep=2)
    store.put_bytes("m/checkpoints/run1/step-00000005/partial.bin", b"x")  # stale, incomplete
    for step in (10, 20, 30):
        _save(mgr, step)
    steps = sorted({o.key.split("/")[3] for o in store.list("m/checkpoints/run1/")})
    assert steps == ["step-00000020", "step-00000030"]
    assert store.exists(f"m/checkpoints/run1/step-00000030/{MARKER}")


def test_a_checkpoint_from_another_world_size_is_reported_not_silently_used(tmp_path: Path) -> None:
    mgr, _ = _manager(tmp_path)
    _save(mgr, 10)
    other, _ = _manager(tmp_path, world=1)
    other.runtime.world_size = 2
    info = other.latest()
    assert info is not None
    with pytest.raises(CheckpointMismatchError, match="written by 1 processes, this run has 2"):
        other.download(info)


PLAN = ResumePlan(
    world_size=2,
    strategy="ddp",
    micro_batch_size=8,
    gradient_accumulation_steps=2,
    micro_batches_per_epoch=9,
    train_examples=140,
    data_order_seed=7,
    total_steps=20,
)


def test_a_resume_under_the_same_plan_is_allowed_and_records_the_effective_batch() -> None:
    saved = PLAN.to_dict()
    assert saved["effectiveBatch"] == 32
    check_resume_plan(12, json.loads(json.dumps(saved)), PLAN)  # as read back from state.json


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"micro_batch_size": 4},
            "microBatchSize=8, effectiveBatch=32; this run has microBatchSize=4, effectiveBatch=16",
        ),
        ({"gradient_accumulation_steps": 4}, "gradientAccumulationSteps=2, effectiveBatch=32"),
        ({"train_examples": 139, "micro_batches_per_epoch": 8}, "microBatchesPerEpoch=9, trainExamples=140"),
        ({"data_order_seed": 8}, "dataOrderSeed=7; this run has dataOrderSeed=8"),
        ({"strategy": "deepspeed-zero2"}, "strategy=ddp; this run has strategy=deepspeed-zero2"),
    ],
)
def test_a_resume_under_another_plan_is_refused_naming_what_differs(
    change: dict[str, object], named: str
) -> None:
    import dataclasses

    current = dataclasses.replace(PLAN, **change)  # type: ignore[arg-type]
    with pytest.raises(CheckpointMismatchError) as refused:
        check_resume_plan(12, PLAN.to_dict(), current)
    assert str(refused.value).startswith("checkpoint step 12 was written with ") and named in str(
        refused.value
    )
    assert "delete the run's checkpoints" in str(refused.value)


def test_a_checkpoint_without_a_plan_is_not_resumed_blindly() -> None:
    with pytest.raises(CheckpointMismatchError, match="records no resume plan"):
        check_resume_plan(4, None, PLAN)


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_a_gpu() -> None:
    assert resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("bf16", cuda=False) == "bf16"
    with pytest.raises(UnsupportedHardwareError, match="precision: fp16 needs a GPU"):
        resolve_precision("fp16", cuda=False)


def test_deepspeed_config_is_generated_from_the_spec() -> None:
    from kubetune_trainer.train.recipe import deepspeed_config

    rc = resolve_run_config(load_finetunejob(REPO / "examples" / "lora-7b-multinode" / "finetunejob.yaml"))
    rt = _runtime(world=16)
    rt.precision = "bf16"
    cfg = deepspeed_config(rc, rt)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["train_batch_size"] == 4 * 4 * 16
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == rc.training.max_grad_norm


def test_progress_lines_and_termination_message(tmp_path: Path) -> None:
    from kubetune_api.models import Progress

    out = io.StringIO()
    term = tmp_path / "termination-log"
    rep = Reporter(termination_message_path=str(term), stream=out)
    rep.stage("Training")
    rep.progress(
        Progress(
            step=5,
            total_steps=20,
            percent=25,
            loss=1.5,
            learning_rate=1e-4,
            tokens_per_second=900,
            eta_seconds=75,
            summary="5/20 (25%)",
        )
    )
    text = out.getvalue()
    assert "step 5/20 (25%) | loss 1.5000 | lr 1.00e-04 | 900 tok/s | ETA 0:01:15" in text
    progress = json.loads(
        next(line for line in text.splitlines() if line.startswith("KUBETUNE_PROGRESS ")).split(" ", 1)[1]
    )
    assert progress["stage"] == "Training" and progress["totalSteps"] == 20
    rep.result(
        TrainerResult(
            outcome="Failed",
            reason="InvalidData",
            message="x" * 1500,
            metrics={f"metric_{i}": 1.0 for i in range(600)},
        )
    )
    written = term.read_text()
    assert len(written.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert json.loads(written)["reason"] == "InvalidData"


def test_silent_reporter_on_other_ranks(tmp_path: Path) -> None:
    out = io.StringIO()
    rep = Reporter(enabled=False, termination_message_path=str(tmp_path / "t"), stream=out)
    rep.stage("Training")
    rep.result(TrainerResult(outcome="Succeeded", reason="Published"))
    assert out.getvalue() == "" and not (tmp_path / "t").exists()


def test_loss_monitor_stops_nan_and_runaway_losses_but_not_noise() -> None:
    from kubetune_trainer.train.divergence import DivergenceMonitor, RecipeFacts
    from kubetune_trainer.train.recipe import TrainingDivergedError  # re-exported for the pipeline

    facts = RecipeFacts(learning_rate=2e-4, max_grad_norm=1.0, warmup_ratio=0.03, scheduler="cosine")
    calm = DivergenceMonitor(facts)
    for step, loss in enumerate([3.0, 2.5, 2.2, 2.4, 2.0] * 10, start=1):  # noisy but fine
        calm.update(step, loss)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 7.*learningRate"):
        calm.update(7, float("nan"))
    runaway = DivergenceMonitor(
        RecipeFacts(learning_rate=1.0, max_grad_norm=1.0, warmup_ratio=0.1, scheduler="cosine")
    )
    with pytest.raises(TrainingDivergedError, match=r"diverged.*learningRate \(now 1"):
        for step in range(1, 200):
            runaway.update(step, 1.0 if step < 20 else 1.0 * 1.3 ** (step - 20))
