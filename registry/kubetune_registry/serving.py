"""Serving manifests for a published version: KServe and plain vLLM on Kubernetes.

Pure builders (a version's manifest and options in, Kubernetes objects out, no I/O):

* :func:`serving_source` — what to serve from a :class:`~kubetune_registry.versions.PublishedVersion`:
  the base model plus the LoRA adapter (``adapter/``), or the merged model (``merged/``) when the
  adapter is one vLLM cannot load (IA3, DoRA, selected layers) or when asked.
* :func:`kserve_manifests` — a ServiceAccount that carries the storage Secret (KServe's storage
  initializer reads S3 credentials from the Secrets of the predictor's ServiceAccount) and an
  ``InferenceService`` (serving.kserve.io/v1beta1) on KServe's Hugging Face runtime with the vLLM
  backend: base and adapter downloaded by KServe's storage initializer (``predictor.storageUris``,
  both under ``/mnt/models``), the adapter registered with ``--enable-lora --lora-modules``.
* :func:`vllm_manifests` — a Deployment running ``vllm serve`` (an init container copies base and
  adapter from S3 with the AWS CLI, credentials from the Secret by name) and a Service on port 8000.
* :func:`render_yaml` — the objects as one multi-document YAML text.

The adapter is served under the model's name (``model=<model.name>`` in OpenAI API requests), the
base under ``<model.name>-base``. Validated against KServe's CRD schema and the Kubernetes OpenAPI
schema in tests/unit/test_serving.py; never run against a KServe controller or a GPU here
(docs/serving.md says what was and was not run). Raises :class:`ServingError` for a version that
cannot be served as asked, naming what is missing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import yaml

from kubetune_registry.versions import PublishedVersion

#: The vLLM OpenAI-compatible server image (the version KServe 0.21's `llm` extra pins).
VLLM_IMAGE: Final = "vllm/vllm-openai:v0.24.0"
#: The AWS CLI image the plain-vLLM init container copies the model with.
AWS_CLI_IMAGE: Final = "amazon/aws-cli:2.31.18"
#: KServe's Hugging Face serving runtime (vLLM backend for text generation).
KSERVE_RUNTIME: Final = "kserve-huggingfaceserver"
KSERVE_MODEL_ROOT: Final = "/mnt/models"
VLLM_MODEL_ROOT: Final = "/models"
VLLM_PORT: Final = 8000
#: vLLM's accepted --max-lora-rank values (its default is 16).
_LORA_RANKS: Final = (8, 16, 32, 64, 128, 256, 320, 512)
#: KServe derives Knative/ingress names from the InferenceService name; it recommends <= 45 chars.
_MAX_NAME: Final = 45

Mode = Literal["adapter", "merged"]


class ServingError(ValueError):
    """The version cannot be served as asked (no adapter/merged files, an unreachable base model)."""


@dataclass(frozen=True)
class ServingSource:
    """What a serving manifest loads: the base model (``s3://`` or ``hf://``) and, in ``adapter``
    mode, the adapter folder; in ``merged`` mode only ``model_uri`` (the version's ``merged/``)."""

    model: str
    version: str
    version_uri: str
    mode: Mode
    model_uri: str
    adapter_uri: str | None
    lora_rank: int | None
    why_merged: str | None = None


@dataclass(frozen=True)
class ServingOptions:
    """Where and how to serve. ``storage_secret`` names the Secret with ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` (the FineTuneJob's ``spec.storage.credentialsSecret``); never its data."""

    name: str | None = None
    namespace: str | None = None
    storage_secret: str | None = None
    storage_endpoint: str | None = None
    storage_region: str | None = None
    vllm_image: str = VLLM_IMAGE
    downloader_image: str = AWS_CLI_IMAGE
    gpus: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "32Gi"
    max_model_len: int | None = None


def serving_source(
    pv: PublishedVersion, *, base_uri: str | None = None, merged: bool = False
) -> ServingSource:
    """What to serve of version ``pv``. ``base_uri`` overrides the manifest's base (needed when the
    base is a ``file://`` path or a ``modelversion://`` reference the caller resolved).

    Raises ServingError when the version has neither a servable adapter nor ``merged/``, or the
    base model is not something a cluster can fetch (``s3://`` or ``hf://``)."""
    m = pv.manifest
    extra = m.get("extra") or {}
    base = base_uri or str(extra.get("base") or (m.get("inputs") or {}).get("base", {}).get("uri") or "")
    return source_for(
        model=str(m.get("model") or extra.get("model") or ""),
        version=pv.name,
        version_uri=pv.uri,
        extra=extra,
        folders={f["path"].split("/", 1)[0] for f in pv.files if "/" in f["path"]},
        base_uri=base,
        merged=merged,
    )


def source_for(
    *,
    model: str,
    version: str,
    version_uri: str,
    extra: dict[str, Any],
    folders: set[str],
    base_uri: str,
    merged: bool = False,
) -> ServingSource:
    """:func:`serving_source` from its parts, for a version being published (no manifest yet):
    ``extra`` as the manifest's ``extra``, ``folders`` the version's top-level folders."""
    adapter = extra.get("adapter") or {}
    why = _why_not_adapter(adapter, "adapter" in folders)
    uri = version_uri.rstrip("/")
    if merged or why is not None:
        if "merged" not in folders:
            reason = "merged serving was asked for" if merged else why
            raise ServingError(f"{uri} has no merged/ folder to serve ({reason}); publish it with merging on")
        return ServingSource(
            model=model,
            version=version,
            version_uri=uri,
            mode="merged",
            model_uri=f"{uri}/merged",
            adapter_uri=None,
            lora_rank=None,
            why_merged="asked for" if merged else why,
        )
    if not base_uri.startswith(("s3://", "hf://")):
        raise ServingError(
            f"the base model of {uri} is {base_uri or 'unknown'!r}, which a cluster cannot fetch: pass the "
            "base's s3:// or hf:// URI (--base-uri) or serve the merged model (--merged)"
        )
    return ServingSource(
        model=model,
        version=version,
        version_uri=uri,
        mode="adapter",
        model_uri=base_uri.rstrip("/"),
        adapter_uri=f"{uri}/adapter",
        lora_rank=int(adapter.get("r") or 16),
    )


def _why_not_adapter(adapter: dict[str, Any], has_folder: bool) -> str | None:
    """Why vLLM cannot load this version's adapter (None: it can)."""
    if not has_folder or adapter.get("method") == "full":
        return "the version has no adapter (full fine-tuning)"
    if adapter.get("peftType") != "LORA":
        return f"vLLM loads LoRA adapters only, this one is {adapter.get('peftType') or 'unknown'}"
    if adapter.get("variant") == "dora":
        return "vLLM does not load DoRA adapters"
    if adapter.get("layers"):
        return "vLLM does not load adapters restricted to selected layers"
    if int(adapter.get("r") or 0) > _LORA_RANKS[-1]:
        return f"LoRA rank {adapter.get('r')} is above vLLM's largest max-lora-rank ({_LORA_RANKS[-1]})"
    return None


def serving_name(source: ServingSource, options: ServingOptions) -> str:
    """A DNS-1035 label for the objects: ``options.name`` or ``<model>-<version>`` (shortened with a
    hash when longer than KServe's recommended 45 characters)."""
    if options.name:
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", options.name) or len(options.name) > _MAX_NAME:
            raise ServingError(
                f"serving name {options.name!r} must be a DNS-1035 label of at most {_MAX_NAME} characters"
            )
        return options.name
    raw = re.sub(r"[^a-z0-9-]+", "-", f"{source.model}-{source.version}".lower()).strip("-")
    if not raw or not raw[0].isalpha():
        raw = "m-" + raw
    if len(raw) > _MAX_NAME:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        raw = raw[: _MAX_NAME - 9].rstrip("-") + "-" + digest
    return raw


def _labels(source: ServingSource, name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/part-of": "kubetune",
        "kubetune.io/model": source.model,
        "kubetune.io/version": source.version,
    }


def _metadata(
    name: str, options: ServingOptions, labels: dict[str, str], source: ServingSource
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": labels,
        "annotations": {
            "kubetune.io/version-uri": source.version_uri,
            "kubetune.io/serving-mode": source.mode,
        },
    }
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def _needs_secret(source: ServingSource, options: ServingOptions) -> bool:
    uris = [source.model_uri, source.adapter_uri or ""]
    needed = any(u.startswith("s3://") for u in uris)
    if needed and not options.storage_secret:
        raise ServingError(
            "the model is read from s3://: name the Secret with its credentials (--secret, the "
            "FineTuneJob's spec.storage.credentialsSecret)"
        )
    return needed


def _resources(options: ServingOptions) -> dict[str, Any]:
    limits: dict[str, Any] = {"memory": options.memory}
    if options.gpus:
        limits[options.gpu_resource] = str(options.gpus)
    return {"requests": {"cpu": options.cpu, "memory": options.memory}, "limits": limits}


def _lora_args(source: ServingSource, adapter_path: str) -> list[str]:
    rank = next(r for r in _LORA_RANKS if r >= (source.lora_rank or 16))
    return ["--enable-lora", "--lora-modules", f"{source.model}={adapter_path}", f"--max-lora-rank={rank}"]


def kserve_manifests(source: ServingSource, options: ServingOptions) -> list[dict[str, Any]]:
    """A ServiceAccount with the storage Secret (when reading from s3://) and the InferenceService."""
    name = serving_name(source, options)
    labels = _labels(source, name, "kserve")
    objects: list[dict[str, Any]] = []
    predictor: dict[str, Any] = {}
    if _needs_secret(source, options):
        account = f"{name}-storage"
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _metadata(account, options, labels, source),
                # KServe's storage initializer takes S3 credentials from this ServiceAccount's
                # Secrets (keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint from the
                # Secret's serving.kserve.io/s3-endpoint annotation).
                "secrets": [{"name": options.storage_secret}],
            }
        )
        predictor["serviceAccountName"] = account
    args = ["--backend=vllm"]
    storage: list[dict[str, str]] = []
    base_name = source.model if source.mode == "merged" else f"{source.model}-base"
    if source.model_uri.startswith("hf://"):
        args.append(f"--model_id={source.model_uri.removeprefix('hf://')}")
    else:
        storage.append({"uri": source.model_uri, "mountPath": f"{KSERVE_MODEL_ROOT}/model"})
        args.append(f"--model_dir={KSERVE_MODEL_ROOT}/model")
    args.insert(0, f"--model_name={base_name}")
    if source.adapter_uri is not None:
        storage.append({"uri": source.adapter_uri, "mountPath": f"{KSERVE_MODEL_ROOT}/adapter"})
        args += _lora_args(source, f"{KSERVE_MODEL_ROOT}/adapter")
    if options.max_model_len:
        args.append(f"--max-model-len={options.max_model_len}")
    if storage:
        predictor["storageUris"] = storage
    predictor["model"] = {
        "modelFormat": {"name": "huggingface"},
        "runtime": KSERVE_RUNTIME,
        "args": args,
        "resources": _resources(options),
    }
    objects.append(
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": _metadata(name, options, labels, source),
            "spec": {"predictor": predictor},
        }
    )
    return objects


