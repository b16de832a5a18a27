"""The model registry on a local-directory object store (the embedded mode), and its CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from kubetune_cli import versions as cli_versions
from kubetune_registry.storage import PreconditionFailed, StoreSettings
from kubetune_registry.versions import (
    AliasConflict,
    IntegrityError,
    ModelRegistry,
    RegistryError,
    VersionNotFound,
)

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


def make_staging(root: Path, tag: str, *, weights_kb: int = 64) -> Path:
    """A version's staged files as the trainer lays them out; content depends on ``tag``."""
    files = {
        "adapter/adapter_model.safetensors": (tag.encode() * 1024)[: weights_kb * 1024],
        "adapter/adapter_config.json": json.dumps({"r": 8, "tag": tag}).encode(),
        "merged/config.json": b'{"model_type": "llama"}',
        "merged/model.safetensors": hashlib.sha256(tag.encode()).digest() * 100,
        "eval/report.json": json.dumps({"eval_loss": 1.0}).encode(),
        "training/metrics.jsonl": b'{"step": 1, "loss": 2.0}\n',
        "README.md": f"# model card {tag}\n".encode(),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def inputs(lr: float = 2e-4, data_digest: str = "d1") -> dict[str, Any]:
    return {
        "baseModel": {"uri": "s3://models/base", "digest": "base123"},
        "data": {"train": data_digest},
        "config": {"training": {"learningRate": lr, "epochs": 3}},
        "trainerVersion": "0.1.0",
    }


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry((tmp_path / "registry").as_uri(), "support-bot", StoreSettings())


def publish(registry: ModelRegistry, tmp_path: Path, tag: str, digest: str, **kw: Any) -> Any:
    staging = make_staging(tmp_path / f"staging-{tag}", tag)
    return registry.publish(
        staging,
        inputs=kw.pop("inputs", inputs()),
        inputs_digest=digest,
        metrics=kw.pop("metrics", {"eval_loss": 1.5}),
        gates=kw.pop("gates", {"passed": True}),
        parent=kw.pop("parent", None),
        **kw,
    )


def test_publish_lays_out_the_version_and_a_complete_manifest(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    pv = publish(
        registry, tmp_path, "one", DIGEST_A, parent="modelversion://base/v2", extra={"method": "lora"}
    )
    root = tmp_path / "registry" / "support-bot" / "versions" / "v1"
    assert pv.name == "v1" and not pv.reused
    assert pv.uri == f"{(tmp_path / 'registry').as_uri()}/support-bot/versions/v1"
    manifest_bytes = (root / "manifest.json").read_bytes()
    assert pv.manifest_digest == hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 1
    assert manifest["version"] == "v1" and manifest["model"] == "support-bot"
    assert manifest["inputsDigest"] == DIGEST_A and manifest["inputs"] == inputs()
    assert manifest["parent"] == "modelversion://base/v2"
    assert manifest["metrics"] == {"eval_loss": 1.5} and manifest["gates"] == {"passed": True}
    assert manifest["extra"] == {"method": "lora"}
    assert manifest["created"].endswith("Z")
    listed = {f["path"]: f for f in manifest["files"]}
    staged = tmp_path / "staging-one"
    assert set(listed) == {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    for rel, entry in listed.items():
        data = (root / rel).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_versions_are_numbered_and_listed_in_order(registry: ModelRegistry, tmp_path: Path) -> None:
    for i in range(1, 12):
        assert publish(registry, tmp_path, f"t{i}", f"{i:064x}").name == f"v{i}"
    assert [v.name for v in registry.list_versions()] == [f"v{i}" for i in range(1, 12)]  # v10 after v9
    assert registry.get_version("v11").manifest["inputsDigest"] == f"{11:064x}"
    with pytest.raises(VersionNotFound, match="v12"):
        registry.get_version("v12")


def test_same_inputs_digest_is_reused_and_nothing_is_uploaded(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    first = publish(registry, tmp_path, "one", DIGEST_A)
    again = publish(registry, tmp_path, "two", DIGEST_A)
    assert again.reused and again.name == first.name == "v1"
    assert again.manifest_digest == first.manifest_digest
    assert [v.name for v in registry.list_versions()] == ["v1"]
    found = registry.find_by_inputs_digest(DIGEST_A)
    assert found is not None and found.name == "v1" and found.reused
    assert registry.find_by_inputs_digest(DIGEST_B) is None


def test_interrupted_upload_leaves_no_version_and_a_retry_completes(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_upload = registry.store.upload_file
    calls = {"n": 0}

    def failing_upload(path: Path, key: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("network dropped mid-upload")
        real_upload(path, key)

    monkeypatch.setattr(registry.store, "upload_file", failing_upload)
    with pytest.raises(ConnectionError):
        publish(registry, tmp_path, "one", DIGEST_A)
    assert registry.list_versions() == []
    assert registry.find_by_inputs_digest(DIGEST_A) is None
    with pytest.raises(VersionNotFound):
        registry.get_version("v1")

    monkeypatch.setattr(registry.store, "upload_file", real_upload)
    pv = publish(registry, tmp_path, "one", DIGEST_A)
    assert pv.name == "v2" and not pv.reused, "the failed claim's name is never reused"
    assert [v.name for v in registry.list_versions()] == ["v2"]
    assert registry.verify("v2").ok
    assert not (tmp_path / "registry" / "support-bot" / "versions" / "v1").exists(), (
        "partial files cleaned up"
    )


def test_a_retried_manifest_write_that_already_landed_still_publishes(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore retries a PUT whose response was lost; the retry then meets its own object: 412.
    real_put = registry.store.put_bytes

    def put_then_412(key: str, data: bytes, **kw: Any) -> str:
        etag = real_put(key, data, **kw)
        if key.endswith("/manifest.json"):
            raise PreconditionFailed(f"{key} already exists (If-None-Match)")
        return etag

    monkeypatch.setattr(registry.store, "put_bytes", put_then_412)
    pv = publish(registry, tmp_path, "one", DIGEST_A)
    assert pv.name == "v1" and registry.verify("v1").ok
    assert [v.name for v in registry.list_versions()] == ["v1"]


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    uri = (tmp_path / "registry").as_uri()
    stagings = [make_staging(tmp_path / f"s{i}", f"pub{i}") for i in range(4)]
    barrier = threading.Barrier(4)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        reg = ModelRegistry(uri, "support-bot", StoreSettings())
        barrier.wait()
        pv = reg.publish(
            stagings[i], inputs=inputs(), inputs_digest=f"{i + 1:064x}", metrics={}, gates={}, parent=None
        )
        results[i] = pv.name

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["v1", "v2", "v3", "v4"]
    reg = ModelRegistry(uri, "support-bot", StoreSettings())
    for i, name in results.items():
        assert reg.verify(name).ok
        card = tmp_path / "registry" / "support-bot" / "versions" / name / "README.md"
        assert card.read_text() == f"# model card pub{i}\n", "each version holds its own publisher's files"


def test_verify_reports_altered_missing_and_unexpected_files(registry: ModelRegistry, tmp_path: Path) -> None:
    publish(registry, tmp_path, "one", DIGEST_A)
    assert registry.verify("v1").ok
    root = tmp_path / "registry" / "support-bot" / "versions" / "v1"
    (root / "merged" / "model.safetensors").write_bytes(b"tampered")
    (root / "eval" / "report.json").unlink()
    (root / "extra.txt").write_text("not in manifest")
    report = registry.verify("v1")
    assert not report.ok
    assert report.missing == ["eval/report.json"]
    assert [a.path for a in report.altered] == ["merged/model.safetensors"]
    assert report.altered[0].actual_size == len(b"tampered")
    assert report.unexpected == ["extra.txt"]


def test_download_verifies_hashes(registry: ModelRegistry, tmp_path: Path) -> None:
    publish(registry, tmp_path, "one", DIGEST_A)
    merged = registry.download("v1", tmp_path / "dl-merged", subdir="merged")
    assert sorted(p.name for p in merged.iterdir()) == ["config.json", "model.safetensors"]
    whole = registry.download("v1", tmp_path / "dl-all")
    assert (whole / "adapter" / "adapter_config.json").is_file() and (whole / "manifest.json").is_file()

    stored = tmp_path / "registry" / "support-bot" / "versions" / "v1" / "merged" / "model.safetensors"
    stored.write_bytes(b"x" * stored.stat().st_size)
    with pytest.raises(IntegrityError, match=r"merged/model\.safetensors: sha256"):
        registry.download("v1", tmp_path / "dl-bad", subdir="merged")
    assert not (tmp_path / "dl-bad" / "model.safetensors").exists(), "a bad copy is not left behind"


def test_alias_cas_promotion_rollback_and_history(registry: ModelRegistry, tmp_path: Path) -> None:
    for i in range(1, 4):
        publish(registry, tmp_path, f"t{i}", f"{i:064x}")
    assert registry.get_alias("production") is None

    first = registry.set_alias("production", "v1", expected=None, reason="first release", actor="alice")
    assert (first.version, first.previous, first.sequence) == ("v1", None, 1)
    with pytest.raises(AliasConflict, match="points to v1, not nothing") as info:
        registry.set_alias("production", "v2", expected=None)
    assert info.value.current is not None and info.value.current.version == "v1"
    with pytest.raises(AliasConflict):
        registry.set_alias("production", "v2", expected="v3")
    registry.set_alias("production", "v2", expected="v1", actor="bob")
    assert registry.get_version("production").name == "v2"

    # promotion rules
    assert registry.promote("production", "v3", gates_passed=False, when="gatesPassed") is None
    assert registry.get_alias("production").version == "v2"  # type: ignore[union-attr]
    moved = registry.promote("production", "v3", gates_passed=True, when="gatesPassed")
    assert moved is not None and moved.version == "v3"
    always = registry.promote("candidate", "v1", gates_passed=False, when="always")
    assert always is not None and always.version == "v1"
    with pytest.raises(ValueError):
        registry.promote("production", "v1", gates_passed=True, when="sometimes")  # type: ignore[arg-type]

    # rollback is a move back; history keeps every move
    back = registry.rollback("production", actor="oncall")
    assert back.version == "v2" and back.previous == "v3"
    history = registry.alias_history("production")
    assert [(r.version, r.previous) for r in history] == [
        ("v1", None),
        ("v2", "v1"),
        ("v3", "v2"),
        ("v2", "v3"),
    ]
    assert [r.sequence for r in history] == [1, 2, 3, 4]
    assert history[0].actor == "alice" and history[0].reason == "first release"

    # same target again: no new history entry
    registry.set_alias("production", "v2")
    assert len(registry.alias_history("production")) == 4

    with pytest.raises(VersionNotFound):
        registry.set_alias("production", "v9")
    with pytest.raises(ValueError, match="looks like a version"):
        registry.set_alias("v1", "v1")


def test_concurrent_alias_moves_lose_no_history(registry: ModelRegistry, tmp_path: Path) -> None:
    for i in range(1, 5):
        publish(registry, tmp_path, f"t{i}", f"{i:064x}")
    barrier = threading.Barrier(4)

    def move(i: int) -> None:
        barrier.wait()
        registry.set_alias("candidate", f"v{i}", actor=f"w{i}")

    threads = [threading.Thread(target=move, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry.alias_history("candidate")
    assert sorted(r.version for r in history) == ["v1", "v2", "v3", "v4"]
    assert [r.previous for r in history[1:]] == [r.version for r in history[:-1]], (
        "each move saw the one before"
    )


@pytest.mark.parametrize("name", ["../x", "UPPER", "a/b", "a..b", "x" * 64, "mödel", "-lead"])
def test_bad_model_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model name"):
        ModelRegistry(tmp_path.as_uri(), name, StoreSettings())


def test_staged_paths_must_be_safe_and_manifest_is_reserved(registry: ModelRegistry, tmp_path: Path) -> None:
    staging = make_staging(tmp_path / "s", "x")
    (staging / "manifest.json").write_text("{}")
    with pytest.raises(RegistryError, match=r"manifest\.json is written by the registry"):
        registry.publish(staging, inputs={}, inputs_digest=DIGEST_A, metrics={}, gates={}, parent=None)
    assert registry.list_versions() == []


def test_diff_shows_config_data_and_metric_changes(registry: ModelRegistry, tmp_path: Path) -> None:
    publish(registry, tmp_path, "one", DIGEST_A, metrics={"eval_loss": 2.0, "bleu": 10.0})
    publish(
        registry,
        tmp_path,
        "two",
        DIGEST_B,
        inputs=inputs(lr=1e-4, data_digest="d2"),
        metrics={"eval_loss": 1.5, "bleu": 12.5},
        parent="modelversion://support-bot/v1",
    )
    diff = registry.diff("v1", "v2")
    fields = {(c["section"], c["field"]): (c["a"], c["b"]) for c in diff["changes"]}
    assert fields[("inputs", "config.training.learningRate")] == (2e-4, 1e-4)
    assert fields[("inputs", "data.train")] == ("d1", "d2")
    assert fields[("parent", "parent")] == (None, "modelversion://support-bot/v1")
    assert ("inputs", "trainerVersion") not in fields
    assert diff["metrics"]["eval_loss"] == {"a": 2.0, "b": 1.5, "delta": -0.5}
    assert "merged/model.safetensors" in diff["files"]["changed"]


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune")
    cli_versions.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_diff_table_and_verify_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    store_dir = tmp_path / "objstore"
    settings = StoreSettings(local_root=str(store_dir))
    registry = ModelRegistry("s3://team-models/prod", "support-bot", settings)
    publish(registry, tmp_path, "one", DIGEST_A, metrics={"eval_loss": 2.0})
    publish(registry, tmp_path, "two", DIGEST_B, inputs=inputs(lr=1e-4), metrics={"eval_loss": 1.25})
    common = ["--output", "s3://team-models/prod", "--model", "support-bot", "--store-dir", str(store_dir)]

    assert run_cli(["versions", "diff", *common, "v1", "v2"]) == 0
    out = capsys.readouterr().out
    assert "config.training.learningRate" in out and "0.0002" in out and "0.0001" in out
    assert "eval_loss" in out and "-0.75" in out

    assert run_cli(["versions", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "v1" in out and "v2" in out

    assert run_cli(["alias", "set", *common, "production", "v2", "--expect", "none", "--actor", "ci"]) == 0
    assert "production -> v2" in capsys.readouterr().out
    assert run_cli(["alias", "set", *common, "production", "v1", "--expect", "v1"]) == 2
    assert "points to v2" in capsys.readouterr().err
    assert run_cli(["alias", "history", *common, "production"]) == 0
    assert "ci" in capsys.readouterr().out

    assert run_cli(["versions", "verify", *common, "production"]) == 0
    assert "OK" in capsys.readouterr().out
    weights = store_dir / "team-models" / "prod" / "support-bot" / "versions" / "v2" / "adapter"
    (weights / "adapter_model.safetensors").write_bytes(b"evil")
    assert run_cli(["versions", "verify", *common, "v2"]) == 1
    out = capsys.readouterr().out
    assert "altered" in out and "adapter/adapter_model.safetensors" in out and "FAILED" in out

    assert run_cli(["versions", "show", *common, "v7"]) == 2
    assert "no published version 'v7'" in capsys.readouterr().err
