"""`pip install kubetune[cli]` is the whole registry and cluster CLI, with no torch (issue 15).

A fresh virtual environment gets the project with only the ``cli`` extra (from the registries, as a
platform engineer's laptop would), then its ``kubetune`` talks to the real S3 endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from kubetune_registry.storage import StoreSettings
from kubetune_registry.versions import ModelRegistry
from tests.fixtures.s3 import FAKE_SECRET_ACCESS_KEY
from tests.unit.test_registry import make_staging

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    py = root / "bin" / "python"
    # A wheel built from this checkout, then installed with the [cli] extra only.
    wheels = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("kubetune-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[cli]"], check=True, timeout=900)
    return root


def _kubetune(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "bin" / "kubetune"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_the_cli_extra_installs_no_torch_and_no_kopf(cli_venv: Path) -> None:
    py = str(cli_venv / "bin" / "python")
    for absent in ("torch", "transformers", "kopf", "deepspeed"):
        probe = subprocess.run([py, "-c", f"import {absent}"], capture_output=True, text=True, check=False)
        assert probe.returncode != 0, f"{absent} is installed by kubetune[cli]"
    help_text = _kubetune(cli_venv, "--help").stdout
    for command in ("run", "versions", "alias", "data", "submit", "status", "logs"):
        assert command in help_text


def test_versions_list_against_the_s3_endpoint(
    cli_venv: Path, s3_bucket: tuple[str, str], s3_settings: StoreSettings, tmp_path: Path
) -> None:
    endpoint, bucket = s3_bucket
    registry = ModelRegistry(f"s3://{bucket}/r", "support-bot", s3_settings)
    for i in range(2):
        registry.publish(
            make_staging(tmp_path / f"s{i}", f"x{i}"),
            inputs={},
            inputs_digest=str(i) * 64,
            metrics={"eval_loss": 0.5 - i / 10},
            gates={},
            parent=None,
        )
    common = ["--output", f"s3://{bucket}/r", "--model", "support-bot", "--endpoint", endpoint]
    listed = _kubetune(cli_venv, "versions", "list", *common, "--region", "us-east-1")
    assert listed.returncode == 0, listed.stderr
    assert "v1" in listed.stdout and "v2" in listed.stdout
    assert FAKE_SECRET_ACCESS_KEY not in listed.stdout + listed.stderr
    moved = _kubetune(cli_venv, "alias", "set", "production", "v2", *common, "--region", "us-east-1")
    assert moved.returncode == 0, moved.stderr
    record = registry.get_alias("production")
    assert record is not None and record.version == "v2"
    verified = _kubetune(cli_venv, "versions", "verify", "v1", *common, "--region", "us-east-1")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_data_validate_works_and_run_names_the_missing_extra(cli_venv: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"\n')
    checked = _kubetune(cli_venv, "data", "validate", str(data))
    assert checked.returncode != 0
    assert f"{data.name}:2" in checked.stdout + checked.stderr  # the bad line, named
    job = REPO / "examples" / "quickstart" / "finetunejob.yaml"
    ran = _kubetune(cli_venv, "run", str(job), "--store-dir", str(tmp_path / "store"))
    assert ran.returncode == 2
    assert "pip install 'kubetune[trainer]'" in ran.stderr
