"""Pure mapping between OpenAI's fine-tuning objects and kubetune's FineTuneJobs (no I/O here).

* :func:`parse_create_request` — the JSON body of ``POST /v1/fine_tuning/jobs`` -> :class:`CreateJob`;
  raises :class:`~kubetune_gateway.errors.ApiError` (400) naming the ``param`` that is wrong.
* :func:`build_finetunejob` — a :class:`CreateJob` + the admin's template -> a FineTuneJob manifest,
  validated with the API's own models (``kubetune_api.models.FineTuneJobSpec``).
* :func:`job_object`, :func:`job_events`, :func:`job_checkpoints`, :func:`model_object` — a
  FineTuneJob (and its Events, checkpoints, ModelVersions) -> OpenAI's object shapes.
* :func:`paginate` — OpenAI's ``after``/``limit`` cursor over a list newest first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune_api.models import FineTuneJobSpec
from kubetune_api.names import NAME_MAX_LENGTH
from kubetune_gateway.errors import ApiError, bad_request

GROUP, VERSION = "kubetune.io", "v1alpha1"
LABEL = "kubetune.io/gateway"
LABEL_VALUE = "openai"
ANN_REQUEST = "openai.kubetune.io/request"  # the OpenAI request as sent (JSON), for the job object
ANN_CANCELLED = "openai.kubetune.io/cancelled"  # set by cancel (with spec.runPolicy.suspend=true)
JOB_PREFIX = "ftjob-"
FILE_PREFIX = "file-"
# The API's default peak learning rate per method (kubetune_api.models.TrainingSpec.learning_rate):
# learning_rate_multiplier multiplies it (or the template's learningRate when the template sets one).
METHOD_DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "ia3": 3e-3}
TERMINAL = ("succeeded", "failed", "cancelled")
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,40}$")
_HYPER_BOUNDS = {"n_epochs": (1, 50), "batch_size": (1, 256)}


# --- create -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    """What a tenant asked for, checked for shape (not yet for existence of the files or model)."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] | None = None


def new_job_id() -> str:
    return JOB_PREFIX + secrets.token_hex(12)


def new_file_id() -> str:
    return FILE_PREFIX + secrets.token_hex(12)


def _hyper(name: str, value: Any) -> int | float | str:
    if value == "auto":
        return "auto"
    if name == "learning_rate_multiplier":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
            raise bad_request(
                f"hyperparameters.{name} must be 'auto' or a number in (0, 100], got {value!r}",
                param=f"hyperparameters.{name}",
            )
        return float(value)
    low, high = _HYPER_BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(
            f"hyperparameters.{name} must be 'auto' or an integer in [{low}, {high}], got {value!r}",
            param=f"hyperparameters.{name}",
        )
    return value


def _parse_hyperparameters(body: Mapping[str, Any]) -> dict[str, Any]:
    raw: Any = body.get("hyperparameters")
    method = body.get("method")
    if method is not None:
        if not isinstance(method, Mapping) or method.get("type", "supervised") != "supervised":
            kind = method.get("type") if isinstance(method, Mapping) else method
            raise bad_request(f"method.type {kind!r} is not supported (only 'supervised')", param="method")
        from_method = (method.get("supervised") or {}).get("hyperparameters")
        if from_method is not None:
            if raw is not None:
                raise bad_request(
                    "give hyperparameters either at the top level or in method.supervised, not both",
                    param="hyperparameters",
                )
            raw = from_method
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise bad_request("hyperparameters must be an object", param="hyperparameters")
    unknown = sorted(set(raw) - {"n_epochs", "batch_size", "learning_rate_multiplier"})
    if unknown:
        raise bad_request(f"unsupported hyperparameters: {unknown}", param="hyperparameters")
    return {name: _hyper(name, value) for name, value in raw.items() if value is not None}


def parse_create_request(body: Any) -> CreateJob:
    """The request body -> CreateJob. Raises ApiError(400) naming the wrong param."""
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    for key in ("model", "training_file"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise bad_request(f"{key} is required (a string)", param=key)
    validation = body.get("validation_file")
    if validation is not None and not isinstance(validation, str):
        raise bad_request("validation_file must be a file id", param="validation_file")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX_RE.fullmatch(suffix)):
        raise bad_request(
            "suffix must be 1-40 characters of letters, digits, '.', '_' or '-'", param="suffix"
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise bad_request("seed must be an integer in [0, 2147483647]", param="seed")
    if body.get("integrations"):
        raise bad_request("integrations are not supported by this server", param="integrations")
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, Mapping)
        or len(metadata) > 16
        or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())
    ):
        raise bad_request("metadata must be at most 16 string pairs", param="metadata")
    return CreateJob(
        model=body["model"],
        training_file=body["training_file"],
        validation_file=validation,
        suffix=suffix,
        seed=seed,
        hyperparameters=_parse_hyperparameters(body),
        metadata=dict(metadata) if metadata is not None else None,
    )


