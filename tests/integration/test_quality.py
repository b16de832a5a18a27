"""Only a better model is published, and every number a user reads is right (issue 17).

Each test replays a case of the issue through the real `kubetune` CLI on the tiny demo model:

* the issue's diverged recipe (full fine-tuning, learningRate 1.0, maxGradNorm 1000, warmupRatio 0,
  constant schedule) stops with exit 5 and a diagnosis, and nothing is published (item 1);
* a run that does not learn fails its default gate with exit 4 (item 1);
* with no gates in the spec the default gate still runs, and the model card says which gates ran;
  opting out leaves no gate, and then promote.when gatesPassed moves no alias (item 2);
* a re-run of a gate-failed inputs digest reports GateFailed with exit 4, even with a changed
  promote alias (item 3);
* maxSamples bounds generation only: the version has one eval_loss (item 7).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.reports import EXIT_DIVERGED, EXIT_GATES_FAILED, RESULT_LOG_PREFIX
from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL = "tiny-demo-translator"

# The issue's recipe, as its first bullet gives it.
DIVERGING = {
    "method": {"type": "full"},
    "training.learningRate": 1.0,
    "training.maxGradNorm": 1000,
    "training.warmupRatio": 0,
    "training.scheduler": "constant",
    "training.maxSteps": 60,
    "training.logEverySteps": 1,
}


def models_dir(store: Path) -> Path:
    return store / "kubetune-demo" / "models" / MODEL


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(RESULT_LOG_PREFIX)]
    assert lines, f"no result line; exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix(RESULT_LOG_PREFIX))


def run_job(
    run_kubetune: Runner, store: Path, tmp: Path, name: str, job: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    path = write_job(tmp / f"{name}.yaml", job)
    # --verbose: the machine lines (KUBETUNE_RESULT) stay on the console, as in a pod's log.
    return run_kubetune(
        "run", str(path), "--verbose", "--store-dir", str(store), "--workdir", str(tmp / f"work-{name}")
    )


def test_the_issues_diverged_recipe_stops_early_with_exit_5_and_publishes_nothing(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    proc = run_job(
        run_kubetune,
        demo_store,
        tmp_path,
        "diverge",
        small_job(**DIVERGING, **{"output.promote": {"alias": "production"}}),
    )
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["outcome"] == "Failed" and result["reason"] == "Diverged"
    message = result["message"]
    assert "diverged" in message and "step 1 was" in message
    for field in (
        "training.learningRate",
        "training.maxGradNorm",
        "training.warmupRatio",
        "training.scheduler",
    ):
        assert field in message, message
    stopped_at = int(message.split(" at step ")[1].split(",")[0])
    assert stopped_at <= 8, message  # the loss was 5x its start by step 6; the old monitor waited past 10
    assert "stage Evaluating" not in proc.stderr and "stage Publishing" not in proc.stderr
    model = models_dir(demo_store)
    assert not (model / "versions").exists() or not any((model / "versions").iterdir())
    assert not (model / "aliases" / "production.json").exists()


def test_a_run_that_does_not_learn_fails_its_default_gate(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    proc = run_job(
        run_kubetune,
        demo_store,
        tmp_path,
        "flat",
        small_job(**{"training.learningRate": 1e-9, "training.maxSteps": 12}),
    )
    assert proc.returncode == EXIT_GATES_FAILED, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["reason"] == "GateFailed"
    gates = {g["metric"]: g for g in result["gates"]["results"]}
    assert not gates["train_loss_decrease"]["passed"]
    assert "not learning" in gates["train_loss_decrease"]["message"]
    assert "training.learningRate (now 1e-09)" in gates["train_loss_decrease"]["message"]


def test_with_no_gates_the_default_gate_runs_and_the_card_says_which_gates_ran(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    proc = run_job(
        run_kubetune, demo_store, tmp_path, "default", small_job(**{"output.promote": {"alias": "candidate"}})
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    metrics = [g["metric"] for g in result["gates"]["results"]]
    assert metrics == ["eval_loss_vs_base", "train_loss_decrease"]
    assert all(g["passed"] for g in result["gates"]["results"])
    assert result["promotedAlias"] == "candidate"
    card = (models_dir(demo_store) / "versions" / "v1" / "README.md").read_text()
    gates_section = card.split("## Gates", 1)[1].split("\n## ", 1)[0]
    assert "eval_loss_vs_base" in gates_section and "train_loss_decrease" in gates_section
    assert "default" in gates_section
    manifest = json.loads((models_dir(demo_store) / "versions" / "v1" / "manifest.json").read_text())
    assert [g["metric"] for g in manifest["gates"]["results"]] == metrics
    # Item 8, in part: the adapter names its base by the published URI, and carries no boilerplate.
    adapter = models_dir(demo_store) / "versions" / "v1" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "s3://kubetune-demo/base-models/tiny-llama-demo"
    assert (
        json.loads((adapter / "kubetune-base.json").read_text())["digest"]
        == manifest["inputs"]["base"]["digest"]
    )
    assert not (adapter / "README.md").exists()


def test_opting_out_leaves_no_gate_and_gates_passed_then_moves_no_alias(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(**{"evaluation.requireImprovement": False, "output.promote": {"alias": "production"}})
    proc = run_job(run_kubetune, demo_store, tmp_path, "optout", job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["gates"]["results"] == []
    assert result.get("promotedAlias") is None
    assert "no gate ran" in proc.stderr
    assert not (models_dir(demo_store) / "aliases" / "production.json").exists()
    card = (models_dir(demo_store) / "versions" / "v1" / "README.md").read_text()
    assert "requireImprovement: false" in card.split("## Gates", 1)[1]


def test_a_rerun_of_a_gate_failed_digest_reports_gate_failed_not_success(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    failing = small_job(
        **{"evaluation.gates": {"eval_loss": {"max": 1e-6}}, "output.promote": {"alias": "candidate"}}
    )
    first = run_job(run_kubetune, demo_store, tmp_path, "first", failing)
    assert first.returncode == EXIT_GATES_FAILED, first.stderr[-3000:]
    assert result_of(first)["reason"] == "GateFailed"

    again = run_job(run_kubetune, demo_store, tmp_path, "again", failing)
    assert again.returncode == EXIT_GATES_FAILED, again.stderr[-3000:]
    result = result_of(again)
    assert result["outcome"] == "Failed" and result["reason"] == "GateFailed"
    assert result["version"]["reused"] is True and result["gates"]["passed"] is False
    assert "stage Training" not in again.stderr

    # A spec change outside the inputs digest (the promote alias) does not turn it green either.
    other_alias = small_job(
        **{"evaluation.gates": {"eval_loss": {"max": 1e-6}}, "output.promote": {"alias": "production"}}
    )
    third = run_job(run_kubetune, demo_store, tmp_path, "third", other_alias)
    assert third.returncode == EXIT_GATES_FAILED and result_of(third)["reason"] == "GateFailed"
    aliases = models_dir(demo_store) / "aliases"
    assert not (aliases / "candidate.json").exists() and not (aliases / "production.json").exists()
    assert not (models_dir(demo_store) / "versions" / "v2").exists()


def test_max_samples_bounds_generation_only_so_a_version_has_one_eval_loss(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(
        **{"evaluation.maxSamples": 4, "evaluation.metrics": ["eval_loss", "perplexity", "rouge_l"]}
    )
    proc = run_job(run_kubetune, demo_store, tmp_path, "samples", job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vdir = models_dir(demo_store) / "versions" / "v1"
    manifest = json.loads((vdir / "manifest.json").read_text())
    rows = [
        json.loads(x) for x in (vdir / "training" / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    final_train_eval = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    report = json.loads((vdir / "eval" / "report.json").read_text())["evaluation"]
    eval_records = (demo_store / "kubetune-demo/datasets/quickstart/eval.jsonl").read_text().splitlines()
    assert report["num_examples"] == len([x for x in eval_records if x.strip()])  # loss: the whole set
    assert report["settings"]["generation_examples"] == 4  # generation: maxSamples
    assert len([s for s in _samples(vdir) if s["set"] == "eval"]) == 4
    assert manifest["metrics"]["eval_loss"] == pytest.approx(final_train_eval, rel=1e-4)


def _samples(vdir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (vdir / "eval" / "samples.jsonl").read_text().splitlines() if x.strip()]
