"""The OpenAI-compatible gateway, driven by the official ``openai`` client, on the real API server.

The gateway runs as its own process (``python -m kubetune_gateway``) on 127.0.0.1 under a
ServiceAccount bound to exactly the Role in kubetune_gateway/rbac.py in each tenant's namespace;
files go to the real S3 endpoint (moto on loopback); the operator (least-privilege token) and the
fake kubelet run the REAL trainer on the demo model, so a job the SDK creates trains and publishes.
Two tenants: A (the namespace the operator serves, at most one unfinished job) and B (another
namespace), who must never see A's files, jobs or models.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
import yaml

from kubetune_gateway import rbac
from tests.fixtures.operator import GROUP, VERSION, OperatorProcess
from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
from tests.fixtures.trainer import REPO, small_job, upload_demo

pytestmark = [pytest.mark.integration]
BASE = "tiny-demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _chat_jsonl(path: Path, limit: int) -> bytes:
    """The demo's instruction records as OpenAI chat ``messages`` records."""
    lines = []
    for raw in path.read_text().splitlines()[:limit]:
        rec = json.loads(raw)
        user = f"{rec['instruction']}\n{rec['input']}" if rec.get("input") else rec["instruction"]
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": rec["output"]},
                    ]
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Gateway:
    url: str
    ns_a: str
    ns_b: str
    token_a: str
    token_b: str
    bucket: str
    s3: Any
    custom: Any
    log: Path
    operator: OperatorProcess

    def client(self, token: str) -> openai.OpenAI:
        # max_retries=0: a 429 must reach the test, not be retried by the SDK.
        return openai.OpenAI(api_key=token, base_url=self.url + "/v1", max_retries=0, timeout=30)

    def ftjs(self, namespace: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")["items"]

    def stored_keys(self, prefix: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        return [o["Key"] for o in listing]


@pytest.fixture
def gateway(
    kube_cluster: Any,
    kube_api: Any,
    kube_namespace: str,
    s3_bucket: tuple[str, str],
    demo_store_cache: Path,
    operator_factory: Callable[..., OperatorProcess],
    tmp_path: Path,
) -> Iterator[Gateway]:
    from kubernetes import client, utils

    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    upload_demo(s3, bucket, demo_store_cache)
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        kube_namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
            },
        },
    )
    ns_b = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": ns_b}})
    core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "kubetune-gateway"}})
    for ns in (kube_namespace, ns_b):
        utils.create_from_dict(kube_api, rbac.gateway_role(ns))
        utils.create_from_dict(kube_api, rbac.gateway_role_binding(ns, kube_namespace))
    token = kube_cluster.service_account_token(kube_namespace, "kubetune-gateway")
    kubeconfig = kube_cluster.kubeconfig_for_token(token, name=f"gateway-{kube_namespace}")

    token_a, token_b = "sk-tenant-a-" + uuid.uuid4().hex, "sk-tenant-b-" + uuid.uuid4().hex
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {
                        "name": "team-a",
                        "namespace": kube_namespace,
                        "tokenSha256": hashlib.sha256(token_a.encode()).hexdigest(),
                        "maxConcurrentJobs": 1,
                    },
                    {
                        "name": "team-b",
                        "namespace": ns_b,
                        "tokenSha256": hashlib.sha256(token_b.encode()).hexdigest(),
                    },
                ]
            }
        )
    )
    template = small_job(
        **{
            "storage": {
                "endpoint": endpoint,
                "region": "us-east-1",
                "addressingStyle": "path",
                "credentialsSecret": "s3-credentials",
            },
            "distributed": {"gpusPerNode": 0},
            "evaluation.metrics": ["eval_loss"],
            "data.format": "auto",
            "data.eval": None,
            "data.train": None,
            "output.uri": None,
        }
    )["spec"]
    del template["model"]
    settings = tmp_path / "gateway.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "files": {
                    "uri": f"s3://{bucket}/gateway",
                    "endpoint": endpoint,
                    "region": "us-east-1",
                    "addressingStyle": "path",
                },
                "baseModels": {BASE: f"s3://{bucket}/demo/base-models/tiny-llama-demo"},
                "template": template,
                "outputUri": f"s3://{bucket}/registry",
                "tenantsFile": str(tenants),
            }
        )
    )
    port = _free_port()
    log = tmp_path / "gateway.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_gateway",
                "--config",
                str(settings),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the gateway did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        op = operator_factory()
        yield Gateway(
            url,
            kube_namespace,
            ns_b,
            token_a,
            token_b,
            bucket,
            s3,
            client.CustomObjectsApi(kube_api),
            log,
            op,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        core.delete_namespace(ns_b)
        print(f"gateway log: {log}")


def _upload(client: openai.OpenAI, name: str, data: bytes) -> Any:
    return client.files.create(file=(name, data), purpose="fine-tune")


@pytest.mark.slow
def test_the_openai_sdk_fine_tunes_to_succeeded_and_reads_events_checkpoints_and_model(
    gateway: Gateway, demo_store_cache: Path
) -> None:
    a, b = gateway.client(gateway.token_a), gateway.client(gateway.token_b)
    data = demo_store_cache / "kubetune-demo" / "datasets" / "quickstart"
    train = _upload(a, "zorbish-train.jsonl", _chat_jsonl(data / "train.jsonl", 200))
    valid = _upload(a, "zorbish-valid.jsonl", _chat_jsonl(data / "eval.jsonl", 40))
    assert train.status == "processed" and train.filename == "zorbish-train.jsonl" and train.bytes > 0
    assert {f.id for f in a.files.list()} == {train.id, valid.id}
    assert a.files.content(train.id).content == _chat_jsonl(data / "train.jsonl", 200)

    job = a.fine_tuning.jobs.create(
        model=BASE,
        training_file=train.id,
        validation_file=valid.id,
        suffix="zorbish",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": "auto", "batch_size": 4, "learning_rate_multiplier": 0.5}
            },
        },
        metadata={"team": "a"},
    )
    assert job.status == "validating_files" and job.model == BASE and job.seed == 7
    assert job.hyperparameters.batch_size == 4 and job.hyperparameters.learning_rate_multiplier == 0.5
    (ftj,) = gateway.ftjs(gateway.ns_a)
    assert ftj["metadata"]["name"] == job.id
    spec = ftj["spec"]
    assert spec["model"]["base"]["uri"].endswith("/demo/base-models/tiny-llama-demo")
    assert spec["training"]["batchSize"] == 4 and spec["training"]["seed"] == 7
    assert spec["training"]["learningRate"] == pytest.approx(0.002 * 0.5)  # template's rate x multiplier
    assert spec["data"]["eval"]["uri"].endswith(f"/gateway/{gateway.ns_a}/files/{valid.id}/data.jsonl")
    assert spec["output"]["uri"] == f"s3://{gateway.bucket}/registry/{gateway.ns_a}"

    # Over quota (team A may run one job at a time): 429, and no second FineTuneJob.
    with pytest.raises(openai.RateLimitError) as over:
        a.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    assert over.value.status_code == 429 and over.value.code == "quota_exceeded"
    assert len(gateway.ftjs(gateway.ns_a)) == 1

    # Tenant B sees nothing of A's and cannot touch it: the same 404 as for an id that never existed.
    for call in (
        b.fine_tuning.jobs.retrieve,
        b.fine_tuning.jobs.cancel,
        b.fine_tuning.jobs.list_events,
        b.fine_tuning.jobs.checkpoints.list,
    ):
        with pytest.raises(openai.NotFoundError) as foreign:
            call(job.id)
        assert foreign.value.status_code == 404 and job.id in str(foreign.value.message)
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(train.id)
    assert list(b.files.list()) == [] and list(b.fine_tuning.jobs.list()) == []
    with pytest.raises(openai.BadRequestError) as foreign_file:
        b.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    assert foreign_file.value.status_code == 400 and foreign_file.value.param == "training_file"
    assert gateway.ftjs(gateway.ns_b) == []

    seen = set()
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        job = a.fine_tuning.jobs.retrieve(job.id)
        seen.add(job.status)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    assert job.status == "succeeded", (job, gateway.operator.log.read_text()[-3000:])
    assert "running" in seen or "validating_files" in seen
    model_id = f"ft:{BASE}:zorbish:{job.id.removeprefix('ftjob-')}"
    assert job.fine_tuned_model == model_id and job.finished_at and job.error is None

    events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed", messages
    assert f"New fine-tuned model created: {model_id}" in messages
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and metrics[0].data["step"] == 16 and metrics[0].data["total_steps"] == 16
    # Pagination: two pages of two, no overlap, in order.
    first = a.fine_tuning.jobs.list_events(job.id, limit=2)
    second = a.fine_tuning.jobs.list_events(job.id, limit=2, after=first.data[-1].id)
    assert first.has_more and [e.id for e in first.data + second.data] == [e.id for e in events[:4]]

    checkpoints = a.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints[0].step_number == 16 and checkpoints[0].fine_tuned_model_checkpoint == model_id
    assert "valid_loss" in checkpoints[0].metrics.model_dump()

    assert model_id in {m.id for m in a.models.list()}
    assert a.models.retrieve(model_id).owned_by == gateway.ns_a
    assert model_id not in {m.id for m in b.models.list()}
    with pytest.raises(openai.NotFoundError):
        b.models.retrieve(model_id)
    assert [j.id for j in a.fine_tuning.jobs.list()] == [job.id]
    # Finished: cancelling now is refused, and a new job fits the quota again.
    with pytest.raises(openai.BadRequestError):
        a.fine_tuning.jobs.cancel(job.id)


