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

import pytest

from kubetune_cli.main import main
from kubetune_registry.mlflow_sync import MlflowMirror, MlflowTarget
from kubetune_registry.storage import StoreSettings
from kubetune_registry.versions import ModelRegistry
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
