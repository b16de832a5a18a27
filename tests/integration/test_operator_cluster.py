"""The operator for real: a v1.20 kube-apiserver + controller manager, a fake kubelet, least privilege.

The operator runs as its own process (``python -m kubetune_operator``, as in the image) with a
ServiceAccount token bound to exactly the rules of ``operator/kubetune_operator/rbac.yaml``, in
v1.20 compatibility mode (settings.compat_k8s_1_20). Training pods run a TEST DOUBLE of the trainer
(``STUB_TRAINER`` below, set through settings.trainer_command): it honours the trainer contract —
patch ``status.progress``/``status.stage`` with the pod's own token, write a TrainerResult to the
termination message, exit with the contract's codes — without training anything. The true
end-to-end test with the real trainer lives elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.fixtures.operator import GROUP, VERSION, Api, OperatorProcess, finetunejob, wait_for

pytestmark = pytest.mark.integration

#: TEST DOUBLE of the trainer: behaviour chosen by spec.model.name (read from the RunConfig).
STUB_TRAINER = r"""
import json, os, ssl, sys, time, urllib.request
cfg = json.load(open(os.environ["KUBETUNE_RUN_CONFIG"]))
ns, name = os.environ["KUBETUNE_NAMESPACE"], os.environ["KUBETUNE_JOB_NAME"]
sa = os.environ["KUBETUNE_SA_DIR"]
url = "https://%s:%s/apis/kubetune.io/v1alpha1/namespaces/%s/finetunejobs/%s/status" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"], ns, name)
ctx = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt"))
token = open(os.path.join(sa, "token")).read().strip()
def report(stage, step, total):
    body = {"status": {"stage": stage, "progress": {"stage": stage, "step": step, "totalSteps": total,
            "percent": 100.0 * step / total, "loss": 1.5, "summary": "%d/%d" % (step, total)}}}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PATCH", headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/merge-patch+json"})
    urllib.request.urlopen(req, context=ctx, timeout=10).read()
def finish(result, code):
    with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as f:
        f.write(json.dumps(result))
    sys.exit(code)
model = cfg["model"]["name"]
report("Training", 1, 4)
if model.startswith("slow"):
    while True:
        time.sleep(0.5)
if model.startswith("bad-data"):
    finish({"outcome": "Failed", "reason": "InvalidData", "message": "train.jsonl:3: missing field output"}, 3)
report("Publishing", 4, 4)
finish({"outcome": "Succeeded", "reason": "Published", "model": model, "base": cfg["model"]["base"]["uri"],
        "version": {"name": "v1", "uri": cfg["output"]["uri"] + "/" + model + "/versions/v1/",
                    "manifestDigest": "sha256:" + "ab" * 32},
        "metrics": {"eval_loss": 1.25}, "gates": {"passed": True, "summary": "passed", "results": []}}, 0)