def vllm_manifests(source: ServingSource, options: ServingOptions) -> list[dict[str, Any]]:
    """A Deployment (``vllm serve``; an init container copies the model from S3) and its Service."""
    name = serving_name(source, options)
    labels = _labels(source, name, "vllm")
    selector = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": name}
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    volumes: list[dict[str, Any]] = [
        # vLLM's workers share tensors through /dev/shm; the container default (64 MiB) is too small.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": "/dev/shm"}]
    init: list[dict[str, Any]] = []
    copies: list[tuple[str, str]] = []
    model_arg = source.model_uri.removeprefix("hf://")
    if source.model_uri.startswith("s3://"):
        copies.append((source.model_uri, f"{VLLM_MODEL_ROOT}/model"))
        model_arg = f"{VLLM_MODEL_ROOT}/model"
    if source.adapter_uri is not None:
        copies.append((source.adapter_uri, f"{VLLM_MODEL_ROOT}/adapter"))
    if copies:
        _needs_secret(source, options)
        volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": VLLM_MODEL_ROOT, "readOnly": True})
        env: list[dict[str, Any]] = []
        if options.storage_endpoint:
            env.append({"name": "AWS_ENDPOINT_URL", "value": options.storage_endpoint})
        if options.storage_region:
            env.append({"name": "AWS_REGION", "value": options.storage_region})
        script = " && ".join(
            f'aws s3 sync --only-show-errors "$SRC_{i}" "$DST_{i}"' for i in range(len(copies))
        )
        for i, (src, dst) in enumerate(copies):
            env += [{"name": f"SRC_{i}", "value": src + "/"}, {"name": f"DST_{i}", "value": dst}]
        init.append(
            {
                "name": "fetch-model",
                "image": options.downloader_image,
                "command": ["/bin/sh", "-ec", script],
                "env": env,
                "envFrom": [{"secretRef": {"name": options.storage_secret}}],
                "volumeMounts": [{"name": "models", "mountPath": VLLM_MODEL_ROOT}],
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                "securityContext": restricted,
            }
        )
    served = source.model if source.mode == "merged" else f"{source.model}-base"
    args = [model_arg, f"--served-model-name={served}", f"--port={VLLM_PORT}"]
    if source.adapter_uri is not None:
        args += _lora_args(source, f"{VLLM_MODEL_ROOT}/adapter")
    if options.max_model_len:
        args.append(f"--max-model-len={options.max_model_len}")
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": "vllm",
                "image": options.vllm_image,
                "command": ["vllm", "serve"],
                "args": args,
                "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
                # Loading weights takes minutes: give the server 30 minutes before liveness counts.
                "startupProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 10,
                    "failureThreshold": 180,
                },
                "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 30},
                "resources": _resources(options),
                "volumeMounts": mounts,
                "securityContext": restricted,
            }
        ],
        "volumes": volumes,
    }
    if init:
        pod["initContainers"] = init
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, options, labels, source),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, options, labels, source),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def serving_manifests(source: ServingSource, options: ServingOptions) -> dict[str, list[dict[str, Any]]]:
    """Both targets: ``{"kserve": [...], "vllm": [...]}``."""
    return {"kserve": kserve_manifests(source, options), "vllm": vllm_manifests(source, options)}


def render_yaml(objects: list[dict[str, Any]], header: str = "") -> str:
    """``objects`` as one multi-document YAML text, ``header`` lines as comments on top."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)


class _PlainDumper(yaml.SafeDumper):
    """Safe YAML without anchors/aliases: shared label dicts are written out in full, as kubectl shows them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
