"""Argo CD health checks (deploy/argocd/health/*.lua), run by a real Lua 5.4 interpreter.

Argo CD runs a health script with the live object as the global ``obj`` and reads the returned
``hs`` table. The harness below does the same: it json-decodes the object (lua-cjson, JSON null ->
nil as in Argo CD), runs the script and prints ``hs`` as JSON. The objects are built from
kubetune_api's models, so a renamed status field breaks this test, not a user's dashboard.

Needs Debian's ``lua5.4`` and ``lua-cjson`` (`make tools` installs them). A missing interpreter is a
test failure, never a silent skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api.models import (
    Condition,
    FineTuneJobStatus,
    GateResult,
    GatesStatus,
    ModelVersionSpec,
    Progress,
    VersionRef,
)

REPO = Path(__file__).resolve().parents[2]
HEALTH = REPO / "deploy" / "argocd" / "health"
LUA = "lua5.4"
HARNESS = r"""
local cjson = require("cjson")
local function strip(v)
  if v == cjson.null then return nil end
  if type(v) == "table" then
    for k, x in pairs(v) do v[k] = strip(x) end
  end
  return v
end
obj = strip(cjson.decode(io.read("a")))
local hs = dofile(os.getenv("HEALTH_SCRIPT"))
print(cjson.encode(hs))
"""


def run_health(script: str, obj: dict[str, Any]) -> dict[str, str]:
    """Run one health script against ``obj`` the way Argo CD does; returns ``hs``."""
    lua = shutil.which(LUA)
    if lua is None:
        pytest.fail(f"{LUA} is not installed: run `make tools` (apt-get install -y lua5.4 lua-cjson)")
    proc = subprocess.run(
        [lua, "-e", HARNESS],
        input=json.dumps(obj),
        env={"HEALTH_SCRIPT": str(HEALTH / script), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def ftj(status: FineTuneJobStatus | None, generation: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "support", "namespace": "team-a", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status.to_api()
    return obj


def cond(kind: str, reason: str = "", message: str = "", status: str = "True") -> Condition:
    return Condition(type=kind, status=status, reason=reason, message=message, observed_generation=2)  # type: ignore[arg-type]


def all_conditions(**true: tuple[str, str]) -> list[Condition]:
    """Every condition type the operator maintains, False unless given as (reason, message)."""
    out = []
    for kind in ("Invalid", "Suspended", "Stalled", "Running", "Succeeded", "Failed"):
        if kind in true:
            out.append(cond(kind, *true[kind]))
        else:
            out.append(cond(kind, f"Not{kind}", status="False"))
    return out


VERSION = VersionRef(
    name="v3", uri="s3://models/registry/support/versions/v3", manifest_digest="sha256:" + "a" * 64
)
GATES_OK = GatesStatus(
    passed=True, summary="passed", results=[GateResult(metric="rouge_l", value=0.5, min=0.4, passed=True)]
)


@pytest.fixture(scope="module", autouse=True)
def _lua_present() -> None:
    if shutil.which(LUA) is None:
        pytest.fail(f"{LUA} is not installed: run `make tools` (apt-get install -y lua5.4 lua-cjson)")


def test_harness_runs_the_script_as_argo_does() -> None:
    # No status at all: the operator has not seen the object yet.
    hs = run_health("finetunejob.lua", ftj(None))
    assert hs == {
        "status": "Progressing",
        "message": "Waiting for the kubetune operator to pick up this FineTuneJob",
    }


@pytest.mark.parametrize(
    ("status", "expected", "message_part"),
    [
        (
            FineTuneJobStatus(
                phase="Succeeded",
                observed_generation=2,
                version=VERSION,
                gates=GATES_OK,
                conditions=all_conditions(Succeeded=("Published", "published v3")),
            ),
            "Healthy",
            "Published v3, gates passed",
        ),
        (
            FineTuneJobStatus(
                phase="Succeeded",
                observed_generation=2,
                reason="Reused",
                version=VERSION.model_copy(update={"reused": True}),
            ),
            "Healthy",
            "Reused v3 (same inputs digest: nothing retrained)",
        ),
        (
            FineTuneJobStatus(
                phase="Running",
                stage="Training",
                observed_generation=2,
                progress=Progress(
                    stage="Training",
                    step=120,
                    total_steps=400,
                    percent=30,
                    summary="120/400 (30%)",
                    loss=1.2345,
                    eta_seconds=600,
                ),
            ),
            "Progressing",
            "Training, 120/400 (30%), loss 1.234, ETA 10m",
        ),
        (
            FineTuneJobStatus(
                phase="Pending", observed_generation=2, reason="Created", message="pods starting"
            ),
            "Progressing",
            "Created: pods starting",
        ),
        (
            FineTuneJobStatus(
                phase="Queued",
                observed_generation=2,
                reason="Queued",
                message="waiting for Kueue LocalQueue team-a-gpus to admit the Job",
                conditions=all_conditions(Suspended=("Queued", "waiting for Kueue")),
            ),
            "Progressing",
            "Queued: waiting for Kueue LocalQueue team-a-gpus",
        ),
        (
            FineTuneJobStatus(
                phase="Suspended",
                observed_generation=2,
                reason="Suspended",
                message="spec.runPolicy.suspend is true",
                conditions=all_conditions(Suspended=("Suspended", "spec.runPolicy.suspend is true")),
            ),
            "Suspended",
            "spec.runPolicy.suspend is true",
        ),
        (
            FineTuneJobStatus(
                phase="Failed",
                observed_generation=2,
                reason="GateFailed",
                message="v3 published but accuracy 0.81 < min 0.92; alias production not moved",
                gates=GatesStatus(passed=False, summary="failed 1/3"),
            ),
            "Degraded",
            "GateFailed: v3 published but accuracy 0.81 < min 0.92",
        ),
        (
            FineTuneJobStatus(
                phase="Failed",
                observed_generation=2,
                reason="InvalidSpec",
                message="spec.distributed.nodes: 16 nodes exceed this platform's limit of 8",
                conditions=all_conditions(
                    Invalid=(
                        "InvalidSpec",
                        "spec.distributed.nodes: 16 nodes exceed this platform's limit of 8",
                    )
                ),
            ),
            "Degraded",
            "Invalid spec: spec.distributed.nodes: 16 nodes exceed",
        ),
        (
            FineTuneJobStatus(
                phase="Pending",
                observed_generation=2,
                reason="ImagePullBackOff",
                conditions=all_conditions(
                    Stalled=("ImagePullBackOff", "ErrImagePull: registry.example.com/trainer:0.1.0")
                ),
            ),
            "Degraded",
            "ImagePullBackOff: ErrImagePull",
        ),
        (
            # A new spec generation that the operator has not reconciled: the old Succeeded is stale.
            FineTuneJobStatus(phase="Succeeded", observed_generation=1, version=VERSION),
            "Progressing",
            "Waiting for the operator to reconcile generation 2",
        ),
    ],
    ids=[
        "published",
        "reused",
        "training",
        "pending",
        "queued",
        "suspended",
        "gate-failed",
        "invalid",
        "stalled",
        "stale-generation",
    ],
)
def test_finetunejob_health(status: FineTuneJobStatus, expected: str, message_part: str) -> None:
    hs = run_health("finetunejob.lua", ftj(status))
    assert hs["status"] == expected
    assert message_part in hs["message"]


def modelversion(gates: GatesStatus | None) -> dict[str, Any]:
    spec = ModelVersionSpec(
        model="support",
        version="v3",
        uri="s3://models/registry/support/versions/v3",
        manifest_digest="sha256:" + "b" * 64,
        base="s3://models/base/mistral-7b",
        key_metric="rouge_l=0.5",
        gates=gates,
    )
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": "support-v3", "namespace": "team-a"},
        "spec": spec.to_api(),
    }


def test_modelversion_health() -> None:
    assert run_health("modelversion.lua", modelversion(GATES_OK)) == {
        "status": "Healthy",
        "message": "support v3 (rouge_l=0.5)",
    }
    assert run_health("modelversion.lua", modelversion(None))["status"] == "Healthy"
    failed = GatesStatus(
        passed=False,
        summary="failed 1/2",
        results=[
            GateResult(metric="accuracy", value=0.81, min=0.92, passed=False, message="0.81 < min 0.92"),
            GateResult(metric="rouge_l", value=0.5, min=0.4, passed=True),
        ],
    )
    hs = run_health("modelversion.lua", modelversion(failed))
    assert hs == {
        "status": "Degraded",
        "message": "support v3 failed its gates (not promotable): accuracy: 0.81 < min 0.92",
    }


def test_argocd_cm_embeds_exactly_the_scripts() -> None:
    cm = yaml.safe_load((REPO / "deploy" / "argocd" / "argocd-cm-health.yaml").read_text())["data"]
    assert (
        cm["resource.customizations.health.kubetune.io_FineTuneJob"]
        == (HEALTH / "finetunejob.lua").read_text()
    )
    assert (
        cm["resource.customizations.health.kubetune.io_ModelVersion"]
        == (HEALTH / "modelversion.lua").read_text()
    )
