"""A FineTuneSweep on a real API server (v1.20) with the fake kubelet and the REAL trainer, as a user
lives it: ``kubectl apply`` a sweep of 4 short trials on the tiny demo model where one learning rate
is clearly better; each trial is a child FineTuneJob owned by the sweep (own Job and pod, the
sweep's Kueue queue label); a weak trial is pruned (its FineTuneJob deleted at its first report);
the operator is killed mid-sweep and restarted (no trial lost or duplicated); the winner resumes
from its trial's checkpoint and is the only version in the bucket, with the lineage in its manifest
and card; ``kubectl get fts`` shows it; re-applying the same YAML runs nothing.

The same sweep with ``kubetune run`` is tests/integration/test_sweep_local.py; the plan's corner
cases (a restart between the status write and the create, a changed spec) are
tests/unit/test_operator_sweeps.py."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import names
from tests.cluster.cluster import LocalCluster
from tests.fixtures.operator import GROUP, VERSION, Api, OperatorProcess, s3_job, wait_for
from tests.fixtures.s3 import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sweep" / "finetunesweep.yaml"
MODEL = "tiny-demo-sweep"
QUEUE = "kueue.x-k8s.io/queue-name"


def _sweep_yaml(endpoint: str, bucket: str) -> dict[str, Any]:
    """The example sweep (its search space, sampler and pruner), its template on the test's S3."""
    example = yaml.safe_load(EXAMPLE.read_text())
    template = example["spec"]["template"]
    spec = s3_job("unused", endpoint, bucket)["spec"]
    spec["model"]["name"] = MODEL
    spec["method"] = template["method"]
    spec["training"].update(
        {k: template["training"][k] for k in ("maxSteps", "batchSize", "maxSeqLength", "evalEverySteps")}
    )
    spec["training"]["checkpoint"] = {"everySteps": 10, "keep": 1}
    spec["evaluation"].update({"metrics": ["eval_loss"], "maxSamples": 8})
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr-sweep", "labels": {QUEUE: "team-a"}},
        "spec": {**example["spec"], "template": spec, "maxTrials": 4, "parallelism": 1},
    }


def _kubectl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _sweep(api: Api) -> dict[str, Any]:
    return dict(api.custom.get_namespaced_custom_object(GROUP, VERSION, api.ns, "finetunesweeps", "lr-sweep"))


def _children(api: Api) -> dict[str, dict[str, Any]]:
    items = api.custom.list_namespaced_custom_object(
        GROUP, VERSION, api.ns, "finetunejobs", label_selector=f"{names.LABEL_SWEEP}=lr-sweep"
    )["items"]
    return {i["metadata"]["name"]: i for i in items}


