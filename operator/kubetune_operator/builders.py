"""Pure builders: a validated FineTuneJob (and the operator's settings) in, Kubernetes objects out.

No I/O, no clock, inputs never mutated: the same FineTuneJob always renders the same objects,
which is what makes the handlers' creates idempotent and the objects testable as plain data
(every rendered object is validated against the Kubernetes OpenAPI schemas in the unit tests).

Children are owned by the FineTuneJob (``ownerReferences`` with ``controller: true``), so deleting
it garbage-collects them; ModelVersions are deliberately not owned: the record of a published
version outlives the job that produced it.

By default the Job targets Kubernetes >= 1.29 (Indexed completion, ``suspend``,
``podFailurePolicy``). ``settings.compat_k8s_1_20`` renders what a v1.20 API server accepts: those
three fields are dropped, the single pod gets ``JOB_COMPLETION_INDEX=0`` and its hostname set
explicitly, and suspension is done by not creating the Job at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_api import names
from kubetune_api.models import FineTuneJob, ModelVersion, ModelVersionSpec, ObjectMeta, SourceJobRef
from kubetune_api.reports import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_GATES_FAILED, TrainerResult
from kubetune_api.runconfig import Reporting, resolve_run_config
from kubetune_operator import naming
from kubetune_operator.settings import OperatorSettings

CONTAINER_NAME = "trainer"
RUN_CONFIG_KEY = "run-config.json"
RUN_CONFIG_DIR = "/etc/kubetune"
RUN_CONFIG_PATH = f"{RUN_CONFIG_DIR}/{RUN_CONFIG_KEY}"
TERMINATION_LOG = "/dev/termination-log"
HOME_DIR = "/home/kubetune"
CACHE_DIR = "/var/cache/kubetune"  # the trainers' node cache, when the chart enables one (docs/cache.md)
#: Exit codes after which a retry cannot help (kubetune_api.reports): the Job fails at once.
FAIL_FAST_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_GATES_FAILED, EXIT_DIVERGED)
#: Reporting the trainer uses inside a cluster: status patches (rank 0) and the termination message.
IN_CLUSTER_REPORTING = Reporting(status_patch=True, termination_message_path=TERMINATION_LOG)


@dataclass(frozen=True)
class Attempt:
    """One attempt = the Job that trains one spec generation of a FineTuneJob.

    ``generation`` is the spec generation that started it; later generations that only flip
    ``runPolicy.suspend`` keep it. ``fingerprint`` is what the operator reads of the spec it trains.
    """

    name: str
    fingerprint: str
    generation: int


def spec_fingerprint(job: FineTuneJob) -> str:
    """The fingerprint of ``job``'s spec as this operator reads it (suspend left out)."""
    return naming.spec_fingerprint(job.spec.to_api())


def attempt_for(job: FineTuneJob, current: Mapping[str, Any] | None = None) -> Attempt:
    """The attempt recorded in ``current`` (the status), else the one the current generation starts.

    Deterministic: the same FineTuneJob and status always give the same Job name.
    """
    st = current or {}
    recorded = st.get("jobName")
    if recorded:
        return Attempt(
            name=str(recorded),
            fingerprint=str(st.get("attemptFingerprint") or spec_fingerprint(job)),
            generation=int(st.get("attemptGeneration") or st.get("observedGeneration") or 1),
        )
    generation = job.metadata.generation or 1
    return Attempt(
        name=naming.job_name(_name(job), generation),
        fingerprint=spec_fingerprint(job),
        generation=generation,
    )


@dataclass(frozen=True)
class AttemptPlan:
    """What reconciling the current generation means for the attempt.

    ``action``: ``keep`` (the recorded attempt is this generation's), ``adopt`` (a new generation
    that only changed ``runPolicy.suspend``: the attempt goes on), ``rebaseline`` (same generation,
    but the spec reads differently: a CRD or operator upgrade changed defaults; the attempt goes on
    and its fingerprint is re-recorded), ``new`` (start a new attempt for this generation).
    """

    action: str
    attempt: Attempt


def plan_attempt(job: FineTuneJob, current: Mapping[str, Any]) -> AttemptPlan:
    """Decide from the generation, never from the spec's content alone (see :class:`AttemptPlan`).

    Only a new ``metadata.generation`` can start a new attempt: an upgrade does not change it (the
    API server bumps it only when a write changes the spec), so defaults that a new CRD or operator
    adds never replace a running or finished Job.
    """
    generation = job.metadata.generation or 1
    fingerprint = spec_fingerprint(job)
    recorded = current.get("jobName")
    observed = current.get("observedGeneration")
    if recorded:
        attempt = attempt_for(job, current)
        if observed == generation:
            action = "keep" if current.get("attemptFingerprint") == fingerprint else "rebaseline"
            return AttemptPlan(action, Attempt(attempt.name, fingerprint, attempt.generation))
        if current.get("attemptFingerprint") == fingerprint:
            return AttemptPlan("adopt", attempt)
    return AttemptPlan("new", Attempt(naming.job_name(_name(job), generation), fingerprint, generation))


