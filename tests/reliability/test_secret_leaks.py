"""Issue #11: after a full run with recognisable fake credentials, the secret is nowhere.

The trainer runs exactly as in a pod: ``python -m kubetune_trainer --run-config <ConfigMap JSON>``
with the credentials only in its environment (as the Secret is mounted), a termination message file,
and a real S3 endpoint (moto). Scanned afterwards for the secret access key and the access key ID:
stdout and stderr, the RunConfig, every file of the work directory (checkpoints, staging, caches),
the termination message, and every object in the bucket (versions, claims, index, aliases). The
operator side (Events, status, ConfigMaps) is in tests/integration/test_operator_cluster.py
(the operator never reads the Secret; see docs/reliability.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from kubetune_api.models import FineTuneJob
from kubetune_api.runconfig import resolve_run_config
from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, fake_credentials_env
from tests.fixtures.trainer import small_job, trainer_env, upload_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SECRETS = (FAKE_SECRET_ACCESS_KEY.encode(), FAKE_ACCESS_KEY_ID.encode())


def leaks(data: bytes) -> list[str]:
    return [s.decode() for s in SECRETS if s in data]


def test_a_full_remote_run_leaks_the_credentials_nowhere(
    demo_store_cache: Path, tmp_path: Path, s3_bucket: tuple[str, str]
) -> None:
    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    upload_demo(s3, bucket, demo_store_cache)
    job = small_job(
        **{
            "model.base.uri": f"s3://{bucket}/demo/base-models/tiny-llama-demo",
            "data.train": {"uri": f"s3://{bucket}/demo/datasets/quickstart/train.jsonl"},
            "data.eval": {"uri": f"s3://{bucket}/demo/datasets/quickstart/eval.jsonl"},
            "output.uri": f"s3://{bucket}/registry",
            "output.promote": {"alias": "candidate", "when": "always"},
            "storage": {
                "endpoint": endpoint,
                "region": "us-east-1",
                "addressingStyle": "path",
                "credentialsSecret": "s3-credentials",
            },
            "training.maxSteps": 4,
            "training.checkpoint": {"everySteps": 2, "keep": 1},
        }
    )
    rc = resolve_run_config(FineTuneJob.model_validate(job))
    config = tmp_path / "run-config.json"
    config.write_text(rc.to_json())
    workdir, termination = tmp_path / "work", tmp_path / "termination-log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_trainer",
            "--run-config",
            str(config),
            "--workdir",
            str(workdir),
            "--termination-message-path",
            str(termination),
        ],
        env=trainer_env(**fake_credentials_env()),
        capture_output=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    result = json.loads(termination.read_text())
    assert result["reason"] == "Published" and result["version"]["name"] == "v1"

    found: dict[str, list[str]] = {}
    for label, data in (
        ("stdout", proc.stdout),
        ("stderr", proc.stderr),
        ("run config", config.read_bytes()),
        ("termination message", termination.read_bytes()),
    ):
        if leaks(data):
            found[label] = leaks(data)
    scanned_files = 0
    for path in workdir.rglob("*"):
        if path.is_file():
            scanned_files += 1
            if hit := leaks(path.read_bytes()):
                found[str(path)] = hit
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    published = [k for k in keys if not k.startswith("demo/")]
    for key in published:
        if hit := leaks(s3.get_object(Bucket=bucket, Key=key)["Body"].read()):
            found[f"s3://{bucket}/{key}"] = hit
    assert found == {}, f"credentials leaked into: {found}"
    # The scan covered something real: the version's files, its claim, index and alias objects.
    assert scanned_files > 5
    assert any(k.endswith("versions/v1/manifest.json") for k in published)
    assert any("/claims/" in k for k in published) and any("/aliases/" in k for k in published)
    assert any("/adapter/" in k for k in published)
