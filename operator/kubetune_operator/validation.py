"""The operator's own validation: the API models again (a v1.20 server ignores CEL), then guard rails.

Everything here is pure. A spec that fails is one that can never work as written: the handler
turns :class:`SpecInvalid` into an ``Invalid`` condition, an Event and ``kopf.PermanentError``.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from kubetune_api.models import FineTuneJob
from kubetune_api.sweep import FineTuneSweep
from kubetune_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


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
    data = _object_data(body, "FineTuneJob")
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        unknown = [err["loc"] for err in exc.errors(include_url=False) if err["type"] == "extra_forbidden"]
        if unknown and len(unknown) == len(exc.errors()) and _drop_fields(data, unknown):
            # The API server accepted these fields, so its CRD is newer than this operator (CRDs are
            # upgraded first, docs/operating.md): a client ignores what it does not know rather than
            # failing a job that was valid, or replacing its attempt, in the upgrade window.
            log.warning(
                "%s/%s: ignoring spec fields this operator does not know (CRD newer than operator?): %s",
                meta.get("namespace"),
                meta.get("name"),
                ", ".join(".".join(str(p) for p in loc) for loc in unknown),
            )
            return parse_job_data(data)
        raise _invalid(exc) from None


def _object_data(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The parts of an API object the models read: identity, labels, annotations and a copy of the
    spec (``status`` is ours and the trainer's to write)."""
    meta = body.get("metadata", {}) or {}
    return {
        "apiVersion": body.get("apiVersion", "kubetune.io/v1alpha1"),
        "kind": body.get("kind", kind),
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
            if meta.get(k) is not None
        },
        "spec": copy.deepcopy(body.get("spec", {})),
    }


def parse_sweep(body: Mapping[str, Any]) -> FineTuneSweep:
    """Validate a FineTuneSweep object (its template as any FineTuneJob spec, its search space by
    kubetune_api.sweep). Raises :class:`SpecInvalid` naming each field (``spec.parameters[0].low``)."""
    data = _object_data(body, "FineTuneSweep")
    try:
        return FineTuneSweep.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def validate_sweep(body: Mapping[str, Any], settings: OperatorSettings) -> FineTuneSweep:
    """Parse a FineTuneSweep and check its template against the guard rails, as every trial's
    FineTuneJob will be (fields named ``spec.template.<path>``). Raises :class:`SpecInvalid`."""
    sweep = parse_sweep(body)
    template = FineTuneJob.model_validate(
        {
            "metadata": sweep.metadata.model_dump(mode="json", exclude_none=True),
            "spec": sweep.spec.template.to_api(),
        }
    )
    problems = guard_rail_problems(template, settings)
    if problems:
        raise SpecInvalid([(f"spec.template.{f.removeprefix('spec.')}", m) for f, m in problems])
    return sweep


def _drop_fields(data: dict[str, Any], locations: list[tuple[Any, ...]]) -> bool:
    """Remove each location from ``data``; False when one is not a plain key path under spec."""
    for loc in locations:
        if not loc or loc[0] != "spec":
            return False
        node: Any = data
        for key in loc[:-1]:
            node = node[key] if isinstance(node, dict | list) else None
            if node is None:
                return False
        if not isinstance(node, dict) or loc[-1] not in node:
            return False
        del node[loc[-1]]
    return True


