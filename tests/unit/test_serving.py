"""Serving hand-off: the manifests `kubetune versions serve-manifest` prints for a published version.

Validated as a cluster would see them, without a cluster: the InferenceService against KServe's own
CRD schema (tests/support/kserve, from kserve/kserve; unknown fields refused) plus the storageUris
rules of KServe's admission webhook; every core object (ServiceAccount, Deployment, Service) against
the Kubernetes 1.31 OpenAPI definitions (kubernetes-validate, strict). Not run here: a KServe
controller, vLLM, a GPU (docs/serving.md).
"""

from __future__ import annotations

import gzip
import json
import posixpath
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune_api.models import FineTuneJob
from kubetune_api.runconfig import resolve_run_config
from kubetune_cli.main import main
from kubetune_registry.serving import (
    ServingError,
    ServingOptions,
    kserve_manifests,
    serving_manifests,
    serving_source,
    vllm_manifests,
)
from kubetune_registry.storage import StoreSettings
from kubetune_registry.versions import ModelRegistry, PublishedVersion

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.31.0"
OUTPUT = "s3://registry/models"
LORA = {"method": "lora", "peftType": "LORA", "variant": "lora", "r": 16, "layers": None}


@cache
def kserve_schema() -> dict[str, Any]:
    doc = json.loads(
        gzip.decompress((REPO / "tests/support/kserve/inferenceservices.v1beta1.schema.json.gz").read_bytes())
    )
    return dict(doc["openAPIV3Schema"])


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the CRD's structural schema does not declare (the API server would prune or, with
    fieldValidation=Strict, refuse them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not (path == "" and key in ("apiVersion", "kind", "metadata")):
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            found += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


def kserve_webhook_problems(isvc: dict[str, Any]) -> list[str]:
    """KServe's admission rules for storageUris (validateMultipleStorageURIs), ported."""
    predictor = isvc["spec"]["predictor"]
    uris = predictor.get("storageUris") or []
    problems = []
    if uris and (predictor.get("model") or {}).get("storageUri"):
        problems.append("Setting both StorageURI and StorageURIs is not supported.")
    paths = []
    for entry in uris:
        mount = entry.get("mountPath", "/mnt/models")
        if not entry.get("uri"):
            problems.append("storage URI cannot be empty")
        if mount == "/" or not mount.startswith("/") or ".." in mount:
            problems.append(f"bad storage path {mount}")
        if not entry["uri"].startswith("pvc://"):
            paths.append(mount)
    if len(paths) > 1 and posixpath.commonpath(paths) == "/":
        problems.append(f"storage paths must have a common parent directory: {paths}")
    return problems


def assert_valid(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] == "InferenceService":
            assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
            jsonschema.validate(obj, kserve_schema())
            assert unknown_fields(obj, kserve_schema()) == []
            assert kserve_webhook_problems(obj) == []
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def version(
    files: list[str], adapter: dict[str, Any] | None = None, base: str = "s3://models/base/llama-3-8b"
) -> PublishedVersion:
    manifest = {
        "model": "support-bot",
        "version": "v3",
        "extra": {"base": base, "adapter": adapter if adapter is not None else LORA, "model": "support-bot"},
        "files": [{"path": p, "size": 1, "sha256": "0" * 64} for p in files],
    }
    return PublishedVersion(
        name="v3",
        uri=f"{OUTPUT}/support-bot/versions/v3",
        manifest_digest="f" * 64,
        reused=False,
        manifest=manifest,
    )


