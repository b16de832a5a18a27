"""The pre-flight plan for real (issue 21, part 1): ``kubetune run`` stops a job that will not fit
before any model byte is read, runs it with ``runPolicy.ignorePlan``, ``kubetune plan`` says the
same with the changes that would fit, and the estimate is within the stated tolerance of the peak
real runs reach (bench/plan_accuracy.py's smallest cases)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.plan_accuracy import CASES, TOLERANCE, error, run_case
from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]


def _run(
    run_kubetune: Runner, store: Path, tmp: Path, name: str, job: dict
) -> subprocess.CompletedProcess[str]:
    return run_kubetune(
        "run",
        str(write_job(tmp / f"{name}.yaml", job)),
        "--store-dir",
        str(store),
        "--workdir",
        str(tmp / name),
    )


def test_a_job_that_will_not_fit_stops_before_the_download_and_ignore_plan_runs_it(
    run_kubetune: Runner, demo_store: Path, tmp_path: Path
) -> None:
    # 64 MiB for a CPU job whose training needs more (the heap alone holds its activations twice).
    job = small_job(
        **{
            "resources.memory": "64Mi",
            "training.batchSize": 16,
            "training.maxSeqLength": 256,
            "training.maxSteps": None,  # one epoch: the plan's step count is the recipe's to check
            "training.epochs": 1,
        }
    )
    proc = _run(run_kubetune, demo_store, tmp_path, "tight", job)
    out = proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "FAILED (WillNotFit)" in out
    assert "of 64 MiB (spec.resources.memory): WILL NOT FIT" in out
    assert "would fit with: spec.training.gradientCheckpointing: true" in out or "batchSize" in out
    assert "Nothing was downloaded or trained" in out
    # The base model was never fetched: no inputs/base folder, no stage after the plan.
    assert not (tmp_path / "tight" / "inputs" / "base").exists()
    assert "stage PreparingData" not in out
    log = (tmp_path / "tight" / "console.log").read_text()  # the machine-readable lines go there
    result = json.loads(log.split("KUBETUNE_RESULT ", 1)[1].splitlines()[0])
    assert result["reason"] == "WillNotFit" and result["outcome"] == "Failed"

    # The same job with runPolicy.ignorePlan: it says so, trains and publishes.
    job["spec"].setdefault("runPolicy", {})["ignorePlan"] = True
    proc = _run(run_kubetune, demo_store, tmp_path, "ignored", job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spec.runPolicy.ignorePlan is true: running anyway" in proc.stderr
    assert "Published" in proc.stderr
    version = next((demo_store / "kubetune-demo" / "models").glob("*/versions/v1"))
    plan = json.loads((version / "training" / "plan.json").read_text())
    assert plan["fits"] is False and plan["measured"]["peakBytes"] > 64 * 2**20
    manifest = json.loads((version / "manifest.json").read_text())
    assert plan["steps"] == manifest["extra"]["steps"]


def test_kubetune_plan_says_the_same_and_its_suggestions_fit(
    run_kubetune: Runner, demo_store: Path, tmp_path: Path
) -> None:
    job = write_job(
        tmp_path / "tight.yaml",
        small_job(**{"resources.memory": "64Mi", "training.batchSize": 16, "training.maxSeqLength": 256}),
    )
    proc = run_kubetune("plan", str(job), "--store-dir", str(demo_store), "--json")
    assert proc.returncode == 3, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["fits"] is False and plan["suggestions"]
    assert plan["data"]["exact"] is True  # counted with the base's tokenizer.json
    for suggestion in plan["suggestions"]:
        assert suggestion["peakBytes"] <= 64 * 2**20
    # The first suggestion applied to the YAML: kubetune plan now says it fits (exit 0).
    fixed = small_job(**{"resources.memory": "64Mi", "training.batchSize": 16, "training.maxSeqLength": 256})
    for path, value in plan["suggestions"][0]["patch"].items():
        node = fixed["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    proc = run_kubetune(
        "plan", str(write_job(tmp_path / "fixed.yaml", fixed)), "--store-dir", str(demo_store)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "; fits against 64 MiB (spec.resources.memory)" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("lora-4M", "lora-4M-gradckpt")], ids=lambda c: c.name
)
def test_estimate_is_within_tolerance_of_the_measured_peak(case, demo_store: Path, tmp_path: Path) -> None:
    report = run_case(case, demo_store, tmp_path / "work")
    assert abs(error(report)) <= TOLERANCE, (
        f"{case.name}: estimated {report['memory']['peakBytes']:,} B, measured {report['measured']['peakBytes']:,} B; "
        f"terms {report['memory']['terms']}"
    )
