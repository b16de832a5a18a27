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

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator import rbac
from tests.cluster.cluster import LocalCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "kubetune.io", "v1alpha1"

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


# --- helpers ----------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, log: Path | None = None) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` (and the operator log)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.3)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\noperator log tail:\n{tail}"
    )


def finetunejob(name: str, model: str, **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": model, "base": {"uri": "s3://models/base/tiny"}},
        "data": {"train": {"uri": "s3://data/train.jsonl"}},
        "distributed": {"gpusPerNode": 0},
        "output": {"uri": "s3://registry/models"},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


class Api:
    """Admin-side reads for assertions (the operator itself runs with its limited token)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.ns = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)

    def create_ftj(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, "finetunejobs", body)
        )

    def ftj(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, "finetunejobs", name))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.ftj(name).get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), None)

    def jobs(self, name: str) -> list[Any]:
        return self.batch.list_namespaced_job(self.ns, label_selector=f"kubetune.io/finetunejob={name}").items

    def model_versions(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, "modelversions")["items"]

    def events(self, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(self.ns).items if e.involved_object.name == name]


class OperatorProcess:
    """``python -m kubetune_operator`` under the least-privilege token; killed by its PID."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, extra_env: dict[str, str]) -> None:
        self.log = log
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_OPERATOR_")},
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_OPERATOR_NAMESPACES": namespace,
            "KUBETUNE_OPERATOR_STANDALONE": "true",
            "KUBETUNE_OPERATOR_COMPAT_K8S_1_20": "true",
            "KUBETUNE_OPERATOR_TRAINER_COMMAND": json.dumps(["python", "-c", STUB_TRAINER]),
            "KUBETUNE_OPERATOR_TRAINER_IMAGE": "kubetune/trainer-stub:test",
            "KUBETUNE_OPERATOR_DEFAULT_CPU": "1",
            "KUBETUNE_OPERATOR_DEFAULT_MEMORY": "1Gi",
            "KUBETUNE_OPERATOR_METRICS_PORT": "none",
            "KUBETUNE_OPERATOR_LIVENESS_ENDPOINT": "none",
            "KUBETUNE_OPERATOR_RESYNC_SECONDS": "3",
            **extra_env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune_operator"],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def _without_empty_string_defaults(node: Any) -> Any:
    """The CRD minus ``default: ''`` entries, which the v1.20 API server rejects as null (reported to
    the API owner; a >= 1.29 server accepts them). Only status fields carry such defaults."""
    if isinstance(node, dict):
        return {
            k: _without_empty_string_defaults(v) for k, v in node.items() if not (k == "default" and v == "")
        }
    if isinstance(node, list):
        return [_without_empty_string_defaults(v) for v in node]
    return node


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crds_installed(kube_cluster: LocalCluster) -> None:
    """The generated CRDs and the operator's ClusterRoles, installed once."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with kube_cluster.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            try:
                ext.create_custom_resource_definition(
                    _without_empty_string_defaults(yaml.safe_load(path.read_text()))
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise

        def established(name: str) -> bool:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        for name in ("finetunejobs.kubetune.io", "modelversions.kubetune.io"):
            wait_for(f"CRD {name} Established", functools.partial(established, name))
        rbac_api = client.RbacAuthorizationV1Api(api)
        for role in rbac.operator_cluster_roles():
            try:
                rbac_api.create_cluster_role(role)
            except ApiException as exc:
                if exc.status != 409:
                    raise


@pytest.fixture
def api(kube_api: Any, kube_namespace: str) -> Api:
    return Api(kube_api, kube_namespace)


@pytest.fixture
def operator_factory(
    kube_cluster: LocalCluster, kube_namespace: str, crds_installed: None, fake_kubelet: Any, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start operators for this test's namespace under a ServiceAccount bound to rbac.yaml only."""
    from kubernetes import client, utils

    with kube_cluster.api_client() as admin:
        client.CoreV1Api(admin).create_namespaced_service_account(
            kube_namespace, {"metadata": {"name": "kubetune-operator"}}
        )
        for binding in rbac.operator_bindings(kube_namespace, "kubetune-operator", [kube_namespace]):
            utils.create_from_dict(admin, binding)
    token = kube_cluster.service_account_token(kube_namespace, "kubetune-operator")
    kubeconfig = kube_cluster.kubeconfig_for_token(token, name=f"operator-{kube_namespace}")
    started: list[OperatorProcess] = []

    def start(**extra_env: str) -> OperatorProcess:
        proc = OperatorProcess(kubeconfig, kube_namespace, tmp_path / "operator.log", extra_env)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    if started:
        print(f"operator log: {tmp_path / 'operator.log'}")


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
    op = operator_factory(KUBETUNE_OPERATOR_ALLOWED_OUTPUT_PREFIXES="s3://approved/")
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
    op = operator_factory()
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
    op = operator_factory()
    api.create_ftj(finetunejob("baddata", "bad-data", runPolicy={"backoffLimit": 0}))
    wait_for("phase Failed", lambda: api.status("baddata").get("phase") == "Failed", timeout=90, log=op.log)
    st = api.status("baddata")
    assert st["reason"] == "InvalidData"
    assert "train.jsonl:3" in st["message"]
    wait_for("InvalidData event", lambda: [e for e in api.events("baddata") if e.reason == "InvalidData"])


def test_missing_secret_is_reported_and_recovers(
    api: Api, operator_factory: Callable[..., OperatorProcess]
) -> None:
    op = operator_factory()
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
    op = operator_factory()
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
    op2 = operator_factory()
    wait_for("phase Running", lambda: api.status("crash").get("phase") == "Running", timeout=90, log=op2.log)
    op2.kill()
    op3 = operator_factory()
    time.sleep(3)  # let the restarted operator resume and resync at least once
    assert len(api.jobs("crash")) == 1
    assert api.status("crash")["phase"] == "Running"
    op3.stop()
