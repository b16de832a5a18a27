"""Issue #6: object-store faults injected for real between the trainer's S3 client and a real S3 endpoint.

A :class:`~tests.reliability.faultproxy.FaultProxy` sits between :class:`S3Store` (boto3, the
production client and settings) and the moto server: it answers 500 / 503 SlowDown, resets
connections before or after the store applied a write, delays responses past the client's read
timeout, or takes the endpoint away mid-publish. Expected: retries with backoff complete the work;
a publish that cannot finish leaves no visible version; a retry completes; nothing published is ever
overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from kubetune_registry.storage import PreconditionFailed, S3Store, StorageError, StoreSettings
from kubetune_registry.versions import ModelRegistry, VersionNotFound
from tests.reliability.faultproxy import Fault, FaultProxy
from tests.unit.test_registry import inputs, make_staging

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(s3_bucket: tuple[str, str]) -> Iterator[FaultProxy]:
    endpoint, _bucket = s3_bucket
    p = FaultProxy(endpoint).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def settings(proxy: FaultProxy, s3_settings: StoreSettings) -> StoreSettings:
    """The production client settings (standard retry mode, 8 attempts), through the proxy."""
    return dataclasses.replace(s3_settings, endpoint=proxy.url)


def direct(s3_bucket: tuple[str, str]) -> Any:
    """A client that bypasses the proxy: what is really in the bucket."""
    endpoint, _ = s3_bucket
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def keys(s3_bucket: tuple[str, str], prefix: str = "") -> list[str]:
    client, (_, bucket) = direct(s3_bucket), s3_bucket
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def test_500s_and_503_slowdown_are_retried_and_every_file_lands(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    _, bucket = s3_bucket
    src = tmp_path / "src"
    src.mkdir()
    files = {f"part-{i}.bin": os.urandom(1000 + i) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    proxy.add(
        Fault("status", method="PUT", path=r"/up/part-0\.bin", times=2, status=500, code="InternalError"),
        Fault("status", method="PUT", path=r"/up/part-1\.bin", times=3, status=503, code="SlowDown"),
        Fault("status", method="GET", path=r"/up/part-2\.bin", times=2, status=503, code="SlowDown"),
    )
    store = S3Store(bucket, settings)
    store.upload_dir(src, "up")
    back = tmp_path / "back"
    store.download_dir("up", back)
    assert {p.name: p.read_bytes() for p in back.iterdir()} == files
    # Each injected failure was followed by a retry of the same request, which succeeded.
    assert proxy.outcomes(r"/up/part-0\.bin", "PUT") == ["500 InternalError"] * 2 + ["200"]
    assert proxy.outcomes(r"/up/part-1\.bin", "PUT") == ["503 SlowDown"] * 3 + ["200"]
    got = proxy.outcomes(r"/up/part-2\.bin", "GET")
    assert got[:2] == ["503 SlowDown"] * 2 and len(got) == 3 and got[2] in ("200", "206"), got


def test_retries_back_off_and_give_up_with_a_clear_error(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings
) -> None:
    _, bucket = s3_bucket
    proxy.add(Fault("status", method="PUT", path=r"/never\.json", times=100, status=503, code="SlowDown"))
    store = S3Store(bucket, dataclasses.replace(settings, max_attempts=4))
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"writing s3://.*/never\.json failed: SlowDown \(HTTP 503\)"):
        store.put_bytes("never.json", b"{}")
    elapsed = time.monotonic() - started
    assert proxy.outcomes(r"/never\.json") == ["503 SlowDown"] * 4  # max_attempts, no more
    # botocore's standard mode waits a jittered exponential backoff between attempts (and throttling
    # errors also spend retry quota): three waits are not instantaneous.
    assert elapsed > 0.05, elapsed


def test_connection_resets_are_retried_and_downloads_are_intact(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    client, (_, bucket) = direct(s3_bucket), s3_bucket
    payload = os.urandom(300_000)
    client.put_object(Bucket=bucket, Key="base/model.safetensors", Body=payload)
    client.put_object(Bucket=bucket, Key="base/config.json", Body=b'{"a": 1}')
    proxy.add(
        Fault("reset", method="GET", path=r"/base/model\.safetensors", times=2),
        Fault("reset", method="GET", path=r"list-type=2", times=1),
    )
    store = S3Store(bucket, settings)
    store.download_dir("base", tmp_path / "base")
    data = (tmp_path / "base" / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    assert proxy.outcomes(r"/base/model\.safetensors", "GET")[:2] == ["reset", "reset"]
    assert proxy.outcomes(r"list-type=2")[0] == "reset"
    # No half-written file and no temporary file is left next to the downloads.
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["config.json", "model.safetensors"]


def test_a_response_slower_than_the_read_timeout_is_retried(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings
) -> None:
    client, (_, bucket) = direct(s3_bucket), s3_bucket
    client.put_object(Bucket=bucket, Key="slow.json", Body=b'{"ok": true}')
    proxy.add(Fault("delay", method="GET", path=r"/slow\.json", delay_s=3.0))
    store = S3Store(bucket, dataclasses.replace(settings, read_timeout_s=1.0))
    started = time.monotonic()
    assert store.get_bytes("slow.json")[0] == b'{"ok": true}'
    assert 1.0 <= time.monotonic() - started < 3.0, "the retry did not wait for the slow answer"
    assert len(proxy.outcomes(r"/slow\.json", "GET")) >= 1


def test_failed_multipart_parts_are_retried_and_the_object_is_whole(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    client, (_, bucket) = direct(s3_bucket), s3_bucket
    big = tmp_path / "model.safetensors"
    payload = os.urandom(12 * 1024 * 1024 + 5)  # three parts at the 5 MiB threshold
    big.write_bytes(payload)
    proxy.add(
        Fault("status", method="PUT", path=r"partNumber=2", times=2, status=500),
        Fault("reset", method="PUT", path=r"partNumber=3", times=1),
        Fault("status", method="POST", path=r"uploadId=", times=1, status=503, code="SlowDown"),
    )
    S3Store(bucket, settings).upload_file(big, "base/model.safetensors")
    head = client.head_object(Bucket=bucket, Key="base/model.safetensors")
    assert "-3" in head["ETag"], "uploaded as three parts"
    got = client.get_object(Bucket=bucket, Key="base/model.safetensors")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert proxy.outcomes(r"partNumber=2", "PUT")[:2] == ["500 InternalError"] * 2
    assert proxy.outcomes(r"partNumber=3", "PUT")[0] == "reset"


def test_endpoint_stopped_mid_publish_leaves_no_version_and_a_retry_completes(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    _, bucket = s3_bucket
    output = f"s3://{bucket}/registry"
    staging = make_staging(tmp_path / "s", "one", weights_kb=256)
    # The endpoint goes away at the first file upload of the version (after the claim and index).
    proxy.add(Fault("outage", method="PUT", path=r"/versions/v1/", times=1))
    # Few attempts so the doomed publish gives up quickly; the production default is 8.
    registry = ModelRegistry(output, "support-bot", dataclasses.replace(settings, max_attempts=2))
    with pytest.raises(StorageError):
        registry.publish(staging, inputs=inputs(), inputs_digest="a" * 64, metrics={}, gates={}, parent=None)
    assert proxy.down and "outage" in proxy.outcomes(r"/versions/v1/")
    # Nothing is visible: no manifest anywhere, and readers going straight to the bucket agree.
    assert not [k for k in keys(s3_bucket) if k.endswith("manifest.json")]
    proxy.restore()
    reader = ModelRegistry(output, "support-bot", settings)
    assert reader.list_versions() == []
    assert reader.find_by_inputs_digest("a" * 64) is None
    with pytest.raises(VersionNotFound):
        reader.get_version("v1")

    pv = reader.publish(staging, inputs=inputs(), inputs_digest="a" * 64, metrics={}, gates={}, parent=None)
    assert (pv.name, pv.reused) == ("v2", False), "the half-written name is never reused"
    assert reader.verify("v2").ok
    assert [v.name for v in reader.list_versions()] == ["v2"]


def test_a_lost_response_to_the_manifest_write_still_publishes_exactly_once(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    client, (_, bucket) = direct(s3_bucket), s3_bucket
    proxy.add(Fault("reset_after_forward", method="PUT", path=r"/versions/v1/manifest\.json", times=1))
    registry = ModelRegistry(f"s3://{bucket}", "support-bot", settings)
    pv = registry.publish(
        make_staging(tmp_path / "s", "one"),
        inputs=inputs(),
        inputs_digest="b" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    # First PUT landed but its answer was lost; the retry got 412 and the registry recognised its own bytes.
    assert proxy.outcomes(r"/versions/v1/manifest\.json", "PUT") == [
        "forwarded 200, response lost",
        "412",
    ]
    assert pv.name == "v1" and registry.verify("v1").ok
    stored = client.get_object(Bucket=bucket, Key="support-bot/versions/v1/manifest.json")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == pv.manifest_digest


def test_a_lost_claim_response_skips_a_name_and_overwrites_nothing(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    client, (_, bucket) = direct(s3_bucket), s3_bucket
    registry = ModelRegistry(f"s3://{bucket}", "support-bot", settings)
    first = registry.publish(
        make_staging(tmp_path / "a", "first"),
        inputs=inputs(),
        inputs_digest="c" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    before = {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys(s3_bucket)}
    proxy.add(Fault("reset_after_forward", method="PUT", path=r"/claims/v2\.json", times=1))
    second = registry.publish(
        make_staging(tmp_path / "b", "second"),
        inputs=inputs(),
        inputs_digest="d" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    # The claim landed but looked lost; its retry hit 412, so the publisher moved on to v3.
    assert proxy.outcomes(r"/claims/v2\.json", "PUT") == ["forwarded 200, response lost", "412"]
    assert (first.name, second.name) == ("v1", "v3")
    after = {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys(s3_bucket)}
    assert {k: v for k, v in after.items() if k in before} == before, "an existing object changed"
    assert [v.name for v in registry.list_versions()] == ["v1", "v3"]
    assert registry.verify("v1").ok and registry.verify("v3").ok


def test_a_published_manifest_cannot_be_overwritten_through_the_store(
    s3_bucket: tuple[str, str], proxy: FaultProxy, settings: StoreSettings, tmp_path: Path
) -> None:
    _, bucket = s3_bucket
    registry = ModelRegistry(f"s3://{bucket}", "support-bot", settings)
    pv = registry.publish(
        make_staging(tmp_path / "a", "x"),
        inputs=inputs(),
        inputs_digest="e" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    store = S3Store(bucket, settings)
    # A 500 first, then the real answer: the retried conditional write must still lose.
    proxy.add(Fault("status", method="PUT", path=r"/versions/v1/manifest\.json", times=1, status=500))
    with pytest.raises(PreconditionFailed):
        store.put_bytes("support-bot/versions/v1/manifest.json", b"{}", if_none_match=True)
    assert registry.get_version("v1").manifest_digest == pv.manifest_digest
    assert registry.verify("v1").ok


@pytest.mark.slow
def test_a_full_remote_run_through_a_flaky_endpoint_publishes_one_whole_version(
    demo_store_cache: Path, tmp_path: Path, s3_bucket: tuple[str, str], proxy: FaultProxy
) -> None:
    from tests.fixtures.s3 import fake_credentials_env
    from tests.fixtures.trainer import kubetune_cmd, small_job, trainer_env, upload_demo, write_job

    client, (_, bucket) = direct(s3_bucket), s3_bucket
    upload_demo(client, bucket, demo_store_cache)
    proxy.add(
        Fault("status", method="GET", path=r"/demo/base-models/.*model\.safetensors", times=2, status=500),
        Fault("reset", method="GET", path=r"/demo/datasets/.*train\.jsonl", times=1),
        Fault("status", method="PUT", path=r"/checkpoints/", times=3, status=503, code="SlowDown"),
        Fault("status", method="PUT", path=r"/versions/v1/adapter/", times=2, status=503, code="SlowDown"),
        Fault("reset_after_forward", method="PUT", path=r"/versions/v1/manifest\.json", times=1),
    )
    job = small_job(
        **{
            "model.base.uri": f"s3://{bucket}/demo/base-models/tiny-llama-demo",
            "data.train": {"uri": f"s3://{bucket}/demo/datasets/quickstart/train.jsonl"},
            "data.eval": {"uri": f"s3://{bucket}/demo/datasets/quickstart/eval.jsonl"},
            "output.uri": f"s3://{bucket}/registry",
            "storage": {"endpoint": proxy.url, "region": "us-east-1", "addressingStyle": "path"},
            "training.maxSteps": 4,
            "training.checkpoint": {"everySteps": 2, "keep": 1},
        }
    )
    proc = subprocess.run(
        kubetune_cmd(
            "run", str(write_job(tmp_path / "job.yaml", job)), "--remote", "--workdir", str(tmp_path / "w")
        ),
        env=trainer_env(**fake_credentials_env()),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    injected = [o for o in proxy.outcomes() if not o[0].isdigit() or o.startswith(("500", "503"))]
    assert len(injected) >= 9, injected  # every fault fired
    registry = ModelRegistry(
        f"s3://{bucket}/registry",
        "tiny-demo-translator",
        dataclasses.replace(
            StoreSettings(region="us-east-1", addressing_style="path"), endpoint=s3_bucket[0]
        ),
    )
    assert [v.name for v in registry.list_versions()] == ["v1"]
    assert registry.verify("v1").ok
