"""Adapter methods end to end: DoRA, rsLoRA, (IA)^3 and LoRA on selected layers, through `kubetune run`.

Each run publishes a version whose adapter/ peft reloads with ``PeftModel.from_pretrained``; the
reloaded adapter gives the same logits as the published merged model, and differs from the base.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL = "tiny-demo-translator"

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (id, spec changes, keys adapter_config.json must have)
    (
        "dora",
        {"method.lora": {"r": 4, "alpha": 8, "variant": "dora"}},
        {"peft_type": "LORA", "use_dora": True},
    ),
    (
        "rslora",
        {"method.lora": {"r": 4, "alpha": 8, "variant": "rslora"}},
        {"peft_type": "LORA", "use_rslora": True, "use_dora": False},
    ),
    ("ia3", {"method.type": "ia3", "method.lora": None}, {"peft_type": "IA3"}),
    (
        "lora-layer-1",
        {"method.lora": {"r": 4, "alpha": 8, "layers": [1]}},
        {"peft_type": "LORA", "layers_to_transform": [1], "use_dora": False},
    ),
]


def _version(store: Path) -> Path:
    return store / "kubetune-demo" / "models" / MODEL / "versions" / "v1"


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(("case", "changes", "expected"), CASES, ids=[c[0] for c in CASES])
def test_adapter_method_is_published_recorded_and_reloads_with_peft(
    case: str,
    changes: dict[str, Any],
    expected: dict[str, Any],
    demo_store: Path,
    tmp_path: Path,
    run_kubetune: Runner,
) -> None:
    # Not a quality test (8 steps): explicitly opt out of the default quality gates (issue 17).
    job = small_job(
        **{"training.maxSteps": 8, "output.merge": True, "evaluation.requireImprovement": False, **changes}
    )
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    vdir = _version(demo_store)
    config = json.loads((vdir / "adapter" / "adapter_config.json").read_text())
    for key, value in expected.items():
        assert config[key] == value, (key, config[key])

    # The choice is recorded in the manifest and the model card.
    manifest = json.loads((vdir / "manifest.json").read_text())
    adapter = manifest["extra"]["adapter"]
    assert adapter["peftType"] == expected["peft_type"]
    if case in ("dora", "rslora"):
        assert adapter["variant"] == case
    if case == "lora-layer-1":
        assert adapter["layers"] == [1]
    run_config = json.loads((vdir / "training" / "run-config.json").read_text())
    assert run_config["method"]["type"] == ("ia3" if case == "ia3" else "lora")
    card = (vdir / "README.md").read_text()
    assert {"dora": "DoRA", "rslora": "rsLoRA", "ia3": "(IA)^3", "lora-layer-1": "adapted layers"}[
        case
    ] in card

    # Only layer 1 carries LoRA weights when layers: [1].
    from safetensors import safe_open

    with safe_open(str(vdir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys
    if case == "lora-layer-1":
        assert all(".layers.1." in k for k in keys), keys
    if case == "dora":
        assert any("lora_magnitude_vector" in k for k in keys), keys

    # peft reloads the published adapter; it matches the published merged model, not the base.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_dir = demo_store / "kubetune-demo" / "base-models" / "tiny-llama-demo"
    ids = list(range(3, 40))
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(str(base_dir)).eval(), ids)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(vdir / "adapter")
    )
    tuned_logits = _logits(tuned.eval(), ids)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(str(vdir / "merged")).eval(), ids)
    assert torch.allclose(tuned_logits, merged_logits, atol=1e-4), (tuned_logits - merged_logits).abs().max()
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)


def test_layers_beyond_the_model_fail_before_training_with_the_field(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    job = small_job(**{"method.lora": {"r": 4, "alpha": 8, "layers": [0, 7]}})
    path = write_job(tmp_path / "job.yaml", job)
    proc = run_kubetune("run", str(path), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "spec.method.lora.layers" in proc.stderr and "[7]" in proc.stderr and "2 layers" in proc.stderr
    assert not _version(demo_store).exists()