BOTH = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json", "README.md"]
OPTIONS = ServingOptions(
    namespace="ml-team", storage_secret="s3-credentials", storage_endpoint="https://minio.example:9000"
)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def test_kserve_serves_the_base_plus_the_adapter_from_the_versions_s3_uris() -> None:
    objs = kserve_manifests(serving_source(version(BOTH)), OPTIONS)
    assert_valid(objs)
    isvc, account = by_kind(objs, "InferenceService"), by_kind(objs, "ServiceAccount")
    assert account["secrets"] == [{"name": "s3-credentials"}]
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == account["metadata"]["name"]
    assert predictor["storageUris"] == [
        {"uri": "s3://models/base/llama-3-8b", "mountPath": "/mnt/models/model"},
        {"uri": f"{OUTPUT}/support-bot/versions/v3/adapter", "mountPath": "/mnt/models/adapter"},
    ]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["runtime"] == "kserve-huggingfaceserver"
    assert "--backend=vllm" in model["args"] and "--enable-lora" in model["args"]
    assert "support-bot=/mnt/models/adapter" in model["args"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert isvc["metadata"]["name"] == "support-bot-v3" and isvc["metadata"]["namespace"] == "ml-team"


def test_vllm_deployment_copies_base_and_adapter_with_the_secret_by_name() -> None:
    objs = vllm_manifests(serving_source(version(BOTH)), OPTIONS)
    assert_valid(objs)
    deployment, service = by_kind(objs, "Deployment"), by_kind(objs, "Service")
    pod = deployment["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    env = {e["name"]: e["value"] for e in fetch["env"]}
    assert env["AWS_ENDPOINT_URL"] == "https://minio.example:9000"
    assert {env["SRC_0"], env["SRC_1"]} == {
        "s3://models/base/llama-3-8b/",
        f"{OUTPUT}/support-bot/versions/v3/adapter/",
    }
    (vllm,) = pod["containers"]
    assert vllm["command"] == ["vllm", "serve"] and vllm["args"][0] == "/models/model"
    assert "support-bot=/models/adapter" in vllm["args"] and "--max-lora-rank=16" in vllm["args"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8000
    # No credentials in any manifest: the Secret is named, never copied.
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(objs)


@pytest.mark.parametrize(
    ("adapter", "why"),
    [
        ({"method": "ia3", "peftType": "IA3", "variant": "ia3"}, "LoRA adapters only"),
        ({**LORA, "variant": "dora"}, "DoRA"),
        ({**LORA, "layers": [0, 1]}, "selected layers"),
        ({"method": "full", "peftType": None}, "full fine-tuning"),
    ],
)
def test_adapters_vllm_cannot_load_serve_merged(adapter: dict[str, Any], why: str) -> None:
    source = serving_source(version(BOTH, adapter))
    assert source.mode == "merged" and source.adapter_uri is None and why in (source.why_merged or "")
    objs = [o for group in serving_manifests(source, OPTIONS).values() for o in group]
    assert_valid(objs)
    isvc = by_kind(objs, "InferenceService")
    assert isvc["spec"]["predictor"]["storageUris"] == [
        {"uri": f"{OUTPUT}/support-bot/versions/v3/merged", "mountPath": "/mnt/models/model"}
    ]
    assert "--enable-lora" not in json.dumps(objs)


def test_a_hub_base_is_loaded_by_id_and_a_large_rank_raises_max_lora_rank() -> None:
    source = serving_source(version(BOTH, {**LORA, "r": 48}, base="hf://meta-llama/Llama-3.1-8B-Instruct"))
    objs = [o for group in serving_manifests(source, OPTIONS).values() for o in group]
    assert_valid(objs)
    model = by_kind(objs, "InferenceService")["spec"]["predictor"]["model"]
    assert (
        "--model_id=meta-llama/Llama-3.1-8B-Instruct" in model["args"]
        and "--max-lora-rank=64" in model["args"]
    )
    vllm = by_kind(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert vllm["args"][0] == "meta-llama/Llama-3.1-8B-Instruct"


def test_what_cannot_be_served_is_refused_naming_why() -> None:
    with pytest.raises(ServingError, match="cannot fetch"):
        serving_source(version(BOTH, base="file:///home/me/base"))
    with pytest.raises(ServingError, match="no merged/"):
        serving_source(version(["adapter/adapter_config.json"], {"method": "ia3", "peftType": "IA3"}))
    with pytest.raises(ServingError, match="--secret"):
        kserve_manifests(serving_source(version(BOTH)), ServingOptions())
    with pytest.raises(ServingError, match="DNS-1035"):
        kserve_manifests(serving_source(version(BOTH)), ServingOptions(name="Bad_Name", storage_secret="s"))


def test_long_names_are_shortened_to_a_stable_dns_label() -> None:
    pv = version(BOTH)
    pv.manifest["model"] = "a-very-long-model-name-for-the-customer-support-assistant"
    objs = kserve_manifests(serving_source(pv), OPTIONS)
    name = by_kind(objs, "InferenceService")["metadata"]["name"]
    assert (
        len(name) <= 45
        and name
        == by_kind(kserve_manifests(serving_source(pv), OPTIONS), "InferenceService")["metadata"]["name"]
    )
    assert_valid(objs)


# --- the CLI over a published version ----------------------------------------------------------


def _publish(tmp_path: Path) -> Path:
    """A version published into an s3:// registry held in a local directory, as `kubetune run` does."""
    store = tmp_path / "store"
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "support", "namespace": "ml-team"},
            "spec": {
                "model": {"name": "support-bot", "base": {"uri": "s3://models/base/llama-3-8b"}},
                "data": {"train": {"uri": "s3://data/train.jsonl"}},
                "output": {"uri": OUTPUT},
                "storage": {
                    "endpoint": "http://minio.minio:9000",
                    "region": "eu-north-1",
                    "credentialsSecret": "team-s3",
                },
            },
        }
    )
    rc = resolve_run_config(job)
    staging = tmp_path / "staging"
    for rel, data in {
        "adapter/adapter_config.json": json.dumps({"r": 16, "peft_type": "LORA"}),
        "adapter/adapter_model.safetensors": "weights",
        "merged/config.json": "{}",
        "training/run-config.json": rc.to_json(),
    }.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(data)
    registry = ModelRegistry(OUTPUT, "support-bot", StoreSettings(local_root=str(store)))
    registry.publish(
        staging,
        inputs={},
        inputs_digest="c" * 64,
        metrics={},
        gates={"passed": True},
        parent=None,
        extra={"base": rc.model.base.uri, "adapter": LORA, "model": "support-bot"},
    )
    registry.set_alias("production", "v1")
    return store


def test_serve_manifest_prints_both_targets_from_the_versions_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _publish(tmp_path)
    argv = ["versions", "serve-manifest", "production", "--output", OUTPUT, "--model", "support-bot"]
    assert main([*argv, "--store-dir", str(store), "--namespace", "ml-team"]) == 0
    out = capsys.readouterr().out
    objs = [d for d in yaml.safe_load_all(out) if d]
    assert [o["kind"] for o in objs] == ["ServiceAccount", "InferenceService", "Deployment", "Service"]
    assert_valid(objs)
    assert by_kind(objs, "ServiceAccount")["secrets"] == [{"name": "team-s3"}]
    env = {
        e["name"]: e["value"]
        for e in by_kind(objs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]["env"]
    }
    assert env["AWS_ENDPOINT_URL"] == "http://minio.minio:9000" and env["AWS_REGION"] == "eu-north-1"
    assert "kubectl annotate secret team-s3 serving.kserve.io/s3-endpoint=minio.minio:9000" in out
    assert "OpenAI API model name: support-bot (LoRA on support-bot-base)" in out

    assert main([*argv, "--store-dir", str(store), "--target", "vllm", "--secret", "other", "--merged"]) == 0
    objs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [o["kind"] for o in objs] == ["Deployment", "Service"]
    pod = objs[0]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["envFrom"] == [{"secretRef": {"name": "other"}}]
    assert pod["initContainers"][0]["env"][-2]["value"] == f"{OUTPUT}/support-bot/versions/v1/merged/"


def test_serve_manifest_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _publish(tmp_path)
    argv = [
        "versions",
        "serve-manifest",
        "v1",
        "--output",
        OUTPUT,
        "--model",
        "support-bot",
        "--store-dir",
        str(store),
    ]
    assert main([*argv, "--base-uri", "file:///base"]) == 2
    assert "cannot fetch" in capsys.readouterr().err
    assert main([*argv[:2], "v9", *argv[3:]]) == 2
