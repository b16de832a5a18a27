"""Augmentation, curriculum and training health end to end through `kubetune run` (CPU, demo model).

One run with all three on: what a user sees is the data report's augmented share and examples, the
curriculum summary naming the record without a difficulty, and the published gradient-norm rows,
heat-map PNG and health report.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL = "tiny-demo-translator"
DATA = "s3://kubetune-demo/datasets/recipes"


def test_augmentation_curriculum_and_health_are_reported_and_published(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    source = demo_store / "kubetune-demo" / "datasets" / "quickstart" / "train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:200]]
    for i, row in enumerate(rows):
        if i != 6:  # line 7 has no difficulty: it goes last and is reported
            row["difficulty"] = i % 5
    data_dir = demo_store / "kubetune-demo" / "datasets" / "recipes"
    data_dir.mkdir(parents=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "terms.yaml").write_text("Translate: [Convert, Render]\nwords: [terms]\n")

    job = small_job(
        **{
            # Not a quality test: explicitly opt out of the default quality gates (issue 17).
            "evaluation.requireImprovement": False,
            "data.train": {"uri": f"{DATA}/train.jsonl"},
            "data.eval": None,
            "data.evalSplit": 0.1,
            "data.augmentation": {
                "share": 0.5,
                "seed": 7,
                "synonyms": {"uri": f"{DATA}/terms.yaml", "probability": 1.0},
                "sentenceTransforms": True,
                "ocrNoise": 0.05,
            },
            "data.curriculum": {"order": "field", "difficultyField": "difficulty"},
            "training.maxSteps": 8,
            "training.logEverySteps": 2,
        }
    )
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    vdir = demo_store / "kubetune-demo" / "models" / MODEL / "versions" / "v1"
    report = json.loads((vdir / "training" / "data-report.json").read_text())

    aug = report["augmentation"]
    originals = report["trainRecords"]
    assert aug["originalRecords"] == originals > 150
    assert 0.25 * originals < aug["augmentedRecords"] < 0.75 * originals  # share 0.5, seeded
    assert aug["augmentedShare"] == pytest.approx(
        aug["augmentedRecords"] / (originals + aug["augmentedRecords"]), abs=1e-3
    )
    assert aug["transforms"]["synonyms"] > 0 and aug["transforms"]["ocrNoise"] > 0
    example = aug["examples"][0]
    assert example["source"].startswith(f"{DATA}/train.jsonl:")
    assert "Translate" in example["before"] and example["after"] != example["before"]
    assert report["trainExamples"] == originals + aug["augmentedRecords"]
    assert "augmented share" in proc.stderr

    cur = report["curriculum"]
    assert (
        cur["order"] == "field" and cur["difficultyField"] == "difficulty" and cur["firstEpochOnly"] is True
    )
    # Line 7 may have been held out for eval; when it trains, it is named.
    assert cur["missingDifficulty"] in (0, 1)
    if cur["missingDifficulty"]:
        assert cur["missingAt"] == [f"{DATA}/train.jsonl:7"]
    assert (cur["easiest"], cur["hardest"]) == (0, 4)
    assert "curriculum: easy-to-hard by field" in proc.stderr

    # The term dictionary is an input: its digest is in the manifest's inputs.
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert f"{DATA}/terms.yaml" in json.dumps(manifest)

    grad_rows = [json.loads(x) for x in (vdir / "training" / "grad-norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grad_rows] == [2, 4, 6, 8]
    assert set(grad_rows[0]["norms"]) == {"layers.0", "layers.1"}
    assert all(v > 0 for r in grad_rows for v in r["norms"].values())
    png = (vdir / "training" / "grad-norms.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    health = json.loads((vdir / "training" / "health.json").read_text())
    assert isinstance(health["warnings"], list)
    listed = {f["path"] for f in manifest["files"]}
    assert {"training/grad-norms.png", "training/grad-norms.jsonl", "training/health.json"} <= listed


def test_a_broken_term_dictionary_fails_before_training_naming_the_file(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    data_dir = demo_store / "kubetune-demo" / "datasets" / "recipes"
    data_dir.mkdir(parents=True)
    (data_dir / "terms.json").write_text('{"Translate": [1, 2]}')
    job = small_job(**{"data.augmentation": {"synonyms": {"uri": f"{DATA}/terms.json"}}})
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"{DATA}/terms.json" in proc.stderr and "'Translate'" in proc.stderr
    assert "stage Training" not in proc.stderr
