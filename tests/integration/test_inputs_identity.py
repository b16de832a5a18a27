"""Content, not place, identifies inputs; data is validated before the base model (issue 17, item 5).

* The same data and base model moved to other URIs used to publish v2, bitwise identical to v1:
  the URIs were part of the inputs digest. Now the digest is taken over content digests only.
* A typo in line 3 of the training data was reported only after the whole base model had been
  downloaded. Now the data is fetched and validated first: with a base URI that does not even
  exist, the run fails on the data (InvalidData, naming the line), never reaching the base.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.reports import EXIT_BAD_INPUT, RESULT_LOG_PREFIX
from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]


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


def test_the_same_data_and_base_moved_elsewhere_reuse_the_version(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    first = run_job(run_kubetune, demo_store, tmp_path, "first", small_job())
    assert first.returncode == 0, first.stderr[-3000:]

    bucket = demo_store / "kubetune-demo"
    shutil.copytree(bucket / "base-models" / "tiny-llama-demo", bucket / "moved" / "base" / "llama-copy")
    (bucket / "moved" / "data").mkdir(parents=True)
    for role in ("train", "eval"):
        shutil.copyfile(
            bucket / "datasets" / "quickstart" / f"{role}.jsonl",
            bucket / "moved" / "data" / f"{role}-v2.jsonl",
        )
    moved = small_job(
        **{
            "model.base": {"uri": "s3://kubetune-demo/moved/base/llama-copy"},
            "data.train": {"uri": "s3://kubetune-demo/moved/data/train-v2.jsonl"},
            "data.eval": {"uri": "s3://kubetune-demo/moved/data/eval-v2.jsonl"},
        }
    )
    again = run_job(run_kubetune, demo_store, tmp_path, "moved", moved)
    assert again.returncode == 0, again.stderr[-3000:]
    result = result_of(again)
    assert result["reason"] == "Reused" and result["version"]["name"] == "v1"
    assert result["inputsDigest"] == result_of(first)["inputsDigest"]
    assert "stage Training" not in again.stderr
    assert not (bucket / "models" / "tiny-demo-translator" / "versions" / "v2").exists()

    # Different content is a different input: one changed byte trains v2.
    changed = bucket / "moved" / "data" / "train-v2.jsonl"
    lines = changed.read_text().splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer
    third = run_job(run_kubetune, demo_store, tmp_path, "changed", moved)
    assert third.returncode == 0 and result_of(third)["version"]["name"] == "v2", third.stderr[-3000:]


def test_data_is_validated_before_the_base_model_is_fetched(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    bucket = demo_store / "kubetune-demo"
    good = (bucket / "datasets" / "quickstart" / "train.jsonl").read_text().splitlines()
    bad = bucket / "datasets" / "typo" / "train.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text("\n".join([good[0], good[1], '{"instruction": "x", "output": "y"', *good[2:60]]) + "\n")
    job = small_job(
        **{
            "model.base": {"uri": "s3://kubetune-demo/base-models/not-uploaded-yet"},
            "data.train": {"uri": "s3://kubetune-demo/datasets/typo/train.jsonl"},
            "data.maxInvalidRecords": 0,
        }
    )
    proc = run_job(run_kubetune, demo_store, tmp_path, "typo", job)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    result = result_of(proc)
    assert result["reason"] == "InvalidData", result  # not FetchFailed on the (missing) base model
    assert "s3://kubetune-demo/datasets/typo/train.jsonl:3" in result["message"]
    assert not (tmp_path / "work-typo" / "inputs" / "base").exists()
