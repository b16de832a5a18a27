"""The cluster commands of the `kubetune` CLI (cli_cluster.py) that need no API server: parsing,
local validation before anything is sent, and the lines and tables a user reads. The API side runs
against the real test API server in tests/integration/test_chart_install_cli.py.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.models import FineTuneJobStatus, GatesStatus, ModelVersionSpec, Progress, VersionRef
from kubetune_cli import cluster as cli_cluster

REPO = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune")
    cli_cluster.add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_commands_parse() -> None:
    args = parser().parse_args(["status", "support", "-n", "team-a", "--watch", "--timeout", "60"])
    assert (args.func, args.name, args.namespace, args.watch, args.timeout) == (
        cli_cluster.cmd_status,
        "support",
        "team-a",
        True,
        60.0,
    )
    args = parser().parse_args(["logs", "support", "-f", "--rank", "1"])
    assert (args.func, args.follow, args.rank) == (cli_cluster.cmd_logs, True, 1)
    args = parser().parse_args(["cluster-versions", "-A", "--model", "support"])
    assert (args.func, args.all_namespaces, args.model) == (cli_cluster.cmd_cluster_versions, True, "support")
    args = parser().parse_args(["submit", "job.yaml", "--kubeconfig", "/tmp/kc"])
    assert (args.func, args.file, args.kubeconfig) == (cli_cluster.cmd_submit, "job.yaml", "/tmp/kc")


def test_submit_validates_locally_and_names_file_line_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    text = (REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text()
    job.write_text(re.sub(r"batchSize: \d+", "batchSize: 0", text, count=1))
    # A kubeconfig that does not exist: validation must fail first, before any cluster access.
    args = parser().parse_args(["submit", str(job), "--kubeconfig", str(tmp_path / "missing")])
    assert args.func(args) == cli_cluster.EXIT_USAGE
    err = capsys.readouterr().err
    line = next(i for i, raw in enumerate(job.read_text().splitlines(), 1) if "batchSize: 0" in raw)
    assert f"{job}:{line}: spec.training.batchSize" in err


def test_unusable_kubeconfig_is_reported_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parser().parse_args(["status", "x", "--kubeconfig", str(tmp_path / "missing")])
    assert args.func(args) == cli_cluster.EXIT_USAGE
    assert "cannot use kubeconfig" in capsys.readouterr().err


def _obj(status: FineTuneJobStatus) -> dict[str, Any]:
    return {"metadata": {"name": "support"}, "status": status.to_api()}


def test_status_line_shows_live_progress_and_outcome() -> None:
    running = FineTuneJobStatus(
        phase="Running",
        stage="Training",
        progress=Progress(
            step=120,
            total_steps=400,
            percent=30,
            summary="120/400 (30%)",
            loss=1.23456,
            tokens_per_second=5321.4,
            eta_seconds=754,
        ),
    )
    assert cli_cluster.status_line(_obj(running)) == (
        "support: Running, Training, 120/400 (30%), loss 1.235, 5321 tok/s, ETA 12m34s"
    )
    done = FineTuneJobStatus(
        phase="Succeeded",
        reason="Published",
        message="published v3",
        version=VersionRef(name="v3", uri="s3://m/support/versions/v3", manifest_digest="sha256:x"),
        gates=GatesStatus(passed=True, summary="passed"),
    )
    assert cli_cluster.status_line(_obj(done)) == (
        "support: Succeeded, version v3, gates passed, Published: published v3"
    )
    assert cli_cluster.status_line({"metadata": {"name": "new"}}) == "new: Unknown"


def test_versions_table_sorts_by_version_number() -> None:
    def mv(version: str) -> dict[str, Any]:
        spec = ModelVersionSpec(
            model="support",
            version=version,
            uri=f"s3://m/support/versions/{version}",
            manifest_digest="sha256:x",
            base="s3://b",
            key_metric="eval_loss=1.2",
        )
        return {"metadata": {"name": f"support-{version}", "namespace": "team-a"}, "spec": spec.to_api()}

    rows = cli_cluster.versions_table([mv("v10"), mv("v2")], all_namespaces=True)
    assert rows[0][:3] == ["NAMESPACE", "MODEL", "VERSION"]
    assert [r[2] for r in rows[1:]] == ["v2", "v10"]
    text = cli_cluster.format_table(rows)
    assert text.splitlines()[1].split()[:4] == ["team-a", "support", "v2", "s3://b"]


def test_cluster_commands_do_not_import_the_kubernetes_client_until_used() -> None:
    code = "import sys, kubetune_cli.cluster; print('kubernetes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
