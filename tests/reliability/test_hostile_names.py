"""Issue #13: hostile names and keys (``..``, ``/``, unicode look-alikes) are refused at the registry and
the CLI, and nothing is ever written outside the intended prefix or directory.

(The API layer — model names, aliases, extra-set names, URIs, Secret names — is the corpus in
tests/reliability/corpus/, checked by test_spec_corpus.py and test_spec_corpus_cluster.py.)
Every test snapshots the files under its tmp dir before and after and asserts that nothing appeared
outside the place it is allowed to write.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_registry.storage import StoreSettings, UnsafeKeyError
from kubetune_registry.versions import ModelRegistry
from tests.fixtures.trainer import kubetune_cmd, small_job, trainer_env, write_job
from tests.unit.test_registry import inputs, make_staging

Runner = Callable[..., subprocess.CompletedProcess[str]]
HOSTILE = [
    "../escape",
    "a/b",
    "a..b",
    "..",
    ".hidden",
    "trailing-",
    "UPPER",
    "\uff4dodel",  # fullwidth m
    "team\u2215model",  # division slash
    "prod\u2024\u2024x",  # one-dot leaders
    "nul\x00byte",
    "m" * 64,
    "",
]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(n)[:20] for n in HOSTILE])
def test_the_registry_refuses_hostile_model_and_alias_names(name: str, tmp_path: Path) -> None:
    output = (tmp_path / "registry").as_uri()
    with pytest.raises(ValueError, match="not allowed"):
        ModelRegistry(output, name, StoreSettings())
    registry = ModelRegistry(output, "support-bot", StoreSettings())
    registry.publish(
        make_staging(tmp_path / "s", "x"),
        inputs=inputs(),
        inputs_digest="a" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    before = files_under(tmp_path)
    with pytest.raises(ValueError):
        registry.set_alias(name, "v1")
    with pytest.raises(ValueError):
        registry.get_version(name)
    assert files_under(tmp_path) == before


def test_a_tampered_manifest_cannot_make_a_download_write_outside_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    registry = ModelRegistry(root.as_uri(), "support-bot", StoreSettings())
    registry.publish(
        make_staging(tmp_path / "s", "x"),
        inputs=inputs(),
        inputs_digest="b" * 64,
        metrics={},
        gates={},
        parent=None,
    )
    manifest_path = root / "support-bot" / "versions" / "v1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    good = manifest["files"][0]
    for hostile in ("../../../escaped.txt", "merged/../../escaped.txt", "/etc/escaped.txt", "merged\u2215x"):
        manifest["files"] = [good, {**good, "path": hostile}]
        manifest_path.write_text(json.dumps(manifest))
        dest = tmp_path / "deep" / "dest"
        before = files_under(tmp_path)
        with pytest.raises(UnsafeKeyError):
            registry.download("v1", dest)
        assert files_under(tmp_path) == before, f"{hostile}: a file was written"


def test_cli_refuses_hostile_names_without_a_traceback_and_writes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "bucket").mkdir(parents=True)
    common = ["--output", "s3://bucket/models", "--store-dir", str(store)]
    commands = [
        ["versions", "list", *common, "--model", "../../etc"],
        ["versions", "show", *common, "--model", "team\u2215model", "v1"],
        ["versions", "show", *common, "--model", "support-bot", "../v1"],
        ["alias", "set", *common, "--model", "support-bot", "prod/../x", "v1"],
        [
            "versions",
            "list",
            "--output",
            "s3://bucket/../../escape",
            "--store-dir",
            str(store),
            "--model",
            "m",
        ],
    ]
    before = files_under(tmp_path)
    for args in commands:
        proc = subprocess.run(
            kubetune_cmd(*args), env=trainer_env(), capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode != 0, f"{args}: accepted"
        assert "Traceback" not in proc.stderr, f"{args}:\n{proc.stderr[-2000:]}"
        assert proc.stderr.strip(), f"{args}: failed without saying why"
    assert files_under(tmp_path) == before


def test_kubetune_run_never_builds_paths_from_a_hostile_job_name(tmp_path: Path) -> None:
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    job = small_job()
    job["metadata"]["name"] = "../../../escaped"
    path = write_job(cwd / "job.yaml", job)
    proc = subprocess.run(
        kubetune_cmd("run", str(path), "--store-dir", str(cwd / "store")),
        cwd=cwd,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{path}:" in proc.stderr and "metadata.name" in proc.stderr
    assert files_under(tmp_path) == {path}, "something was written next to the job file or outside"
    assert not (tmp_path / "a" / "escaped").exists()


@pytest.mark.integration
def test_kubetune_run_refuses_data_and_output_uris_that_climb_out_of_the_store(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    # A real, valid data file right where the traversal would lead.
    outside = tmp_path / "outside.jsonl"
    outside.write_text((demo_store / "kubetune-demo/datasets/quickstart/train.jsonl").read_text())
    escape = os.path.relpath(outside, demo_store / "kubetune-demo")
    cases: dict[str, dict[str, Any]] = {
        "data": {"data.train": {"uri": f"s3://kubetune-demo/{escape}"}},
        "output": {"output.uri": "s3://kubetune-demo/models/../../../escaped-registry"},
        "file-data": {"data.train": {"uri": f"file://{demo_store}/../outside.jsonl"}},
    }
    for label, change in cases.items():
        before = files_under(tmp_path)
        job = write_job(tmp_path / f"{label}.yaml", small_job(**change))
        proc = run_kubetune(
            "run", str(job), "--store-dir", str(demo_store), "--workdir", str(tmp_path / "w" / label)
        )
        assert proc.returncode == 3, f"{label}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "'..' segment" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "stage Training" not in proc.stderr
        new = {p for p in files_under(tmp_path) - before if not p.is_relative_to(tmp_path / "w")}
        assert new == {job}, f"{label}: wrote {new - {job}}"
    assert not (tmp_path / "escaped-registry").exists()