def model_name(base: str, suffix: str | None, job_id: str) -> str:
    """spec.model.name: ``<base>[-<suffix>]-<8 hex of the job id>``, within the API's name rules.

    One model per job, as OpenAI has it: the job's checkpoints and its version live under a prefix
    no other job writes to.
    """
    name = base if not suffix else f"{base}-{suffix.lower()}"
    name = re.sub(r"[^a-z0-9._-]+", "-", name)
    name = re.sub(r"[._-]{2,}", "-", name).strip("._-")
    tag = job_id.removeprefix(JOB_PREFIX)[:8]
    return name[: NAME_MAX_LENGTH - len(tag) - 1].rstrip("._-") + "-" + tag


def _learning_rate(template: Mapping[str, Any], multiplier: float) -> float:
    base = (template.get("training") or {}).get("learningRate")
    if base is None:
        method = (template.get("method") or {}).get("type", "lora")
        base = METHOD_DEFAULT_LR.get(method, METHOD_DEFAULT_LR["lora"])
    return float(base) * multiplier


def build_finetunejob(
    request: CreateJob,
    *,
    job_id: str,
    namespace: str,
    base_uri: str,
    template: Mapping[str, Any],
    output_uri: str,
    training_uri: str,
    validation_uri: str | None,
    created_at: int,
) -> dict[str, Any]:
    """The FineTuneJob for this request. ``"auto"`` (or absent) keeps the template's value.

    Raises ApiError(400) when the result is not a valid FineTuneJob spec (e.g. a multiplier that
    takes the learning rate above 1), with the API's own message.
    """
    spec: dict[str, Any] = copy.deepcopy(dict(template))
    spec["model"] = {"name": model_name(request.model, request.suffix, job_id), "base": {"uri": base_uri}}
    data = spec.setdefault("data", {})
    data["train"] = {"uri": training_uri}
    if validation_uri is not None:
        data["eval"] = {"uri": validation_uri}
        data.pop("evalSplit", None)  # eval files and evalSplit exclude each other
    spec["output"] = {**(spec.get("output") or {}), "uri": f"{output_uri.rstrip('/')}/{namespace}"}
    training = spec.setdefault("training", {})
    hyper = request.hyperparameters
    if isinstance(hyper.get("n_epochs"), int):
        training["epochs"] = hyper["n_epochs"]
    if isinstance(hyper.get("batch_size"), int):
        training["batchSize"] = hyper["batch_size"]
    if isinstance(hyper.get("learning_rate_multiplier"), float):
        training["learningRate"] = _learning_rate(template, hyper["learning_rate_multiplier"])
    if request.seed is not None:
        training["seed"] = request.seed
    try:
        FineTuneJobSpec.model_validate(spec)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(
            f"this request makes an invalid FineTuneJob: spec.{where}: {first['msg']}"
        ) from None
    record = {
        "model": request.model,
        "training_file": request.training_file,
        "validation_file": request.validation_file,
        "suffix": request.suffix,
        "seed": request.seed,
        "hyperparameters": request.hyperparameters,
        "metadata": request.metadata,
        "created_at": created_at,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {
            "name": job_id,
            "labels": {LABEL: LABEL_VALUE},
            "annotations": {ANN_REQUEST: json.dumps(record, sort_keys=True)},
        },
        "spec": spec,
    }


# --- reading a FineTuneJob back -----------------------------------------------------------------


def epoch(timestamp: str | None) -> int | None:
    """RFC 3339 -> Unix seconds (None stays None)."""
    if not timestamp:
        return None
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(UTC).timestamp())


def request_record(ftj: Mapping[str, Any]) -> dict[str, Any]:
    annotations = (ftj.get("metadata") or {}).get("annotations") or {}
    try:
        return dict(json.loads(annotations.get(ANN_REQUEST, "{}")))
    except ValueError:
        return {}


def is_gateway_job(ftj: Mapping[str, Any]) -> bool:
    labels = (ftj.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL) == LABEL_VALUE


def job_status(ftj: Mapping[str, Any]) -> str:
    """OpenAI's status from the FineTuneJob's phase (and the gateway's cancel mark)."""
    status = ftj.get("status") or {}
    phase = status.get("phase")
    annotations = (ftj.get("metadata") or {}).get("annotations") or {}
    if phase == "Succeeded":
        return "succeeded"
    if annotations.get(ANN_CANCELLED):
        return "cancelled"
    return {
        "Failed": "failed",
        "Running": "running",
        "Queued": "queued",
        "Suspended": "queued",
    }.get(phase or "", "validating_files")  # Pending / not yet reconciled: inputs being checked


