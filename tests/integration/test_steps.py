"""Steps mean the same thing everywhere (issue 17, item 4).

The issue's case: 2 epochs, batch 8, gradient accumulation 2, on a training set whose epoch ends
with a partial accumulation (150 records, no packing: 19 micro-batches, 10 optimizer steps an
epoch). The plain loop made 20 optimizer steps; DeepSpeed ZeRO-2 made 19 (its own micro-step
counter ignored the partial accumulation at the epoch's end), so its learning rate did not advance
at step 10, its final learning rate was 1.36e-05 instead of 0, and its weights differed by 2.6e-3,
while the manifest said 20. Measured before the fix on this machine; the test compares the plain
loop with ZeRO-2 and ZeRO-3 (one process each, DeepSpeed on CPU) step by step.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import small_job, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Runner = Callable[..., subprocess.CompletedProcess[str]]

ODD_EPOCH = {
    "training.maxSteps": None,
    "training.epochs": 2,
    "training.batchSize": 8,
    "training.gradientAccumulationSteps": 2,
    "training.packing": False,
    "training.logEverySteps": 1,
    "training.scheduler": "cosine",
    "data.train": {"uri": "s3://kubetune-demo/datasets/odd/train.jsonl"},
    "evaluation.requireImprovement": False,
}


def _rows(vdir: Path) -> list[dict[str, Any]]:
    lines = (vdir / "training" / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(x) for x in lines if x.strip()) if "loss" in r]


def test_plain_zero2_and_zero3_make_the_same_steps_schedule_and_weights(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    data = demo_store / "kubetune-demo" / "datasets"
    (data / "odd").mkdir()
    train = (data / "quickstart" / "train.jsonl").read_text().splitlines()[:150]
    (data / "odd" / "train.jsonl").write_text("\n".join(train) + "\n")

    runs: dict[str, Path] = {}
    for strategy in ("none", "deepspeed-zero2", "deepspeed-zero3"):
        name = f"steps-{strategy}"
        job = small_job(**ODD_EPOCH, **{"model.name": name, "distributed.strategy": strategy})
        proc = run_kubetune(
            "run",
            str(write_job(tmp_path / f"{name}.yaml", job)),
            "--store-dir",
            str(demo_store),
            "--workdir",
            str(tmp_path / f"w-{name}"),
        )
        assert proc.returncode == 0, f"{strategy}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        runs[strategy] = demo_store / "kubetune-demo" / "models" / name / "versions" / "v1"

    plain = _rows(runs["none"])
    assert [r["step"] for r in plain] == list(range(1, 21))  # ceil(19 / 2) = 10 steps an epoch, 2 epochs
    assert plain[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)
    from safetensors.torch import load_file

    reference = load_file(str(runs["none"] / "adapter" / "adapter_model.safetensors"))
    for strategy in ("deepspeed-zero2", "deepspeed-zero3"):
        rows = _rows(runs[strategy])
        manifest = json.loads((runs[strategy] / "manifest.json").read_text())
        assert manifest["extra"]["steps"] == len(rows) == 20, strategy
        # The same schedule step by step: the LR advances at the partial step that ends epoch 1.
        assert [r["learning_rate"] for r in rows] == pytest.approx(
            [r["learning_rate"] for r in plain], rel=1e-6, abs=1e-12
        ), strategy
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in plain], rel=1e-3), strategy
        weights = load_file(str(runs[strategy] / "adapter" / "adapter_model.safetensors"))
        assert weights.keys() == reference.keys()
        worst = max(float((weights[k] - reference[k]).abs().max()) for k in reference)
        assert worst < 1e-4, f"{strategy}: weights differ by {worst:.3g} from the plain loop"
