"""The object store and the registry against a real S3 HTTP endpoint (moto server on loopback)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import boto3
import pytest

from kubetune_registry.storage import PreconditionFailed, S3Store, StoreSettings, UnsafeKeyError, open_uri
from kubetune_registry.versions import AliasConflict, ModelRegistry, VersionNotFound
from kubetune_trainer.fetch.sources import fetch
from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
from tests.unit.test_registry import inputs, make_staging, run_cli

pytestmark = pytest.mark.integration


def raw_client(endpoint: str) -> Any:
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = raw_client(endpoint)
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def test_folder_round_trip_with_a_multipart_object(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    src = tmp_path / "src"
    (src / "tokenizer").mkdir(parents=True)
    big = os.urandom(12 * 1024 * 1024 + 17)  # > 2 parts at the 5 MiB threshold
    (src / "model.safetensors").write_bytes(big)
    (src / "config.json").write_bytes(b'{"a": 1}')
    (src / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    store, prefix = open_uri(f"s3://{bucket}/base/tiny", s3_settings)
    assert isinstance(store, S3Store) and prefix == "base/tiny"

    keys = store.upload_dir(src, prefix)
    assert sorted(keys) == [
        "base/tiny/config.json",
        "base/tiny/model.safetensors",
        "base/tiny/tokenizer/tokenizer.json",
    ]
    head = raw_client(endpoint).head_object(Bucket=bucket, Key="base/tiny/model.safetensors")
    assert "-" in head["ETag"], "large objects go up as multipart uploads"

    dest = tmp_path / "dest"
    paths = store.download_dir(prefix, dest)
    assert len(paths) == 3
    assert hashlib.sha256((dest / "model.safetensors").read_bytes()).digest() == hashlib.sha256(big).digest()
    assert (dest / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"

    one = fetch(f"s3://{bucket}/base/tiny/config.json", tmp_path / "one", s3_settings)
    assert one.read_bytes() == b'{"a": 1}'
    assert store.delete_prefix("base/") == 3
    assert list(store.list("")) == []


def test_conditional_writes_conflict_with_412(s3_bucket: tuple[str, str], s3_settings: StoreSettings) -> None:
    _endpoint, bucket = s3_bucket
    store = S3Store(bucket, s3_settings)
    etag = store.put_bytes("claims/v1.json", b"mine", if_none_match=True)
    with pytest.raises(PreconditionFailed, match="If-None-Match"):
        store.put_bytes("claims/v1.json", b"theirs", if_none_match=True)
    assert store.get_bytes("claims/v1.json") == (b"mine", etag)

    new_etag = store.put_bytes("claims/v1.json", b"updated", if_match=etag)
    with pytest.raises(PreconditionFailed, match="If-Match"):
        store.put_bytes("claims/v1.json", b"stale", if_match=etag)
    assert store.get_bytes("claims/v1.json") == (b"updated", new_etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("absent.json", b"x", if_match=new_etag)


def test_four_concurrent_publishers_get_four_versions(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    output = f"s3://{bucket}/registry"
    stagings = [make_staging(tmp_path / f"s{i}", f"publisher-{i}", weights_kb=256) for i in range(4)]
    barrier = threading.Barrier(4)
    names: dict[int, str] = {}
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            registry = ModelRegistry(output, "support-bot", s3_settings)  # its own client, like another pod
            barrier.wait()
            pv = registry.publish(
                stagings[i],
                inputs=inputs(),
                inputs_digest=f"{i + 1:064x}",
                metrics={"i": i},
                gates={},
                parent=None,
            )
            names[i] = pv.name
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(names.values()) == ["v1", "v2", "v3", "v4"]

    registry = ModelRegistry(output, "support-bot", s3_settings)
    assert [v.name for v in registry.list_versions()] == ["v1", "v2", "v3", "v4"]
    objects = bucket_objects(endpoint, bucket)
    for i, name in names.items():
        assert registry.verify(name).ok, f"{name} has files of another publisher"
        assert (
            objects[f"registry/support-bot/versions/{name}/README.md"]
            == f"# model card publisher-{i}\n".encode()
        )
        assert registry.get_version(name).manifest["metrics"] == {"i": i}


def test_interrupted_upload_is_invisible_and_a_retry_completes(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, bucket = s3_bucket
    registry = ModelRegistry(f"s3://{bucket}", "support-bot", s3_settings)
    staging = make_staging(tmp_path / "s", "one")
    real_upload = registry.store.upload_file
    lock = threading.Lock()
    count = {"n": 0}

    def flaky(path: Path, key: str) -> None:
        with lock:
            count["n"] += 1
            n = count["n"]
        if n == 4:
            raise ConnectionResetError("connection reset by peer")
        real_upload(path, key)

    monkeypatch.setattr(registry.store, "upload_file", flaky)
    with pytest.raises(ConnectionResetError):
        registry.publish(staging, inputs=inputs(), inputs_digest="e" * 64, metrics={}, gates={}, parent=None)
    assert registry.list_versions() == []
    assert registry.find_by_inputs_digest("e" * 64) is None
    with pytest.raises(VersionNotFound):
        registry.get_version("v1")
    assert not any(k.startswith("support-bot/versions/") for k in bucket_objects(endpoint, bucket))

    monkeypatch.setattr(registry.store, "upload_file", real_upload)
    pv = registry.publish(staging, inputs=inputs(), inputs_digest="e" * 64, metrics={}, gates={}, parent=None)
    assert (pv.name, pv.reused) == ("v2", False)
    assert registry.verify("v2").ok
    reused = registry.publish(
        staging, inputs=inputs(), inputs_digest="e" * 64, metrics={}, gates={}, parent=None
    )
    assert (reused.name, reused.reused, reused.manifest_digest) == ("v2", True, pv.manifest_digest)


def test_verify_catches_altered_and_missing_objects(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    registry = ModelRegistry(f"s3://{bucket}/r", "support-bot", s3_settings)
    registry.publish(
        make_staging(tmp_path / "s", "x"),
        inputs={},
        inputs_digest="f" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    assert registry.verify("v1").ok
    client = raw_client(endpoint)
    client.put_object(
        Bucket=bucket, Key="r/support-bot/versions/v1/merged/model.safetensors", Body=b"swapped"
    )
    client.delete_object(Bucket=bucket, Key="r/support-bot/versions/v1/README.md")
    report = registry.verify("v1")
    assert not report.ok
    assert report.missing == ["README.md"]
    assert [a.path for a in report.altered] == ["merged/model.safetensors"]


def test_alias_compare_and_swap_between_two_writers(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    _endpoint, bucket = s3_bucket
    output = f"s3://{bucket}"
    alice = ModelRegistry(output, "support-bot", s3_settings)
    bob = ModelRegistry(output, "support-bot", s3_settings)
    for i in range(1, 4):
        alice.publish(
            make_staging(tmp_path / f"s{i}", f"t{i}"),
            inputs={},
            inputs_digest=f"{i:064x}",
            metrics={},
            gates={},
            parent=None,
        )
    alice.set_alias("production", "v1", expected=None)
    seen = alice.get_alias("production")
    assert seen is not None and seen.version == "v1"
    bob.set_alias("production", "v2", expected="v1", actor="bob")
    with pytest.raises(AliasConflict, match="points to v2, not v1"):
        alice.set_alias("production", "v3", expected=seen.version, actor="alice")
    assert alice.promote("production", "v3", gates_passed=False, when="gatesPassed") is None
    assert alice.get_version("production").name == "v2"
    alice.promote("production", "v3", gates_passed=True, when="gatesPassed")
    alice.rollback("production", actor="oncall")
    assert [(r.version, r.actor) for r in bob.alias_history("production")] == [
        ("v1", ""),
        ("v2", "bob"),
        ("v3", "kubetune"),
        ("v2", "oncall"),
    ]


def test_hostile_keys_in_a_bucket_are_refused_and_nothing_escapes(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    client = raw_client(endpoint)
    client.put_object(Bucket=bucket, Key="data/good.jsonl", Body=b"{}\n")
    client.put_object(Bucket=bucket, Key="data/sub/../../../escaped.txt", Body=b"pwned")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]]
    assert "data/sub/../../../escaped.txt" in listed, "the endpoint keeps the hostile key verbatim"
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeKeyError, match=r"'\.\.' segment"):
        fetch(f"s3://{bucket}/data", dest, s3_settings)
    assert not dest.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "no file was written anywhere"


def test_modelversion_chain_and_no_credentials_in_any_object(
    s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    output = f"s3://{bucket}/models"
    general = ModelRegistry(output, "general", s3_settings)
    pv = general.publish(
        make_staging(tmp_path / "s", "g"),
        inputs={},
        inputs_digest="9" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    general.set_alias("production", pv.name)
    base = fetch(
        "modelversion://general/production", tmp_path / "base", s3_settings, registry_output_uri=output
    )
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors"]

    for key, data in bucket_objects(endpoint, bucket).items():
        assert FAKE_SECRET_ACCESS_KEY.encode() not in data, key
        assert FAKE_ACCESS_KEY_ID.encode() not in data, key


def test_cli_against_the_s3_endpoint(
    s3_bucket: tuple[str, str],
    s3_settings: StoreSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("COLUMNS", "200")
    registry = ModelRegistry(f"s3://{bucket}/r", "support-bot", s3_settings)
    registry.publish(
        make_staging(tmp_path / "s", "x"),
        inputs={},
        inputs_digest="8" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    common = [
        "--output",
        f"s3://{bucket}/r",
        "--model",
        "support-bot",
        "--endpoint",
        endpoint,
        "--region",
        "us-east-1",
    ]
    assert run_cli(["versions", "verify", *common, "v1"]) == 0
    raw_client(endpoint).delete_object(Bucket=bucket, Key="r/support-bot/versions/v1/eval/report.json")
    assert run_cli(["versions", "verify", *common, "v1"]) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "eval/report.json" in out
    assert FAKE_SECRET_ACCESS_KEY not in out