def fine_tuned_model_id(ftj: Mapping[str, Any]) -> str:
    """``ft:<base>:<suffix>:<id>`` (``ft:<base>::<id>`` without a suffix), as OpenAI names them."""
    record = request_record(ftj)
    name = str((ftj.get("metadata") or {}).get("name", ""))
    return f"ft:{record.get('model', '')}:{record.get('suffix') or ''}:{name.removeprefix(JOB_PREFIX)}"


def job_id_from_model(model_id: str) -> str | None:
    parts = model_id.split(":")
    if len(parts) != 4 or parts[0] != "ft" or not parts[3]:
        return None
    return JOB_PREFIX + parts[3]


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def job_object(ftj: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI ``fine_tuning.job`` object of a FineTuneJob made by the gateway."""
    meta = ftj.get("metadata") or {}
    spec = ftj.get("spec") or {}
    status = ftj.get("status") or {}
    record = request_record(ftj)
    state = job_status(ftj)
    training = spec.get("training") or {}
    requested = record.get("hyperparameters") or {}
    multiplier = requested.get("learning_rate_multiplier")
    hyper = {
        "n_epochs": _number(training.get("epochs", 3)),
        "batch_size": training.get("batchSize", 8),
        "learning_rate_multiplier": multiplier if isinstance(multiplier, float) else 1.0,
    }
    error = None
    if state == "failed":
        error = {
            "code": status.get("reason") or "failed",
            "message": status.get("message") or "The job failed.",
            "param": None,
        }
    progress = status.get("progress") or {}
    eta = progress.get("etaSeconds")
    estimated = None
    if state == "running" and eta is not None and progress.get("updatedAt"):
        estimated = (epoch(progress["updatedAt"]) or 0) + int(eta)
    finished = epoch(status.get("completionTime")) if state in TERMINAL else None
    if state == "cancelled" and finished is None:
        finished = epoch((meta.get("annotations") or {}).get(ANN_CANCELLED))
    return {
        "object": "fine_tuning.job",
        "id": meta.get("name"),
        "created_at": record.get("created_at") or epoch(meta.get("creationTimestamp")) or 0,
        "model": record.get("model"),
        "training_file": record.get("training_file"),
        "validation_file": record.get("validation_file"),
        "status": state,
        "fine_tuned_model": fine_tuned_model_id(ftj)
        if state == "succeeded" and status.get("version")
        else None,
        "finished_at": finished,
        "error": error,
        "hyperparameters": hyper,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "seed": training.get("seed", 42),
        "suffix": record.get("suffix"),
        "user_provided_suffix": record.get("suffix"),
        "organization_id": meta.get("namespace"),
        "result_files": [],
        "trained_tokens": None,
        "estimated_finish": estimated,
        "integrations": None,
        "metadata": record.get("metadata"),
    }


def _event_id(job_id: str, *parts: Any) -> str:
    digest = hashlib.sha256(json.dumps([job_id, *parts], default=str).encode()).hexdigest()
    return "ftevent-" + digest[:24]


def _event(
    job_id: str, created: int | None, level: str, message: str, key: Sequence[Any], **extra: Any
) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": _event_id(job_id, *key),
        "created_at": created or 0,
        "level": level,
        "message": message,
        "type": extra.pop("type", "message"),
        "data": extra.pop("data", None),
    }


def job_events(ftj: Mapping[str, Any], kube_events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Events newest first, from the job's creation, conditions, progress and Kubernetes Events."""
    meta = ftj.get("metadata") or {}
    status = ftj.get("status") or {}
    job_id = str(meta.get("name"))
    job = job_object(ftj)
    events = [_event(job_id, job["created_at"], "info", f"Created fine-tuning job: {job_id}", ["created"])]
    for cond in status.get("conditions") or []:
        bad = cond.get("type") in ("Failed", "Invalid") and cond.get("status") == "True"
        text = f"{cond.get('type')}={cond.get('status')}"
        if cond.get("reason"):
            text += f" ({cond['reason']})"
        if cond.get("message"):
            text += f": {cond['message']}"
        when = cond.get("lastTransitionTime")
        events.append(
            _event(
                job_id, epoch(when), "error" if bad else "info", text, ["condition", cond.get("type"), when]
            )
        )
    progress = status.get("progress") or {}
    if progress.get("totalSteps"):
        data = {
            "step": progress.get("step", 0),
            "total_steps": progress["totalSteps"],
            "train_loss": progress.get("loss"),
            "learning_rate": progress.get("learningRate"),
            "epoch": progress.get("epoch"),
        }
        text = f"Step {data['step']}/{data['total_steps']}"
        if data["train_loss"] is not None:
            text += f": training loss={data['train_loss']:.4f}"
        when = progress.get("updatedAt")
        events.append(
            _event(
                job_id, epoch(when), "info", text, ["progress", data["step"], when], type="metrics", data=data
            )
        )
    for ev in kube_events:
        ev_meta = ev.get("metadata") or {}
        when = (
            ev.get("lastTimestamp")
            or ev.get("eventTime")
            or ev.get("firstTimestamp")
            or ev_meta.get("creationTimestamp")
        )
        level = "warn" if ev.get("type") == "Warning" else "info"
        events.append(
            _event(
                job_id,
                epoch(when),
                level,
                f"{ev.get('reason')}: {ev.get('message')}",
                ["k8s", ev_meta.get("uid"), ev.get("count")],
            )
        )
    # The end comes last even when an Event's clock or second rounding puts it a little later.
    end = max([job["finished_at"] or 0, *(e["created_at"] for e in events)])
    if job["status"] == "succeeded" and job["fine_tuned_model"]:
        events.append(
            _event(job_id, end, "info", f"New fine-tuned model created: {job['fine_tuned_model']}", ["model"])
        )
        events.append(_event(job_id, end, "info", "The job has successfully completed", ["done"]))
    elif job["status"] == "failed":
        events.append(_event(job_id, end, "error", f"The job failed: {job['error']['message']}", ["failed"]))
    elif job["status"] == "cancelled":
        events.append(_event(job_id, end, "info", "The job was cancelled", ["cancelled"]))
    # Newest first, as OpenAI lists them; ties keep the order they happened in, reversed.
    indexed = list(enumerate(events))
    indexed.sort(key=lambda pair: (pair[1]["created_at"], pair[0]), reverse=True)
    return [e for _, e in indexed]


def job_checkpoints(ftj: Mapping[str, Any], markers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checkpoints newest first: the complete ones still in the object store (``COMPLETE.json``
    markers) and, once the job succeeded, the published version as the final one."""
    meta = ftj.get("metadata") or {}
    status = ftj.get("status") or {}
    job_id = str(meta.get("name"))
    model = fine_tuned_model_id(ftj)
    found: dict[int, dict[str, Any]] = {}
    for marker in markers:
        step = int(marker["step"])
        found[step] = {
            "object": "fine_tuning.job.checkpoint",
            "id": "ftckpt-" + hashlib.sha256(f"{job_id}:{step}".encode()).hexdigest()[:24],
            "created_at": epoch(marker.get("created")) or 0,
            "fine_tuning_job_id": job_id,
            "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}",
            "step_number": step,
            "metrics": {"step": float(step)},
        }
    if job_status(ftj) == "succeeded" and status.get("version"):
        step = int((status.get("progress") or {}).get("step") or 0)
        metrics: dict[str, float] = {"step": float(step)}
        if (status.get("progress") or {}).get("loss") is not None:
            metrics["train_loss"] = float(status["progress"]["loss"])
        if "eval_loss" in (status.get("metrics") or {}):
            metrics["valid_loss"] = float(status["metrics"]["eval_loss"])
        found[step] = {
            "object": "fine_tuning.job.checkpoint",
            "id": "ftckpt-" + hashlib.sha256(f"{job_id}:{step}:final".encode()).hexdigest()[:24],
            "created_at": epoch(status.get("completionTime")) or 0,
            "fine_tuning_job_id": job_id,
            "fine_tuned_model_checkpoint": model,
            "step_number": step,
            "metrics": metrics,
        }
    return [found[s] for s in sorted(found, reverse=True)]


def model_object(model_id: str, created: int | None, owned_by: str) -> dict[str, Any]:
    return {"object": "model", "id": model_id, "created": created or 0, "owned_by": owned_by}


def paginate(
    items: Sequence[dict[str, Any]], after: str | None, limit: int, *, max_limit: int = 100
) -> tuple[list[dict[str, Any]], bool]:
    """The page after the item whose id is ``after`` (the start when None). Raises ApiError(400)
    for a limit outside 1..max_limit; an unknown ``after`` gives an empty page."""
    if not 1 <= limit <= max_limit:
        raise bad_request(f"limit must be between 1 and {max_limit}", param="limit")
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = list(items[start : start + limit])
    return page, start + limit < len(items)


def list_object(page: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": page,
        "has_more": has_more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


__all__ = ["ApiError", "CreateJob", "build_finetunejob", "parse_create_request"]
