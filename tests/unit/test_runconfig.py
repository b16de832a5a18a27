"""RunConfig: one pure resolution shared by the operator and `kubetune run`."""

from __future__ import annotations

import copy

from kubetune_api.models import FineTuneJob
from kubetune_api.runconfig import RunConfig, resolve_run_config
from tests.unit.test_api_models import MINIMAL, with_spec


def test_defaults_are_resolved_once_here() -> None:
    rc = resolve_run_config(FineTuneJob.model_validate(MINIMAL))
    assert rc.learning_rate == 2e-4  # LoRA default
    assert rc.eval_split == 0.1  # neither eval nor evalSplit given
    full = resolve_run_config(FineTuneJob.model_validate(with_spec(**{"method.type": "full"})))
    assert full.learning_rate == 2e-5
    explicit = resolve_run_config(FineTuneJob.model_validate(with_spec(**{"training.learningRate": 1e-3})))
    assert explicit.learning_rate == 1e-3
    with_eval = resolve_run_config(
        FineTuneJob.model_validate(with_spec(**{"data.eval": {"uri": "s3://data/e.jsonl"}}))
    )
    assert with_eval.eval_split is None


def test_gated_metrics_are_always_computed() -> None:
    job = FineTuneJob.model_validate(
        with_spec(**{"evaluation.metrics": ["eval_loss"], "evaluation.gates": {"accuracy": {"min": 0.9}}})
    )
    assert resolve_run_config(job).evaluation.metrics == ["eval_loss", "accuracy"]


def test_resolution_is_pure_and_round_trips_through_json() -> None:
    job = FineTuneJob.model_validate(MINIMAL)
    before = copy.deepcopy(job.model_dump())
    rc = resolve_run_config(job, local_root="/tmp/store")
    assert job.model_dump() == before
    assert RunConfig.from_json(rc.to_json()) == rc
    assert rc.storage.local_root == "/tmp/store"


def test_config_digest_ignores_identity_and_locations_but_not_hyperparameters() -> None:
    a = resolve_run_config(FineTuneJob.model_validate(MINIMAL))
    renamed = copy.deepcopy(MINIMAL)
    renamed["metadata"] = {"name": "other", "namespace": "team-b", "uid": "123", "generation": 7}
    renamed["spec"]["data"]["train"]["uri"] = "s3://elsewhere/train.jsonl"
    renamed["spec"]["output"]["uri"] = "s3://other-registry"
    renamed["spec"]["training"] = {"checkpoint": {"everySteps": 5}}
    b = resolve_run_config(FineTuneJob.model_validate(renamed), local_root="/x")
    assert a.config_digest() == b.config_digest()
    c = resolve_run_config(FineTuneJob.model_validate(with_spec(**{"training.learningRate": 1e-3})))
    assert c.config_digest() != a.config_digest()


def test_tracking_reaches_the_trainer_but_never_the_inputs_digest() -> None:
    tracking = {"mlflow": {"trackingUri": "https://mlflow.example.com", "credentialsSecret": "mlflow-token"}}
    plain = resolve_run_config(FineTuneJob.model_validate(MINIMAL))
    tracked = resolve_run_config(FineTuneJob.model_validate(with_spec(tracking=tracking)))
    assert tracked.tracking is not None and tracked.tracking.mlflow is not None
    assert tracked.tracking.mlflow.tracking_uri == "https://mlflow.example.com"
    assert RunConfig.from_json(tracked.to_json()) == tracked
    assert tracked.config_digest() == plain.config_digest()  # a re-run with tracking on is reused


def test_mlflow_run_parameters_are_the_digest_material_and_hold_no_connection_or_secret() -> None:
    from kubetune_trainer.tracking import run_params

    tracking = {"mlflow": {"trackingUri": "https://mlflow.example.com", "credentialsSecret": "mlflow-token"}}
    job = with_spec(
        tracking=tracking,
        **{"storage.credentialsSecret": "s3-creds", "storage.endpoint": "https://s3.example.com"},
    )
    params = run_params(resolve_run_config(FineTuneJob.model_validate(job)))
    assert params["training.learningRate"] == "0.0002" and params["method.type"] == "lora"
    assert params["model.base.uri"] and params["data.train.uri"]
    text = " ".join([*params, *params.values()])
    for never in ("s3-creds", "mlflow-token", "https://s3.example.com", "mlflow.example.com", "storage."):
        assert never not in text
    assert all(len(v) <= 6000 for v in params.values())
