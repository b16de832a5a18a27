"""The I/O half of the operator: send what the builders render, read what the reducers need.

Sync ``kubernetes`` client calls, run in kopf's thread pool (the handlers are sync functions).
Every create is idempotent (deterministic names; 409 means it is already there, after checking it
is ours). The status is written with JSON merge patches of the operator's own fields, so the
trainer's ``status.progress`` is never clobbered.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf

from kubetune_api import names
from kubetune_api.models import FineTuneJob
from kubetune_operator import builders, naming, status, sweeps
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validation import SpecInvalid, validate_job, validate_sweep

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)

PLURAL = "finetunejobs"
MV_PLURAL = "modelversions"
#: Delay before retrying when a child name is taken by an object this FineTuneJob does not own.
CONFLICT_RETRY_SECONDS = 30


def utc_now() -> str:
    """RFC 3339 UTC timestamp, second precision (what Kubernetes stores)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Context:
    """What every handler needs: settings, an API client, metrics. Kept in kopf's memo."""

    settings: OperatorSettings
    api: ApiClient
    metrics: OperatorMetrics


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _status_of(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


# --- creating children ------------------------------------------------------------------------


def child_creators(api: ApiClient) -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    """kind -> (create(namespace, body), read(name, namespace)) for every child kind."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    batch = client.BatchV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    return {
        "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map),
        "Service": (core.create_namespaced_service, core.read_namespaced_service),
        "ServiceAccount": (core.create_namespaced_service_account, core.read_namespaced_service_account),
        "Role": (rbac.create_namespaced_role, rbac.read_namespaced_role),
        "RoleBinding": (rbac.create_namespaced_role_binding, rbac.read_namespaced_role_binding),
        "Job": (batch.create_namespaced_job, batch.read_namespaced_job),
    }


class ChildRejected(RuntimeError):
    """The API server refused to create a child (400/403/422): quota, admission, an invalid field.

    ``status`` is the HTTP status, ``message`` the API server's own words, ``kind``/``name`` the child.
    """

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        self.kind, self.name, self.status, self.message = kind, name, status, message
        super().__init__(f"{kind} {name}: {message}")

    @property
    def reason(self) -> str:
        """QuotaExceeded, Forbidden or ChildRejected (the CamelCase reason of the Stalled condition)."""
        if self.status == 403 and "exceeded quota" in self.message:
            return "QuotaExceeded"
        return "Forbidden" if self.status == 403 else "ChildRejected"


#: HTTP statuses that mean "the server will not create this as asked", not "try again now".
_REJECTED = frozenset({400, 403, 422})


def _server_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if not isinstance(body, str | bytes):
        return str(exc)
    try:
        return str(json.loads(body).get("message") or body)
    except (ValueError, AttributeError):
        return str(body)


def create_owned(api: ApiClient, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """Create ``obj``; the created object as the API server returned it (its JSON form), or None if
    it already existed and is owned by the same FineTuneJob.

    Raises ``kopf.TemporaryError`` when the name is taken by an object with another owner (for
    example one still being garbage-collected after a FineTuneJob of the same name was deleted).
    """
    kind = obj["kind"]
    meta = obj["metadata"]
    create, read = child_creators(api)[kind]
    try:
        # Raw JSON: the caller reads the created Job in the API's own form (no read-back needed).
        response = create(meta["namespace"], obj, _preload_content=False)
        return dict(json.loads(response.data))
    except _api_exception() as exc:
        code = _status_of(exc)
        if code in _REJECTED:
            raise ChildRejected(kind, meta["name"], int(code or 0), _server_message(exc)) from None
        if code != 409:
            raise
    existing = read(meta["name"], meta["namespace"])
    owners = {ref.uid for ref in (existing.metadata.owner_references or [])}
    wanted = {ref["uid"] for ref in meta.get("ownerReferences", [])}
    if wanted and not (owners & wanted):
        raise kopf.TemporaryError(
            f"{kind} {meta['namespace']}/{meta['name']} exists and is not owned by this FineTuneJob; "
            "waiting for it to go away",
            delay=CONFLICT_RETRY_SECONDS,
        )
    return None


def desired_children(
    job: FineTuneJob, settings: OperatorSettings, attempt: builders.Attempt | None = None
) -> list[dict[str, Any]]:
    """Every child of ``attempt``, in creation order (the Job last: it needs the rest)."""
    attempt = attempt or builders.attempt_for(job)
    objects = [
        builders.build_service_account(job, settings),
        builders.build_role(job, settings),
        builders.build_role_binding(job, settings),
        builders.build_service(job, settings),
        builders.build_configmap(job, settings, attempt),
    ]
    # v1.20 cannot create a suspended Job: compat mode suspends by not creating it yet.
    if not (settings.compat_k8s_1_20 and builders.job_suspended_at_creation(job)):
        objects.append(builders.build_job(job, settings, attempt))
    return objects


@dataclass
class Created:
    """What :func:`ensure_children` created now: ``'<Kind>/<name>'`` of each, and the attempt's Job
    as the API server returned it when that was one of them (None: it existed, or is not made yet)."""

    names: list[str] = field(default_factory=list)
    job: dict[str, Any] | None = None


def ensure_children(
    api: ApiClient, job: FineTuneJob, settings: OperatorSettings, attempt: builders.Attempt
) -> Created:
    """Create what is missing.

    An existing child is never replaced or updated: what an attempt runs is fixed when its Job is
    created (an upgrade that renders it differently changes only Jobs created afterwards).
    """
    created = Created()
    for obj in desired_children(job, settings, attempt):
        made = create_owned(api, obj)
        if made is not None:
            created.names.append(f"{obj['kind']}/{obj['metadata']['name']}")
            if obj["kind"] == "Job":
                created.job = made
    return created


def remove_stale_attempts(api: ApiClient, job: FineTuneJob, attempt: str) -> list[str]:
    """Delete Jobs and RunConfig ConfigMaps of earlier attempts of this FineTuneJob.

    Background propagation: the Job's pods go with it. ModelVersions are never touched.
    """
    return remove_attempts(
        api, job.metadata.namespace or "default", job.metadata.name or "", job.metadata.uid, keep=attempt
    )


def remove_attempts(
    api: ApiClient, namespace: str, name: str, uid: str | None, *, keep: str | None
) -> list[str]:
    """Delete the Jobs and RunConfig ConfigMaps owned by FineTuneJob ``uid``, except attempt ``keep``
    (None: all of them, e.g. when the current generation is invalid); '<Kind>/<name>' of each."""
    from kubernetes import client

    selector = f"{naming.LABEL_FINETUNEJOB}={naming.label_value(name)}"
    batch = client.BatchV1Api(api)
    core = client.CoreV1Api(api)
    removed = []
    body = client.V1DeleteOptions(propagation_policy="Background")
    for old in batch.list_namespaced_job(namespace, label_selector=selector).items:
        if old.metadata.name != keep and _owned_by(old, uid):
            _delete_quietly(batch.delete_namespaced_job, old.metadata.name, namespace, body)
            removed.append(f"Job/{old.metadata.name}")
    kept_cm = naming.config_map_name(keep) if keep else None
    for cm in core.list_namespaced_config_map(namespace, label_selector=selector).items:
        if cm.metadata.name != kept_cm and _owned_by(cm, uid):
            _delete_quietly(core.delete_namespaced_config_map, cm.metadata.name, namespace, body)
            removed.append(f"ConfigMap/{cm.metadata.name}")
    return removed


def _owned_by(obj: Any, uid: str | None) -> bool:
    return uid is not None and any(ref.uid == uid for ref in (obj.metadata.owner_references or []))


def _delete_quietly(delete: Callable[..., Any], name: str, namespace: str, body: Any) -> None:
    try:
        delete(name, namespace, body=body)
    except _api_exception() as exc:
        if _status_of(exc) != 404:
            raise


def apply_suspend(api: ApiClient, job: FineTuneJob, attempt: str, settings: OperatorSettings) -> bool:
    """Make the running attempt's Job follow ``spec.runPolicy.suspend``; True if it was changed.

    With a Kueue queue, Kueue owns the flag while the user does not ask to suspend: resuming
    means handing the Job back to Kueue (which un-suspends it on admission), so only
    ``suspend: true`` is written then.
    """
    from kubernetes import client

    if settings.compat_k8s_1_20:
        return False
    batch = client.BatchV1Api(api)
    namespace = job.metadata.namespace or "default"
    try:
        current = batch.read_namespaced_job(attempt, namespace)
    except _api_exception() as exc:
        if _status_of(exc) == 404:
            return False
        raise
    want = job.spec.run_policy.suspend
    if job.spec.run_policy.queue_name and not want:
        return False
    if bool(current.spec.suspend) == want:
        return False
    batch.patch_namespaced_job(attempt, namespace, {"spec": {"suspend": want}})
    return True


# --- observing and writing status -------------------------------------------------------------


def read_finetunejob(
    api: ApiClient, namespace: str, name: str, plural: str = PLURAL
) -> dict[str, Any] | None:
    """The FineTuneJob (or, with ``plural``, another of our resources) as a plain dict, or None when
    it is gone."""
    from kubernetes import client

    try:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            names.API_GROUP, names.API_VERSION, namespace, plural, name
        )
    except _api_exception() as exc:
        if _status_of(exc) == 404:
            return None
        raise
    return dict(obj)


def observe(
    api: ApiClient,
    job: FineTuneJob,
    current_status: Mapping[str, Any],
    now: str,
    created_job: Mapping[str, Any] | None = None,
    seen_job: Mapping[str, Any] | None = None,
) -> status.Observed:
    """Read the current attempt's Job and pods (the attempt ``status.jobName`` names) into :class:`status.Observed`.

    ``created_job``: the attempt's Job as its create call returned it a moment ago. Then nothing is
    read: the Job is that object, and a Job this new has no pods and no Events yet (the Job
    controller acts on it after the create returned; its pods' and the Job's next changes arrive as
    events, which refresh the status again).

    ``seen_job``: a Job as a watch event delivered it just now; when it is the attempt's Job it is
    not read again (its pods still are).
    """
    from kubernetes import client

    attempt = builders.attempt_for(job, current_status)
    namespace = job.metadata.namespace or "default"
    if created_job is not None:
        return _observed(job, attempt.name, current_status, now, dict(created_job), [], [])
    # Raw JSON (_preload_content=False): the reducers read the API's own JSON form, and building
    # client model objects only to serialise them back was ~40% of a status refresh's CPU.
    job_obj: dict[str, Any] | None
    if seen_job is not None and (seen_job.get("metadata") or {}).get("name") == attempt.name:
        job_obj = dict(seen_job)
    else:
        try:
            response = client.BatchV1Api(api).read_namespaced_job(
                attempt.name, namespace, _preload_content=False
            )
            job_obj = json.loads(response.data)
        except _api_exception() as exc:
            if _status_of(exc) != 404:
                raise
            job_obj = None
    pods = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"{naming.LABEL_ATTEMPT}={attempt.name}", _preload_content=False
    )
    pod_items = list(json.loads(pods.data).get("items") or [])
    job_events: list[dict[str, Any]] = []
    if job_obj is not None and not pod_items and not status.job_finished(job_obj):
        # No pods and not finished: the Job controller may be failing to create them (quota,
        # admission). It says so only in Events on the Job.
        events = client.CoreV1Api(api).list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind=Job,involvedObject.name={attempt.name},reason=FailedCreate",
            _preload_content=False,
        )
        job_events = list(json.loads(events.data).get("items") or [])
    return _observed(job, attempt.name, current_status, now, job_obj, pod_items, job_events)


def _observed(
    job: FineTuneJob,
    attempt: str,
    current_status: Mapping[str, Any],
    now: str,
    job_obj: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    job_events: list[dict[str, Any]],
) -> status.Observed:
    return status.Observed(
        generation=job.metadata.generation or 1,
        attempt=attempt,
        job_events=job_events,
        job=job_obj,
        pods=pods,
        status=current_status,
        now=now,
        suspend_requested=job.spec.run_policy.suspend,
        queue_name=job.spec.run_policy.queue_name,
        nodes=job.spec.distributed.nodes,
    )


class StatusConflict(RuntimeError):
    """The FineTuneJob changed after the status being written was worked out from it (HTTP 409)."""


def patch_status(
    api: ApiClient,
    namespace: str,
    name: str,
    patch: Mapping[str, Any],
    resource_version: str | None = None,
    plural: str = PLURAL,
) -> None:
    """JSON merge patch of ``status`` (only the keys in ``patch``) through the /status subresource.

    With ``resource_version`` the write is conditional: the API server refuses it (409, raised as
    :class:`StatusConflict`) when the object changed since that version was read.
    """
    from kubernetes import client

    body: dict[str, Any] = {"status": dict(patch)}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            names.API_GROUP, names.API_VERSION, namespace, plural, name, body
        )
    except _api_exception() as exc:
        if resource_version and _status_of(exc) == 409:
            raise StatusConflict(f"{plural} {namespace}/{name} changed since {resource_version}") from None
        raise


def _changed(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    return any(current.get(k) != v for k, v in patch.items())


def ensure_model_version(api: ApiClient, record: Mapping[str, Any], *, alternate: bool = True) -> str | None:
    """Create the ModelVersion record; the name it was created under, None if it exists already.

    When the name is taken by a version of another registry (another URI), the record is created
    under :func:`naming.model_version_name` with the URI's hash instead. A record of the same name
    and URI with another manifest digest raises :class:`ModelVersionConflict` (a Warning Event).
    """
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    meta = record["metadata"]
    try:
        custom.create_namespaced_custom_object(
            names.API_GROUP, names.API_VERSION, meta["namespace"], MV_PLURAL, dict(record)
        )
        return str(meta["name"])
    except _api_exception() as exc:
        if _status_of(exc) != 409:
            raise
    existing = custom.get_namespaced_custom_object(
        names.API_GROUP, names.API_VERSION, meta["namespace"], MV_PLURAL, meta["name"]
    )
    spec = record["spec"]
    if existing.get("spec", {}).get("uri") != spec["uri"] and alternate:
        # Same model and version name, another registry (FineTuneJobs with different output URIs):
        # a record of its own, named with a hash of the version's URI, never the other one's.
        other = {
            **record,
            "metadata": {
                **meta,
                "name": naming.model_version_name(spec["model"], spec["version"], spec["uri"]),
            },
        }
        return ensure_model_version(api, other, alternate=False)
    if existing.get("spec", {}).get("manifestDigest") != record["spec"]["manifestDigest"]:
        raise ModelVersionConflict(
            f"ModelVersion {meta['name']} already records manifest {existing['spec'].get('manifestDigest')}, "
            f"not {record['spec']['manifestDigest']}"
        )
    return None


class ModelVersionConflict(RuntimeError):
    """A ModelVersion of that name exists and describes a different version."""


def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """An Event on the FineTuneJob (through kopf's poster, so it is rate-limited and never raises)."""
    # kopf only reads apiVersion/kind/metadata from it, so any FineTuneJob mapping will do.
    kopf.event(dict(body), type=type_, reason=reason, message=message[:1024])  # type: ignore[arg-type]


#: Conditional status writes tried per refresh before giving up (each refused one re-reads the object).
STATUS_WRITE_ATTEMPTS = 5


def refresh_status(
    ctx: Context,
    body: Mapping[str, Any],
    *,
    pending: Mapping[str, Any] | None = None,
    created: Created | None = None,
    seen_job: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Level-based status update of one FineTuneJob from its children; returns the patch written.

    Also creates the ModelVersion for a published version and posts an Event for each phase or
    reason change. A spec that fails validation is left alone (its Invalid status was written by
    the reconcile handler). Raises only for API errors.

    From the reconcile handler: ``pending`` is the status it decided (a new attempt, a re-recorded
    fingerprint) and has not written: it goes out in the same status patch as what the children show,
    one write per reconcile. ``created`` is what it created now: its Job is not read back, and the
    creation and the status it leads to are told in one Event (a Warning still gets its own).
    From a Job's watch event: ``seen_job`` is that Job as the event delivered it (not read again).

    Handlers run concurrently (a Job's event, a pod's, the reconcile handler), each from what it read:
    the write is conditional on ``body``'s resourceVersion. When another write came first the object
    is read again and the status worked out anew from it and the pods listed again, so an older
    picture never overwrites a newer one (a Succeeded job reported Pending again).
    """
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace"), meta.get("name")
    created_job = created.job if created else None
    recorded: str | None = None
    for attempt_no in range(STATUS_WRITE_ATTEMPTS):
        refreshed = _work_out_status(ctx, body, pending, created_job, seen_job)
        if refreshed is None:
            return {}
        before, current, patch, obs, job = refreshed
        # Before the status says Succeeded, so a failure here is retried rather than left behind.
        recorded = _record_model_version(ctx, job, body, obs, recorded)
        write = {**(pending or {}), **patch}
        if not _changed(before, write):
            break
        try:
            patch_status(ctx.api, namespace, name, write, resource_version=meta.get("resourceVersion"))
            break
        except StatusConflict:
            ctx.metrics.status_conflicts.inc()
            if attempt_no == STATUS_WRITE_ATTEMPTS - 1:
                raise
            fresh = read_finetunejob(ctx.api, namespace, name)
            if fresh is None:
                return {}
            # The pods are listed again; a Job seen in an event (or just created) is not read again:
            # when it is older than the one the other write saw, its newer event follows this one,
            # and a recorded outcome is never moved back by an older copy (status.verdict).
            body, meta = fresh, fresh.get("metadata", {})
    event = status.transition(current, patch) if _changed(current, patch) else None
    if created is not None and created.names:
        told = f"created {', '.join(created.names)}"
        if event is not None and event.type == "Normal":
            told, event = f"{told}; {event.message}", None
        post_event(body, "Normal", "Created", told)
    if event is not None:
        post_event(body, event.type, event.reason, event.message)
    ctx.metrics.observe_phase(namespace, name, patch.get("phase"))
    ctx.metrics.observe_status(namespace, name, current, status.merged(current, patch))
    return write


def _work_out_status(
    ctx: Context,
    body: Mapping[str, Any],
    pending: Mapping[str, Any] | None,
    created_job: Mapping[str, Any] | None,
    seen_job: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], status.Observed, FineTuneJob] | None:
    """(status as read, with ``pending`` applied, the reducers' patch, what was observed, the
    validated spec); None when the status is not this refresh's to write (a generation not acted
    on yet, an invalid spec)."""
    meta = body.get("metadata", {})
    before = dict(body.get("status") or {})
    current = status.merged(before, pending or {})
    if current.get("observedGeneration") != meta.get("generation"):
        # A generation the reconcile handler has not acted on yet: what the children show is about
        # an earlier generation and must not be reported as this one's outcome.
        return None
    try:
        job = validate_job(body, ctx.settings)
    except SpecInvalid:
        return None
    obs = observe(ctx.api, job, current, utc_now(), created_job=created_job, seen_job=seen_job)
    patch = status.reduce_status(obs)
    if patch.get("reason") == "ServiceAccountMissing":
        # Someone deleted the attempt's ServiceAccount (or its token): put back what is missing, as
        # the reconcile handler would; the Job controller's next pod creation then succeeds.
        try:
            restored = ensure_children(ctx.api, job, ctx.settings, builders.attempt_for(job, current)).names
        except ChildRejected as exc:
            restored = []
            post_event(body, "Warning", exc.reason, str(exc))
        if restored:
            post_event(body, "Normal", "Created", f"recreated {', '.join(restored)}")
    return before, current, patch, obs, job


def _record_model_version(
    ctx: Context, job: FineTuneJob, body: Mapping[str, Any], obs: status.Observed, recorded: str | None
) -> str | None:
    """Make sure the ModelVersion of the version the trainer reported exists (an Event when it was
    made now); returns that version's URI, or ``recorded`` when there is none or it was done."""
    result = status.trainer_result(obs.pods)
    if result is None or result.version is None or result.version.uri == recorded:
        return recorded
    record = builders.build_model_version(job, result)
    try:
        made = ensure_model_version(ctx.api, record)
        if made is not None:
            ctx.metrics.model_versions_created.inc()
            post_event(
                body, "Normal", "ModelVersionCreated", f"ModelVersion {made} records {result.version.uri}"
            )
    except ModelVersionConflict as exc:
        post_event(body, "Warning", "ModelVersionConflict", str(exc))
    return result.version.uri


# --- sweeps -----------------------------------------------------------------------------------

SWEEP_PLURAL = "finetunesweeps"


def sweep_children(api: ApiClient, namespace: str, sweep: str) -> dict[str, dict[str, Any]]:
    """The sweep's child FineTuneJobs (trials and winner) by name: one list by label."""
    from kubernetes import client

    listed = client.CustomObjectsApi(api).list_namespaced_custom_object(
        names.API_GROUP,
        names.API_VERSION,
        namespace,
        PLURAL,
        label_selector=f"{names.LABEL_SWEEP}={sweeps.sweep_label(sweep)}",
    )
    out = {}
    for item in listed.get("items", []):
        meta = item.get("metadata") or {}
        if (meta.get("annotations") or {}).get(names.ANNOTATION_SWEEP) == sweep:  # labels may be shortened
            out[str(meta["name"])] = dict(item)
    return out


def create_child_job(api: ApiClient, body: Mapping[str, Any]) -> bool:
    """Create a sweep's child FineTuneJob; False when it exists already (owned by the same sweep).

    Raises :class:`ChildRejected` when the API server refuses it (a quota, a webhook, the CRD's
    own rules) and ``kopf.TemporaryError`` when the name is taken by another owner's object."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    meta = body["metadata"]
    try:
        custom.create_namespaced_custom_object(
            names.API_GROUP, names.API_VERSION, meta["namespace"], PLURAL, dict(body)
        )
        return True
    except _api_exception() as exc:
        code = _status_of(exc)
        if code in _REJECTED:
            raise ChildRejected("FineTuneJob", meta["name"], int(code or 0), _server_message(exc)) from None
        if code != 409:
            raise
    existing = read_finetunejob(api, meta["namespace"], meta["name"]) or {}
    owners = {ref.get("uid") for ref in (existing.get("metadata") or {}).get("ownerReferences") or []}
    if meta["ownerReferences"][0]["uid"] not in owners:
        raise kopf.TemporaryError(
            f"FineTuneJob {meta['namespace']}/{meta['name']} exists and is not owned by this sweep; "
            "waiting for it to go away",
            delay=CONFLICT_RETRY_SECONDS,
        )
    return False


def delete_child_job(api: ApiClient, namespace: str, name: str) -> None:
    """Delete a child FineTuneJob (its Job and pods follow through ownerReferences)."""
    from kubernetes import client

    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            names.API_GROUP,
            names.API_VERSION,
            namespace,
            PLURAL,
            name,
            body={"propagationPolicy": "Background"},
        )
    except _api_exception() as exc:
        if _status_of(exc) != 404:
            raise


def reconcile_sweep(ctx: Context, body: Mapping[str, Any]) -> sweeps.SweepPlan:
    """One step of a sweep (:func:`sweeps.plan`): the status is written first (conditional on the
    sweep's resourceVersion; refused, everything is worked out again from a fresh read), then the
    trials it records are created and the pruned ones deleted. Raises :class:`SpecInvalid`."""
    meta = body.get("metadata", {})
    namespace, name = str(meta["namespace"]), str(meta["name"])
    plan = sweeps.SweepPlan(status={})
    for attempt_no in range(STATUS_WRITE_ATTEMPTS):
        sweep = validate_sweep(body, ctx.settings)
        current = dict(body.get("status") or {})
        plan = sweeps.plan(sweep, meta, current, sweep_children(ctx.api, namespace, name), utc_now())
        # A plan that creates or deletes writes the status even when it is unchanged: conditional on
        # the resourceVersion it was worked out from, so a step from an older read (another handler
        # pruned a trial meanwhile) is refused and worked out again instead of re-creating that trial.
        if not _changed(current, plan.status) and not (plan.create or plan.delete):
            break
        try:
            patch_status(
                ctx.api,
                namespace,
                name,
                plan.status,
                resource_version=meta.get("resourceVersion"),
                plural=SWEEP_PLURAL,
            )
            break
        except StatusConflict:
            ctx.metrics.status_conflicts.inc()
            if attempt_no == STATUS_WRITE_ATTEMPTS - 1:
                raise
            fresh = read_finetunejob(ctx.api, namespace, name, plural=SWEEP_PLURAL)
            if fresh is None:
                return sweeps.SweepPlan(status={})
            body, meta = fresh, fresh.get("metadata", {})
    # Deletes and Events first, then every create: one refused create (a quota) must not drop the
    # rest of a step whose status is already written; the first refusal is raised after them all.
    for child_name in plan.delete:
        delete_child_job(ctx.api, namespace, child_name)
    for type_, reason, message in plan.events:
        post_event(body, type_, reason, message)
    refused: ChildRejected | None = None
    for child in plan.create:
        try:
            create_child_job(ctx.api, child)
        except ChildRejected as exc:
            refused = refused or exc
    if refused is not None:
        raise refused
    return plan


def stop_sweep_children(ctx: Context, namespace: str, name: str) -> list[str]:
    """Delete the sweep's unfinished children (an invalid spec runs nothing); their names."""
    stopped = [
        child_name
        for child_name, child in sweep_children(ctx.api, namespace, name).items()
        if sweeps.unfinished(child)
    ]
    for child_name in stopped:
        delete_child_job(ctx.api, namespace, child_name)
    return stopped
