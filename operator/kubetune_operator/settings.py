"""Operator settings: what the platform team configures (Helm values -> ConfigMap -> environment).

Every setting is an environment variable ``KUBETUNE_OPERATOR_<FIELD>`` (upper snake case), so the
chart can render one ConfigMap and mount it with ``envFrom``. Lists are comma-separated (or a JSON
array), mappings are JSON objects. Unknown ``KUBETUNE_OPERATOR_*`` variables are errors, because a
misspelt guard rail silently not applying is worse than an operator that refuses to start.

The guard rails are self-service limits: a FineTuneJob that breaks one is marked ``Invalid``
(naming the field and the limit) and gets no children.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

ENV_PREFIX = "KUBETUNE_OPERATOR_"


class SettingsError(ValueError):
    """The operator's configuration is unusable; the message names the variable."""


class OperatorSettings(BaseModel):
    """Everything the operator needs to know about its installation. Immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- what runs -------------------------------------------------------------------------
    trainer_image: str = Field(
        default="ghcr.io/kubetune/trainer:0.1.0",
        min_length=1,
        description="Image of the trainer pods unless spec.image is set and allowed.",
    )
    allowed_images: tuple[str, ...] = Field(
        default=(),
        description="Prefixes spec.image must start with; empty: spec.image is not allowed at all.",
    )
    trainer_command: tuple[str, ...] = Field(
        default=("python", "-m", "kubetune_trainer"),
        min_length=1,
        description="Runs one trainer process; '--run-config <file>' is appended.",
    )
    launcher_command: tuple[str, ...] = Field(
        default=("python", "-m", "kubetune_trainer.launch"),
        min_length=1,
        description=(
            "Starts the processes of a multi-process job: torchrun's arguments follow. The default "
            "is torchrun keeping the workers' exit codes (kubetune_trainer/launch.py), so "
            "podFailurePolicy can fail fast on bad input, gates and divergence."
        ),
    )
    torchrun_max_restarts: int = Field(
        default=3,
        ge=0,
        le=100,
        description=(
            "torchrun --max-restarts: how often a pod restarts its workers in place (a lost peer, a "
            "crash) before it fails; permanent exit codes stop at once."
        ),
    )
    trainer_module: str = Field(
        default="kubetune_trainer", min_length=1, description="Module torchrun starts (-m) per process."
    )
    image_pull_policy: str = Field(default="IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$")
    image_pull_secrets: tuple[str, ...] = Field(default=(), description="Pull secrets for trainer pods.")

    # --- where it watches ------------------------------------------------------------------
    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces served; empty: all namespaces (cluster-wide)."
    )

    # --- guard rails -----------------------------------------------------------------------
    max_nodes: int = Field(default=8, ge=1, description="Largest spec.distributed.nodes accepted.")
    max_gpus_per_job: int = Field(default=64, ge=0, description="Largest nodes x gpusPerNode accepted.")
    allowed_base_model_prefixes: tuple[str, ...] = Field(
        default=(), description="Prefixes spec.model.base.uri must start with; empty: any."
    )
    allowed_output_prefixes: tuple[str, ...] = Field(
        default=(), description="Prefixes spec.output.uri must start with; empty: any."
    )
    allowed_data_prefixes: tuple[str, ...] = Field(
        default=(),
        description=(
            "Prefixes every data URI (spec.data.*, synonyms, any other uri outside model and output) "
            "must be under; empty: any."
        ),
    )
    allowed_storage_endpoints: tuple[str, ...] = Field(
        default=(),
        description="URLs spec.storage.endpoint must be under (scheme, host:port, path); empty: any.",
    )
    allowed_credentials_secrets: tuple[str, ...] = Field(
        default=(),
        description=(
            "Names (or shell patterns, e.g. 's3-*') spec.storage.credentialsSecret may name; empty: any. "
            "Checked by name: the operator never reads Secrets."
        ),
    )
    allowed_priority_classes: tuple[str, ...] = Field(
        default=(),
        description=(
            "PriorityClasses spec.resources.priorityClassName may name; empty: any except system-*, "
            "which are refused unless listed."
        ),
    )
    allowed_toleration_keys: tuple[str, ...] = Field(
        default=(),
        description=(
            "Taint keys spec.resources.tolerations may tolerate; empty: any key except the "
            "Kubernetes-owned ones (node.kubernetes.io/*, node-role.kubernetes.io/*, ...). A toleration "
            "without a key (every taint) is refused unless '*' is listed."
        ),
    )
    allowed_gpu_resource_names: tuple[str, ...] = Field(
        default=(),
        description=(
            "Values spec.resources.gpuResourceName may take; empty: any extended resource (a "
            "domain-prefixed name outside kubernetes.io). cpu, memory and other native resources "
            "are always refused."
        ),
    )
    denied_namespaces: tuple[str, ...] = Field(
        default=("kube-system", "kube-public", "kube-node-lease"),
        description="Namespaces whose FineTuneJobs are refused (no pods there, whatever RBAC allows).",
    )
    allow_trust_remote_code: bool = Field(
        default=False, description="Whether spec.model.base.trustRemoteCode: true is accepted."
    )

    # --- defaults for pods -----------------------------------------------------------------
    default_cpu: str = Field(default="4", description="CPU per pod when spec.resources.cpu is unset.")
    default_memory: str = Field(default="32Gi", description="Memory per pod when unset.")
    default_ephemeral_storage: str | None = Field(
        default=None, description="Ephemeral storage request/limit per pod (caches, merged weights)."
    )
    run_as_user: int = Field(default=1000, ge=1, description="UID of the trainer process (non-root).")
    run_as_group: int = Field(default=1000, ge=1, description="GID of the trainer process.")
    rendezvous_port: int = Field(default=29400, ge=1, le=65535, description="torchrun c10d port.")
    extra_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for trainer pods (no secrets here)."
    )

    # --- the trainers' node cache (docs/cache.md) ------------------------------------------
    trainer_cache_host_path: str | None = Field(
        default=None,
        description=(
            "A node folder every trainer pod mounts as its cache of base models and tokenized data "
            "(shared by the jobs on that node; it must be writable by runAsUser). None: off."
        ),
    )
    trainer_cache_pvc: str | None = Field(
        default=None,
        description=(
            "A PersistentVolumeClaim (in each job's namespace, ReadWriteMany for more than one pod) "
            "mounted as the trainers' cache instead of a host path. None: off."
        ),
    )
    trainer_cache_max_bytes: int = Field(
        default=100 * 1024**3,
        ge=0,
        description="The cache's size bound (least recently used entries go first).",
    )

    # --- Kubernetes compatibility ----------------------------------------------------------
    compat_k8s_1_20: bool = Field(
        default=False,
        description=(
            "Render Jobs a v1.20 API server accepts: no completionMode Indexed, no suspend, no "
            "podFailurePolicy (the integration-test server). Single-node jobs only."
        ),
    )

    # --- operator runtime ------------------------------------------------------------------
    standalone: bool = Field(default=False, description="Run without peering (one replica, or tests).")
    peering_name: str = Field(default="kubetune-operator", description="KopfPeering object name.")
    priority: int = Field(default=0, description="Peering priority of this replica.")
    liveness_endpoint: str | None = Field(
        default="http://0.0.0.0:8080/healthz", description="kopf's liveness probe URL; None: off."
    )
    metrics_port: int | None = Field(
        default=9090, ge=1, le=65535, description="Prometheus /metrics port; None: off."
    )
    metrics_address: str = Field(default="0.0.0.0", description="Address the metrics server binds.")
    resync_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Level-based status refresh of each unfinished FineTuneJob, besides the Job/pod events "
            "that drive it (a safety net: 200 jobs at 30 s cost ~10% of a core when idle)."
        ),
    )
    watch_server_timeout: int = Field(
        default=300, ge=10, description="Server-side timeout of one watch request (seconds)."
    )
    watch_client_timeout: int = Field(
        default=330, ge=10, description="Client-side timeout of one watch request (seconds)."
    )
    request_timeout: float = Field(default=30.0, gt=0, description="Timeout of one API request.")
    max_workers: int = Field(
        default=32, ge=1, description="Threads (and API connections) for the handlers' sync API calls."
    )

    @field_validator(
        "allowed_images",
        "allowed_base_model_prefixes",
        "allowed_output_prefixes",
        "allowed_data_prefixes",
        "allowed_storage_endpoints",
        "allowed_credentials_secrets",
        "allowed_priority_classes",
        "allowed_toleration_keys",
        "allowed_gpu_resource_names",
    )
    @classmethod
    def _no_empty_prefix(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # An empty string prefix would allow everything while looking like a restriction.
        if any(not p for p in value):
            raise ValueError("empty prefix (it would allow everything); leave the list empty instead")
        return value

    @field_validator("trainer_cache_host_path")
    @classmethod
    def _absolute_host_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path on the node")
        return value

    @field_validator("trainer_cache_pvc")
    @classmethod
    def _one_cache_volume(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("trainer_cache_host_path") is not None:
            raise ValueError("set either this or TRAINER_CACHE_HOST_PATH, not both")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OperatorSettings:
        """Read ``KUBETUNE_OPERATOR_*`` variables from ``environ`` (pass ``os.environ``).

        Raises :class:`SettingsError` naming the variable for unknown names and invalid values.
        """
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            field = key[len(ENV_PREFIX) :].lower()
            info = cls.model_fields.get(field)
            if info is None:
                raise SettingsError(f"{key}: unknown setting (known: {', '.join(_env_names())})")
            values[field] = _parse_env_value(key, raw, info.annotation)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = [
                f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg']}"
                for err in exc.errors(include_url=False)
            ]
            raise SettingsError("invalid operator settings: " + "; ".join(problems)) from None


def _env_names() -> list[str]:
    return [ENV_PREFIX + name.upper() for name in OperatorSettings.model_fields]


def _parse_env_value(key: str, raw: str, annotation: Any) -> Any:
    """Turn one variable into what the field expects; pydantic does the type checks."""
    text = raw.strip()
    kind = str(annotation)
    if "tuple" in kind:
        if text.startswith("["):
            return _json(key, text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if "dict" in kind:
        return _json(key, text or "{}")
    if "None" in kind and text.lower() in ("", "none", "null", "off"):
        return None
    return text


def _json(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{key}: not valid JSON: {exc.msg} (column {exc.colno})") from None
