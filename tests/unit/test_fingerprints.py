"""Listing fingerprints and the fingerprint cache (issue 17 item 5): what a source holds, said by its
listing without reading it, and the digests kubetune last read for it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from kubetune_registry.digests import digest_dir
from kubetune_registry.fingerprints import FingerprintCache, source_fingerprint
from kubetune_registry.storage import LocalStore, StoreSettings, bytes_read
from kubetune_registry.versions import ModelRegistry
from kubetune_trainer.context import RunContext
from kubetune_trainer.fetch.fingerprints import _from_manifest
from kubetune_trainer.fetch.sources import fetch


def make_model(root: Path, weights: bytes = b"\x01" * 4096) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "model.safetensors").write_bytes(weights)
    (root / "tok").mkdir(exist_ok=True)
    (root / "tok" / "tokenizer.json").write_text("{}")
    return root


def test_a_fingerprint_reads_no_object_byte_and_follows_the_objects_not_the_place(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    settings = StoreSettings(local_root=str(objects))
    make_model(objects / "bucket" / "base" / "tiny")
    make_model(objects / "bucket" / "base" / "tiny-2", weights=b"\x02" * 10)  # a sibling prefix
    before = bytes_read()
    first = source_fingerprint("s3://bucket/base/tiny", settings)
    assert bytes_read() == before  # one LIST, no GET
    assert (
        first is not None and first.objects == 3 and first.size == 4096 + len('{"model_type": "llama"}') + 2
    )
    assert not first.single and first.names == ("config.json", "model.safetensors", "tok/tokenizer.json")
    assert source_fingerprint("s3://bucket/base/tiny/", settings) == first

    # Moved (renamed) to another prefix: the same objects, the same fingerprint.
    (objects / "bucket" / "moved").mkdir()
    os.rename(objects / "bucket" / "base" / "tiny", objects / "bucket" / "moved" / "tiny")
    assert source_fingerprint("s3://bucket/moved/tiny", settings) == first
    # Any rewrite of one object (the store's own write: a new file renamed in place) changes it.
    store = LocalStore(objects / "bucket")
    store.put_bytes("moved/tiny/config.json", json.dumps({"model_type": "llama"}).encode())
    rewritten = source_fingerprint("s3://bucket/moved/tiny", settings)
    assert rewritten is not None and rewritten.key != first.key
    store.put_bytes("moved/tiny/extra.txt", b"x")
    added = source_fingerprint("s3://bucket/moved/tiny", settings)
    assert added is not None and added.key != rewritten.key and added.objects == 4
    # A copy is new files for a local store (new inodes): another fingerprint, so it downloads.
    shutil.copytree(objects / "bucket" / "moved" / "tiny", objects / "bucket" / "copy" / "tiny")
    copied = source_fingerprint("s3://bucket/copy/tiny", settings)
    assert copied is not None and copied.key != added.key

    one = source_fingerprint("s3://bucket/base/tiny-2/model.safetensors", settings)
    assert one is not None and one.single and one.names == ("model.safetensors",) and one.may_be_gguf()
    assert not first.may_be_gguf()
    assert source_fingerprint("s3://bucket/absent", settings) is None
    assert source_fingerprint("hf://org/name@main", settings) is None
    assert source_fingerprint("modelversion://m/v1", settings) is None


def test_file_sources_are_fingerprinted_through_symlinks_as_they_are_fetched(tmp_path: Path) -> None:
    blobs = make_model(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "model.safetensors", "tok"):
        (snapshot / name).symlink_to(blobs / name)  # a Hugging Face cache snapshot: links
    fp = source_fingerprint(snapshot.as_uri(), StoreSettings())
    assert fp is not None and fp.names == ("config.json", "model.safetensors", "tok/tokenizer.json")
    (blobs / "tok" / "tokenizer.json").write_text('{"changed": true}')  # behind a linked folder
    changed = source_fingerprint(snapshot.as_uri(), StoreSettings())
    assert changed is not None and changed.key != fp.key
    assert source_fingerprint((tmp_path / "nowhere").as_uri(), StoreSettings()) is None


def test_the_cache_lives_in_the_output_registry_and_a_bad_entry_is_a_miss(tmp_path: Path) -> None:
    settings = StoreSettings(local_root=str(tmp_path / "objects"))
    make_model(tmp_path / "objects" / "inputs" / "base")
    fp = source_fingerprint("s3://inputs/base", settings)
    assert fp is not None
    cache = FingerprintCache("s3://out/models", settings)
    assert cache.get(fp) is None
    assert cache.put(fp, {"digest": "d1"}, source="s3://inputs/base")
    assert cache.get(fp) == {"digest": "d1"}
    assert cache.get(fp, {"dequantizedTo": "bf16"}) is None  # another context is another entry
    (entry,) = (tmp_path / "objects" / "out" / "models" / ".kubetune" / "fingerprints").iterdir()
    doc = json.loads(entry.read_text())
    assert doc["kind"] == "kubetune.io/SourceFingerprint" and doc["size"] == fp.size
    assert doc["source"] == "s3://inputs/base" and doc["value"] == {"digest": "d1"}
    assert not list((tmp_path / "objects" / "inputs").rglob(".kubetune"))  # nothing in the input bucket
    # A download that disagrees replaces the entry (and says so); a damaged entry reads as a miss.
    assert cache.put(fp, {"digest": "d2"}) is False
    assert cache.get(fp) == {"digest": "d2"}
    entry.write_text("{not json")
    assert cache.get(fp) is None


def test_a_modelversion_base_digest_comes_from_its_manifest_exactly(tmp_path: Path) -> None:
    output = (tmp_path / "registry").as_uri()
    staging = tmp_path / "staging"
    make_model(staging / "merged")
    (staging / "adapter").mkdir()
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"\x03" * 64)
    ModelRegistry(output, "parent", StoreSettings()).publish(
        staging, inputs={}, inputs_digest="e" * 64, metrics={}, gates={}, parent=None
    )
    ctx = cast(
        RunContext,
        SimpleNamespace(rc=SimpleNamespace(output=SimpleNamespace(uri=output)), store=StoreSettings()),
    )
    before = bytes_read()
    known = _from_manifest(ctx, "base", "modelversion://parent/v1")
    read = bytes_read() - before
    assert known.value is not None and known.resolved == "modelversion://parent/v1"
    assert known.size == 4096 + len('{"model_type": "llama"}') + 2 and read < known.size  # the manifest only
    fetched = fetch(
        "modelversion://parent/v1", tmp_path / "fetched", StoreSettings(), registry_output_uri=output
    )
    assert known.value["digest"] == digest_dir(fetched)
    missing: Any = _from_manifest(ctx, "base", "modelversion://parent/v9")
    assert missing.value is None
