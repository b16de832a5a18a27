"""Fetching base models and data (file://, s3:// in embedded mode, hf://, modelversion://) and the
weights safety check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubetune_registry.storage import StoreSettings
from kubetune_registry.versions import ModelRegistry
from kubetune_trainer.fetch.sources import FetchError, UnsafeModelError, check_weights_safety, fetch


def make_model(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "model.safetensors").write_bytes(b"\x00" * 128)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root


def test_file_folder_is_linked_or_copied_and_the_source_untouched(tmp_path: Path) -> None:
    src = make_model(tmp_path / "base")
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    out = fetch(src.as_uri(), tmp_path / "dest", StoreSettings())
    assert out == tmp_path / "dest"
    assert (out / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert (out / "model.safetensors").read_bytes() == b"\x00" * 128
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before


def test_file_single_file(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    out = fetch(data.as_uri(), tmp_path / "dest", StoreSettings())
    assert out == tmp_path / "dest" / "train.jsonl" and out.read_text() == data.read_text()


def test_missing_file_source_names_the_uri(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="does not exist"):
        fetch((tmp_path / "nope").as_uri(), tmp_path / "dest", StoreSettings())


def test_s3_uri_in_embedded_mode_fetches_a_prefix_or_one_object(tmp_path: Path) -> None:
    make_model(tmp_path / "objects" / "models" / "base" / "tiny")
    settings = StoreSettings(local_root=str(tmp_path / "objects"))
    folder = fetch("s3://models/base/tiny", tmp_path / "d1", settings)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "config.json",
        "model.safetensors",
        "tokenizer/tokenizer.json",
    ]
    one = fetch("s3://models/base/tiny/config.json", tmp_path / "d2", settings)
    assert one == tmp_path / "d2" / "config.json" and json.loads(one.read_text()) == {"model_type": "llama"}
    with pytest.raises(FetchError, match="no object"):
        fetch("s3://models/base/absent", tmp_path / "d3", settings)
    with pytest.raises(
        FetchError, match=r"s3://models/base/\.\./secrets: prefix 'base/\.\./secrets' has a '\.\.' segment"
    ):
        fetch("s3://models/base/../secrets", tmp_path / "d4", settings)


def test_hf_offline_gives_the_mirroring_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError) as info:
        fetch("hf://org/name@abc123", tmp_path / "d", StoreSettings())
    assert str(info.value).startswith(
        "hf://org/name@abc123: the Hugging Face Hub is not reachable from here; mirror the model to s3:// or "
        "file:// and point model.base.uri at it"
    )


def test_hf_unreachable_endpoint_gives_the_same_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # A closed port on loopback: fails at once, like a cluster with no egress.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(FetchError, match="not reachable from here"):
        fetch("hf://org/name@main", tmp_path / "d", StoreSettings())


def test_modelversion_downloads_merged_weights_verified(tmp_path: Path) -> None:
    output = (tmp_path / "registry").as_uri()
    staging = tmp_path / "staging"
    make_model(staging / "merged")
    (staging / "adapter").mkdir()
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"\x01" * 32)
    registry = ModelRegistry(output, "general", StoreSettings())
    pv = registry.publish(staging, inputs={}, inputs_digest="c" * 64, metrics={}, gates={}, parent=None)
    registry.set_alias("production", pv.name)

    out = fetch(
        "modelversion://general/production", tmp_path / "base", StoreSettings(), registry_output_uri=output
    )
    assert out == tmp_path / "base"
    assert (out / "config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    assert not (out / "adapter").exists()
    adapter = fetch(
        "modelversion://general/v1",
        tmp_path / "adapter",
        StoreSettings(),
        registry_output_uri=output,
        subdir_for_modelversion="adapter",
    )
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"\x01" * 32

    with pytest.raises(FetchError, match="no published version 'v9'"):
        fetch("modelversion://general/v9", tmp_path / "x", StoreSettings(), registry_output_uri=output)
    with pytest.raises(FetchError, match=r"output\.uri"):
        fetch("modelversion://general/v1", tmp_path / "x", StoreSettings())


def test_modelversion_without_merged_weights_says_how_to_fix(tmp_path: Path) -> None:
    output = (tmp_path / "registry").as_uri()
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"\x01")
    ModelRegistry(output, "m", StoreSettings()).publish(
        staging, inputs={}, inputs_digest="d" * 64, metrics={}, gates={}, parent=None
    )
    with pytest.raises(FetchError, match=r"no merged/ files .*output\.merge"):
        fetch("modelversion://m/v1", tmp_path / "x", StoreSettings(), registry_output_uri=output)


def test_weights_safety(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    check_weights_safety(model, allow_pickle=False, trust_remote_code=False)

    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeModelError, match=r"^pytorch_model\.bin: pickle"):
        check_weights_safety(model, allow_pickle=False, trust_remote_code=False)
    check_weights_safety(model, allow_pickle=True, trust_remote_code=False)
    os.unlink(model / "pytorch_model.bin")

    (model / "model.safetensors").unlink()
    with pytest.raises(UnsafeModelError, match=r"no \*\.safetensors"):
        check_weights_safety(model, allow_pickle=False, trust_remote_code=False)
    (model / "model.safetensors").write_bytes(b"\x00")

    (model / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.XModel"}}))
    with pytest.raises(UnsafeModelError, match=r"^config\.json: auto_map"):
        check_weights_safety(model, allow_pickle=False, trust_remote_code=False)
    check_weights_safety(model, allow_pickle=False, trust_remote_code=True)

    (model / "config.json").write_text("{}")
    (model / "tokenizer" / "custom.py").write_text("import os")
    with pytest.raises(UnsafeModelError, match=r"^tokenizer/custom\.py: the model ships Python code"):
        check_weights_safety(model, allow_pickle=False, trust_remote_code=False)