def test_a_sweep_on_the_cluster_survives_an_operator_restart_and_publishes_only_the_winner(
    e2e: tuple[Api, Any, str, str, OperatorProcess],
    operator_factory: Callable[..., OperatorProcess],
    kube_cluster: LocalCluster,
    tmp_path: Path,
) -> None:
    api, s3, endpoint, bucket, op = e2e
    manifest_file = tmp_path / "sweep.yaml"
    manifest_file.write_text(yaml.safe_dump(_sweep_yaml(endpoint, bucket), sort_keys=False))
    applied = _kubectl(kube_cluster, "-n", api.ns, "apply", "-f", str(manifest_file))
    assert applied.returncode == 0 and "created" in applied.stdout, applied.stderr

    # 1. Trial 1 is running: kill the operator (SIGKILL, no chance to tidy up), start a new one.
    def trial_running(number: int) -> dict[str, Any] | None:
        trials = (_sweep(api).get("status") or {}).get("trials") or []
        record = next((t for t in trials if t["number"] == number and t["state"] == "running"), None)
        return record if record and record.get("jobName") in _children(api) else None

    record = wait_for("trial 1 running", lambda: trial_running(1), timeout=400, log=op.log)
    uid_before = _children(api)[record["jobName"]]["metadata"]["uid"]
    before = _sweep(api)["status"]["trials"]
    op.kill()
    time.sleep(2)
    op = operator_factory()

    # 2. The sweep runs to the end under the new operator.
    def finished() -> dict[str, Any] | None:
        st = _sweep(api).get("status") or {}
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = wait_for("the sweep to finish", finished, timeout=900, log=op.log)
    assert (st["phase"], st["reason"]) == ("Succeeded", "Published"), st
    trials = st["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]  # none lost, none repeated
    assert [t["params"] for t in trials[: len(before)]] == [t["params"] for t in before]
    children = _children(api)
    assert children[record["jobName"]]["metadata"]["uid"] == uid_before  # not created again
    started = [e for e in api.core.list_namespaced_event(api.ns).items if e.reason == "TrialStarted"]
    assert sorted(e.message.split(":")[0] for e in started) == [
        f"trial {n}" for n in range(4) if trials[n].get("jobName")
    ]

    # Each trial was an ordinary FineTuneJob owned by the sweep, with the sweep's queue label.
    sweep_uid = _sweep(api)["metadata"]["uid"]
    for child in children.values():
        assert child["metadata"]["ownerReferences"][0]["uid"] == sweep_uid
        assert child["metadata"]["labels"][QUEUE] == "team-a"

    # The sweep found the clearly better learning rate; the weak trial was pruned at its first report.
    complete = [t for t in trials if t["state"] == "complete"]
    high = [t["value"] for t in complete if t["params"]["training.learningRate"] >= 1e-3]
    low = [t["value"] for t in complete if t["params"]["training.learningRate"] <= 1e-4]
    assert high and low and max(high) < min(low) - 1.0, trials
    winner = min(complete, key=lambda t: t["value"])
    assert st["bestTrial"] == winner["number"] and winner["params"]["training.learningRate"] >= 1e-3
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and st["pruned"] == len(pruned), trials
    assert all(list(t["intermediate"]) == ["10"] for t in pruned), pruned
    assert all(t["jobName"] not in children for t in pruned)  # its FineTuneJob was deleted
    reasons = [e.reason for e in api.events("lr-sweep")]
    assert "TrialPruned" in reasons and "PublishingWinner" in reasons

    # Only the winner is a version: v1, trained once (resumed from its trial's final checkpoint).
    winner_job = children[st["winnerJob"]]
    assert winner_job["status"]["version"]["name"] == "v1" and st["version"]["name"] == "v1"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="registry/")["Contents"]]
    assert sorted({k.split("/versions/")[1].split("/")[0] for k in keys if "/versions/" in k}) == ["v1"]
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=f"registry/{MODEL}/versions/v1/manifest.json")["Body"].read()
    )
    assert manifest["extra"]["resumedFromStep"] == 40
    lineage = manifest["extra"]["sweep"]
    assert lineage["winner"] == winner["number"] and [t["number"] for t in lineage["trials"]] == [0, 1, 2, 3]
    assert manifest["metrics"]["eval_loss"] == pytest.approx(winner["value"], rel=1e-6)
    assert f"registry/{MODEL}/versions/v1/sweep/objective.png" in keys
    card = s3.get_object(Bucket=bucket, Key=f"registry/{MODEL}/versions/v1/README.md")["Body"].read().decode()
    assert "## Sweep" in card and f"| **{winner['number']}** (this version) | complete |" in card
    assert not [k for k in keys if "/checkpoints/" in k]  # every trial's checkpoints are spent
    mvs = [m for m in api.model_versions() if m["spec"]["model"] == MODEL]
    assert [m["spec"]["version"] for m in mvs] == ["v1"]

    # What a user reads.
    got = _kubectl(kube_cluster, "-n", api.ns, "get", "fts", "lr-sweep", "--no-headers")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split()[:5] == ["lr-sweep", "Succeeded", "4/4", "0", str(len(pruned))], got.stdout
    assert f"training.learningRate={winner['params']['training.learningRate']:.4g}" in got.stdout
    assert f" {winner['value']:.5g} " in got.stdout and " v1 " in got.stdout
    wide = _kubectl(kube_cluster, "-n", api.ns, "get", "fts", "lr-sweep", "-o", "wide", "--no-headers")
    assert " v1 " in wide.stdout and " Published " in wide.stdout, wide.stdout

    # 3. Re-applying the same sweep runs nothing.
    again = _kubectl(kube_cluster, "-n", api.ns, "apply", "-f", str(manifest_file))
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr
    time.sleep(8)  # more than two resync intervals
    assert set(_children(api)) == set(children)
    assert _sweep(api)["status"]["trials"] == trials

    # Secrets never leak into the sweep's status, its Events or its children.
    texts = [json.dumps(_sweep(api)), json.dumps(children), *(str(e.message) for e in api.events("lr-sweep"))]
    for text in texts:
        assert FAKE_SECRET_ACCESS_KEY not in text and FAKE_ACCESS_KEY_ID not in text