def _name(job: FineTuneJob) -> str:
    if not job.metadata.name:
        raise ValueError("metadata.name: a FineTuneJob from the API server always has a name")
    return job.metadata.name


def _namespace(job: FineTuneJob) -> str:
    return job.metadata.namespace or "default"


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """The controller ownerReference pointing at ``job`` (needs ``metadata.uid``)."""
    if not job.metadata.uid:
        raise ValueError("metadata.uid: children can only be owned by a FineTuneJob read from the API server")
    return {
        "apiVersion": names.GROUP_VERSION,
        "kind": "FineTuneJob",
        "name": _name(job),
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def common_labels(job: FineTuneJob, component: str) -> dict[str, str]:
    """Labels on every child: who manages it, which FineTuneJob and model it belongs to."""
    return {
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        naming.LABEL_COMPONENT: component,
        naming.LABEL_FINETUNEJOB: naming.label_value(_name(job)),
        naming.LABEL_MODEL: job.spec.model.name,
    }


def _metadata(job: FineTuneJob, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": _namespace(job),
        "labels": {**common_labels(job, component), **extra_labels},
        "annotations": {naming.ANNOTATION_FINETUNEJOB: _name(job)},
        "ownerReferences": [owner_reference(job)],
    }


# --- ConfigMap, Service, RBAC -----------------------------------------------------------------


def build_configmap(
    job: FineTuneJob, settings: OperatorSettings, attempt: Attempt | None = None
) -> dict[str, Any]:
    """The attempt's RunConfig as ``run-config.json``; immutable, one per attempt."""
    del settings  # same RunConfig whatever the installation: the trainer must not depend on it
    attempt = attempt or attempt_for(job)
    run_config = resolve_run_config(job, reporting=IN_CLUSTER_REPORTING)
    meta = _metadata(
        job, naming.config_map_name(attempt.name), "run-config", **{naming.LABEL_ATTEMPT: attempt.name}
    )
    meta["annotations"][naming.ANNOTATION_FINGERPRINT] = attempt.fingerprint
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        # Immutable: an attempt's configuration never changes; a new spec is a new attempt.
        "immutable": True,
        "data": {RUN_CONFIG_KEY: run_config.to_json()},
    }


def build_service(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Headless Service giving pod 0 the DNS name torchrun's c10d rendezvous connects to."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, naming.service_name(_name(job)), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "selector": {naming.LABEL_FINETUNEJOB: naming.label_value(_name(job))},
            # Workers must resolve pod 0 before it is Ready: rendezvous is how it gets ready.
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "c10d", "port": settings.rendezvous_port, "targetPort": settings.rendezvous_port}
            ],
        },
    }


def build_service_account(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer pods' identity (used only to patch the job's own status)."""
    del settings
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, naming.trainer_account_name(_name(job)), "trainer-identity"),
        "automountServiceAccountToken": False,
    }


def build_role(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """get/patch on this FineTuneJob's status and nothing else (resourceNames = the job)."""
    del settings
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, naming.trainer_account_name(_name(job)), "trainer-identity"),
        "rules": [
            {
                "apiGroups": [names.API_GROUP],
                "resources": ["finetunejobs/status"],
                "resourceNames": [_name(job)],
                "verbs": ["get", "patch"],
            }
        ],
    }


def build_role_binding(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """Binds :func:`build_role` to :func:`build_service_account`."""
    del settings
    account = naming.trainer_account_name(_name(job))
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, account, "trainer-identity"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": _namespace(job)}],
    }


# --- the Job ----------------------------------------------------------------------------------


def trainer_command(job: FineTuneJob, attempt: Attempt, settings: OperatorSettings) -> list[str]:
    """One process, or torchrun with c10d rendezvous on pod 0 through the headless Service.

    torchrun runs through ``settings.launcher_command`` (kubetune_trainer.launch), which exits with
    the failing worker's code instead of torchrun's 1, so podFailurePolicy's FailJob rule on the
    permanent exit codes matches for distributed jobs too.
    """
    dist = job.spec.distributed
    tail = ["--run-config", RUN_CONFIG_PATH]
    if dist.nodes == 1 and dist.gpus_per_node <= 1:
        return [*settings.trainer_command, *tail]
    endpoint = f"{attempt.name}-0.{naming.service_name(_name(job))}:{settings.rendezvous_port}"
    return [
        *settings.launcher_command,
        f"--nnodes={dist.nodes}",
        f"--nproc-per-node={max(dist.gpus_per_node, 1)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        # A preempted peer: the surviving pods restart their workers and re-rendezvous with its
        # replacement (resuming from the checkpoint) instead of failing; see kubetune_trainer.launch.
        f"--max-restarts={settings.torchrun_max_restarts}",
        # The FineTuneJob UID plus the attempt's generation: a replaced attempt never joins the old
        # rendezvous, and nothing an upgrade changes (defaults, fingerprints) moves it.
        f"--rdzv-id={job.metadata.uid}-g{attempt.generation}",
        "-m",
        settings.trainer_module,
        *tail,
    ]


