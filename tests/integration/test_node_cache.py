"""A second job on the same base model and data, on the same node, downloads no model byte and
tokenises nothing (issue 21, part 2): two real `kubetune run`s of different jobs sharing one
``--cache-dir``, against a local object store holding the demo base model and data."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import small_job, write_job

pytestmark = pytest.mark.integration

Runner = Callable[..., subprocess.CompletedProcess[str]]
MODEL_BYTES = re.compile(
    r"base: .*from the node cache \(([\d,]+) bytes in \d+ files; ([\d,]+) model bytes read"
)


def run_job(
    run_kubetune: Runner, store: Path, tmp: Path, cache: Path, name: str, job: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    path = write_job(tmp / f"{name}.yaml", job)
    return run_kubetune(
        "run",
        str(path),
        "--verbose",
        "--store-dir",
        str(store),
        "--workdir",
        str(tmp / f"work-{name}"),
        "--cache-dir",
        str(cache),
    )


def data_report(store: Path, version: str) -> dict[str, Any]:
    path = store / "kubetune-demo" / "models" / "tiny-demo-translator" / "versions" / version
    return json.loads((path / "training" / "data-report.json").read_text())


def test_a_second_job_on_the_same_base_and_data_reads_them_from_the_node_cache(
    demo_store: Path, tmp_path: Path, run_kubetune: Runner
) -> None:
    cache = tmp_path / "node-cache"
    first = run_job(run_kubetune, demo_store, tmp_path, cache, "first", small_job())
    assert first.returncode == 0, first.stderr[-3000:]
    assert "base: not in the node cache" in first.stderr
    assert "tokenization skipped" not in first.stderr
    report1 = data_report(demo_store, "v1")
    assert report1["cache"]["hit"] is False and len(report1["cache"]["key"]) == 64
    assert len(list((cache / "models").iterdir())) == 1 and len(list((cache / "tokenized").iterdir())) == 1

    # Another job (another learning rate: not a reuse of v1) on the same base model and data.
    second = run_job(
        run_kubetune, demo_store, tmp_path, cache, "second", small_job(**{"training.learningRate": 0.001})
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage Training" in second.stderr or "step " in second.stderr  # it trained: not a reuse
    hit = MODEL_BYTES.search(second.stderr)
    assert hit is not None, second.stderr[-3000:]
    assert int(hit.group(1).replace(",", "")) > 0 and hit.group(2) == "0"
    assert "data: tokenized examples from the cache" in second.stderr
    assert "tokenization skipped" in second.stderr
    report2 = data_report(demo_store, "v2")
    assert report2["cache"] == {"hit": True, "key": report1["cache"]["key"]}
    # The same examples as a fresh tokenisation: everything but the cache entry matches.
    assert {k: v for k, v in report2.items() if k != "cache"} == {
        k: v for k, v in report1.items() if k != "cache"
    }
    # Same base digest in both versions' lineage: the cached folder is the downloaded one.
    lineage = [
        json.loads(
            (
                demo_store
                / "kubetune-demo"
                / "models"
                / "tiny-demo-translator"
                / "versions"
                / v
                / "manifest.json"
            ).read_text()
        )
        for v in ("v1", "v2")
    ]
    assert lineage[0]["inputs"]["base"]["digest"] == lineage[1]["inputs"]["base"]["digest"]