def test_bad_inputs_get_openai_errors_and_create_nothing_and_cancel_frees_the_quota(gateway: Gateway) -> None:
    a = gateway.client(gateway.token_a)
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    bad = good + b'{"messages": [{"role": "user", "content": "no answer"\n' + b'{"prompt": "x"}\n'
    with pytest.raises(openai.BadRequestError) as malformed:
        _upload(a, "broken.jsonl", bad)
    err = malformed.value
    assert err.status_code == 400 and err.code == "invalid_file" and err.param == "file"
    assert "broken.jsonl:2" in err.message and "broken.jsonl:3" in err.message, err.message
    assert list(a.files.list()) == [] and gateway.stored_keys("gateway/") == []

    with pytest.raises(openai.BadRequestError) as not_jsonl:
        _upload(a, "data.csv", b"prompt,completion\nx,y\n")
    assert not_jsonl.value.param == "file"

    train = _upload(a, "ok.jsonl", good * 3)
    with pytest.raises(openai.BadRequestError) as unknown_model:
        a.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train.id)
    assert unknown_model.value.status_code == 400 and unknown_model.value.param == "model"
    assert "tiny-demo" in unknown_model.value.message
    with pytest.raises(openai.BadRequestError) as unknown_file:
        a.fine_tuning.jobs.create(model=BASE, training_file="file-000000000000000000000000")
    assert unknown_file.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as bad_hyper:
        a.fine_tuning.jobs.create(model=BASE, training_file=train.id, hyperparameters={"n_epochs": 0})
    assert bad_hyper.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.NotFoundError):
        a.fine_tuning.jobs.retrieve("ftjob-000000000000000000000000")
    assert gateway.ftjs(gateway.ns_a) == []

    with pytest.raises(openai.AuthenticationError) as no_tenant:
        gateway.client("sk-not-a-tenant").fine_tuning.jobs.list()
    assert no_tenant.value.status_code == 401

    # Cancel: the FineTuneJob is suspended and marked, the job reads cancelled, the quota is free again.
    job = a.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    cancelled = a.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    (ftj,) = gateway.ftjs(gateway.ns_a)
    assert ftj["spec"]["runPolicy"]["suspend"] is True
    assert a.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert "The job was cancelled" in [e.message for e in a.fine_tuning.jobs.list_events(job.id)]
    with pytest.raises(openai.BadRequestError):
        a.fine_tuning.jobs.cancel(job.id)
    again = a.fine_tuning.jobs.create(model=BASE, training_file=train.id)  # within maxConcurrentJobs=1
    a.fine_tuning.jobs.cancel(again.id)
    # (created the same second, so only the set is certain; ties are ordered by id)
    assert {j.id for j in a.fine_tuning.jobs.list()} == {again.id, job.id}


