"""Knowledge distillation end to end through `kubetune run`.

The teacher is the DEMO base (trained on the toy copy task); the student is a differently
initialised tiny Llama with the same tokenizer. With pure distillation (weight 1) the student's
token distributions on held-out prompts move toward the teacher's: the mean KL(teacher || student)
at the answer tokens falls far below where it started, and below an SFT-only run of the same steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
BUCKET = "kubetune-demo"
TEACHER_URI = f"s3://{BUCKET}/base-models/tiny-llama-demo"
STEPS = 100


def _student(store: Path) -> str:
    """A random tiny Llama with the demo tokenizer, placed in the store as the student's base."""
    from kubetune_trainer.demo import build_tiny_llama

    teacher = store / BUCKET / "base-models" / "tiny-llama-demo"
    build_tiny_llama(store / BUCKET / "base-models" / "student", teacher, seed=123)
    return f"s3://{BUCKET}/base-models/student"


def _job(store: Path, distillation: dict[str, Any] | None, **changes: Any) -> dict[str, Any]:
    return small_job(
        **{
            "model.name": "distilled",
            "model.base.uri": _student(store),
            "method": {"type": "full"},
            "training.maxSteps": STEPS,
            "training.batchSize": 8,
            "training.learningRate": 0.003,
            "training.logEverySteps": 6,
            "training.checkpoint": {"everySteps": 100, "keep": 1},
            "evaluation.metrics": ["eval_loss"],
            # Not a quality test: explicitly opt out of the default quality gates (issue 17).
            "evaluation.requireImprovement": False,
            "distillation": distillation,
            **changes,
        }
    )


