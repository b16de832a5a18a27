"""Serving manifests carried by every version: ``serving/kserve.yaml`` and ``serving/vllm.yaml``.

Input: the run context, the claimed version's name and URI, the manifest's ``extra`` (adapter,
base). Output: the two files in ``staging/serving/`` (so the manifest lists them with their sha256),
built by :mod:`kubetune_registry.serving` with the job's storage endpoint, region and credentials
Secret name — the same builders ``kubetune versions serve-manifest`` uses, which takes overrides.
A version that cannot be served as is (an adapter vLLM cannot load and no ``merged/``, a base a
cluster cannot fetch) gets no serving/ folder and a console line saying why; publishing never fails
for it.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune_registry.serving import ServingError, ServingOptions, render_yaml, serving_manifests, source_for
from kubetune_trainer.context import RunContext

log = logging.getLogger(__name__)

#: The Secret name written when the job names none (a local `kubetune run`): the one the docs create.
PLACEHOLDER_SECRET = "s3-credentials"


def write_serving_manifests(ctx: RunContext, version: str, version_uri: str, extra: dict[str, Any]) -> bool:
    """Write ``serving/kserve.yaml`` and ``serving/vllm.yaml`` into ``ctx.staging``; False (and a
    console line) when the version cannot be served as published."""
    rc = ctx.rc
    folders = {p.name for p in ctx.staging.iterdir() if p.is_dir()}
    try:
        source = source_for(
            model=rc.model.name,
            version=version,
            version_uri=version_uri,
            extra=extra,
            folders=folders,
            base_uri=rc.model.base.uri,
        )
        secret = rc.storage.credentials_secret
        options = ServingOptions(
            storage_secret=secret or PLACEHOLDER_SECRET,
            storage_endpoint=rc.storage.endpoint,
            storage_region=rc.storage.region,
        )
        manifests = serving_manifests(source, options)
    except ServingError as exc:
        print(f"[kubetune] serving manifests: none ({exc})", file=ctx.reporter.stream, flush=True)
        return False
    notes = [
        f"{rc.model.name} {version} ({version_uri}); `kubetune versions serve-manifest {version}` prints these",
        "with overrides (--namespace, --secret, --gpus, --image, --merged).",
        f"serves {source.mode}: {source.model_uri}"
        + (f" + {source.adapter_uri}" if source.adapter_uri else ""),
    ]
    if not secret:
        notes.append(
            f"Secret {PLACEHOLDER_SECRET!r} is a placeholder: the job named no spec.storage.credentialsSecret."
        )
    out = ctx.staging / "serving"
    out.mkdir(exist_ok=True)
    titles = {
        "kserve": "KServe InferenceService (Hugging Face runtime, vLLM backend)",
        "vllm": "vLLM Deployment + Service",
    }
    for target, objects in manifests.items():
        (out / f"{target}.yaml").write_text(render_yaml(objects, "\n".join([titles[target], *notes])))
    log.info("serving manifests written for %s %s (%s)", rc.model.name, version, source.mode)
    return True