def parse_job_data(data: Mapping[str, Any]) -> FineTuneJob:
    """Validate already-assembled FineTuneJob data; raises :class:`SpecInvalid`."""
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> SpecInvalid:
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
    return SpecInvalid(problems)


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
        problems += _uri_problems(f"{path}.uri", ref.uri, settings.allowed_base_model_prefixes)
        if ref.trust_remote_code and not settings.allow_trust_remote_code:
            problems.append(
                (f"{path}.trustRemoteCode", "running model-supplied code is disabled on this platform")
            )
    problems += _uri_problems("spec.output.uri", spec.output.uri, settings.allowed_output_prefixes)
    if settings.allowed_data_prefixes:
        for field, uri in _data_uris(spec.to_api()):
            problems += _uri_problems(field, uri, settings.allowed_data_prefixes)
    problems += _storage_problems(job, settings)
    problems += _scheduling_problems(job, settings)
    namespace = job.metadata.namespace or "default"
    if namespace in settings.denied_namespaces:
        problems.append(
            ("metadata.namespace", f"FineTuneJobs in namespace {namespace!r} are refused on this platform")
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


# --- URIs, storage, scheduling ----------------------------------------------------------------

#: Spec paths of URIs that are not data: models (base, teacher) and the output registry.
_NOT_DATA = ("spec.model.", "spec.distillation.teacher.", "spec.output.")


def _kubernetes_owned(key: str) -> bool:
    """Taint keys Kubernetes itself owns (node.kubernetes.io/*, node-role.kubernetes.io/*, ...):
    tolerating them puts pods where the platform keeps them off (control plane, failing nodes)."""
    domain, slash, _ = key.partition("/")
    return bool(slash) and any(domain == d or domain.endswith("." + d) for d in ("kubernetes.io", "k8s.io"))


def uri_under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` is ``prefix`` or below it: same scheme, same bucket/host, whole path segments.

    ``s3://models`` covers ``s3://models/x`` but not ``s3://models-attacker/x``; ``s3://models/registry``
    covers ``s3://models/registry/a`` but not ``s3://models/registry-evil``. A URI with ``.`` or ``..``
    segments, a query or a fragment is never under anything (it could point elsewhere once resolved).
    A prefix of only a scheme (``s3://``) covers every URI of that scheme.
    """
    u, p = urlsplit(uri), urlsplit(prefix)
    if u.scheme.lower() != p.scheme.lower() or u.query or u.fragment:
        return False
    segments = [seg for seg in u.path.split("/") if seg]
    if any(seg in (".", "..") for seg in segments) or "\\" in uri:
        return False
    wanted = [seg for seg in p.path.split("/") if seg]
    if not p.netloc and not wanted:
        return True
    return u.netloc.lower() == p.netloc.lower() and segments[: len(wanted)] == wanted


def _uri_problems(field: str, uri: str, prefixes: tuple[str, ...]) -> list[tuple[str, str]]:
    if not prefixes or any(uri_under(uri, prefix) for prefix in prefixes):
        return []
    return [(field, f"{uri!r} is not under an allowed prefix ({', '.join(prefixes)})")]


def _data_uris(node: Any, path: str = "spec") -> list[tuple[str, str]]:
    """(field, uri) of every ``uri`` in the spec outside the model and output sections."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            child = f"{path}.{key}"
            if key == "uri" and isinstance(value, str):
                if not f"{child}".startswith(_NOT_DATA):
                    found.append((child, value))
            else:
                found += _data_uris(value, child)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _data_uris(item, f"{path}[{i}]")
    return found


def _storage_problems(job: FineTuneJob, settings: OperatorSettings) -> list[tuple[str, str]]:
    storage = job.spec.storage
    problems: list[tuple[str, str]] = []
    endpoints = settings.allowed_storage_endpoints
    if storage.endpoint and endpoints and not any(uri_under(storage.endpoint, e) for e in endpoints):
        problems.append(
            (
                "spec.storage.endpoint",
                f"{storage.endpoint!r} is not an allowed endpoint "
                f"({', '.join(settings.allowed_storage_endpoints)})",
            )
        )
    patterns = settings.allowed_credentials_secrets
    mlflow = job.spec.tracking.mlflow if job.spec.tracking is not None else None
    named = [("spec.storage.credentialsSecret", storage.credentials_secret)] + (
        [("spec.tracking.mlflow.credentialsSecret", mlflow.credentials_secret)] if mlflow is not None else []
    )
    for field, secret in named:
        if secret and patterns and not any(fnmatch.fnmatchcase(secret, p) for p in patterns):
            problems.append(
                (
                    field,
                    f"{secret!r} is not a Secret FineTuneJobs may use on this platform "
                    f"({', '.join(settings.allowed_credentials_secrets)})",
                )
            )
    return problems


def is_extended_resource(name: str) -> bool:
    """A fully-qualified extended resource name (``vendor.com/gpu``), outside the kubernetes.io domain."""
    domain, slash, rest = name.partition("/")
    if not slash or not domain or not rest or "." not in domain:
        return False
    native = domain == "kubernetes.io" or domain.endswith(".kubernetes.io")
    return not native and not name.startswith("requests.")


def _scheduling_problems(job: FineTuneJob, settings: OperatorSettings) -> list[tuple[str, str]]:
    res = job.spec.resources
    problems: list[tuple[str, str]] = []
    gpu = res.gpu_resource_name
    if not is_extended_resource(gpu):
        problems.append(
            (
                "spec.resources.gpuResourceName",
                f"{gpu!r} is not an extended resource (like nvidia.com/gpu): cpu, memory and other "
                "native resources are set through spec.resources",
            )
        )
    elif settings.allowed_gpu_resource_names and gpu not in settings.allowed_gpu_resource_names:
        problems.append(
            (
                "spec.resources.gpuResourceName",
                f"{gpu!r} is not allowed ({', '.join(settings.allowed_gpu_resource_names)})",
            )
        )
    pc = res.priority_class_name
    if pc:
        allowed = settings.allowed_priority_classes
        if (allowed and pc not in allowed) or (not allowed and pc.startswith("system-")):
            problems.append(
                (
                    "spec.resources.priorityClassName",
                    f"{pc!r} is not a PriorityClass FineTuneJobs may use"
                    + (f" ({', '.join(allowed)})" if allowed else " (system-* classes are reserved)"),
                )
            )
    keys = settings.allowed_toleration_keys
    for i, tol in enumerate(res.tolerations):
        field = f"spec.resources.tolerations[{i}]"
        if not tol.key:
            if "*" not in keys:
                problems.append((field, "a toleration without a key tolerates every taint: not allowed"))
            continue
        if keys and tol.key not in keys:
            problems.append((f"{field}.key", f"{tol.key!r} is not an allowed taint key ({', '.join(keys)})"))
        elif not keys and _kubernetes_owned(tol.key):
            problems.append(
                (f"{field}.key", f"{tol.key!r} is a taint Kubernetes owns: tolerating it is not allowed")
            )
    return problems