def test_an_invalid_sweep_is_refused_with_the_field_named_and_runs_once_fixed(
    api: Api, operator_factory: Callable[..., OperatorProcess], kube_cluster: LocalCluster, tmp_path: Path
) -> None:
    """What the CRD's schema can say, the API server refuses at ``kubectl apply``; what needs the
    FineTuneJob model (a path, low > high) the operator marks InvalidSpec, naming each field."""
    op = operator_factory(trainer_command=["python", "-c", "import time; time.sleep(600)"])
    doc = _sweep_yaml("http://127.0.0.1:9", "kubetune-test")
    path = tmp_path / "sweep.yaml"

    doc["spec"]["maxTrials"] = 0
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    refused = _kubectl(kube_cluster, "-n", api.ns, "apply", "-f", str(path))
    assert refused.returncode != 0 and "spec.maxTrials" in refused.stderr, refused.stderr

    doc["spec"]["maxTrials"] = 4
    doc["spec"]["parameters"] = [
        {"path": "training.learnRate", "type": "logUniform", "low": 1e-5, "high": 1e-3},
        {"path": "method.lora.dropout", "type": "uniform", "low": 0.3, "high": 0.1},
    ]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _kubectl(kube_cluster, "-n", api.ns, "apply", "-f", str(path)).returncode == 0

    def invalid() -> dict[str, Any] | None:
        st = _sweep(api).get("status") or {}
        return st if st.get("reason") == "InvalidSpec" else None

    st = wait_for("the sweep marked InvalidSpec", invalid, timeout=60, log=op.log)
    assert st["phase"] == "Failed" and st["observedGeneration"] == 1
    assert "spec.parameters[0].path: unknown field 'learnRate' in training" in st["message"], st
    assert "spec.parameters[1]" in st["message"] and "low" in st["message"], st
    events = [e for e in api.events("lr-sweep") if e.reason == "InvalidSpec"]
    assert events and events[0].type == "Warning" and "spec.parameters[0].path" in events[0].message
    assert _children(api) == {}  # nothing ran

    # Fixed: generation 2 searches (trial 0 recorded, its FineTuneJob created).
    doc["spec"]["parameters"] = [
        {"path": "training.learningRate", "type": "logUniform", "low": 1e-5, "high": 1e-3},
        {"path": "method.lora.dropout", "type": "uniform", "low": 0.0, "high": 0.1},
    ]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _kubectl(kube_cluster, "-n", api.ns, "apply", "-f", str(path)).returncode == 0

    def searching() -> dict[str, Any] | None:
        st = _sweep(api).get("status") or {}
        return st if st.get("reason") == "Searching" and st.get("observedGeneration") == 2 else None

    st = wait_for("generation 2 searching", searching, timeout=60, log=op.log)
    assert [t["number"] for t in st["trials"]] == [0]
    wait_for("trial 0's FineTuneJob", lambda: st["trials"][0]["jobName"] in _children(api), timeout=30)
    condition = st["conditions"][0]
    assert (condition["type"], condition["status"], condition["observedGeneration"]) == (
        "Complete",
        "False",
        2,
    )

    # Made invalid again while trial 0 runs: nothing runs for an invalid spec, so it is stopped.
    doc["spec"]["parameters"][1]["low"] = 0.5
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _kubectl(kube_cluster, "-n", api.ns, "apply", "-f", str(path)).returncode == 0
    wait_for("trial 0 stopped", lambda: _children(api) == {}, timeout=60, log=op.log)
    st = _sweep(api)["status"]
    assert (st["reason"], st["observedGeneration"]) == ("InvalidSpec", 3)
    stopped = [e for e in api.events("lr-sweep") if e.reason == "InvalidSpec" and "stopped" in e.message]
    assert stopped and "-t0" in stopped[0].message
