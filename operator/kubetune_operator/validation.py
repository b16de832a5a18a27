"""The operator's own validation: the API models again (a v1.20 server ignores CEL), then guard rails.

Everything here is pure. A spec that fails is one that can never work as written: the handler
turns :class:`SpecInvalid` into an ``Invalid`` condition, an Event and ``kopf.PermanentError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubetune_api.models import FineTuneJob
from kubetune_operator.settings import OperatorSettings


class SpecInvalid(ValueError):
    """A FineTuneJob spec that can never work. ``field`` is the spec path, ``problems`` every finding."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.field = problems[0][0]
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))


def parse_job(body: Mapping[str, Any]) -> FineTuneJob:
    """Validate a FineTuneJob object as the API server returned it.

    ``status`` is ignored (it is ours and the trainer's to write). Raises :class:`SpecInvalid`
    naming each field (``spec.training.batchSize``) for schema and cross-field violations.
    """
    meta = body.get("metadata", {}) or {}
    try:
        return FineTuneJob.model_validate(
            {
                "apiVersion": body.get("apiVersion", "kubetune.io/v1alpha1"),
                "kind": body.get("kind", "FineTuneJob"),
                "metadata": {
                    k: meta[k]
                    for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
                    if meta.get(k) is not None
                },
                "spec": body.get("spec", {}),
            }
        )
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for err in exc.errors(include_url=False):
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            field = ".".join(str(p) for p in loc) or "spec"
            message = err["msg"].removeprefix("Value error, ")
            # Cross-field rule messages already start with the field they are about.
            if message.startswith("spec.") and ":" in message:
                for part in message.split("; "):
                    rule_field, _, rule_msg = part.partition(": ")
                    problems.append((rule_field, rule_msg))
            else:
                problems.append((field, message))
        raise SpecInvalid(problems) from None


def guard_rail_problems(job: FineTuneJob, settings: OperatorSettings) -> list[tuple[str, str]]:
    """(field, message) for every platform limit the spec breaks; empty when it is within limits."""
    spec = job.spec
    problems: list[tuple[str, str]] = []
    nodes = spec.distributed.nodes
    gpus = nodes * spec.distributed.gpus_per_node
    if nodes > settings.max_nodes:
        problems.append(
            ("spec.distributed.nodes", f"{nodes} nodes exceed this platform's limit of {settings.max_nodes}")
        )
    if gpus > settings.max_gpus_per_job:
        problems.append(
            (
                "spec.distributed.gpusPerNode",
                f"{gpus} GPUs in total (nodes x gpusPerNode) exceed this platform's limit of "
                f"{settings.max_gpus_per_job}",
            )
        )
    if settings.compat_k8s_1_20 and nodes > 1:
        problems.append(
            (
                "spec.distributed.nodes",
                "multi-node jobs need Indexed Jobs (Kubernetes >= 1.24); this operator runs in v1.20 "
                "compatibility mode",
            )
        )
    # A distillation teacher is a model the trainer loads too: the same rules as the base.
    models = [("spec.model.base", spec.model.base)]
    if spec.distillation is not None:
        models.append(("spec.distillation.teacher", spec.distillation.teacher))
    for path, ref in models:
        if settings.allowed_base_model_prefixes and not ref.uri.startswith(
            settings.allowed_base_model_prefixes
        ):
            problems.append(
                (
                    f"{path}.uri",
                    f"{ref.uri!r} is not under an allowed prefix "
                    f"({', '.join(settings.allowed_base_model_prefixes)})",
                )
            )
        if ref.trust_remote_code and not settings.allow_trust_remote_code:
            problems.append(
                (f"{path}.trustRemoteCode", "running model-supplied code is disabled on this platform")
            )
    out = spec.output.uri
    if settings.allowed_output_prefixes and not out.startswith(settings.allowed_output_prefixes):
        problems.append(
            (
                "spec.output.uri",
                f"{out!r} is not under an allowed prefix ({', '.join(settings.allowed_output_prefixes)})",
            )
        )
    if spec.image is not None:
        if not settings.allowed_images:
            problems.append(("spec.image", "image overrides are disabled on this platform"))
        elif not spec.image.startswith(settings.allowed_images):
            problems.append(
                (
                    "spec.image",
                    f"{spec.image!r} is not under an allowed prefix ({', '.join(settings.allowed_images)})",
                )
            )
    return problems


def validate_job(body: Mapping[str, Any], settings: OperatorSettings) -> FineTuneJob:
    """Parse the object and check the guard rails. Raises :class:`SpecInvalid` naming the field."""
    job = parse_job(body)
    problems = guard_rail_problems(job, settings)
    if problems:
        raise SpecInvalid(problems)
    return job
