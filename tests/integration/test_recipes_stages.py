"""Multi-stage training in one FineTuneJob, end to end through `kubetune run` (CPU, demo model).

What a user sees: the stages run in order and say so; a stage with `publish: true` becomes a version
of `<model>-<stage>`; the final version's manifest and card list the stages it was trained after;
each stage continues from the previous one's weights (its first loss starts where the previous
stage left off); all stage checkpoints are gone once the version is published; re-applying the same
spec reuses the version, and changing only the last stage reuses the published stage.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import kubetune_cmd, small_job, trainer_env, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL = "tiny-demo-translator"
DATA = "s3://kubetune-demo/datasets/stages"


def _split_data(store: Path) -> None:
    """general / domain / task files cut from the quickstart training set."""
    source = store / "kubetune-demo" / "datasets" / "quickstart" / "train.jsonl"
    lines = source.read_text().splitlines()
    target = store / "kubetune-demo" / "datasets" / "stages"
    target.mkdir(parents=True)
    for name, part in (("general", lines[:300]), ("domain", lines[300:500]), ("task", lines[500:700])):
        (target / f"{name}.jsonl").write_text("\n".join(part) + "\n")


def _job(final_steps: int = 4) -> dict[str, Any]:
    return small_job(
        **{
            "data.train": {"uri": f"{DATA}/task.jsonl"},
            "training.maxSteps": final_steps,
            "training.logEverySteps": 1,
            "training.checkpoint": {"everySteps": 3, "keep": 1},
            "stages": [
                {
                    "name": "general",
                    "data": {
                        "train": {"uri": f"{DATA}/general.jsonl"},
                        "evalSplit": 0.1,
                        "format": "instruction",
                        "template": "chatml",
                    },
                    "training": {"maxSteps": 8},
                    "publish": True,
                },
                {
                    "name": "domain",
                    "data": {
                        "train": {"uri": f"{DATA}/domain.jsonl"},
                        "evalSplit": 0.1,
                        "format": "instruction",
                        "template": "chatml",
                    },
                    "training": {"maxSteps": 4, "learningRate": 0.001},
                },
            ],
        }
    )


def _losses(metrics: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [r[key] for r in rows if r.get(key) is not None]


def test_stages_run_in_order_publish_and_record_lineage(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    _split_data(demo_store)
    path = write_job(tmp_path / "job.yaml", _job())
    proc = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    assert err.index("stage 1/3: general") < err.index("stage 2/3: domain") < err.index("stage 3/3: final")

    models = demo_store / "kubetune-demo" / "models"
    general = models / f"{MODEL}-general" / "versions" / "v1"
    g_manifest = json.loads((general / "manifest.json").read_text())
    assert (general / "adapter" / "adapter_model.safetensors").exists()
    assert "eval_loss" in g_manifest["metrics"]
    assert not (models / f"{MODEL}-domain").exists()  # publish: false

    final = models / MODEL / "versions" / "v1"
    manifest = json.loads((final / "manifest.json").read_text())
    stages = manifest["extra"]["stages"]
    assert [s["name"] for s in stages] == ["general", "domain"]
    assert stages[0]["version"].endswith(f"{MODEL}-general/versions/v1")
    assert stages[0]["inputsDigest"] == g_manifest["inputsDigest"]
    assert stages[1]["version"] is None and stages[1]["steps"] == 4
    # Every stage's data is an input of the final version.
    recorded = json.dumps(manifest["inputs"]["stages"])
    assert f"{DATA}/general.jsonl" in recorded and f"{DATA}/domain.jsonl" in recorded
    assert "general (8 steps) -> domain (4 steps)" in (final / "README.md").read_text()

    # Each stage continues from the previous one: it starts near where the previous one ended,
    # far below where training from the base began.
    work = tmp_path / "w"
    general_losses = _losses(work / "stages" / "1-general" / "training" / "metrics.jsonl")
    domain_losses = _losses(work / "stages" / "2-domain" / "training" / "metrics.jsonl")
    final_losses = _losses(final / "training" / "metrics.jsonl")
    assert general_losses[-1] < general_losses[0] - 1.0
    assert domain_losses[0] < general_losses[-1] + 0.5
    assert final_losses[0] < domain_losses[-1] + 0.5

    # Checkpoints of every stage are spent once the version is published.
    assert not any(p.name == "checkpoints" for p in models.rglob("checkpoints"))

    # The same spec again: nothing trains.
    again = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w2"))
    assert again.returncode == 0 and "Reused" in again.stderr + again.stdout, again.stderr[-3000:]
    assert "stage 1/3" not in again.stderr

    # Only the last stage changed: the published general stage is reused, domain and final retrain.
    path2 = write_job(tmp_path / "job2.yaml", _job(final_steps=5))
    third = run_kubetune("run", str(path2), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w3"))
    assert third.returncode == 0, third.stderr[-4000:]
    assert "stage 1/3: general: reusing" in third.stderr
    assert not (models / f"{MODEL}-general" / "versions" / "v2").exists()
    v2 = json.loads((models / MODEL / "versions" / "v2" / "manifest.json").read_text())
    assert v2["extra"]["stages"][0]["reused"] is True
    assert v2["extra"]["stages"][1]["steps"] == 4


def test_a_bad_stage_is_named_before_anything_runs(
    tmp_path: Path, run_kubetune: Runner, demo_store: Path
) -> None:
    job = _job()
    job["spec"]["stages"].append(dict(job["spec"]["stages"][0]))  # duplicate name
    job["spec"]["stages"][1]["data"] = {
        "train": {"uri": f"{DATA}/domain.jsonl"},
        "eval": {"uri": f"{DATA}/x.jsonl"},
        "evalSplit": 0.2,
    }
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode != 0
    assert "spec.stages: stage names must be unique" in proc.stderr
    assert "spec.stages[].data.evalSplit" in proc.stderr


def test_a_job_stopped_inside_a_stage_resumes_in_that_stage(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    _split_data(demo_store)
    job = _job()
    job["spec"]["stages"][0]["publish"] = False  # the finished stage comes back from its checkpoint
    path = write_job(tmp_path / "job.yaml", job)
    cmd = kubetune_cmd("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    proc = subprocess.Popen(
        cmd, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    in_domain = False
    for line in proc.stderr:
        in_domain = in_domain or "stage 2/3: domain" in line
        if in_domain and line.startswith("[kubetune] step 2/4"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest[-3000:]

    resumed = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    err = resumed.stderr
    # general is not retrained (its last checkpoint is its end); domain goes on from where it stopped.
    general, domain = err.split("stage 2/3: domain", 1)
    assert "resumed from checkpoint at step 8" in general
    assert "resumed from checkpoint at step" in domain.split("stage 3/3: final", 1)[0]
    manifest = json.loads(
        (demo_store / "kubetune-demo" / "models" / MODEL / "versions" / "v1" / "manifest.json").read_text()
    )
    assert [s["steps"] for s in manifest["extra"]["stages"]] == [8, 4]
    models = demo_store / "kubetune-demo" / "models"
    assert not any(models.rglob("checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero2", "deepspeed-zero3"])
def test_stages_and_distillation_under_two_torchrun_processes(
    strategy: str, demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    _split_data(demo_store)
    job = _job()
    job["spec"]["distributed"] = {"gpusPerNode": 0, "strategy": strategy}
    # Distillation under torchrun too: every rank runs its own (unsharded) teacher next to the student.
    job["spec"]["distillation"] = {"teacher": {"uri": job["spec"]["model"]["base"]["uri"]}, "weight": 0.5}
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune(
        "run", str(path), "--nproc", "2", "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = demo_store / "kubetune-demo" / "models" / MODEL / "versions" / "v1"
    manifest = json.loads((final / "manifest.json").read_text())
    assert [s["name"] for s in manifest["extra"]["stages"]] == ["general", "domain"]
    assert manifest["extra"]["distillation"]["weight"] == 0.5
    rows = [json.loads(x) for x in (final / "training" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_loss" in r for r in rows)
    assert (demo_store / "kubetune-demo" / "models" / f"{MODEL}-general" / "versions" / "v1").exists()
    # The stages carried over on both ranks: the final stage starts well below the first stage's start.
    # (the cross-entropy part: "loss" mixes in the distillation term)
    general = _losses(tmp_path / "w" / "stages" / "1-general" / "training" / "metrics.jsonl", "sft_loss")
    assert _losses(final / "training" / "metrics.jsonl", "sft_loss")[0] < general[0] - 1.0
