"""The quickstart path (`kubetune run examples/quickstart/finetunejob.yaml` on the demo inputs) as a
person sees it: only kubetune's lines on the console, the real stack's warnings and exporter chatter
(torch, transformers, torchao, onnxruntime, the ONNX exporter) in the work directory's console.log;
and what the published version carries for serving it (serving/kserve.yaml, serving/vllm.yaml,
listed in its manifest, valid against KServe's CRD schema and the Kubernetes OpenAPI schema).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit.test_serving import assert_valid

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_quickstart_console_shows_only_kubetunes_lines(demo_store: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "kubetune_cli.main",
        "run",
        str(REPO / "examples/quickstart/finetunejob.yaml"),
    ]
    cmd += ["--store-dir", str(demo_store), "--workdir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, check=False)
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 0, "\n".join(console[-40:])
    strangers = [line for line in console if not line.startswith("[kubetune]")]
    assert strangers == [], strangers
    assert not [line for line in console if "Warning" in line and not line.startswith("[kubetune] warning:")]
    assert any(line.startswith("[kubetune] Published:") or "Published" in line for line in console), console
    assert console.count("[kubetune] stage PreparingData") == 1
    log = workdir / "console.log"
    assert sum(str(log) in line for line in console) == 1
    # What was kept off the console is in the log, not lost.
    assert log.stat().st_size > 0

    version = demo_store / "kubetune-demo/models/tiny-demo-translator/versions/v1"
    listed = {f["path"] for f in json.loads((version / "manifest.json").read_text())["files"]}
    assert {"serving/kserve.yaml", "serving/vllm.yaml"} <= listed
    kserve = [d for d in yaml.safe_load_all((version / "serving/kserve.yaml").read_text()) if d]
    vllm = [d for d in yaml.safe_load_all((version / "serving/vllm.yaml").read_text()) if d]
    assert [o["kind"] for o in kserve] == ["ServiceAccount", "InferenceService"]
    assert [o["kind"] for o in vllm] == ["Deployment", "Service"]
    assert_valid(kserve + vllm)
    storage = kserve[1]["spec"]["predictor"]["storageUris"]
    assert storage[1]["uri"] == "s3://kubetune-demo/models/tiny-demo-translator/versions/v1/adapter"
