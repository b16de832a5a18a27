"""The trainer end to end, through the real `kubetune` CLI and real processes (CPU, tiny demo model).

Covered here: a LoRA fine-tune that learns and publishes a whole version, a re-run that reuses it,
bad data failing before training, a SIGKILLed run resuming to the same end as an uninterrupted
one, 2-process torchrun DDP and DeepSpeed ZeRO runs, and a full run against a real S3 endpoint.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import (
    kubetune_cmd,
    quickstart_job,
    small_job,
    trainer_env,
    upload_demo,
    write_job,
)

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL = "tiny-demo-translator"


def version_dir(store: Path, version: str = "v1", model: str = MODEL) -> Path:
    return store / "kubetune-demo" / "models" / model / "versions" / version


def manifest(store: Path, version: str = "v1") -> dict[str, Any]:
    return json.loads((version_dir(store, version) / "manifest.json").read_text())


def metrics_rows(store: Path, version: str = "v1") -> list[dict[str, Any]]:
    path = version_dir(store, version) / "training" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_quickstart_learns_publishes_a_whole_version_and_reuses_it(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = write_job(tmp_path / "job.yaml", quickstart_job())
    proc = run_kubetune("run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "work"))
    assert_ok(proc)
    vdir = version_dir(demo_store)
    for rel in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "merged/model.safetensors",
        "quantized/int8",
        "quantized/onnx-int8",
        "eval/report.json",
        "eval/samples.jsonl",
        "training/metrics.jsonl",
        "training/loss.png",
        "training/run-config.json",
        "README.md",
        "manifest.json",
    ):
        assert (vdir / rel).exists(), f"missing {rel} in the published version"
    m = manifest(demo_store)
    listed = {f["path"] for f in m["files"]}
    assert "adapter/adapter_model.safetensors" in listed and "manifest.json" not in listed
    # The tuned model is clearly better than the base on the same eval data.
    report = json.loads((vdir / "eval" / "report.json").read_text())
    tuned, base = report["evaluation"]["tuned"], report["evaluation"]["base"]
    assert tuned["eval_loss"] < 0.2 * base["eval_loss"], (tuned, base)
    assert tuned["exact_match"] >= 0.9 and base["exact_match"] <= 0.1, (tuned, base)
    sample = json.loads((vdir / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["tuned"] == sample["reference"]
    for fmt in ("int8", "onnx-int8"):
        artifact = next(a for a in report["artifacts"] if a["format"] == fmt)
        assert artifact["smoke_text"] and artifact["size_bytes"] > 0
    assert m["gates"]["passed"] is True
    alias = json.loads(
        (demo_store / "kubetune-demo/models" / MODEL / "aliases" / "candidate.json").read_text()
    )
    assert alias["version"] == "v1"
    assert "[kubetune] Published" in proc.stderr and str(vdir) in proc.stderr
    # Checkpoints are removed once the version is published.
    assert not list((demo_store / "kubetune-demo/models" / MODEL / "checkpoints").rglob("COMPLETE.json"))

    # A re-sync of the same spec trains nothing and reuses v1.
    started = time.monotonic()
    again = run_kubetune(
        "run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "work2")
    )
    assert_ok(again)
    assert "Reused" in again.stderr and "stage Training" not in again.stderr
    assert not version_dir(demo_store, "v2").exists()
    assert time.monotonic() - started < 120


def test_bad_data_fails_before_training_with_file_and_line(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    bad = demo_store / "kubetune-demo" / "datasets" / "bad" / "train.jsonl"
    bad.parent.mkdir(parents=True)
    good = (demo_store / "kubetune-demo/datasets/quickstart/train.jsonl").read_text().splitlines()
    bad.write_text(
        "\n".join([good[0], "{not json", good[1], '{"instruction": "x", "output": ""}', *good[2:50]]) + "\n"
    )
    job = write_job(
        tmp_path / "job.yaml",
        small_job(**{"data.train": {"uri": "s3://kubetune-demo/datasets/bad/train.jsonl"}}),
    )
    proc = run_kubetune("run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert_ok(proc, 3)
    assert "s3://kubetune-demo/datasets/bad/train.jsonl:2" in proc.stderr
    assert "s3://kubetune-demo/datasets/bad/train.jsonl:4" in proc.stderr
    assert "stage Training" not in proc.stderr
    assert not (demo_store / "kubetune-demo" / "models").exists()


def test_invalid_spec_is_reported_with_file_line_and_field(tmp_path: Path, run_kubetune: Runner) -> None:
    job = quickstart_job(**{"training.batchSize": 0})
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(tmp_path / "store"))
    assert_ok(proc, 3)
    assert f"{path}:" in proc.stderr and "spec.training.batchSize" in proc.stderr


def _final_train_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return [r for r in rows if "loss" in r][-1]


@pytest.mark.slow
def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(
    demo_store_cache: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    import shutil

    job = write_job(tmp_path / "job.yaml", small_job(**{"training.maxSteps": 24}))
    straight = tmp_path / "straight"
    shutil.copytree(demo_store_cache, straight)
    assert_ok(run_kubetune("run", str(job), "--store-dir", str(straight), "--workdir", str(tmp_path / "w1")))

    killed = tmp_path / "killed"
    shutil.copytree(demo_store_cache, killed)
    proc = subprocess.Popen(
        kubetune_cmd("run", str(job), "--store-dir", str(killed), "--workdir", str(tmp_path / "w2")),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_root = killed / "kubetune-demo" / "models" / MODEL / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            markers = list(ckpt_root.rglob("COMPLETE.json")) if ckpt_root.exists() else []
            if any(json.loads(m.read_text())["step"] >= 8 for m in markers):
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint at step >= 8 appeared")
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not version_dir(killed).exists()

    resumed = run_kubetune("run", str(job), "--store-dir", str(killed), "--workdir", str(tmp_path / "w2"))
    assert_ok(resumed)
    assert "resumed from checkpoint at step" in resumed.stderr
    a, b = _final_train_row(metrics_rows(straight)), _final_train_row(metrics_rows(killed))
    assert a["step"] == b["step"] == 24

    # Same data order, RNG and optimizer state: an exact resume, not a close one. Every logged
    # step's loss and learning rate, and every adapter tensor, are bitwise equal.
    def curve(store: Path) -> list[tuple[Any, ...]]:
        rows = metrics_rows(store)
        return [(r["step"], r["loss"], r["learning_rate"]) for r in rows if "loss" in r]

    assert curve(killed) == curve(straight)
    from safetensors.torch import load_file

    expected = load_file(str(version_dir(straight) / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(version_dir(killed) / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert manifest(killed)["extra"]["resumedFromStep"] >= 8


def _planned_steps(stderr: str) -> int:
    for line in stderr.splitlines():
        if line.startswith("[kubetune] step ") and "/" in line:
            return int(line.split()[2].split("/")[1])
    raise AssertionError("no progress line in:\n" + stderr[-3000:])


@pytest.mark.slow
def test_ddp_two_processes_split_the_data(demo_store: Path, tmp_path: Path, run_kubetune: Runner) -> None:
    common = {
        "training.maxSteps": None,
        "training.epochs": 1,
        "training.batchSize": 2,
        "training.gradientAccumulationSteps": 1,
    }
    single = write_job(tmp_path / "single.yaml", small_job(**common))
    one = run_kubetune("run", str(single), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w1"))
    assert_ok(one)
    ddp_job = small_job(**common, **{"distributed.strategy": "ddp", "model.name": "ddp-translator"})
    ddp = run_kubetune(
        "run",
        str(write_job(tmp_path / "ddp.yaml", ddp_job)),
        "--nproc",
        "2",
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w2"),
    )
    assert_ok(ddp)
    # Each rank trains on half the rows: half the optimizer steps per epoch.
    assert _planned_steps(ddp.stderr) == math.ceil(_planned_steps(one.stderr) / 2)
    assert "[kubetune] Published: ddp-translator v1" in ddp.stderr
    m = json.loads((demo_store / "kubetune-demo/models/ddp-translator/versions/v1/manifest.json").read_text())
    assert m["extra"]["steps"] == _planned_steps(ddp.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_zero_two_processes(
    strategy: str, demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(
        **{"training.maxSteps": 6, "distributed.strategy": strategy, "model.name": f"ds-{strategy}"}
    )
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "ds.yaml", job)),
        "--nproc",
        "2",
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w"),
    )
    assert_ok(proc)
    vdir = demo_store / "kubetune-demo/models" / f"ds-{strategy}" / "versions" / "v1"
    from safetensors import safe_open

    with safe_open(str(vdir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and all(f.get_tensor(k).numel() > 0 for k in keys)  # gathered, not ZeRO-3 shards


@pytest.mark.slow
def test_full_run_against_a_real_s3_endpoint_leaks_no_secret(
    demo_store_cache: Path, tmp_path: Path, s3_bucket: tuple[str, str], run_kubetune: Runner
) -> None:
    import boto3

    from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, fake_credentials_env

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    upload_demo(s3, bucket, demo_store_cache)
    job = small_job(
        **{
            "model.base.uri": f"s3://{bucket}/demo/base-models/tiny-llama-demo",
            "data.train": {"uri": f"s3://{bucket}/demo/datasets/quickstart/train.jsonl"},
            "data.eval": {"uri": f"s3://{bucket}/demo/datasets/quickstart/eval.jsonl"},
            "output.uri": f"s3://{bucket}/registry",
            "storage": {"endpoint": endpoint, "region": "us-east-1", "addressingStyle": "path"},
            "training.maxSteps": 6,
        }
    )
    env = trainer_env(**fake_credentials_env())
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "s3.yaml", job)),
        "--remote",
        "--workdir",
        str(tmp_path / "w"),
        env=env,
    )
    assert_ok(proc)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"registry/{MODEL}/versions/v1/")["Contents"]
    ]
    assert f"registry/{MODEL}/versions/v1/manifest.json" in keys
    assert f"registry/{MODEL}/versions/v1/adapter/adapter_model.safetensors" in keys
    # Secrets never appear in logs or in anything published.
    for secret in (FAKE_SECRET_ACCESS_KEY, FAKE_ACCESS_KEY_ID):
        assert secret not in proc.stderr and secret not in proc.stdout
        for key in keys:
            assert secret.encode() not in s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting_and_the_restart_resumes(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    # Checkpoints only every 1000 steps: any checkpoint found was written because of SIGTERM.
    job = write_job(
        tmp_path / "job.yaml",
        small_job(
            **{
                "training.maxSteps": 40,
                "training.logEverySteps": 1,
                "training.checkpoint": {"everySteps": 1000, "keep": 2},
            }
        ),
    )
    code, rest = _sigterm_at("[kubetune] step 3/", job, demo_store, tmp_path)
    assert code == 143, rest[-3000:]
    markers = list((demo_store / "kubetune-demo" / "models" / MODEL / "checkpoints").rglob("COMPLETE.json"))
    assert len(markers) == 1
    saved_at = json.loads(markers[0].read_text())["step"]
    assert 3 <= saved_at < 40
    resumed = run_kubetune("run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert_ok(resumed)
    assert f"resumed from checkpoint at step {saved_at}" in resumed.stderr


def test_sigterm_after_training_ends_the_run_at_once_and_the_rerun_only_evaluates(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    # The loop's SIGTERM handler (stop at a step boundary, save a checkpoint) is the trainer's only
    # while it trains: left installed it swallowed a stop during evaluation, which then ran on to
    # the end (in a pod: until the kubelet's SIGKILL).
    job = write_job(tmp_path / "job.yaml", small_job(**{"evaluation.maxSamples": 32}))
    code, rest = _sigterm_at("[kubetune] stage Evaluating", job, demo_store, tmp_path)
    assert code == -signal.SIGTERM, rest[-3000:]
    assert "stage Publishing" not in rest
    assert not (demo_store / "kubetune-demo" / "models" / MODEL / "versions").exists()
    resumed = run_kubetune("run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert_ok(resumed)
    assert "resumed from checkpoint at step 16" in resumed.stderr  # the final step: nothing retrained
    assert (demo_store / "kubetune-demo" / "models" / MODEL / "versions" / "v1" / "manifest.json").exists()


def _sigterm_at(prefix: str, job: Path, demo_store: Path, tmp_path: Path) -> tuple[int, str]:
    """`kubetune run job` sent SIGTERM when a console line starts with ``prefix``: (exit code, the rest)."""
    proc = subprocess.Popen(
        kubetune_cmd("run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w")),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(prefix):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    return proc.wait(timeout=120), rest


def test_early_stopping_on_eval_loss(demo_store: Path, tmp_path: Path, run_kubetune: Runner) -> None:
    # A learning rate too small to move the eval loss: patience 2 stops at the third evaluation.
    job = small_job(
        **{
            "training.maxSteps": 40,
            "training.evalEverySteps": 2,
            "training.learningRate": 1e-12,
            "training.earlyStopping": {"patience": 2, "minDelta": 0.001},
        }
    )
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "j.yaml", job)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w"),
    )
    # Nothing was learned, so the default quality gates (issue 17) fail it: published, not promotable.
    assert_ok(proc, 4)
    assert "early stopping at step 6" in proc.stderr
    assert "not learning" in proc.stderr
    assert manifest(demo_store)["extra"]["steps"] == 6


def test_qlora_on_a_cpu_node_fails_with_a_clear_message(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(**{"method": {"type": "qlora"}, "distributed.gpusPerNode": 1})
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "j.yaml", job)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w"),
    )
    assert_ok(proc, 3)
    assert "qlora" in proc.stderr and "needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_published_version_is_the_base_of_the_next_stage(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    first = small_job(**{"output.merge": True, "output.promote": {"alias": "stage1", "when": "always"}})
    assert_ok(
        run_kubetune(
            "run",
            str(write_job(tmp_path / "a.yaml", first)),
            "--store-dir",
            str(demo_store),
            "--workdir",
            str(tmp_path / "wa"),
        )
    )
    second = small_job(
        **{"model.name": "stage2-translator", "model.base.uri": f"modelversion://{MODEL}/stage1"}
    )
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "b.yaml", second)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "wb"),
    )
    assert_ok(proc)
    m = json.loads(
        (demo_store / "kubetune-demo/models/stage2-translator/versions/v1/manifest.json").read_text()
    )
    # The alias was resolved to a concrete version in the lineage, not left as a moving pointer.
    assert m["parent"] == f"modelversion://{MODEL}/v1"
    assert m["inputs"]["base"]["parent"] == f"modelversion://{MODEL}/v1"
    parent_merged = version_dir(demo_store) / "merged"
    from kubetune_registry.digests import digest_dir

    assert m["inputs"]["base"]["digest"] == digest_dir(parent_merged)


@pytest.mark.slow
def test_promotion_is_a_commit_a_changed_alias_moves_without_retraining(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    first = small_job(**{"output.promote": {"alias": "candidate"}})
    assert_ok(
        run_kubetune(
            "run",
            str(write_job(tmp_path / "a.yaml", first)),
            "--store-dir",
            str(demo_store),
            "--workdir",
            str(tmp_path / "wa"),
        )
    )
    promoted = small_job(**{"output.promote": {"alias": "production"}})  # the reviewed commit
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "b.yaml", promoted)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "wb"),
    )
    assert_ok(proc)
    assert "Reused" in proc.stderr and "stage Training" not in proc.stderr
    aliases = demo_store / "kubetune-demo" / "models" / MODEL / "aliases"
    assert json.loads((aliases / "production.json").read_text())["version"] == "v1"
    assert json.loads((aliases / "candidate.json").read_text())["version"] == "v1"
    assert not version_dir(demo_store, "v2").exists()


def test_gradient_checkpointing_runs_end_to_end(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(**{"training.gradientCheckpointing": True, "training.maxSteps": 4})
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "j.yaml", job)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w"),
    )
    assert_ok(proc)
    config = json.loads((version_dir(demo_store) / "training" / "run-config.json").read_text())
    assert config["training"]["gradientCheckpointing"] is True
    assert math.isfinite(manifest(demo_store)["metrics"]["eval_loss"])