def _resources(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    res = job.spec.resources
    amounts: dict[str, str] = {
        "cpu": res.cpu or settings.default_cpu,
        "memory": res.memory or settings.default_memory,
    }
    if settings.default_ephemeral_storage:
        amounts["ephemeral-storage"] = settings.default_ephemeral_storage
    if job.spec.distributed.gpus_per_node > 0:
        amounts[res.gpu_resource_name] = str(job.spec.distributed.gpus_per_node)
    # requests == limits: Guaranteed QoS, so a training pod is the last to be evicted under pressure.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _env(job: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    caches = f"{HOME_DIR}/.cache"
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_JOB_NAME", "value": _name(job)},
        {"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        # The root filesystem is read-only: every library that writes a cache is pointed at an emptyDir.
        {"name": "HOME", "value": HOME_DIR},
        {"name": "XDG_CACHE_HOME", "value": caches},
        {"name": "HF_HOME", "value": f"{caches}/huggingface"},
        {"name": "TORCH_HOME", "value": f"{caches}/torch"},
        {"name": "TRITON_CACHE_DIR", "value": f"{caches}/triton"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{caches}/torch_extensions"},
        {"name": "MPLCONFIGDIR", "value": f"{caches}/matplotlib"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The same paths as in the RunConfig, as environment: a runtime that relocates mounts (the
        # test suite's fake kubelet) rewrites these, and the trainer prefers them when set.
        {"name": "KUBETUNE_RUN_CONFIG", "value": RUN_CONFIG_PATH},
        {"name": "KUBETUNE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_LOG},
        # Scratch for inputs, checkpoints in flight and staging: the /tmp emptyDir.
        {"name": "KUBETUNE_WORKDIR", "value": "/tmp/kubetune"},
    ]
    if _cache_volume(settings) is not None:
        env += [
            {"name": "KUBETUNE_CACHE_DIR", "value": CACHE_DIR},
            {"name": "KUBETUNE_CACHE_MAX_BYTES", "value": str(settings.trainer_cache_max_bytes)},
        ]
    if settings.compat_k8s_1_20:
        # v1.20 has no Indexed Jobs, so nothing sets the index; compat mode allows one pod only.
        env.append({"name": "JOB_COMPLETION_INDEX", "value": "0"})
    taken = {e["name"] for e in env}
    env += [{"name": k, "value": v} for k, v in sorted(settings.extra_env.items()) if k not in taken]
    return env


def _cache_volume(settings: OperatorSettings) -> dict[str, Any] | None:
    """The node cache's volume (shared by the jobs on a node), or None when the chart sets none."""
    if settings.trainer_cache_pvc is not None:
        return {"name": "node-cache", "persistentVolumeClaim": {"claimName": settings.trainer_cache_pvc}}
    if settings.trainer_cache_host_path is not None:
        # DirectoryOrCreate: a fresh node gets the folder (root-owned; see docs/cache.md for its owner).
        return {
            "name": "node-cache",
            "hostPath": {"path": settings.trainer_cache_host_path, "type": "DirectoryOrCreate"},
        }
    return None


def _volumes(
    job: FineTuneJob, attempt: Attempt, settings: OperatorSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {
            "name": "run-config",
            "configMap": {"name": naming.config_map_name(attempt.name), "defaultMode": 0o444},
        },
        # NCCL and data-loader workers need far more shared memory than a container's 64 MiB default.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.spec.resources.shared_memory}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "run-config", "mountPath": RUN_CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": HOME_DIR},
    ]
    cache = _cache_volume(settings)
    if cache is not None:
        volumes.append(cache)
        mounts.append({"name": "node-cache", "mountPath": CACHE_DIR})
    return volumes, mounts


def job_suspended_at_creation(job: FineTuneJob) -> bool:
    """A Job starts suspended when the user asked so or Kueue admits it (it un-suspends on admission)."""
    return job.spec.run_policy.suspend or job.spec.run_policy.queue_name is not None


def build_job(job: FineTuneJob, settings: OperatorSettings, attempt: Attempt | None = None) -> dict[str, Any]:
    """The Indexed Job of the current attempt: one pod per node, restricted pod security."""
    spec = job.spec
    attempt = attempt or attempt_for(job)
    policy = spec.run_policy
    nodes = spec.distributed.nodes
    account = naming.trainer_account_name(_name(job))
    volumes, mounts = _volumes(job, attempt, settings)
    pod_labels = {
        **common_labels(job, "trainer"),
        naming.LABEL_ATTEMPT: attempt.name,
    }
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": trainer_command(job, attempt, settings),
        "env": _env(job, settings),
        "resources": _resources(job, settings),
        "volumeMounts": mounts,
        "ports": [{"name": "c10d", "containerPort": settings.rendezvous_port, "protocol": "TCP"}],
        # The trainer writes its TrainerResult here; on a crash the log tail stands in for it.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    secrets = [spec.storage.credentials_secret]
    if spec.tracking is not None and spec.tracking.mlflow is not None:
        secrets.append(spec.tracking.mlflow.credentials_secret)  # MLFLOW_TRACKING_TOKEN etc.
    if any(secrets):
        # Referenced, never read by the operator: a missing Secret shows up as the pod's
        # CreateContainerConfigError, which the status reducer turns into SecretNotFound.
        container["envFrom"] = [{"secretRef": {"name": name}} for name in dict.fromkeys(secrets) if name]
    pod_spec: dict[str, Any] = {
        # podFailurePolicy requires Never; restarts are new pods counted by backoffLimit.
        "restartPolicy": "Never",
        "serviceAccountName": account,
        # The trainer needs its token to patch the FineTuneJob status (and only that: see build_role).
        "automountServiceAccountToken": True,
        "subdomain": naming.service_name(_name(job)),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    res = spec.resources
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_api() for t in res.tolerations]
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if settings.compat_k8s_1_20:
        # Indexed Jobs name pod i "<job>-<i>"; v1.20 does not, and compat mode runs one pod only.
        pod_spec["hostname"] = f"{attempt.name}-0"

    job_labels = {**pod_labels}
    if policy.queue_name:
        job_labels[naming.LABEL_QUEUE] = policy.queue_name
    meta = _metadata(job, attempt.name, "trainer")
    meta["labels"] = job_labels
    meta["annotations"].update(
        {
            naming.ANNOTATION_FINGERPRINT: attempt.fingerprint,
            naming.ANNOTATION_GENERATION: str(attempt.generation),
        }
    )
    job_spec: dict[str, Any] = {
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": policy.backoff_limit,
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {naming.ANNOTATION_FINETUNEJOB: _name(job)},
            },
            "spec": pod_spec,
        },
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    if not settings.compat_k8s_1_20:
        job_spec["completionMode"] = "Indexed"
        job_spec["suspend"] = job_suspended_at_creation(job)
        job_spec["podFailurePolicy"] = {
            "rules": [
                {
                    # Bad input, failed gates, divergence: retrying cannot help, fail now.
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": list(FAIL_FAST_EXIT_CODES),
                    },
                },
                {
                    # Evictions, preemptions, node drains: not the trainer's fault, do not use up backoffLimit.
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


# --- ModelVersion -----------------------------------------------------------------------------


def build_model_version(job: FineTuneJob, result: TrainerResult) -> dict[str, Any]:
    """The catalogue record of the version ``result`` published. Not owned by the FineTuneJob.

    Raises ValueError when ``result`` names no version (nothing was published).
    """
    if result.version is None:
        raise ValueError("the trainer result names no version: nothing was published")
    model = result.model or job.spec.model.name
    key_metric = ""
    if "eval_loss" in result.metrics:
        key_metric = f"eval_loss={result.metrics['eval_loss']:.4g}"
    elif result.metrics:
        first = sorted(result.metrics)[0]
        key_metric = f"{first}={result.metrics[first]:.4g}"
    record = ModelVersion(
        metadata=ObjectMeta(
            name=naming.model_version_name(model, result.version.name),
            namespace=_namespace(job),
            labels={
                naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
                naming.LABEL_MODEL: model,
                naming.LABEL_FINETUNEJOB: naming.label_value(_name(job)),
                "kubetune.io/version": result.version.name,
            },
            annotations={naming.ANNOTATION_FINETUNEJOB: _name(job)},
        ),
        spec=ModelVersionSpec(
            model=model,
            version=result.version.name,
            uri=result.version.uri,
            manifest_digest=result.version.manifest_digest,
            inputs_digest=result.inputs_digest,
            base=result.base or job.spec.model.base.uri,
            parent=result.parent,
            method=result.method or job.spec.method.type,
            metrics=dict(result.metrics),
            key_metric=key_metric,
            gates=result.gates,
            quantized=list(result.quantized),
            source=SourceJobRef(
                name=_name(job),
                namespace=_namespace(job),
                uid=job.metadata.uid,
                generation=job.metadata.generation,
            ),
            created=result.created,
        ),
    )
    return record.to_api()
