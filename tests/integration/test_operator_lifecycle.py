"""A FineTuneJob's whole life on the real API server (issue 16): edits, fixes, upgrades.

v1.20 kube-apiserver + controller-manager + etcd (tests/cluster), the operator as its own process
under its least-privilege token, a fake kubelet running pods as local processes. Training pods run
a TEST DOUBLE of the trainer (``LIFECYCLE_TRAINER``): it publishes version ``v<epochs>`` (so each
generation's version is visible), holds while the FineTuneJob carries the annotation
``test.kubetune.io/hold: "<epochs>"`` (read through the pod's own token: its Role allows get on the
job's status subresource, which returns the whole object), and never finishes for models named
``slow-*``. Everything asserted is what a user sees: conditions with their observedGeneration,
``kubectl wait``/``kubectl get``, Events, the Jobs that exist, status.version and status.history.
"""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.cluster.cluster import LocalCluster
from tests.fixtures.operator import REPO, Api, OperatorProcess, finetunejob, wait_for

pytestmark = pytest.mark.integration

HOLD = "test.kubetune.io/hold"

#: TEST DOUBLE of the trainer (see the module docstring).
LIFECYCLE_TRAINER = r"""
import json, os, ssl, sys, time, urllib.request
cfg = json.load(open(os.environ["KUBETUNE_RUN_CONFIG"]))
ns, name = os.environ["KUBETUNE_NAMESPACE"], os.environ["KUBETUNE_JOB_NAME"]
sa = os.environ["KUBETUNE_SA_DIR"]
url = "https://%s:%s/apis/kubetune.io/v1alpha1/namespaces/%s/finetunejobs/%s/status" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], ns, name)
ctx = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt"))
token = open(os.path.join(sa, "token")).read().strip()
def call(method, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, method=method,
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/merge-patch+json"})
    return json.loads(urllib.request.urlopen(req, context=ctx, timeout=10).read())
def report(stage, step, total):
    call("PATCH", {"status": {"stage": stage, "progress": {"stage": stage, "step": step, "totalSteps": total,
         "percent": 100.0 * step / total, "summary": "%d/%d" % (step, total)}}})
model = cfg["model"]["name"]
epochs = str(int(cfg["training"]["epochs"]))
report("Training", 1, 4)
while model.startswith("slow") or (
        call("GET")["metadata"].get("annotations", {}).get("test.kubetune.io/hold") == epochs):
    time.sleep(0.5)
report("Publishing", 4, 4)
with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as f:
    f.write(json.dumps({"outcome": "Succeeded", "reason": "Published", "model": model,
        "version": {"name": "v" + epochs, "uri": cfg["output"]["uri"] + "/" + model + "/versions/v" + epochs + "/",
                    "manifestDigest": "sha256:" + (epochs * 64)[:64]},
        "metrics": {"eval_loss": 1.25}}))
"""
COMMAND = ["python", "-c", LIFECYCLE_TRAINER]


