"""The operator's pure builders: rendered objects validated against Kubernetes 1.31 OpenAPI (strict).

The integration server is v1.20, so fields newer than it (completionMode Indexed, suspend,
podFailurePolicy, seccompProfile, ...) are checked here, against the schemas users' clusters serve.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest

from kubetune_api.loader import load_finetunejob
from kubetune_api.models import FineTuneJob
from kubetune_api.reports import TrainerResult
from kubetune_api.runconfig import RunConfig
from kubetune_operator import builders, naming
from kubetune_operator.settings import OperatorSettings, SettingsError
from tests.support.crd_schema import validate as validate_crd

K8S_VERSION = "1.31.0"
EXAMPLE = "examples/quickstart/finetunejob.yaml"
MULTINODE = "examples/lora-7b-multinode/finetunejob.yaml"


def make_job(path: str = EXAMPLE, /, **spec_updates: Any) -> FineTuneJob:
    job = load_finetunejob(path)
    data = job.model_dump(by_alias=True, exclude_none=True)
    data["metadata"].update({"name": "quickstart", "namespace": "team-a", "uid": "uid-1234", "generation": 3})
    for dotted, value in spec_updates.items():
        node = data["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return FineTuneJob.model_validate(data)


def k8s_valid(obj: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError (naming the field) when 1.31 would reject ``obj``."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


ALL_BUILDERS = [
    builders.build_configmap,
    builders.build_service,
    builders.build_job,
    builders.build_service_account,
    builders.build_role,
    builders.build_role_binding,
]


@pytest.mark.parametrize("build", ALL_BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("compat", [False, True], ids=["k8s-1.29+", "compat-1.20"])
def test_every_child_validates_against_kubernetes_openapi(build: Any, compat: bool) -> None:
    obj = build(make_job(), OperatorSettings(compat_k8s_1_20=compat))
    k8s_valid(obj)
    assert obj["metadata"]["namespace"] == "team-a"
    owner = obj["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "quickstart",
        "uid": "uid-1234",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_schema_validation_can_fail() -> None:
    """The validator really is strict: a misspelt Job field is caught, naming it."""
    obj = builders.build_job(make_job(), OperatorSettings())
    obj["spec"]["podFailurePolcy"] = obj["spec"].pop("podFailurePolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="podFailurePolcy"):
        k8s_valid(obj)


def test_multinode_job_is_indexed_torchrun_with_gpus_and_placement() -> None:
    job = make_job(MULTINODE)
    settings = OperatorSettings()
    obj = builders.build_job(job, settings)
    k8s_valid(obj)
    spec = obj["spec"]
    nodes = job.spec.distributed.nodes
    gpus = job.spec.distributed.gpus_per_node
    assert nodes > 1 and gpus > 1
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", nodes, nodes)
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    attempt = builders.attempt_for(job).name
    assert container["command"] == [
        # torchrun through the launcher that keeps the workers' exit codes (kubetune_trainer.launch)
        "python",
        "-m",
        "kubetune_trainer.launch",
        f"--nnodes={nodes}",
        f"--nproc-per-node={gpus}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={attempt}-0.quickstart-rdzv:29400",
        "--max-restarts=3",
        "--rdzv-id=uid-1234-g3",
        "-m",
        "kubetune_trainer",
        "--run-config",
        "/etc/kubetune/run-config.json",
    ]
    assert pod["subdomain"] == builders.build_service(job, settings)["metadata"]["name"] == "quickstart-rdzv"
    gpu = job.spec.resources.gpu_resource_name
    assert container["resources"]["limits"][gpu] == str(gpus)
    assert container["resources"]["requests"] == container["resources"]["limits"]
    if job.spec.resources.tolerations:
        assert pod["tolerations"] == [t.to_api() for t in job.spec.resources.tolerations]
    if job.spec.resources.node_selector:
        assert pod["nodeSelector"] == job.spec.resources.node_selector


def test_single_process_command_and_run_config_mount() -> None:
    job = make_job()
    obj = builders.build_job(job, OperatorSettings())
    pod = obj["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "python",
        "-m",
        "kubetune_trainer",
        "--run-config",
        "/etc/kubetune/run-config.json",
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["run-config"]["configMap"]["name"] == f"{obj['metadata']['name']}-run-config"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": job.spec.resources.shared_memory}
    assert mounts["/dev/shm"]["name"] == "dshm"
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_JOB_NAME"]["value"] == "quickstart"
    assert env["KUBETUNE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Every cache a library writes lands under a writable emptyDir (read-only root filesystem).
    for var in ("HOME", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TMPDIR"):
        assert any(env[var]["value"].startswith(m) for m in ("/home/kubetune", "/tmp")), var
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["terminationMessagePath"] == "/dev/termination-log"


def test_restricted_pod_security_profile() -> None:
    pod = builders.build_job(make_job(), OperatorSettings())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "privileged" not in sc
    assert not any("hostPath" in v for v in pod["volumes"])
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_pod_failure_policy_fails_fast_on_contract_exit_codes_and_ignores_disruptions() -> None:
    spec = builders.build_job(make_job(**{"runPolicy.backoffLimit": 5}), OperatorSettings())["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 5
    rules = spec["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [3, 4, 5]}
    ignore = next(r for r in rules if r["action"] == "Ignore")
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_run_policy_deadlines_and_ttl() -> None:
    spec = builders.build_job(
        make_job(**{"runPolicy.activeDeadlineSeconds": 3600, "runPolicy.ttlSecondsAfterFinished": 60}),
        OperatorSettings(),
    )["spec"]
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["ttlSecondsAfterFinished"] == 60


@pytest.mark.parametrize(
    ("suspend", "queue", "expect_suspended"),
    [(False, None, False), (True, None, True), (False, "gpu-queue", True), (True, "gpu-queue", True)],
)
def test_suspend_and_kueue(suspend: bool, queue: str | None, expect_suspended: bool) -> None:
    updates: dict[str, Any] = {"runPolicy.suspend": suspend}
    if queue:
        updates["runPolicy.queueName"] = queue
    obj = builders.build_job(make_job(**updates), OperatorSettings())
    k8s_valid(obj)
    assert obj["spec"]["suspend"] is expect_suspended
    labels = obj["metadata"]["labels"]
    if queue:
        assert labels[naming.LABEL_QUEUE] == queue
    else:
        assert naming.LABEL_QUEUE not in labels


def _at_generation(job: FineTuneJob, generation: int) -> FineTuneJob:
    return job.model_copy(update={"metadata": job.metadata.model_copy(update={"generation": generation})})


def test_attempts_are_named_after_the_generation_that_started_them() -> None:
    first = builders.attempt_for(make_job())
    assert (first.name, first.generation) == ("quickstart-g3", 3)
    # Once recorded in the status, the attempt is the recorded one, whatever the spec reads like.
    recorded = {"jobName": "quickstart-0994bf7a", "attemptGeneration": 2, "attemptFingerprint": "f"}
    assert builders.attempt_for(make_job(), recorded).name == "quickstart-0994bf7a"


def test_only_a_new_generation_that_changes_more_than_suspend_starts_a_new_attempt() -> None:
    job = make_job()
    running = builders.plan_attempt(job, {})
    assert running.action == "new"
    st = {
        "jobName": running.attempt.name,
        "attemptGeneration": 3,
        "attemptFingerprint": running.attempt.fingerprint,
        "observedGeneration": 3,
    }
    assert builders.plan_attempt(job, st).action == "keep"
    # Suspend flipped: a new generation, the same attempt.
    suspended = _at_generation(make_job(**{"runPolicy.suspend": True}), 4)
    plan = builders.plan_attempt(suspended, st)
    assert (plan.action, plan.attempt.name) == ("adopt", "quickstart-g3")
    # Anything else: a new attempt, named after the new generation.
    edited = _at_generation(make_job(**{"training.epochs": 1}), 4)
    plan = builders.plan_attempt(edited, st)
    assert (plan.action, plan.attempt.name, plan.attempt.generation) == ("new", "quickstart-g4", 4)


def test_an_upgrade_that_changes_defaults_keeps_the_attempt() -> None:
    """The same generation read with a defaulted field the CRD or operator added: same Job."""
    job = make_job()
    st = {
        "jobName": "quickstart-g3",
        "attemptGeneration": 3,
        "attemptFingerprint": builders.spec_fingerprint(job),
        "observedGeneration": 3,
    }
    upgraded = make_job(**{"runPolicy.activeDeadlineSeconds": 86400})
    assert builders.spec_fingerprint(upgraded) != st["attemptFingerprint"]
    plan = builders.plan_attempt(upgraded, st)
    assert (plan.action, plan.attempt.name, plan.attempt.generation) == ("rebaseline", "quickstart-g3", 3)
    assert plan.attempt.fingerprint == builders.spec_fingerprint(upgraded)
    # A status written by a release that named Jobs by fingerprint is adopted as it is.
    legacy = {"jobName": "quickstart-8ab681a5", "observedGeneration": 3, "phase": "Running"}
    plan = builders.plan_attempt(job, legacy)
    assert (plan.action, plan.attempt.name) == ("rebaseline", "quickstart-8ab681a5")


def test_compat_1_20_drops_newer_fields_and_sets_the_index() -> None:
    obj = builders.build_job(make_job(), OperatorSettings(compat_k8s_1_20=True))
    spec = obj["spec"]
    for newer in ("completionMode", "suspend", "podFailurePolicy"):
        assert newer not in spec
    pod = spec["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["JOB_COMPLETION_INDEX"] == "0"
    assert pod["hostname"] == f"{obj['metadata']['name']}-0"


def test_secret_is_referenced_never_inlined() -> None:
    obj = builders.build_job(make_job(**{"storage.credentialsSecret": "s3-creds"}), OperatorSettings())
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(obj)


def test_the_mlflow_tracking_secret_is_referenced_beside_the_storage_one() -> None:
    tracking = {"mlflow": {"trackingUri": "https://mlflow.example.com", "credentialsSecret": "mlflow-token"}}
    obj = builders.build_job(
        make_job(**{"storage.credentialsSecret": "s3-creds", "tracking": tracking}), OperatorSettings()
    )
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [
        {"secretRef": {"name": "s3-creds"}},
        {"secretRef": {"name": "mlflow-token"}},
    ]
    assert "MLFLOW_TRACKING_TOKEN" not in json.dumps(obj)
    # Only the tracking secret: still mounted; the same Secret for both: mounted once.
    alone = builders.build_job(make_job(tracking=tracking), OperatorSettings())
    assert alone["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "mlflow-token"}}
    ]
    both = {"mlflow": {**tracking["mlflow"], "credentialsSecret": "s3-creds"}}
    same = builders.build_job(
        make_job(**{"storage.credentialsSecret": "s3-creds", "tracking": both}), OperatorSettings()
    )
    assert same["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "s3-creds"}}
    ]


def test_image_override_and_default() -> None:
    settings = OperatorSettings(
        trainer_image="registry.local/kubetune/trainer:1", allowed_images=("registry.local/",)
    )
    default = builders.build_job(make_job(), settings)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert default == "registry.local/kubetune/trainer:1"
    custom = builders.build_job(make_job(image="registry.local/me/trainer:2"), settings)
    assert custom["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/me/trainer:2"


def test_configmap_holds_the_resolved_run_config_with_in_cluster_reporting() -> None:
    job = make_job()
    cm = builders.build_configmap(job, OperatorSettings())
    assert cm["immutable"] is True
    run_config = RunConfig.from_json(cm["data"]["run-config.json"])
    assert run_config.job.name == "quickstart" and run_config.job.generation == 3
    assert run_config.reporting.status_patch is True
    assert run_config.reporting.termination_message_path == "/dev/termination-log"


def test_trainer_role_allows_only_its_own_status() -> None:
    job = make_job()
    role = builders.build_role(job, OperatorSettings())
    assert role["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["quickstart"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = builders.build_role_binding(job, OperatorSettings())
    account = builders.build_service_account(job, OperatorSettings())["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "team-a"}]
    pod = builders.build_job(job, OperatorSettings())["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def test_headless_service_for_rendezvous() -> None:
    svc = builders.build_service(make_job(), OperatorSettings())
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"][0]["port"] == 29400


def test_builders_are_pure() -> None:
    job = make_job()
    before = job.model_dump()
    first = [b(job, OperatorSettings()) for b in ALL_BUILDERS]
    second = [b(job, OperatorSettings()) for b in ALL_BUILDERS]
    assert first == second
    assert job.model_dump() == before


def test_long_and_dotted_names_become_valid_kubernetes_names() -> None:
    job = make_job()
    job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"name": "team.a." + "x" * 200})})
    for build in ALL_BUILDERS:
        k8s_valid(build(job, OperatorSettings()))
    name = builders.build_job(job, OperatorSettings())["metadata"]["name"]
    assert len(name) <= naming.JOB_NAME_MAX and "." not in name
    svc = builders.build_service(job, OperatorSettings())["metadata"]["name"]
    assert len(svc) <= 63 and svc[0].isalpha()


RESULT = TrainerResult.model_validate(
    {
        "outcome": "Succeeded",
        "reason": "Published",
        "model": "tiny-demo-reverser",
        "base": "s3://kubetune-demo/base-models/tiny-llama-demo",
        "method": "lora",
        "version": {
            "name": "v1",
            "uri": "s3://kubetune-demo/models/tiny-demo-reverser/versions/v1/",
            "manifestDigest": "sha256:" + "a" * 64,
        },
        "inputsDigest": "sha256:" + "b" * 64,
        "metrics": {"eval_loss": 1.2345, "bleu": 12.0},
        "gates": {"passed": True, "summary": "passed", "results": []},
        "quantized": ["int8"],
    }
)


def test_model_version_record_is_valid_unowned_and_named_model_version() -> None:
    record = builders.build_model_version(make_job(), RESULT)
    assert validate_crd(record, "ModelVersion") == []
    assert record["metadata"]["name"] == "tiny-demo-reverser-v1"
    assert "ownerReferences" not in record["metadata"]
    assert record["metadata"]["labels"]["kubetune.io/model"] == "tiny-demo-reverser"
    assert record["metadata"]["labels"]["kubetune.io/finetunejob"] == "quickstart"
    assert record["spec"]["keyMetric"] == "eval_loss=1.234"
    assert record["spec"]["source"] == {
        "name": "quickstart",
        "namespace": "team-a",
        "uid": "uid-1234",
        "generation": 3,
    }


def test_model_version_needs_a_version() -> None:
    failed = TrainerResult(outcome="Failed", reason="InvalidData", message="bad")
    with pytest.raises(ValueError, match="no version"):
        builders.build_model_version(make_job(), failed)


def test_model_names_with_underscore_do_not_collide() -> None:
    assert naming.model_version_name("a-b", "v1") == "a-b-v1"
    underscored = naming.model_version_name("a_b", "v1")
    assert underscored != "a-b-v1" and underscored.startswith("a-b-v1-")


def test_job_dict_is_json_serialisable_and_deterministic() -> None:
    a = builders.build_job(make_job(), OperatorSettings())
    b = builders.build_job(copy.deepcopy(make_job()), OperatorSettings())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_children_order_and_compat_suspend_creates_no_job() -> None:
    from kubetune_operator.reconcile import desired_children

    kinds = [o["kind"] for o in desired_children(make_job(), OperatorSettings())]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Service", "ConfigMap", "Job"]
    # >= 1.29: a suspended Job is created (suspend: true); v1.20 cannot, so none is created yet.
    suspended = make_job(**{"runPolicy.suspend": True})
    assert "Job" in [o["kind"] for o in desired_children(suspended, OperatorSettings())]
    assert "Job" not in [
        o["kind"] for o in desired_children(suspended, OperatorSettings(compat_k8s_1_20=True))
    ]


def test_the_node_cache_is_mounted_and_named_to_the_trainer_only_when_set() -> None:
    def pod(settings: OperatorSettings) -> dict[str, Any]:
        return builders.build_job(make_job(), settings)["spec"]["template"]["spec"]

    plain = pod(OperatorSettings())
    assert "node-cache" not in {v["name"] for v in plain["volumes"]}
    assert not {"KUBETUNE_CACHE_DIR", "KUBETUNE_CACHE_MAX_BYTES"} & {
        e["name"] for e in plain["containers"][0]["env"]
    }

    for settings, volume in (
        (
            OperatorSettings(trainer_cache_host_path="/mnt/kubetune-cache", trainer_cache_max_bytes=10**12),
            {"hostPath": {"path": "/mnt/kubetune-cache", "type": "DirectoryOrCreate"}},
        ),
        (
            OperatorSettings(trainer_cache_pvc="shared-cache"),
            {"persistentVolumeClaim": {"claimName": "shared-cache"}},
        ),
    ):
        spec = pod(settings)
        (vol,) = [v for v in spec["volumes"] if v["name"] == "node-cache"]
        assert {k: v for k, v in vol.items() if k != "name"} == volume
        container = spec["containers"][0]
        assert {"name": "node-cache", "mountPath": builders.CACHE_DIR} in container["volumeMounts"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["KUBETUNE_CACHE_DIR"] == builders.CACHE_DIR
        assert env["KUBETUNE_CACHE_MAX_BYTES"] == str(settings.trainer_cache_max_bytes)


def test_the_node_cache_settings_refuse_a_relative_path_and_two_volumes() -> None:
    with pytest.raises(SettingsError, match="TRAINER_CACHE_HOST_PATH"):
        OperatorSettings.from_env({"KUBETUNE_OPERATOR_TRAINER_CACHE_HOST_PATH": "cache"})
    with pytest.raises(SettingsError, match="TRAINER_CACHE_PVC"):
        OperatorSettings.from_env(
            {"KUBETUNE_OPERATOR_TRAINER_CACHE_HOST_PATH": "/c", "KUBETUNE_OPERATOR_TRAINER_CACHE_PVC": "p"}
        )
