"""Two processes: the same optimizer steps for DDP and DeepSpeed, and a crash resumes exactly.

Issue 17, items 4 and 10. The runs: 2 torchrun processes on CPU (gloo), 140 training records (70
per rank: 9 micro-batches of 8 an epoch), gradient accumulation 2 (so every epoch ends with a
partial accumulation: 5 optimizer steps an epoch), 4 epochs = 20 steps, a checkpoint every 3 steps.

* DDP, ZeRO-2 and ZeRO-3 make the same 20 optimizer steps with the same learning rate at every
  step, and end with the same weights (to fp32 tolerance: the reduction order differs).
* Each checkpoint falls on an optimizer-step boundary and records its resume plan (world size,
  effective batch, data cursor).
* DDP and ZeRO-2 runs SIGKILLed after a checkpoint (the whole process tree, as when a pod dies) and
  restarted in a fresh work directory end *bitwise* equal to the uninterrupted run: the same loss
  and learning rate at every step and identical adapter tensors.
* A resume under another plan (another world size) is refused with the fields that differ (exit 3),
  not silently continued.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from safetensors.torch import load_file

from tests.fixtures.trainer import kubetune_cmd, small_job, trainer_env, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Runner = Callable[..., subprocess.CompletedProcess[str]]

GAS = 2
SPEC = {
    "training.maxSteps": None,
    "training.epochs": 4,
    "training.batchSize": 8,
    "training.gradientAccumulationSteps": GAS,
    "training.packing": False,
    "training.logEverySteps": 1,
    "training.scheduler": "cosine",
    "training.checkpoint": {"everySteps": 3, "keep": 10},
    "data.train": {"uri": "s3://kubetune-demo/datasets/odd140/train.jsonl"},
    "evaluation.requireImprovement": False,
}
STRATEGIES = ("ddp", "deepspeed-zero2", "deepspeed-zero3")


def _job(tmp: Path, strategy: str, name: str, **changes: Any) -> Path:
    job = small_job(**SPEC, **{"model.name": name, "distributed.strategy": strategy}, **changes)
    return write_job(tmp / f"{name}.yaml", job)


def _run_args(job: Path, store: Path, workdir: Path, nproc: int = 2) -> list[str]:
    return ["run", str(job), "--nproc", str(nproc), "--store-dir", str(store), "--workdir", str(workdir)]


def _version(store: Path, name: str) -> Path:
    return store / "kubetune-demo" / "models" / name / "versions" / "v1"


def _rows(vdir: Path) -> list[dict[str, Any]]:
    lines = (vdir / "training" / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(x) for x in lines if x.strip()) if "loss" in r]


def _adapter(vdir: Path) -> dict[str, Any]:
    return load_file(str(vdir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, demo_store_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("exact-resume") / "store"
    shutil.copytree(demo_store_cache, root)
    data = root / "kubetune-demo" / "datasets"
    (data / "odd140").mkdir()
    train = (data / "quickstart" / "train.jsonl").read_text().splitlines()[:140]
    (data / "odd140" / "train.jsonl").write_text("\n".join(train) + "\n")
    return root


@pytest.fixture(scope="module")
def straight(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted 2-process run per strategy: strategy -> its published version folder."""
    tmp = tmp_path_factory.mktemp("straight")
    out: dict[str, Path] = {}
    for strategy in STRATEGIES:
        name = f"straight-{strategy}"
        proc = subprocess.run(
            kubetune_cmd(*_run_args(_job(tmp, strategy, name), store, tmp / f"w-{name}")),
            env=trainer_env(),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert proc.returncode == 0, f"{strategy}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        out[strategy] = _version(store, name)
    return out


def test_ddp_zero2_and_zero3_make_the_same_steps_schedule_and_weights(straight: dict[str, Path]) -> None:
    reference = _rows(straight["ddp"])
    # 9 micro-batches an epoch per rank, accumulation 2: ceil(9 / 2) = 5 steps an epoch, 4 epochs.
    assert [r["step"] for r in reference] == list(range(1, 21))
    assert reference[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-12)
    weights = _adapter(straight["ddp"])
    for strategy in ("deepspeed-zero2", "deepspeed-zero3"):
        rows = _rows(straight[strategy])
        manifest = json.loads((straight[strategy] / "manifest.json").read_text())
        assert manifest["extra"]["steps"] == len(rows) == 20, strategy
        assert [r["learning_rate"] for r in rows] == pytest.approx(
            [r["learning_rate"] for r in reference], rel=1e-6, abs=1e-12
        ), strategy
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-3), strategy
        other = _adapter(straight[strategy])
        assert other.keys() == weights.keys()
        worst = max(float((other[k] - weights[k]).abs().max()) for k in weights)
        assert worst < 1e-4, f"{strategy}: weights differ by {worst:.3g} from DDP"


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the CLI, torchrun and every worker (torchrun starts workers in their own sessions,
    so a process-group kill would miss them), as when a pod's container dies."""
    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def _markers(root: Path) -> Iterator[dict[str, Any]]:
    for marker in root.rglob("COMPLETE.json") if root.exists() else []:
        try:
            yield json.loads(marker.read_text())
        except (json.JSONDecodeError, FileNotFoundError):  # being written or pruned right now
            continue


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero2"])
def test_a_killed_two_process_run_resumes_bitwise_equal(
    strategy: str, store: Path, straight: dict[str, Path], tmp_path: Path
) -> None:
    name = f"killed-{strategy}"
    job = _job(tmp_path, strategy, name)
    ckpt_root = store / "kubetune-demo" / "models" / name / "checkpoints"
    proc = subprocess.Popen(
        kubetune_cmd(*_run_args(job, store, tmp_path / "w1")),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if any(m["step"] >= 3 for m in _markers(ckpt_root)):
                break
            assert proc.poll() is None, "the run ended before a checkpoint appeared"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        _kill_tree(proc)
    assert not _version(store, name).exists(), "the run finished before it was killed"

    # Every checkpoint is on an optimizer-step boundary and records its plan.
    states = [json.loads(p.read_text()) for p in ckpt_root.rglob("state.json")]
    assert states
    for state in states:
        plan, cursor = state["plan"], state["trainState"]
        assert plan["worldSize"] == 2 and plan["effectiveBatch"] == 8 * GAS * 2
        assert plan["microBatchesPerEpoch"] == 9 and plan["totalSteps"] == 20
        assert cursor["micro_batch"] % GAS == 0 or cursor["micro_batch"] == plan["microBatchesPerEpoch"]
    newest = max(m["step"] for m in _markers(ckpt_root))

    if strategy == "ddp":
        # A restart with another world size (other data shards, another effective batch) is
        # refused as permanent (exit 3), naming what differs; nothing is published.
        refused = subprocess.run(
            kubetune_cmd(*_run_args(job, store, tmp_path / "w-one", nproc=1)),
            env=trainer_env(),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert refused.returncode == 3, refused.stderr[-3000:]
        assert "written by 2 processes, this run has 1" in refused.stderr, refused.stderr[-3000:]
        assert not _version(store, name).exists()

    # The restart, in a fresh work directory (a new pod): resumes and ends bitwise equal.
    resumed = subprocess.run(
        kubetune_cmd(*_run_args(job, store, tmp_path / "w2")),
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint at step {newest}" in resumed.stderr
    reference, rows = _rows(straight[strategy]), _rows(_version(store, name))
    assert [(r["step"], r["loss"], r["learning_rate"]) for r in rows] == [
        (r["step"], r["loss"], r["learning_rate"]) for r in reference
    ]
    expected, got = _adapter(straight[strategy]), _adapter(_version(store, name))
    assert expected.keys() == got.keys()
    unequal = [k for k in expected if not (expected[k] == got[k]).all()]
    assert not unequal, f"{len(unequal)} tensors differ after the resume, e.g. {unequal[0]}"
