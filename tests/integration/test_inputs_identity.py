"""Content, not place, identifies inputs; data is validated before the base model (issue 17, item 5).

* The same data and base model moved to other URIs used to publish v2, bitwise identical to v1:
  the URIs were part of the inputs digest. Now the digest is taken over content digests only.
* A typo in line 3 of the training data was reported only after the whole base model had been
  downloaded. Now the data is fetched and validated first: with a base URI that does not even
  exist, the run fails on the data (InvalidData, naming the line), never reaching the base.
* A re-run downloaded the whole base model before it found out that nothing needed training. Now
  the base model's listing fingerprint (one LIST, no object bytes) is looked up in the output
  registry's fingerprint cache first: a re-run, or one with the base renamed or server-side copied
  elsewhere, is reused without reading a base-model byte (the bytes it read are counted and
  compared with the base's size); a changed listing downloads, and still reuses when the content
  is the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.reports import EXIT_BAD_INPUT, EXIT_GATES_FAILED, RESULT_LOG_PREFIX
from tests.fixtures.trainer import small_job, trainer_env, upload_demo, write_job

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


EARLY_REUSE = re.compile(r"reuse decided before any model download: ([\d,]+) bytes read")


def early_reuse_bytes(proc: subprocess.CompletedProcess[str]) -> int | None:
    """The bytes a run read from object storage when it was reused before any model download."""
    found = EARLY_REUSE.search(proc.stdout + proc.stderr)
    return int(found.group(1).replace(",", "")) if found else None


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_re_run_is_reused_without_reading_a_base_model_byte(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    bucket = demo_store / "kubetune-demo"
    base = bucket / "base-models" / "tiny-llama-demo"
    base_size = folder_size(base)
    data_size = sum(
        (bucket / "datasets" / "quickstart" / f"{r}.jsonl").stat().st_size for r in ("train", "eval")
    )
    # A gate that cannot pass: the reused digest must keep failing (exit 4), however it was decided.
    job = small_job(**{"evaluation.gates": {"eval_loss": {"max": 0.0001}}})
    first = run_job(run_kubetune, demo_store, tmp_path, "first", job)
    assert first.returncode == EXIT_GATES_FAILED, first.stderr[-3000:]
    assert early_reuse_bytes(first) is None and (tmp_path / "work-first" / "inputs" / "base").is_dir()
    cache = bucket / "models" / ".kubetune" / "fingerprints"
    assert len(list(cache.glob("*.json"))) == 1  # the base's fingerprint, in the output registry only
    assert not list((bucket / "base-models").rglob(".kubetune"))

    again = run_job(run_kubetune, demo_store, tmp_path, "again", job)
    assert again.returncode == EXIT_GATES_FAILED, again.stderr[-3000:]
    result = result_of(again)
    assert result["reason"] == "GateFailed" and result["version"]["name"] == "v1"
    assert result["inputsDigest"] == result_of(first)["inputsDigest"]
    read = early_reuse_bytes(again)
    assert read is not None, again.stderr[-3000:]
    # What it read: the data (fetched and validated first, as always) and the registry's small
    # manifests and index; not one byte of the base model.
    assert read < data_size + 64 * 1024 < base_size, (read, data_size, base_size)
    assert not (tmp_path / "work-again" / "inputs" / "base").exists()
    assert "stage Training" not in again.stderr
    print(f"re-run read {read} bytes; data {data_size} bytes; base model {base_size} bytes (not read)")

    # Renamed to another prefix: the same objects, the same listing fingerprint, still no download.
    (bucket / "elsewhere").mkdir()
    os.rename(base, bucket / "elsewhere" / "llama")
    moved = small_job(
        **{
            "evaluation.gates": {"eval_loss": {"max": 0.0001}},
            "model.base": {"uri": "s3://kubetune-demo/elsewhere/llama"},
        }
    )
    renamed = run_job(run_kubetune, demo_store, tmp_path, "renamed", moved)
    assert renamed.returncode == EXIT_GATES_FAILED and result_of(renamed)["version"]["name"] == "v1"
    assert (
        early_reuse_bytes(renamed) is not None
        and not (tmp_path / "work-renamed" / "inputs" / "base").exists()
    )

    # A rewritten object (same bytes, a new file) changes the listing: the run downloads, finds
    # the same content digest, reuses v1, and remembers the new listing for next time.
    readme = bucket / "elsewhere" / "llama" / "README.md"
    content = readme.read_bytes()
    readme.unlink()
    readme.write_bytes(content)
    rewritten = run_job(run_kubetune, demo_store, tmp_path, "rewritten", moved)
    assert rewritten.returncode == EXIT_GATES_FAILED and result_of(rewritten)["version"]["name"] == "v1"
    assert early_reuse_bytes(rewritten) is None and (tmp_path / "work-rewritten" / "inputs" / "base").is_dir()
    assert len(list(cache.glob("*.json"))) == 2
    assert not (bucket / "models" / "tiny-demo-translator" / "versions" / "v2").exists()


@pytest.mark.slow
def test_a_re_run_against_a_real_s3_endpoint_reads_no_base_model_byte(
    demo_store_cache: Path, tmp_path: Path, s3_bucket: tuple[str, str], run_kubetune: Runner
) -> None:
    import boto3

    from tests.fixtures.s3 import fake_credentials_env

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    upload_demo(s3, bucket, demo_store_cache)
    base_size = folder_size(demo_store_cache / "kubetune-demo" / "base-models" / "tiny-llama-demo")

    def job(base: str) -> dict[str, Any]:
        return small_job(
            **{
                "model.base.uri": f"s3://{bucket}/{base}",
                "data.train": {"uri": f"s3://{bucket}/demo/datasets/quickstart/train.jsonl"},
                "data.eval": {"uri": f"s3://{bucket}/demo/datasets/quickstart/eval.jsonl"},
                "output.uri": f"s3://{bucket}/registry",
                "storage": {"endpoint": endpoint, "region": "us-east-1", "addressingStyle": "path"},
                "training.maxSteps": 6,
            }
        )

    def run(name: str, base: str) -> subprocess.CompletedProcess[str]:
        path = write_job(tmp_path / f"{name}.yaml", job(base))
        return run_kubetune(
            "run",
            str(path),
            "--remote",
            "--verbose",
            "--workdir",
            str(tmp_path / f"work-{name}"),
            env=trainer_env(**fake_credentials_env()),
        )

    first = run("first", "demo/base-models/tiny-llama-demo")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run("again", "demo/base-models/tiny-llama-demo")
    assert again.returncode == 0, again.stderr[-3000:]
    assert result_of(again)["reason"] == "Reused" and result_of(again)["version"]["name"] == "v1"
    read = early_reuse_bytes(again)
    assert read is not None and read < base_size, (read, base_size, again.stderr[-3000:])
    assert not (tmp_path / "work-again" / "inputs" / "base").exists()
    print(f"S3 re-run read {read} bytes; base model {base_size} bytes (not read)")

    # A server-side copy to another prefix keeps every ETag: reused, still without a download.
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="demo/base-models/tiny-llama-demo/")["Contents"]
    for item in listed:
        rel = item["Key"].removeprefix("demo/base-models/tiny-llama-demo/")
        s3.copy_object(
            Bucket=bucket, Key=f"copied/llama/{rel}", CopySource={"Bucket": bucket, "Key": item["Key"]}
        )
    copied = run("copied", "copied/llama")
    assert copied.returncode == 0 and result_of(copied)["version"]["name"] == "v1", copied.stderr[-3000:]
    assert (
        early_reuse_bytes(copied) is not None and not (tmp_path / "work-copied" / "inputs" / "base").exists()
    )