@pytest.mark.slow
def test_data_the_trainer_refuses_after_upload_fails_the_job_with_the_file_and_line(gateway: Gateway) -> None:
    """Upload checks records; the trainer alone knows the tokenizer. Records whose prompt fills
    the template's maxSeqLength (128 tokens) pass the upload and leave no answer token to learn: the
    job reads `failed`, its error names the uploaded file's lines, and its events say so."""
    a = gateway.client(gateway.token_a)
    long_prompt = " ".join(f"word{i}" for i in range(400))
    body = b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{n} {long_prompt}"},
                    {"role": "assistant", "content": "ok"},
                ]
            }
        ).encode()
        + b"\n"
        for n in range(4)
    )
    train = _upload(a, "long.jsonl", body)
    assert train.status == "processed"  # every record is valid JSON in the chat form
    job = a.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = a.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    assert job.status == "failed", (job, gateway.operator.log.read_text()[-3000:])
    assert job.error is not None and job.error.code == "InvalidData", job.error
    assert "no training examples left" in job.error.message and "maxSeqLength=128" in job.error.message
    assert f"/files/{train.id}/data.jsonl:1" in job.error.message, job.error.message
    assert job.fine_tuned_model is None and job.finished_at
    events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
    failed = [e for e in events if e.level == "error"]
    assert failed and any("no training examples left" in e.message for e in failed), [
        e.message for e in events
    ]
    assert a.fine_tuning.jobs.checkpoints.list(job.id).data == []
    assert not any(m.id.startswith(f"ft:{BASE}:") for m in a.models.list())


def test_a_namespace_resourcequota_refusal_is_a_429_and_creates_nothing(
    gateway: Gateway, kube_api: Any
) -> None:
    """Tenant B has no gateway job limit; its namespace's ResourceQuota (real quota admission and
    the real quota controller of the v1.20 API server) allows no FineTuneJob at all."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    b = gateway.client(gateway.token_b)
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    train = _upload(b, "ok.jsonl", good * 3)
    core.create_namespaced_resource_quota(
        gateway.ns_b,
        {"metadata": {"name": "no-finetunejobs"}, "spec": {"hard": {"count/finetunejobs.kubetune.io": "0"}}},
    )
    deadline = time.monotonic() + 60  # admission judges by the status the quota controller computes
    while not (core.read_namespaced_resource_quota("no-finetunejobs", gateway.ns_b).status.hard or {}):
        assert time.monotonic() < deadline, "the quota controller never computed the quota's status"
        time.sleep(0.2)
    with pytest.raises(openai.RateLimitError) as refused:
        b.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    err = refused.value
    assert err.status_code == 429 and err.code == "quota_exceeded", err
    assert "ResourceQuota" in err.message and "count/finetunejobs.kubetune.io" in err.message, err.message
    assert gateway.ftjs(gateway.ns_b) == [] and list(b.fine_tuning.jobs.list()) == []
