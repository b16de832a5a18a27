"""Issue #14: model files that would run code are refused by `kubetune run` unless the spec allows them.

The hostile files are real: a pickle whose unpickling writes a marker file, and a config.json whose
``auto_map`` points at a Python module that writes a marker when imported. Refusal must happen before
anything loads them (no marker), exit with the bad-input code and name the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.reports import EXIT_BAD_INPUT
from kubetune_trainer.fetch.sources import UnsafeModelError, check_weights_safety
from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
DEMO_BASE = Path("kubetune-demo") / "base-models" / "tiny-llama-demo"


class _Boobytrap:
    """Unpickling this writes ``marker``: proof that someone loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pickle code ran"))


def hostile_base(store: Path, name: str) -> Path:
    """A copy of the demo base model under ``base-models/<name>`` in the local store."""
    dest = store / "kubetune-demo" / "base-models" / name
    shutil.copytree(store / DEMO_BASE, dest)
    return dest


def run_job(
    run_kubetune: Runner, store: Path, tmp_path: Path, **changes: Any
) -> subprocess.CompletedProcess[str]:
    job = write_job(tmp_path / "job.yaml", small_job(**changes))
    return run_kubetune("run", str(job), "--store-dir", str(store), "--workdir", str(tmp_path / "w"))


def test_a_pickle_checkpoint_is_refused_before_it_is_loaded(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    base = hostile_base(demo_store, "pickled")
    (base / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(_Boobytrap(marker)))
    proc = run_job(
        run_kubetune, demo_store, tmp_path, **{"model.base.uri": "s3://kubetune-demo/base-models/pickled"}
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "FAILED (UnsafeModel): pytorch_model.bin: pickle files can run code" in proc.stderr
    assert "allowPickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle was unpickled"
    assert not (demo_store / "kubetune-demo" / "models").exists()


def test_a_pickle_next_to_safetensors_is_refused_too(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    base = hostile_base(demo_store, "mixed")
    marker = tmp_path / "PWNED"
    (base / "training_args.bin").write_bytes(pickle.dumps(_Boobytrap(marker)))
    proc = run_job(
        run_kubetune, demo_store, tmp_path, **{"model.base.uri": "s3://kubetune-demo/base-models/mixed"}
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "UnsafeModel" in proc.stderr and "training_args.bin" in proc.stderr
    assert not marker.exists()


def test_remote_code_is_refused_unless_trusted(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    base = hostile_base(demo_store, "remote-code")
    marker = tmp_path / "PWNED"
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    proc = run_job(
        run_kubetune, demo_store, tmp_path, **{"model.base.uri": "s3://kubetune-demo/base-models/remote-code"}
    )
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "UnsafeModel" in proc.stderr and "trustRemoteCode" in proc.stderr
    assert "modeling_evil.py" in proc.stderr or "config.json: auto_map" in proc.stderr
    assert not marker.exists(), "the model's Python code ran"

    # Without the .py file the auto_map alone is refused, naming config.json.
    (base / "modeling_evil.py").unlink()
    proc = run_job(
        run_kubetune, demo_store, tmp_path, **{"model.base.uri": "s3://kubetune-demo/base-models/remote-code"}
    )
    assert proc.returncode == EXIT_BAD_INPUT and "config.json: auto_map needs code" in proc.stderr


def test_the_spec_switches_lift_exactly_their_own_refusal(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded here")
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UnsafeModelError, match="auto_map"):
        check_weights_safety(folder, allow_pickle=True, trust_remote_code=False)
    with pytest.raises(UnsafeModelError, match="pickle"):
        check_weights_safety(folder, allow_pickle=False, trust_remote_code=True)
    check_weights_safety(folder, allow_pickle=True, trust_remote_code=True)


@pytest.mark.slow
def test_allow_pickle_lets_a_benign_pickle_checkpoint_train(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    import torch
    from safetensors.torch import load_file

    base = hostile_base(demo_store, "pickled-ok")
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    proc = run_job(
        run_kubetune,
        demo_store,
        tmp_path,
        **{
            "model.base": {"uri": "s3://kubetune-demo/base-models/pickled-ok", "allowPickle": True},
            "training.maxSteps": 2,
            "training.checkpoint": {"everySteps": 100, "keep": 1},
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (demo_store / "kubetune-demo/models/tiny-demo-translator/versions/v1/manifest.json").exists()