"""

STUB_COMMAND = ["python", "-c", STUB_TRAINER]


# --- tests ------------------------------------------------------------------------------------


def test_api_server_rejects_invalid_spec_naming_the_field(api: Api, crds_installed: None) -> None:
    from kubernetes.client.exceptions import ApiException

    body = finetunejob("bad", "tiny", training={"batchSize": 0})
    with pytest.raises(ApiException) as err:
        api.create_ftj(body)
    assert err.value.status == 422
    assert "spec.training.batchSize" in str(err.value.body)


def test_guard_rail_violation_is_invalid_with_event_and_no_children(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(STUB_COMMAND, KUBETUNE_OPERATOR_ALLOWED_OUTPUT_PREFIXES="s3://approved/")
    api.create_ftj(finetunejob("outside", "tiny"))
    cond = wait_for("Invalid condition", lambda: api.condition("outside", "Invalid"), log=op.log)
    wait_for(
        "Invalid=True",
        lambda: (api.condition("outside", "Invalid") or {}).get("status") == "True",
        log=op.log,
    )
    cond = api.condition("outside", "Invalid")
    assert cond is not None and "spec.output.uri" in cond["message"]
    assert api.status("outside")["phase"] == "Failed"
    events = wait_for(
        "InvalidSpec event", lambda: [e for e in api.events("outside") if e.reason == "InvalidSpec"]
    )
    assert "spec.output.uri" in events[0].message
    assert api.jobs("outside") == []
    assert (
        api.core.list_namespaced_config_map(api.ns, label_selector="kubetune.io/finetunejob=outside").items
        == []
    )


def test_run_to_success_mirrors_status_creates_model_version_and_gc_keeps_it(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("demo", "tiny-demo"))
    wait_for(
        "phase Succeeded", lambda: api.status("demo").get("phase") == "Succeeded", timeout=90, log=op.log
    )
    st = api.status("demo")
    # The stub's own progress report (through its per-job Role) survived the operator's status writes.
    assert st["progress"]["summary"] == "4/4"
    assert st["stage"] == "Publishing"
    assert st["version"]["name"] == "v1"
    assert st["metrics"] == {"eval_loss": 1.25}
    assert st["observedGeneration"] == 1
    succeeded = api.condition("demo", "Succeeded")
    assert succeeded is not None and succeeded["status"] == "True" and succeeded["observedGeneration"] == 1

    jobs = api.jobs("demo")
    assert len(jobs) == 1
    owner = jobs[0].metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("FineTuneJob", "demo", True)
    versions = wait_for("ModelVersion", api.model_versions, log=op.log)
    assert [v["metadata"]["name"] for v in versions] == ["tiny-demo-v1"]
    assert versions[0]["spec"]["source"]["name"] == "demo"
    assert not versions[0]["metadata"].get("ownerReferences")

    api.custom.delete_namespaced_custom_object(GROUP, VERSION, api.ns, "finetunejobs", "demo")
    wait_for("children garbage-collected", lambda: not api.jobs("demo"), timeout=60)
    wait_for(
        "ServiceAccount garbage-collected",
        lambda: all(
            sa.metadata.name != "demo-trainer"
            for sa in api.core.list_namespaced_service_account(api.ns).items
        ),
        timeout=60,
    )
    assert [v["metadata"]["name"] for v in api.model_versions()] == ["tiny-demo-v1"]


def test_bad_input_exit_code_fails_with_trainer_reason(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("baddata", "bad-data", runPolicy={"backoffLimit": 0}))
    wait_for("phase Failed", lambda: api.status("baddata").get("phase") == "Failed", timeout=90, log=op.log)
    st = api.status("baddata")
    assert st["reason"] == "InvalidData"
    assert "train.jsonl:3" in st["message"]
    wait_for("InvalidData event", lambda: [e for e in api.events("baddata") if e.reason == "InvalidData"])


def test_missing_secret_is_reported_and_recovers(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("creds", "tiny-creds", storage={"credentialsSecret": "s3-creds"}))
    wait_for(
        "SecretNotFound",
        lambda: api.status("creds").get("reason") == "SecretNotFound",
        timeout=90,
        log=op.log,
    )
    stalled = api.condition("creds", "Stalled")
    assert stalled is not None and stalled["status"] == "True" and "s3-creds" in stalled["message"]
    wait_for("SecretNotFound event", lambda: [e for e in api.events("creds") if e.reason == "SecretNotFound"])
    api.core.create_namespaced_secret(
        api.ns,
        {
            "metadata": {"name": "s3-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        },
    )
    wait_for(
        "Succeeded after the Secret exists",
        lambda: api.status("creds").get("phase") == "Succeeded",
        timeout=90,
        log=op.log,
    )
    assert (api.condition("creds", "Stalled") or {}).get("status") == "False"


def test_operator_killed_mid_reconcile_leaves_exactly_one_job(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("crash", "slow-crash"))
    # Kill it as soon as the first child exists: the rest of the reconcile has not happened yet.
    wait_for(
        "first child",
        lambda: any(
            sa.metadata.name == "crash-trainer"
            for sa in api.core.list_namespaced_service_account(api.ns).items
        ),
        log=op.log,
    )
    op.kill()
    op2 = operator_factory(STUB_COMMAND)
    wait_for("phase Running", lambda: api.status("crash").get("phase") == "Running", timeout=90, log=op2.log)
    op2.kill()
    op3 = operator_factory(STUB_COMMAND)
    time.sleep(3)  # let the restarted operator resume and resync at least once
    assert len(api.jobs("crash")) == 1
    assert api.status("crash")["phase"] == "Running"
    op3.stop()


def test_the_same_reconcile_twice_at_once_creates_one_set_of_children(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    """Handlers are at-least-once: two operators (standalone, no peering) reconciling the same object
    concurrently is the worst case. Every create is idempotent, so there is one set of children."""
    op1 = operator_factory(STUB_COMMAND)
    op2 = operator_factory(STUB_COMMAND)
    api.create_ftj(finetunejob("twice", "slow-twice"))
    wait_for("phase Running", lambda: api.status("twice").get("phase") == "Running", timeout=90, log=op1.log)
    time.sleep(4)  # both operators resynced at least once more
    selector = "kubetune.io/finetunejob=twice"
    counts = {
        "Job": len(api.jobs("twice")),
        "ConfigMap": len(api.core.list_namespaced_config_map(api.ns, label_selector=selector).items),
        "Service": len(api.core.list_namespaced_service(api.ns, label_selector=selector).items),
        "ServiceAccount": len(
            api.core.list_namespaced_service_account(api.ns, label_selector=selector).items
        ),
        "Role": len(api.rbac.list_namespaced_role(api.ns, label_selector=selector).items),
        "RoleBinding": len(api.rbac.list_namespaced_role_binding(api.ns, label_selector=selector).items),
    }
    assert counts == dict.fromkeys(counts, 1), counts
    first = api.status("twice")
    time.sleep(4)
    second = api.status("twice")
    # The same end state, stable across further reconciles (conditions do not flap).
    assert first["phase"] == second["phase"] == "Running"
    assert [(c["type"], c["status"]) for c in first["conditions"]] == [
        (c["type"], c["status"]) for c in second["conditions"]
    ]
    op1.stop()
    op2.stop()


def test_metrics_and_health_endpoints_are_served(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    import socket
    import urllib.request

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    metrics_port, health_port = free_port(), free_port()
    op = operator_factory(
        STUB_COMMAND,
        KUBETUNE_OPERATOR_METRICS_PORT=str(metrics_port),
        KUBETUNE_OPERATOR_METRICS_ADDRESS="127.0.0.1",
        KUBETUNE_OPERATOR_LIVENESS_ENDPOINT=f"http://127.0.0.1:{health_port}/healthz",
    )
    api.create_ftj(finetunejob("observed", "slow-observed"))
    wait_for(
        "phase Running", lambda: api.status("observed").get("phase") == "Running", timeout=90, log=op.log
    )

    def get(port: int, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()

    def metrics_show_the_job() -> str | None:
        try:
            code, text = get(metrics_port, "/metrics")
        except OSError:
            return None
        return text if code == 200 and 'phase="Running"' in text else None

    text = wait_for("the job in /metrics", metrics_show_the_job, timeout=30, log=op.log)
    assert "kubetune_finetunejobs" in text and "kubetune_reconcile_duration_seconds_count" in text
    assert get(health_port, "/healthz")[0] == 200
    op.stop()
