"""kubetune's registry mirrored into a real MLflow tracking server (PyPI mlflow, sqlite, 127.0.0.1).

Real: the MLflow server in its own cached virtualenv (tests/support/build-mlflow-server.sh), the
project's mlflow-skinny client, the `kubetune` CLI over a registry in a local directory. Asserted
through MLflow's own client, as an MLflow user would see it: registered model versions whose
source is the kubetune version's URI, and aliases that follow every kubetune alias move.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_cli.main import main
from kubetune_registry.mlflow_sync import MlflowMirror, MlflowTarget
from kubetune_registry.storage import StoreSettings
from kubetune_registry.versions import ModelRegistry
from tests.fixtures.trainer import small_job, trainer_env, write_job
from tests.support.mlflow_server import MlflowServer, mlflow_server_python

pytestmark = pytest.mark.integration

OUTPUT = "s3://registry/models"
MODEL = "support-bot"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(mlflow_server_python(), tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _registry(store: Path) -> ModelRegistry:
    return ModelRegistry(OUTPUT, MODEL, StoreSettings(local_root=str(store)))


def _publish(registry: ModelRegistry, tmp_path: Path, tag: str) -> None:
    staging = tmp_path / f"staging-{tag}"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "tag": tag}))
    (staging / "README.md").write_text(f"# card {tag}\n")
    registry.publish(
        staging,
        inputs={"tag": tag},
        inputs_digest=(tag * 64)[:64],
        metrics={"eval_loss": 1.0},
        gates={"passed": True},
        parent=None,
    )


def test_alias_moves_are_mirrored_into_mlflows_model_registry(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    registry = _registry(store)
    _publish(registry, tmp_path, "a")
    _publish(registry, tmp_path, "b")
    common = [
        "--output",
        OUTPUT,
        "--model",
        MODEL,
        "--store-dir",
        str(store),
        "--mlflow-uri",
        mlflow_server.url,
    ]
    registered = "kubetune-support-bot"

    assert main(["alias", "set", *common, "--mlflow-model", registered, "production", "v1"]) == 0
    assert "MLflow kubetune-support-bot: alias production -> version 1 (v1)" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    mv = client.get_model_version_by_alias(registered, "production")
    assert mv.source == registry.get_version("v1").uri
    assert mv.tags["kubetune.version"] == "v1"
    assert mv.tags["kubetune.manifest_sha256"] == registry.get_version("v1").manifest_digest

    # A promotion and a rollback, each mirrored; the mirror never duplicates a version.
    assert main(["alias", "set", *common, "--mlflow-model", registered, "production", "v2"]) == 0
    assert client.get_model_version_by_alias(registered, "production").tags["kubetune.version"] == "v2"
    assert main(["alias", "set", *common, "--mlflow-model", registered, "candidate", "v2"]) == 0
    assert main(["alias", "set", *common, "--mlflow-model", registered, "production", "v1"]) == 0
    mirror = MlflowMirror(MlflowTarget(mlflow_server.url, registered))
    assert mirror.aliases() == {"production": "v1", "candidate": "v2"}
    assert len(client.search_model_versions(f"name='{registered}'")) == 2


def test_mlflow_sync_backfills_every_version_and_alias_idempotently(
    mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    registry = _registry(store)
    for tag in ("a", "b", "c"):
        _publish(registry, tmp_path, tag)
    registry.set_alias("production", "v2")
    registry.set_alias("candidate", "v3")
    argv = ["versions", "mlflow-sync", "--output", OUTPUT, "--model", MODEL, "--store-dir", str(store)]
    argv += ["--mlflow-uri", mlflow_server.url, "--mlflow-model", "backfill"]
    assert main(argv) == 0
    assert main(argv) == 0
    assert "3 version(s), 2 alias(es) mirrored" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    versions = client.search_model_versions("name='backfill'")
    assert sorted(v.tags["kubetune.version"] for v in versions) == ["v1", "v2", "v3"]
    assert MlflowMirror(MlflowTarget(mlflow_server.url, "backfill")).aliases() == {
        "production": "v2",
        "candidate": "v3",
    }


def test_an_unreachable_tracking_server_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    _publish(_registry(store), tmp_path, "a")
    argv = ["versions", "mlflow-sync", "--output", OUTPUT, "--model", MODEL, "--store-dir", str(store)]
    assert main(argv) == 2
    assert "--mlflow-uri" in capsys.readouterr().err


TRACKED = "tracked-translator"


@pytest.mark.slow
def test_a_run_is_tracked_in_mlflow_and_its_version_registered_with_the_promoted_alias(
    mlflow_server: MlflowServer, demo_store: Path, tmp_path: Path, run_kubetune: Any
) -> None:
    """`spec.tracking.mlflow` on a real `kubetune run`: what an MLflow user then sees."""
    from mlflow.tracking import MlflowClient

    secret = "mlflow-token-" + "f00d" * 8
    job = small_job(
        **{
            "model.name": TRACKED,
            "training.logEverySteps": 2,
            "training.evalEverySteps": 8,
            "output.promote": {"alias": "candidate", "when": "always"},
            "tracking": {"mlflow": {"trackingUri": mlflow_server.url, "experiment": "zorbish"}},
        }
    )
    env = trainer_env(MLFLOW_TRACKING_TOKEN=secret)  # sent as a bearer header; never logged
    proc = run_kubetune(
        "run", str(write_job(tmp_path / "job.yaml", job)), "--store-dir", str(demo_store), env=env
    )
    assert proc.returncode in (0, 4), proc.stderr[-3000:]
    assert "[kubetune] MLflow: run " in proc.stderr and "warning: MLflow" not in proc.stderr, proc.stderr[
        -3000:
    ]
    assert secret not in proc.stderr and secret not in proc.stdout

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("zorbish")
    (run,) = client.search_runs([experiment.experiment_id])
    version = json.loads(
        (demo_store / "kubetune-demo" / "models" / TRACKED / "versions" / "v1" / "manifest.json").read_text()
    )
    gates_passed = proc.returncode == 0
    assert run.info.status == ("FINISHED" if gates_passed else "FAILED")
    assert run.info.run_name == f"{job['metadata']['name']}-g1"  # <job>-g<generation>
    params = run.data.params
    assert params["training.batchSize"] == "4" and params["training.maxSteps"] == "16"
    assert params["method.type"] == "lora" and params["model.base.uri"].endswith("/tiny-llama-demo")
    assert float(params["training.learningRate"]) > 0
    assert not any(secret in v for v in params.values()) and not any(
        secret in v for v in run.data.tags.values()
    )
    # Per-step training metrics at their optimizer steps; the final evaluation of tuned and base.
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss_during_training")] == [
        8,
        16,
    ]
    assert run.data.metrics["eval_loss"] == pytest.approx(version["metrics"]["eval_loss"])
    assert "base.eval_loss" in run.data.metrics and run.data.metrics["gates.passed"] == float(gates_passed)
    # tuned - base with its paired interval, as the version's eval report has it.
    m = run.data.metrics
    paired = json.loads(
        (
            demo_store / "kubetune-demo" / "models" / TRACKED / "versions" / "v1" / "eval" / "report.json"
        ).read_text()
    )["evaluation"]["paired"]["eval_loss"]
    assert m["paired.eval_loss.difference"] == pytest.approx(m["eval_loss"] - m["base.eval_loss"], rel=1e-6)
    assert (m["paired.eval_loss.ci_low"], m["paired.eval_loss.ci_high"]) == pytest.approx(
        (paired["ci_low"], paired["ci_high"])
    )
    assert m["paired.eval_loss.significant"] == (1.0 if paired["improved"] else 0.0)
    tags = run.data.tags
    assert tags["kubetune.version"] == "v1" and tags["kubetune.version_uri"].endswith(
        f"/{TRACKED}/versions/v1"
    )
    assert tags["kubetune.inputs_digest"] == version["inputsDigest"]
    assert any(k.startswith("gate.") for k in tags)
    # The model card, as published, is an artifact of the run.
    card = (demo_store / "kubetune-demo" / "models" / TRACKED / "versions" / "v1" / "README.md").read_text()
    local = client.download_artifacts(run.info.run_id, "model-card/README.md", str(tmp_path))
    assert Path(local).read_text() == card
    # The version in MLflow's model registry, linked to the run, with the alias the promotion moved.
    mv = client.get_model_version_by_alias(TRACKED, "candidate")
    assert mv.run_id == run.info.run_id and mv.source == tags["kubetune.version_uri"]
    assert mv.tags["kubetune.version"] == "v1"

    # A re-run of the same spec is reused: a new run that links the same version, no second version.
    again = run_kubetune("run", str(tmp_path / "job.yaml"), "--store-dir", str(demo_store), env=env)
    assert again.returncode == proc.returncode, again.stderr[-3000:]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.data.tags["kubetune.reason"] for r in runs} >= {"Reused"}
    assert len(client.search_model_versions(f"name='{TRACKED}'")) == 1


def test_an_unreachable_tracking_server_is_a_warning_and_the_run_still_publishes(
    demo_store: Path, tmp_path: Path, run_kubetune: Any
) -> None:
    from tests.cluster.cluster import free_port

    job = small_job(
        **{
            "model.name": "untracked-translator",
            "training.maxSteps": 4,
            "evaluation.requireImprovement": False,
            "tracking": {"mlflow": {"trackingUri": f"http://127.0.0.1:{free_port()}"}},
        }
    )
    env = trainer_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    proc = run_kubetune(
        "run", str(write_job(tmp_path / "job.yaml", job)), "--store-dir", str(demo_store), env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning: MLflow tracking" in line]
    assert len(warnings) == 1 and "tracking stops, training goes on" in warnings[0], warnings
    assert "[kubetune] Published: untracked-translator v1" in proc.stderr