def _run(
    runner: Runner, tmp_path: Path, store: Path, job: dict[str, Any], name: str
) -> subprocess.CompletedProcess[str]:
    path = write_job(tmp_path / f"{name}.yaml", job)
    proc = runner("run", str(path), "--store-dir", str(store), "--workdir", str(tmp_path / f"w-{name}"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _version(store: Path, model: str, version: str) -> Path:
    return store / BUCKET / "models" / model / "versions" / version


def mean_kl(teacher_dir: Path, student_dir: Path, eval_file: Path) -> float:
    """Mean KL(teacher || student) at T = 1 over the answer tokens of the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_api.models import DataSpec
    from kubetune_trainer.data import iter_batches, model_inputs, prepare_data
    from kubetune_trainer.train.distill import kd_loss
    from kubetune_trainer.train.label_head import LabelPositionHead

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    data = DataSpec.model_validate(
        {"train": {"uri": "file:///unused.jsonl"}, "format": "instruction", "template": "chatml"}
    )
    held_out = prepare_data([eval_file], [eval_file], tokenizer, data, max_seq_length=128, seed=0).eval[:48]
    models = [
        AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        for d in (teacher_dir, student_dir)
    ]
    heads = [LabelPositionHead(m) for m in models]
    total = count = 0.0
    with torch.no_grad():
        for batch in iter_batches(
            held_out,
            batch_size=16,
            max_seq_length=128,
            packing=False,
            pad_token_id=0,
            seed=0,
            epoch=0,
            shuffle=False,
        ):
            inputs = model_inputs(batch)
            teacher, student = (h.forward(m, inputs) for h, m in zip(heads, models, strict=True))
            n = teacher.logits.shape[0]
            total += float(kd_loss(student.logits, teacher.logits, 1.0)) * n
            count += n
    return total / count


def test_distillation_moves_the_student_toward_the_teacher_more_than_sft(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    store = demo_store
    teacher_dir = store / BUCKET / "base-models" / "tiny-llama-demo"
    eval_file = store / BUCKET / "datasets" / "quickstart" / "eval.jsonl"
    distillation = {"teacher": {"uri": TEACHER_URI}, "weight": 1.0, "temperature": 2.0}
    proc = _run(run_kubetune, tmp_path, store, _job(store, distillation), "kd")
    _run(run_kubetune, tmp_path, store, _job(store, None, **{"model.name": "sft-only"}), "sft")

    kd_dir = _version(store, "distilled", "v1")
    before = mean_kl(teacher_dir, store / BUCKET / "base-models" / "student", eval_file)
    after_kd = mean_kl(teacher_dir, kd_dir / "merged", eval_file)
    after_sft = mean_kl(teacher_dir, _version(store, "sft-only", "v1") / "merged", eval_file)
    print(f"KL(teacher || student): before {before:.3f}, after KD {after_kd:.3f}, after SFT {after_sft:.3f}")
    assert after_kd < 0.5 * before, (before, after_kd)
    assert after_kd < after_sft, (after_kd, after_sft)

    # What was distilled from is recorded: the manifest, the inputs record, the card, the log.
    from kubetune_registry.digests import digest_dir

    manifest = json.loads((kd_dir / "manifest.json").read_text())
    extra = manifest["extra"]["distillation"]
    assert extra["teacher"] == TEACHER_URI and extra["teacherLogits"] == "onTheFly" and extra["weight"] == 1.0
    assert extra["teacherDigest"] == digest_dir(teacher_dir)
    assert manifest["inputs"]["teacher"]["digest"] == digest_dir(teacher_dir)
    assert TEACHER_URI in (kd_dir / "README.md").read_text()
    rows = [json.loads(line) for line in (kd_dir / "training" / "metrics.jsonl").read_text().splitlines()]
    kd_rows = [r for r in rows if "kd_loss" in r]
    assert kd_rows and kd_rows[-1]["kd_loss"] < kd_rows[0]["kd_loss"]
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-4) for r in kd_rows)  # weight 1: pure KD
    assert "FAILED" not in proc.stderr


def _publish_teacher(store: Path, source: Path, alias: str) -> str:
    """Publish ``source`` as the next version of the model 'teacher' (merged/) and point ``alias`` at it."""
    from kubetune_registry.digests import digest_dir
    from kubetune_registry.storage import StoreSettings
    from kubetune_registry.versions import ModelRegistry

    registry = ModelRegistry(f"s3://{BUCKET}/models", "teacher", StoreSettings(local_root=str(store)))
    staging = store.parent / f"teacher-staging-{digest_dir(source)[:8]}"
    shutil.copytree(source, staging / "merged")
    version = registry.publish(
        staging, inputs={"demo": True}, inputs_digest=digest_dir(source), metrics={}, gates={}, parent=None
    )
    registry.promote(alias, version.name, True, "always")
    return version.name


def test_cached_teacher_from_a_model_version_and_a_changed_teacher_retrains(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    store = demo_store
    teacher_dir = store / BUCKET / "base-models" / "tiny-llama-demo"
    eval_file = store / BUCKET / "datasets" / "quickstart" / "eval.jsonl"
    assert _publish_teacher(store, teacher_dir, "prod") == "v1"
    distillation = {
        "teacher": {"uri": "modelversion://teacher/prod"},
        "weight": 1.0,
        "teacherLogits": "cached",
        "topK": 16,
    }
    job = _job(store, distillation)
    proc = _run(run_kubetune, tmp_path, store, job, "cached")
    assert "cached the teacher's top-16 logits" in proc.stderr
    v1 = _version(store, "distilled", "v1")
    before = mean_kl(teacher_dir, store / BUCKET / "base-models" / "student", eval_file)
    after = mean_kl(teacher_dir, v1 / "merged", eval_file)
    print(f"KL(teacher || student), cached top-16: before {before:.3f}, after {after:.3f}")
    assert after < 0.5 * before, (before, after)
    extra = json.loads((v1 / "manifest.json").read_text())["extra"]["distillation"]
    assert extra["teacherVersion"] == "modelversion://teacher/v1" and extra["topK"] == 16
    assert extra["teacherLogits"] == "cached"

    # The alias moves to a different teacher: the same YAML must train again, not reuse v1.
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    save_file(
        {k: v * 0.5 if "lm_head" in k else v for k, v in weights.items()},
        str(other / "model.safetensors"),
        metadata={"format": "pt"},
    )
    assert _publish_teacher(store, other, "prod") == "v2"
    _run(run_kubetune, tmp_path, store, job, "changed")
    v2 = json.loads((_version(store, "distilled", "v2") / "manifest.json").read_text())
    assert v2["extra"]["distillation"]["teacherVersion"] == "modelversion://teacher/v2"
    assert v2["inputsDigest"] != json.loads((v1 / "manifest.json").read_text())["inputsDigest"]


def test_a_teacher_with_another_tokenizer_fails_before_training_naming_the_field(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    from kubetune_trainer.demo import build_demo_tokenizer, build_tiny_llama

    store = demo_store
    build_demo_tokenizer(tmp_path / "other-tokenizer", vocab_size=300)
    build_tiny_llama(store / BUCKET / "base-models" / "other-teacher", tmp_path / "other-tokenizer")
    job = _job(store, {"teacher": {"uri": f"s3://{BUCKET}/base-models/other-teacher"}})
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "InvalidSpec" in proc.stderr and "spec.distillation.teacher.uri" in proc.stderr
    assert "other-teacher" in proc.stderr
    assert not _version(store, "distilled", "v1").exists()
