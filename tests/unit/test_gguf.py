"""GGUF base models: a tiny Llama written as GGUF by the tests loads back as the same network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_registry.digests import sha256_file
from kubetune_trainer.fetch.gguf import (
    CONVERSION_RECORD,
    GgufError,
    check_architecture,
    find_gguf,
    prepare_gguf_base,
    read_gguf_header,
)
from tests.support.gguf_files import write_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf")


def _logits(model_dir: Path, text: str = "red cat blue") -> tuple[list[int], object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids[0].tolist(), model(input_ids=ids).logits


def test_find_gguf_file_folder_and_not(tiny_gguf: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert find_gguf(tiny_gguf) == tiny_gguf
    assert find_gguf(tiny_gguf.parent) == tiny_gguf
    assert find_gguf(tiny_model_dir) is None  # a transformers folder (config.json)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(GgufError, match=r"fake\.gguf: named \.gguf but is not a GGUF file"):
        find_gguf(fake)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(GgufError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); name one file"):
        find_gguf(two)


def test_header_and_dequantised_model_match_the_original(
    tiny_gguf: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    header = read_gguf_header(tiny_gguf)
    assert header == {"architecture": "llama", "name": "tiny-llama-demo", "file_type": "ALL_F32"}
    base = prepare_gguf_base(tiny_gguf, tmp_path / "work", precision="fp32")
    assert base.sha256 == sha256_file(tiny_gguf)
    assert base.dtype == "float32" and not base.cached
    assert "dequantised to float32" in base.describe() and base.sha256[:12] in base.describe()
    record = json.loads((base.model_dir / CONVERSION_RECORD).read_text())
    assert record["sha256"] == base.sha256 and record["file_type"] == "ALL_F32"
    config = json.loads((base.model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint: merges and saves normally
    assert any(p.suffix == ".safetensors" for p in base.model_dir.iterdir())

    ids, ref = _logits(tiny_model_dir)
    ids_back, got = _logits(base.model_dir)
    assert ids_back == ids  # the tokenizer came through the GGUF vocabulary and merges
    assert torch.allclose(got, ref, atol=1e-4)  # F32 tensors, q/k permutation undone


def test_quantised_gguf_dequantises_close_and_is_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    q8 = write_llama_gguf(tiny_model_dir, tmp_path / "tiny.Q8_0.gguf", quantize_linear=True)
    assert read_gguf_header(q8)["file_type"] == "MOSTLY_Q8_0"
    cache = tmp_path / "cache"
    first = prepare_gguf_base(q8, tmp_path / "work", cache_dir=cache)
    second = prepare_gguf_base(q8, tmp_path / "work", cache_dir=cache)
    assert not first.cached and second.cached and second.model_dir == first.model_dir
    assert first.model_dir.name.startswith(first.sha256)
    _, ref = _logits(tiny_model_dir)
    _, got = _logits(first.model_dir)
    assert not torch.equal(got, ref)  # 8-bit weights really were dequantised...
    assert torch.allclose(got, ref, atol=5e-2)  # ...and stay close to the original


def test_unsupported_architecture_is_refused_by_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    odd = write_llama_gguf(tiny_model_dir, tmp_path / "odd.gguf", architecture="rwkv7")
    with pytest.raises(
        GgufError, match=r"odd\.gguf: GGUF architecture 'rwkv7' cannot be loaded by transformers"
    ):
        prepare_gguf_base(odd, tmp_path / "work")
    check_architecture("qwen2moe", "x.gguf")  # llama.cpp's name for what transformers calls qwen2_moe
    with pytest.raises(GgufError, match="precision"):
        prepare_gguf_base(
            write_llama_gguf(tiny_model_dir, tmp_path / "t.gguf"), tmp_path / "w", precision="fp16"
        )
