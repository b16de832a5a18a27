"""What ships is what is judged (issue 17 item 6), through the real `kubetune` CLI on the demo model.

One run publishes merged/ and quantized/int8/ with a gate on each: the merged model within 5% of
the tuned model's eval loss (passes), and a p95 latency bar no int8 artifact can meet (fails). The
version is published but GateFailed (exit 4), the alias does not move, and every gate value is the
artifact's own number from its evaluation on the eval set, as report.json, the manifest and the
model card show it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_api.reports import EXIT_GATES_FAILED
from tests.fixtures.trainer import small_job
from tests.integration.test_quality import models_dir, result_of, run_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]


def test_a_failed_gate_on_the_int8_artifact_makes_the_version_gate_failed(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(
        **{
            "evaluation.metrics": ["eval_loss", "perplexity", "exact_match", "latency_p95_ms"],
            "evaluation.maxSamples": 4,
            "evaluation.maxNewTokens": 8,
            "evaluation.gates": {
                "merged.eval_loss": {"maxDropVsTuned": 0.05},
                "int8.latency_p95_ms": {"max": 0.001},
            },
            "quantization.formats": ["int8"],
            "output.merge": True,
            "output.promote": {"alias": "candidate"},
        }
    )
    proc = run_job(run_kubetune, demo_store, tmp_path, "artifact-gates", job)
    assert proc.returncode == EXIT_GATES_FAILED, proc.stderr[-4000:]
    result = result_of(proc)
    assert result["reason"] == "GateFailed" and result["version"]["name"] == "v1"
    assert "int8.latency_p95_ms" in result["message"] and "is above max 0.001" in result["message"]
    gates = {g["metric"]: g for g in result["gates"]["results"]}
    assert gates["merged.eval_loss"]["passed"] is True
    assert gates["int8.latency_p95_ms"]["passed"] is False
    assert "[kubetune] artifact gates: 1/2 gates passed" in proc.stderr

    vdir = models_dir(demo_store) / "versions" / "v1"
    report = json.loads((vdir / "eval" / "report.json").read_text())
    assert report["passed"] is False
    tuned = report["evaluation"]["tuned"]
    judged = {e["artifact"]: e for e in report["artifact_evaluations"]}
    assert list(judged) == ["merged", "int8"]
    assert judged["int8"]["path"] == "quantized/int8" and judged["merged"]["path"] == "merged"
    # The gate values are the artifacts' own numbers on the same eval set (all examples for the
    # loss, the same 4 generation samples), not the tuned model's.
    for artifact in ("merged", "int8"):
        settings = judged[artifact]["settings"]
        assert settings["num_examples"] == report["evaluation"]["num_examples"]
        assert settings["generation_examples"] == report["evaluation"]["settings"]["generation_examples"] == 4
        assert set(judged[artifact]["metrics"]) >= {
            "eval_loss",
            "perplexity",
            "exact_match",
            "latency_p95_ms",
        }
    assert gates["int8.latency_p95_ms"]["value"] == judged["int8"]["metrics"]["latency_p95_ms"]
    assert gates["merged.eval_loss"]["value"] == judged["merged"]["metrics"]["eval_loss"]
    assert gates["merged.eval_loss"]["max"] == pytest.approx(tuned["eval_loss"] * 1.05)
    assert judged["int8"]["metrics"]["eval_loss"] != tuned["eval_loss"]  # int8 weights, its own loss

    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["gates"]["passed"] is False
    assert manifest["extra"]["artifactMetrics"]["int8"]["eval_loss"] == judged["int8"]["metrics"]["eval_loss"]
    card = (vdir / "README.md").read_text()
    assert "**Quality gates FAILED: this version is not promotable.**" in card
    assert "### What ships, on the same eval set" in card
    assert "| int8.latency_p95_ms | spec, on int8 | <= 0.001 |" in card
    # Published, not promoted.
    assert not (models_dir(demo_store) / "aliases" / "candidate.json").exists()


def test_artifact_max_samples_checks_merged_on_fewer_answers_against_the_tuned_on_the_same(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    """spec.evaluation.artifactMaxSamples through the whole pipeline: merged answers the first 2 of
    the tuned model's 4; its gate is judged against the tuned model's recorded answers to those 2."""
    job = small_job(
        **{
            "evaluation.metrics": ["eval_loss", "exact_match"],
            "evaluation.maxSamples": 4,
            "evaluation.artifactMaxSamples": 2,
            "evaluation.maxNewTokens": 8,
            "evaluation.gates": {"merged.exact_match": {"maxDropVsTuned": 0.0}},
            "output.merge": True,
        }
    )
    proc = run_job(run_kubetune, demo_store, tmp_path, "artifact-subset", job)
    assert proc.returncode in (0, 4), proc.stderr[-4000:]
    vdir = models_dir(demo_store) / "versions" / "v1"
    report = json.loads((vdir / "eval" / "report.json").read_text())
    merged = {e["artifact"]: e for e in report["artifact_evaluations"]}["merged"]
    assert merged["settings"]["generation_examples"] == 2
    assert merged["settings"]["tuned_generation_examples"] == 4
    assert merged["settings"]["num_examples"] == report["evaluation"]["num_examples"]  # loss: all
    samples = [json.loads(line) for line in (vdir / "eval" / "samples.jsonl").read_text().splitlines()]
    rows = [s for s in samples if s["set"] == "eval"][:2]
    expected = sum(r["tuned"].strip() == r["reference"].strip() for r in rows) / 2
    assert merged["tuned_on_same"]["exact_match"] == pytest.approx(expected)
    gate = {g["metric"]: g for g in report["gates"]["results"]}["merged.exact_match"]
    assert gate["min"] == pytest.approx(merged["tuned_on_same"]["exact_match"])
    assert gate["value"] == merged["metrics"]["exact_match"]
    assert gate["passed"] == (merged["metrics"]["exact_match"] >= merged["tuned_on_same"]["exact_match"])
