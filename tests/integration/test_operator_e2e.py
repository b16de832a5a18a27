"""End to end on a real API server with the REAL trainer: kubectl-apply a FineTuneJob and get a version.

The operator runs under its least-privilege token (tests/fixtures/operator.py); the fake kubelet runs
the Job's pod command — ``python -m kubetune_trainer`` — as a local process with the pod's env, its
mounted RunConfig and the S3 credentials Secret; the trainer reads the demo model and data from a
real S3 endpoint (moto on loopback), reports progress into the FineTuneJob status with its per-job
ServiceAccount, checkpoints and publishes to S3, and the operator turns its result into status and a
ModelVersion. What v1.20 cannot show (Indexed Jobs, podFailurePolicy, suspend) is covered by schema
validation of the rendered Job in tests/unit/test_operator_builders.py.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from tests.fixtures.operator import GROUP, VERSION, Api, OperatorProcess, s3_job, wait_for
from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "tiny-demo-translator"


def _watch_until_done(
    api: Api, name: str, op: OperatorProcess, timeout: float
) -> tuple[dict[str, Any], list[dict]]:
    """Poll status until Succeeded/Failed; also collect every progress report seen on the way."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.status(name)
        progress = status.get("progress")
        if progress and (not seen or seen[-1] != progress):
            seen.append(progress)
        if status.get("phase") in ("Succeeded", "Failed"):
            return status, seen
        time.sleep(0.5)
    pytest.fail(
        f"{name} did not finish in {timeout} s; status: {api.status(name)}\n{op.log.read_text()[-3000:]}"
    )


def test_applied_finetunejob_trains_for_real_and_publishes_a_version(
    e2e: tuple[Api, Any, str, str, OperatorProcess],
) -> None:
    api, s3, endpoint, bucket, op = e2e
    api.create_ftj(
        s3_job("quickstart", endpoint, bucket, **{"training.maxSteps": 24, "training.logEverySteps": 4})
    )
    status, seen = _watch_until_done(api, "quickstart", op, timeout=600)
    assert status["phase"] == "Succeeded", status

    # Progress came from the trainer's own status reports while it trained.
    training = [p for p in seen if p.get("stage") == "Training" and p.get("totalSteps") == 24]
    assert training and any(0 < p["step"] <= 24 for p in training), seen
    assert status["progress"]["step"] == 24

    # The version: in status, in the bucket, and as a ModelVersion that names the same manifest.
    version = status["version"]
    assert version["name"] == "v1" and not version.get("reused")
    manifest_key = f"registry/{MODEL}/versions/v1/manifest.json"
    manifest = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    import hashlib

    assert version["manifestDigest"] == hashlib.sha256(manifest).hexdigest()
    assert status["metrics"]["eval_loss"] < json.loads(manifest)["metrics"]["eval_loss"] + 1e-9
    mvs = [m for m in api.model_versions() if m["spec"]["version"] == "v1"]
    assert len(mvs) == 1 and mvs[0]["spec"]["manifestDigest"] == version["manifestDigest"]
    assert mvs[0]["spec"]["model"] == MODEL

    # Secrets never leak into status, Events or the RunConfig ConfigMap.
    cms = api.core.list_namespaced_config_map(api.ns).items
    texts = [json.dumps(api.ftj("quickstart")), *(str(e.message) for e in api.events("quickstart"))]
    texts += [json.dumps(cm.data) for cm in cms]
    for text in texts:
        assert FAKE_SECRET_ACCESS_KEY not in text and FAKE_ACCESS_KEY_ID not in text


def test_a_training_pod_killed_mid_run_resumes_from_its_checkpoint(
    e2e: tuple[Api, Any, str, str, OperatorProcess], fake_kubelet: Any
) -> None:
    api, s3, endpoint, bucket, op = e2e
    api.create_ftj(
        s3_job(
            "resume",
            endpoint,
            bucket,
            **{
                "training.maxSteps": 40,
                "training.logEverySteps": 2,
                "training.checkpoint": {"everySteps": 4},
            },
        )
    )
    prefix = f"registry/{MODEL}/checkpoints/"

    def checkpoint_step() -> int:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        steps = [int(o["Key"].split("step-")[1][:8]) for o in listing if o["Key"].endswith("COMPLETE.json")]
        return max(steps, default=0)

    saved = wait_for(
        "a complete checkpoint at step >= 8", lambda: checkpoint_step() >= 8, timeout=400, log=op.log
    )
    assert saved
    pods = api.core.list_namespaced_pod(api.ns).items
    running = [p for p in pods if p.metadata.deletion_timestamp is None and p.status.phase == "Running"]
    assert len(running) == 1
    fake_kubelet.kill_pod(api.ns, running[0].metadata.name, signal.SIGKILL)  # the real trainer process dies

    status, _ = _watch_until_done(api, "resume", op, timeout=600)
    assert status["phase"] == "Succeeded", status
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=f"registry/{MODEL}/versions/v1/manifest.json")["Body"].read()
    )
    assert manifest["extra"]["resumedFromStep"] >= 8
    assert manifest["extra"]["steps"] == 40
    assert status.get("restarts", 0) >= 1
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, api.ns, "finetunejobs", "resume")


def test_a_job_that_will_not_fit_fails_with_fits_false_and_runs_once_fixed(
    e2e: tuple[Api, Any, str, str, OperatorProcess],
) -> None:
    """The trainer's pre-flight plan lands in status as the Fits condition (with its generation):
    WillNotFit stops the run before any model byte is read; the edited spec plans, fits and trains."""
    api, s3, endpoint, bucket, op = e2e
    tight = {
        "training.maxSteps": 4,
        "training.batchSize": 16,
        "training.maxSeqLength": 256,
        "resources": {"memory": "64Mi"},  # a CPU job's bound: its pod memory
    }
    api.create_ftj(s3_job("tight", endpoint, bucket, **tight))
    status, _ = _watch_until_done(api, "tight", op, timeout=300)
    assert (status["phase"], status["reason"]) == ("Failed", "WillNotFit"), status
    assert "spec.resources.memory" in status["message"] and "Nothing was downloaded" in status["message"]
    fits = api.condition("tight", "Fits")
    assert fits is not None and (fits["status"], fits["reason"], fits["observedGeneration"]) == (
        "False",
        "WillNotFit",
        1,
    )
    assert "WILL NOT FIT" in fits["message"] and "would fit with" in fits["message"]
    assert status["plan"]["generation"] == 1 and status["plan"]["fits"] is False
    assert status["plan"]["peakBytesPerDevice"] > status["plan"]["capacityBytes"] == 64 * 2**20
    # Nothing was trained or published: no checkpoint, no version in the bucket.
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"registry/{MODEL}/").get("Contents", [])
    assert listing == []

    # Fixed in the spec (a bigger bound): generation 2 plans Fits=True and publishes.
    api.custom.patch_namespaced_custom_object(
        GROUP, VERSION, api.ns, "finetunejobs", "tight", {"spec": {"resources": {"memory": "8Gi"}}}
    )
    wait_for(
        "generation 2 to start",
        lambda: api.status("tight").get("observedGeneration") == 2,
        timeout=60,
        log=op.log,
    )
    status, _ = _watch_until_done(api, "tight", op, timeout=600)
    assert status["phase"] == "Succeeded", status
    fits = api.condition("tight", "Fits")
    assert fits is not None and (fits["status"], fits["reason"], fits["observedGeneration"]) == (
        "True",
        "Fits",
        2,
    )
    assert status["plan"]["generation"] == 2 and status["history"][0]["reason"] == "WillNotFit"
