"""The gateway's pure mapping: OpenAI requests -> FineTuneJobs, FineTuneJobs -> OpenAI objects."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from kubetune_gateway import mapping
from kubetune_gateway.config import GatewaySettings
from kubetune_gateway.errors import ApiError

TEMPLATE: dict[str, Any] = {
    "method": {"type": "lora"},
    "training": {"epochs": 2, "batchSize": 8},
    "distributed": {"gpusPerNode": 0},
    "data": {"format": "auto", "evalSplit": 0.2},
}


def _build(body: dict[str, Any], template: dict[str, Any] | None = None) -> dict[str, Any]:
    return mapping.build_finetunejob(
        mapping.parse_create_request(body),
        job_id="ftjob-0123456789abcdef01234567",
        namespace="team-a",
        base_uri="s3://models/base/tiny",
        template=TEMPLATE if template is None else template,
        output_uri="s3://registry/openai/",
        training_uri="s3://files/team-a/files/file-1/data.jsonl",
        validation_uri=None if "validation_file" not in body else "s3://files/team-a/files/file-2/data.jsonl",
        created_at=1700000000,
    )


def test_auto_hyperparameters_keep_the_template_and_numbers_override_it() -> None:
    auto = _build({"model": "tiny", "training_file": "file-1", "hyperparameters": {"n_epochs": "auto"}})
    assert auto["spec"]["training"] == {"epochs": 2, "batchSize": 8}
    assert auto["spec"]["data"] == {
        "format": "auto",
        "evalSplit": 0.2,
        "train": {"uri": "s3://files/team-a/files/file-1/data.jsonl"},
    }
    body = {
        "model": "tiny",
        "training_file": "file-1",
        "validation_file": "file-2",
        "seed": 3,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 5, "batch_size": 2, "learning_rate_multiplier": 2.0}
            },
        },
    }
    ftj = _build(body)
    training = ftj["spec"]["training"]
    assert training["epochs"] == 5 and training["batchSize"] == 2 and training["seed"] == 3
    assert training["learningRate"] == pytest.approx(2e-4 * 2)  # the LoRA default x multiplier
    assert "evalSplit" not in ftj["spec"]["data"] and ftj["spec"]["data"]["eval"]["uri"].endswith(
        "file-2/data.jsonl"
    )
    assert ftj["spec"]["output"] == {"uri": "s3://registry/openai/team-a"}
    assert ftj["metadata"]["labels"] == {mapping.LABEL: mapping.LABEL_VALUE}
    assert json.loads(ftj["metadata"]["annotations"][mapping.ANN_REQUEST])["validation_file"] == "file-2"


def test_the_multiplier_scales_the_templates_own_rate() -> None:
    ftj = _build(
        {"model": "tiny", "training_file": "file-1", "hyperparameters": {"learning_rate_multiplier": 0.5}},
        {**TEMPLATE, "training": {"learningRate": 0.002}},
    )
    assert ftj["spec"]["training"]["learningRate"] == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"training_file": "file-1"}, "model"),
        ({"model": "tiny"}, "training_file"),
        (
            {"model": "tiny", "training_file": "file-1", "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs",
        ),
        (
            {"model": "tiny", "training_file": "file-1", "hyperparameters": {"batch_size": "big"}},
            "hyperparameters.batch_size",
        ),
        ({"model": "tiny", "training_file": "file-1", "hyperparameters": {"warmup": 1}}, "hyperparameters"),
        ({"model": "tiny", "training_file": "file-1", "suffix": "no spaces please"}, "suffix"),
        ({"model": "tiny", "training_file": "file-1", "seed": -1}, "seed"),
        ({"model": "tiny", "training_file": "file-1", "method": {"type": "dpo"}}, "method"),
        ({"model": "tiny", "training_file": "file-1", "integrations": [{"type": "wandb"}]}, "integrations"),
    ],
)
def test_bad_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        mapping.parse_create_request(body)
    assert err.value.status == 400 and err.value.param == param


def test_a_request_the_api_refuses_is_a_400_with_the_api_message() -> None:
    with pytest.raises(ApiError) as err:  # 2e-4 x 100 = 0.02 is fine; a template rate of 0.5 x 10 is not
        _build(
            {
                "model": "tiny",
                "training_file": "file-1",
                "hyperparameters": {"learning_rate_multiplier": 10.0},
            },
            {**TEMPLATE, "training": {"learningRate": 0.5}},
        )
    assert err.value.status == 400 and "spec.training.learningRate" in err.value.message


def test_model_names_are_per_job_and_valid() -> None:
    name = mapping.model_name("tiny", "My_Suffix..x", "ftjob-abcdef0123456789")
    assert name == "tiny-my_suffix-x-abcdef01"
    assert len(mapping.model_name("b" * 60, "s" * 40, "ftjob-abcdef0123456789")) <= 63


def _ftj(phase: str | None, **status: Any) -> dict[str, Any]:
    record = {
        "model": "tiny",
        "training_file": "file-1",
        "suffix": "zb",
        "created_at": 100,
        "hyperparameters": {},
    }
    return {
        "metadata": {
            "name": "ftjob-abc",
            "namespace": "team-a",
            "annotations": {mapping.ANN_REQUEST: json.dumps(record)},
        },
        "spec": {"training": {"epochs": 3.0, "batchSize": 4, "seed": 1}, "model": {"name": "tiny-zb-abc"}},
        "status": {"phase": phase, **status} if phase else {},
    }


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        (None, "validating_files"),
        ("Pending", "validating_files"),
        ("Queued", "queued"),
        ("Running", "running"),
        ("Succeeded", "succeeded"),
        ("Failed", "failed"),
    ],
)
def test_phase_maps_to_openai_status(phase: str | None, state: str) -> None:
    assert mapping.job_status(_ftj(phase)) == state


def test_a_cancelled_job_reads_cancelled_and_a_failed_one_carries_the_file_line_error() -> None:
    ftj = _ftj("Suspended")
    ftj["metadata"]["annotations"][mapping.ANN_CANCELLED] = "2026-01-01T00:00:00Z"
    assert mapping.job_object(ftj)["status"] == "cancelled"
    failed = mapping.job_object(
        _ftj("Failed", reason="InvalidData", message="train.jsonl:7: messages: empty")
    )
    assert failed["error"] == {
        "code": "InvalidData",
        "message": "train.jsonl:7: messages: empty",
        "param": None,
    }
    assert failed["fine_tuned_model"] is None


def test_a_succeeded_job_names_its_model_and_lists_events_newest_first() -> None:
    ftj = _ftj(
        "Succeeded",
        completionTime="1970-01-01T00:03:20Z",
        version={"name": "v1"},
        progress={"step": 16, "totalSteps": 16, "loss": 0.5, "updatedAt": "1970-01-01T00:03:10Z"},
        metrics={"eval_loss": 0.25},
        conditions=[
            {
                "type": "Succeeded",
                "status": "True",
                "reason": "Published",
                "lastTransitionTime": "1970-01-01T00:03:20Z",
            }
        ],
    )
    job = mapping.job_object(ftj)
    assert job["fine_tuned_model"] == "ft:tiny:zb:abc" and job["finished_at"] == 200
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    k8s = [
        {
            "metadata": {"uid": "u1"},
            "type": "Warning",
            "reason": "BackOff",
            "message": "pod restarted",
            "lastTimestamp": "1970-01-01T00:05:00Z",
        }
    ]
    events = mapping.job_events(ftj, k8s)
    assert events[0]["message"] == "The job has successfully completed"
    assert events[-1]["message"] == "Created fine-tuning job: ftjob-abc"
    assert [e["created_at"] for e in events] == sorted((e["created_at"] for e in events), reverse=True)
    assert any(e["level"] == "warn" and "BackOff" in e["message"] for e in events)
    assert len({e["id"] for e in events}) == len(events)
    checkpoints = mapping.job_checkpoints(ftj, [{"step": 8, "created": "1970-01-01T00:02:00Z"}])
    assert [c["step_number"] for c in checkpoints] == [16, 8]
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == "ft:tiny:zb:abc"
    assert checkpoints[0]["metrics"] == {"step": 16.0, "train_loss": 0.5, "valid_loss": 0.25}
    assert checkpoints[1]["fine_tuned_model_checkpoint"] == "ft:tiny:zb:abc:ckpt-step-8"
    assert mapping.job_id_from_model("ft:tiny:zb:abc") == "ftjob-abc"


def test_pagination_after_and_limit() -> None:
    items = [{"id": str(i)} for i in range(5)]
    assert mapping.paginate(items, None, 2) == ([{"id": "0"}, {"id": "1"}], True)
    assert mapping.paginate(items, "1", 2) == ([{"id": "2"}, {"id": "3"}], True)
    assert mapping.paginate(items, "3", 2) == ([{"id": "4"}], False)
    assert mapping.paginate(items, "unknown", 2) == ([], False)
    with pytest.raises(ApiError):
        mapping.paginate(items, None, 0)


def test_the_template_may_not_set_what_the_gateway_fills() -> None:
    base = {
        "files": {"uri": "s3://f/x"},
        "baseModels": {"tiny": "s3://m/t"},
        "outputUri": "s3://o/p",
        "tenantsFile": "/t",
    }
    GatewaySettings.model_validate(
        {**base, "template": {"data": {"format": "auto"}, "output": {"merge": False}}}
    )
    for bad in ({"model": {}}, {"data": {"train": {}}}, {"output": {"uri": "s3://x/y"}}):
        with pytest.raises(ValueError):
            GatewaySettings.model_validate({**base, "template": bad})


def test_importing_the_gateway_app_imports_no_torch() -> None:
    code = "import sys, kubetune_gateway.app, kubetune_gateway.files; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
