"""GGUF export end to end (issue 20 item 1): a small LoRA version published through the real
``kubetune`` CLI with ``quantization.formats: [gguf-f16, gguf-q8_0, gguf-q4_k_m]``.

Asserts what a llama.cpp / Ollama user gets: each ``quantized/gguf-*/model.gguf`` listed in the
manifest with its real sha256, of the GGUF file type its name says, loadable by llama-cpp-python's
``Llama`` and generating; an Ollama ``Modelfile`` with the training chat template (ChatML) and
both stop tokens; and each variant evaluated on the eval set like every artifact (its metrics in
report.json, a ``gguf-q8_0.*`` gate judged on them).

Needs llama-cpp-python and llama.cpp's converter (``scripts/build-llama-cpp.sh``, run by ``make
setup``/``make test``); skipped, saying so, only where that build is absent.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_trainer.artifacts.gguf_export import gguf_unavailable_reason
from tests.fixtures.trainer import small_job, write_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL = "tiny-demo-translator"
GGUF = {"gguf-f16": 1, "gguf-q8_0": 7, "gguf-q4_k_m": 15}  # llama_ftype (general.file_type)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gguf_variants_are_published_loadable_evaluated_and_ready_for_ollama(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    reason = gguf_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    import llama_cpp

    job = small_job(
        **{
            "quantization.formats": list(GGUF),
            "evaluation.metrics": ["eval_loss", "perplexity", "exact_match", "latency_p95_ms"],
            "evaluation.gates": {"gguf-q8_0.eval_loss": {"max": 20}},
        }
    )
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "job.yaml", job)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "work"),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    vdir = demo_store / "kubetune-demo" / "models" / MODEL / "versions" / "v1"
    manifest = {f["path"]: f for f in json.loads((vdir / "manifest.json").read_text())["files"]}
    report = json.loads((vdir / "eval" / "report.json").read_text())
    evaluations = {e["artifact"]: e for e in report["artifact_evaluations"]}
    tuned_loss = report["evaluation"]["tuned"]["eval_loss"]

    for fmt, file_type in GGUF.items():
        adir = vdir / "quantized" / fmt
        gguf = adir / "model.gguf"
        for name in ("model.gguf", "Modelfile", "kubetune-gguf.json", "tokenizer.json"):
            rel = f"quantized/{fmt}/{name}"
            assert rel in manifest, f"{rel} missing from the manifest"
            assert manifest[rel]["sha256"] == _sha256(adir / name), rel
        info = json.loads((adir / "kubetune-gguf.json").read_text())
        assert info["general.file_type"] == str(file_type), info
        assert info["tokenizer.ggml.pre"] == "gpt-2" and info["pre_tokenizer_fallback"] == "gpt-2"
        assert info["tokenizer_parity"]["identical"] == info["tokenizer_parity"]["texts"], info

        # What an Ollama user runs: the file, the training chat template, both stop tokens.
        modelfile = (adir / "Modelfile").read_text().splitlines()
        assert "FROM ./model.gguf" in modelfile
        assert any(line.startswith('TEMPLATE """{{- range .Messages }}<|im_start|>') for line in modelfile)
        assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile

        # What a llama.cpp user runs: the file alone, llama.cpp's own tokenizer and sampler.
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, verbose=False)
        out = llm.create_completion(
            "<|im_start|>user\nTranslate into Zorbish.\n\ncat dog<|im_end|>\n<|im_start|>assistant\n",
            max_tokens=8,
            temperature=0.0,
        )
        assert out["usage"]["completion_tokens"] >= 1, out
        del llm

        # Evaluated like every artifact: same eval set, its own metrics, finite and near the tuned
        # model's loss (f16 is nearly lossless; 4-bit is allowed more).
        metrics = evaluations[fmt]["metrics"]
        assert {"eval_loss", "exact_match", "latency_p95_ms"} <= set(metrics), metrics
        assert math.isfinite(metrics["eval_loss"])
        slack = {"gguf-f16": 0.02, "gguf-q8_0": 0.05, "gguf-q4_k_m": 0.5}[fmt]
        assert abs(metrics["eval_loss"] - tuned_loss) <= slack * max(tuned_loss, 1.0), (
            fmt,
            metrics,
            tuned_loss,
        )
        artifact = next(a for a in report["artifacts"] if a["format"] == fmt)
        assert artifact["size_bytes"] > 0 and artifact["new_tokens"] > 0

    gate = next(g for g in report["gates"]["results"] if g["metric"].startswith("gguf-q8_0."))
    assert gate["passed"] is True, gate
    # Smaller files as the bits go down.
    sizes = [(vdir / "quantized" / f / "model.gguf").stat().st_size for f in GGUF]
    assert sizes[0] > sizes[1] > sizes[2], sizes