def _kubectl(cluster: LocalCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _conditions(api: Api, name: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in api.status(name).get("conditions", [])}


def _patch_ftj(api: Api, name: str, body: dict[str, Any]) -> None:
    from tests.fixtures.operator import GROUP, VERSION

    api.custom.patch_namespaced_custom_object(GROUP, VERSION, api.ns, "finetunejobs", name, body)


def _job_names(api: Api, name: str) -> list[str]:
    return sorted(j.metadata.name for j in api.jobs(name))


def test_edit_after_success_retrains_as_the_new_generation(
    api: Api, kube_cluster: LocalCluster, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(COMMAND)
    api.create_ftj(finetunejob("edit", "tiny-edit", training={"epochs": 1}))
    wait_for("generation 1 Succeeded", lambda: api.status("edit").get("phase") == "Succeeded", 90, op.log)
    st = api.status("edit")
    assert (st["version"]["name"], st["observedGeneration"], st["jobName"]) == ("v1", 1, "edit-g1")
    assert _conditions(api, "edit")["Succeeded"]["status"] == "True"

    # The user edits the spec (and the test double is told to hold generation 2 until released).
    _patch_ftj(api, "edit", {"metadata": {"annotations": {HOLD: "2"}}, "spec": {"training": {"epochs": 2}}})
    wait_for(
        "generation 2 running",
        lambda: (s := api.status("edit")).get("observedGeneration") == 2 and s.get("phase") == "Running",
        90,
        op.log,
    )
    st = api.status("edit")
    conds = _conditions(api, "edit")
    # Nothing claims success for generation 2 while it runs; every condition is about generation 2.
    assert conds["Succeeded"]["status"] == "False" and conds["Running"]["status"] == "True"
    assert {c["observedGeneration"] for c in conds.values()} == {2}
    assert "version" not in st and st["jobName"] == "edit-g2"
    wait_for("the old attempt's Job deleted", lambda: _job_names(api, "edit") == ["edit-g2"], 60, op.log)
    assert st["history"] == [
        {
            "generation": 1,
            "jobName": "edit-g1",
            "phase": "Succeeded",
            "reason": "Published",
            "version": "v1",
            "completionTime": st["history"][0]["completionTime"],
        }
    ]
    replaced = [e for e in api.events("edit") if e.reason == "AttemptReplaced"]
    assert replaced and "edit-g1" in replaced[0].message
    # kubectl wait (which compares observedGeneration with metadata.generation) does not return.
    waited = _kubectl(
        kube_cluster, "-n", api.ns, "wait", "--for=condition=Succeeded", "ftj/edit", "--timeout=3s"
    )
    assert waited.returncode != 0, waited.stdout

    _patch_ftj(api, "edit", {"metadata": {"annotations": {HOLD: None}}})
    waited = _kubectl(
        kube_cluster, "-n", api.ns, "wait", "--for=condition=Succeeded", "ftj/edit", "--timeout=90s"
    )
    assert waited.returncode == 0, waited.stderr + op.log.read_text()[-3000:]
    st = api.status("edit")
    assert (st["phase"], st["version"]["name"], st["observedGeneration"]) == ("Succeeded", "v2", 2)
    assert [(h["generation"], h["phase"], h.get("version")) for h in st["history"]] == [
        (1, "Succeeded", "v1"),
        (2, "Succeeded", "v2"),
    ]
    assert _conditions(api, "edit")["Succeeded"]["observedGeneration"] == 2
    got = _kubectl(kube_cluster, "-n", api.ns, "get", "ftj", "edit", "--no-headers")
    assert got.returncode == 0 and got.stdout.split()[:4] == ["edit", "Succeeded", "4/4", "v2"], got.stdout
    names = wait_for("two ModelVersions", lambda: len(api.model_versions()) == 2 and api.model_versions(), 30)
    assert sorted(v["metadata"]["name"] for v in names) == ["tiny-edit-v1", "tiny-edit-v2"]
    assert {v["spec"]["source"]["generation"] for v in names} == {1, 2}


def test_fixing_an_invalid_spec_starts_it(api: Api, operator_factory: Callable[..., OperatorProcess]) -> None:
    op = operator_factory(COMMAND, KUBETUNE_OPERATOR_ALLOWED_OUTPUT_PREFIXES="s3://registry")
    api.create_ftj(
        finetunejob("fixme", "tiny-fix", training={"epochs": 1}, output={"uri": "s3://elsewhere/m"})
    )
    wait_for(
        "Invalid=True",
        lambda: (_conditions(api, "fixme").get("Invalid") or {}).get("status") == "True",
        60,
        op.log,
    )
    assert api.status("fixme")["phase"] == "Failed" and api.jobs("fixme") == []

    _patch_ftj(api, "fixme", {"spec": {"output": {"uri": "s3://registry/models"}}})
    wait_for("the fixed spec Succeeded", lambda: api.status("fixme").get("phase") == "Succeeded", 90, op.log)
    st = api.status("fixme")
    conds = _conditions(api, "fixme")
    assert conds["Invalid"]["status"] == "False" and conds["Invalid"]["observedGeneration"] == 2
    assert conds["Succeeded"]["status"] == "True" and conds["Succeeded"]["observedGeneration"] == 2
    assert (st["jobName"], st["version"]["name"]) == ("fixme-g2", "v1")
    assert [(h["generation"], h["phase"], h.get("reason")) for h in st["history"]] == [
        (1, "Failed", "InvalidSpec"),
        (2, "Succeeded", "Published"),
    ]
    assert _job_names(api, "fixme") == ["fixme-g2"]


def test_an_invalid_edit_of_a_running_job_stops_it_and_a_fix_starts_the_new_generation(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(COMMAND, KUBETUNE_OPERATOR_ALLOWED_OUTPUT_PREFIXES="s3://registry")
    body = finetunejob("typo", "tiny-typo", training={"epochs": 1})
    body["metadata"]["annotations"] = {HOLD: "1"}
    api.create_ftj(body)
    wait_for("generation 1 running", lambda: api.status("typo").get("phase") == "Running", 90, op.log)

    _patch_ftj(api, "typo", {"spec": {"output": {"uri": "s3://elsewhere/m"}}})
    wait_for(
        "Invalid=True at generation 2",
        lambda: (c := _conditions(api, "typo").get("Invalid") or {}).get("status") == "True"
        and c.get("observedGeneration") == 2,
        60,
        op.log,
    )
    wait_for("the running attempt stopped", lambda: api.jobs("typo") == [], 60, op.log)
    st = api.status("typo")
    assert st["phase"] == "Failed" and "jobName" not in st
    assert _conditions(api, "typo")["Running"]["status"] == "False"
    assert [(h["generation"], h.get("jobName"), h["phase"]) for h in st["history"]] == [
        (1, "typo-g1", "Superseded"),
        (2, None, "Failed"),
    ]

    _patch_ftj(
        api,
        "typo",
        {"metadata": {"annotations": {HOLD: None}}, "spec": {"output": {"uri": "s3://registry/m"}}},
    )
    wait_for("generation 3 Succeeded", lambda: api.status("typo").get("phase") == "Succeeded", 90, op.log)
    st = api.status("typo")
    assert (st["jobName"], st["observedGeneration"], st["version"]["name"]) == ("typo-g3", 3, "v1")
    assert [h["generation"] for h in st["history"]] == [1, 2, 3]
    assert _job_names(api, "typo") == ["typo-g3"]


def test_only_a_new_generation_changing_more_than_suspend_replaces_the_attempt(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    """Labels and annotations (no new generation) and a suspend-only edit (a new generation) keep
    the running attempt: the same Job UID, no AttemptReplaced. (On v1.20 the operator cannot patch
    Job.spec.suspend, so the Job keeps running; what is shown is that the attempt is not replaced.)"""
    op = operator_factory(COMMAND)
    api.create_ftj(finetunejob("steady", "slow-steady", training={"epochs": 1}))
    wait_for("running", lambda: api.status("steady").get("phase") == "Running", 90, op.log)
    uid = api.batch.read_namespaced_job("steady-g1", api.ns).metadata.uid
    _patch_ftj(api, "steady", {"metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}}})
    assert api.ftj("steady")["metadata"]["generation"] == 1
    _patch_ftj(api, "steady", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for("generation 2 observed", lambda: api.status("steady").get("observedGeneration") == 2, 60, op.log)
    _patch_ftj(api, "steady", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for("generation 3 observed", lambda: api.status("steady").get("observedGeneration") == 3, 60, op.log)
    time.sleep(4)  # resyncs
    st = api.status("steady")
    assert (st["jobName"], st["attemptGeneration"], st["phase"]) == ("steady-g1", 1, "Running")
    assert {c["observedGeneration"] for c in st["conditions"]} == {3}
    assert [j.metadata.uid for j in api.jobs("steady")] == [uid]
    assert not [e for e in api.events("steady") if e.reason == "AttemptReplaced"]
    assert not st.get("history")


# --- upgrades ---------------------------------------------------------------------------------


def _crd_next_release(crd: dict[str, Any]) -> dict[str, Any]:
    """CRD v(N+1): a new defaulted field this operator does not know, and a default added to a field
    it does (spec.runPolicy.activeDeadlineSeconds). Every stored object reads differently after it."""
    nxt = copy.deepcopy(crd)
    for version in nxt["spec"]["versions"]:
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        spec["training"]["properties"]["warmupShape"] = {
            "type": "string",
            "default": "linear",
            "description": "A field added in release N+1.",
        }
        spec["runPolicy"]["properties"]["activeDeadlineSeconds"]["default"] = 604800
    return nxt


@pytest.fixture
def crd_upgrade(kube_cluster: LocalCluster, crds_installed: None) -> Iterator[Callable[[], None]]:
    """Replace the FineTuneJob CRD with :func:`_crd_next_release`; put release N back afterwards."""
    from kubernetes import client

    original = yaml.safe_load((REPO / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
    admin = kube_cluster.api_client()
    ext = client.ApiextensionsV1Api(admin)

    def apply(body: dict[str, Any]) -> None:
        current = ext.read_custom_resource_definition(body["metadata"]["name"])
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body)

    try:
        yield lambda: apply(_crd_next_release(original))
    finally:
        apply(original)
        admin.close()


def test_upgrade_with_a_new_defaulted_field_is_invisible_to_running_and_finished_jobs(
    api: Api, operator_factory: Callable[..., OperatorProcess], crd_upgrade: Callable[[], None]
) -> None:
    op = operator_factory(COMMAND)
    api.create_ftj(finetunejob("done", "tiny-done", training={"epochs": 1}))
    api.create_ftj(finetunejob("running", "slow-running", training={"epochs": 1}))
    wait_for("done Succeeded", lambda: api.status("done").get("phase") == "Succeeded", 90, op.log)
    wait_for("running Running", lambda: api.status("running").get("phase") == "Running", 90, op.log)

    def snapshot() -> dict[str, Any]:
        jobs = {j.metadata.name: j.metadata.uid for n in ("done", "running") for j in api.jobs(n)}
        pods = {
            p.metadata.name: p.metadata.uid
            for p in api.core.list_namespaced_pod(
                api.ns, label_selector="app.kubernetes.io/component=trainer"
            ).items
        }
        cms = {
            c.metadata.name: c.metadata.uid
            for c in api.core.list_namespaced_config_map(
                api.ns, label_selector="app.kubernetes.io/component=run-config"
            ).items
        }
        return {"jobs": jobs, "pods": pods, "configmaps": cms}

    before = snapshot()
    assert sorted(before["jobs"]) == ["done-g1", "running-g1"]
    fingerprints = {n: api.status(n)["attemptFingerprint"] for n in ("done", "running")}
    done_status = api.status("done")

    # Release N+1, as docs/operating.md says: the CRDs first (the old operator keeps running)...
    crd_upgrade()
    wait_for(
        "stored objects read with the new defaults",
        lambda: api.ftj("running")["spec"]["training"].get("warmupShape") == "linear"
        and api.ftj("running")["spec"]["runPolicy"].get("activeDeadlineSeconds") == 604800,
        30,
    )
    time.sleep(8)  # a few resyncs (3 s) of the old operator against the new CRD
    # ...then the operator (the new release knows activeDeadlineSeconds' default; the field it does not
    # know is ignored, as any client does).
    op.stop()
    op2 = operator_factory(COMMAND)
    wait_for(
        "the new operator re-recorded the fingerprints",
        lambda: all(api.status(n).get("attemptFingerprint") != fingerprints[n] for n in ("done", "running")),
        60,
        op2.log,
    )
    time.sleep(8)  # more resyncs with the new operator
    after = snapshot()
    assert after == before  # no Job, pod or RunConfig deleted or recreated
    assert not [e for e in api.events("done") + api.events("running") if e.reason == "AttemptReplaced"]
    st = api.status("done")
    assert (st["phase"], st["version"], st["jobName"]) == ("Succeeded", done_status["version"], "done-g1")
    assert st["history"] == done_status["history"]
    assert _conditions(api, "done")["Succeeded"]["status"] == "True"
    running = api.status("running")
    assert (running["phase"], running["jobName"], running["attemptGeneration"]) == (
        "Running",
        "running-g1",
        1,
    )
    assert api.ftj("running")["metadata"]["generation"] == 1
    # The Job that runs keeps what it was created with: the new default applies to new attempts only.
    assert api.batch.read_namespaced_job("running-g1", api.ns).spec.active_deadline_seconds is None
    assert "ignoring spec fields this operator does not know" in op2.log.read_text()


def test_the_same_model_and_version_in_two_registries_get_two_model_versions(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    """Two FineTuneJobs, one model name, different output URIs: both publish v1; neither record is
    the other's (no ModelVersionConflict), each names its own URI."""
    op = operator_factory(COMMAND)
    for name, out in (("team-a", "s3://registry/a"), ("team-b", "s3://registry/b")):
        api.create_ftj(finetunejob(name, "tiny-shared", training={"epochs": 1}, output={"uri": out}))
    for name in ("team-a", "team-b"):
        wait_for(f"{name} Succeeded", lambda n=name: api.status(n).get("phase") == "Succeeded", 90, op.log)
    records = wait_for(
        "two ModelVersions", lambda: len(api.model_versions()) == 2 and api.model_versions(), 30
    )
    by_uri = {r["spec"]["uri"]: r for r in records}
    assert sorted(by_uri) == [
        "s3://registry/a/tiny-shared/versions/v1/",
        "s3://registry/b/tiny-shared/versions/v1/",
    ]
    assert {r["spec"]["source"]["name"] for r in records} == {"team-a", "team-b"}
    assert "tiny-shared-v1" in {r["metadata"]["name"] for r in records}
    assert not [e for n in ("team-a", "team-b") for e in api.events(n) if e.reason == "ModelVersionConflict"]


def test_a_status_worked_out_from_an_older_read_never_overwrites_a_newer_one(
    api: Api, kube_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a loaded CI run showed: a Job's watch event handled late (its Job still running, its
    FineTuneJob read before another handler wrote Succeeded) wrote the job back to Pending. The
    write is conditional on the resourceVersion it was worked out from: refused (409), read again,
    worked out anew, and the recorded outcome stays. The real v1.20 API server decides the 409."""
    from kubetune_operator import reconcile
    from kubetune_operator.metrics import OperatorMetrics
    from kubetune_operator.settings import OperatorSettings

    events: list[tuple[str, str]] = []
    monkeypatch.setattr(
        reconcile, "post_event", lambda _b, _t, reason, message: events.append((reason, message))
    )
    ctx = reconcile.Context(settings=OperatorSettings(), api=kube_api, metrics=OperatorMetrics())
    api.create_ftj(finetunejob("late", "tiny-late"))
    running = {"phase": "Running", "reason": "Running", "observedGeneration": 1, "jobName": "late-g1"}
    reconcile.patch_status(kube_api, api.ns, "late", running)
    stale = api.ftj("late")
    # Another handler saw the Job complete and wrote the outcome.
    succeeded = {**running, "phase": "Succeeded", "reason": "Published", "message": "published v1"}
    reconcile.patch_status(kube_api, api.ns, "late", succeeded)
    old_job = {"metadata": {"name": "late-g1"}, "spec": {}, "status": {"active": 1}}

    # What the late event alone shows (its Job running, no pods left) would say Pending...
    worked_out = reconcile._work_out_status(ctx, stale, None, None, old_job)
    assert worked_out is not None and worked_out[2]["phase"] == "Pending"
    with pytest.raises(reconcile.StatusConflict):
        reconcile.patch_status(
            kube_api, api.ns, "late", worked_out[2], resource_version=stale["metadata"]["resourceVersion"]
        )
    # ...but the refresh is refused, reads the job again and keeps what the newer write recorded.
    written = reconcile.refresh_status(ctx, stale, seen_job=old_job)
    st = api.status("late")
    assert (st["phase"], st["reason"], st["message"]) == ("Succeeded", "Published", "published v1")
    assert written.get("phase") in (None, "Succeeded")
    assert ctx.metrics.registry.get_sample_value("kubetune_status_conflicts_total") == 1
    assert not [e for e in events if "Pending" in e[1]], events
