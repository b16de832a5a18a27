"""kopf handlers: thin, each one delegating to the builders, reducers and :mod:`reconcile`.

Nothing registers at import time: :func:`register` attaches the handlers to a registry with the
settings injected (kopf's memo carries them to the handlers).

Error model (kopf docs, errors.rst / idempotence.rst): a spec that can never work ->
``Invalid`` condition, a Warning Event and ``kopf.PermanentError`` (no retries until the spec
changes); "not ready yet" -> ``kopf.TemporaryError(delay=...)``; anything else is retried with
kopf's backoff. Handlers never sleep, and run at least once, so every create is idempotent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, NoReturn

import kopf

from kubetune_api import names
from kubetune_operator import builders, reconcile, status, sweeps
from kubetune_operator.reconcile import Context
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.validation import SpecInvalid, validate_job

FTJ = (names.API_GROUP, names.API_VERSION, reconcile.PLURAL)
FTS = (names.API_GROUP, names.API_VERSION, reconcile.SWEEP_PLURAL)
MANAGED = {"app.kubernetes.io/managed-by": "kubetune-operator"}
#: The same, as the label selector sent with the children's list/watch requests.
CHILD_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED.items())


def _ctx(memo: Any) -> Context:
    ctx = memo.get("ctx") if isinstance(memo, Mapping) else getattr(memo, "ctx", None)
    if not isinstance(ctx, Context):
        raise kopf.TemporaryError("operator context not initialised yet", delay=5)
    return ctx


# --- FineTuneJob: create / resume / update ----------------------------------------------------


#: Back-off after the API server refused a child: 5 s, doubling, at most 5 minutes.
REJECTED_RETRY_SECONDS = 5.0
REJECTED_RETRY_MAX_SECONDS = 300.0


def rejected_retry_delay(retry: int) -> float:
    """Seconds before retrying a refused create (``retry`` = kopf's count of earlier retries)."""
    return float(min(REJECTED_RETRY_SECONDS * 2 ** min(retry, 16), REJECTED_RETRY_MAX_SECONDS))


def _report_rejection(
    ctx: Context,
    body: kopf.Body,
    current: Mapping[str, Any],
    pending: Mapping[str, Any],
    obs: status.Observed,
    exc: reconcile.ChildRejected,
    retry: int,
) -> NoReturn:
    """Stalled with the API server's words and a Warning Event (once per reason and message), then a
    retry with back-off: the cause (a quota, a webhook, a spec field) may be removed at any time.
    ``pending``: the status the reconcile decided and had not written yet (written with it)."""
    meta = body["metadata"]
    message = f"the API server refused to create {exc.kind} {exc.name} (HTTP {exc.status}): {exc.message}"
    patch = {**pending, **status.rejected_status(obs, exc.reason, message)}
    reconcile.patch_status(ctx.api, meta["namespace"], meta["name"], patch)
    if (current.get("reason"), current.get("message")) != (exc.reason, message):
        reconcile.post_event(body, "Warning", exc.reason, message)
    ctx.metrics.observe_phase(meta["namespace"], meta["name"], "Pending")
    ctx.metrics.observe_status(meta["namespace"], meta["name"], current, status.merged(current, patch))
    raise kopf.TemporaryError(message, delay=rejected_retry_delay(retry))


def reconcile_finetunejob(
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    retry: int = 0,
    **_: Any,
) -> None:
    """Validate, create the current attempt's children, retire older attempts, refresh status."""
    ctx = _ctx(memo)
    with ctx.metrics.timed("reconcile"):
        meta = body["metadata"]
        current = dict(body.get("status") or {})
        try:
            job = validate_job(body, ctx.settings)
        except SpecInvalid as exc:
            obs = status.Observed(
                generation=meta.get("generation") or 1,
                attempt="",
                job=None,
                pods=[],
                status=current,
                now=reconcile.utc_now(),
            )
            patch = status.invalid_status(exc.problems, obs)
            reconcile.patch_status(ctx.api, meta["namespace"], meta["name"], patch)
            if current.get("jobName") and current.get("phase") not in status.TERMINAL_PHASES:
                # The spec asks for nothing that can run: the previous generation's running attempt
                # is superseded (status.history says so) and goes, as it would for a valid edit.
                removed = reconcile.remove_attempts(
                    ctx.api, meta["namespace"], meta["name"], meta.get("uid"), keep=None
                )
                if removed:
                    reconcile.post_event(
                        body,
                        "Normal",
                        "AttemptReplaced",
                        f"generation {obs.generation} is invalid: removed {', '.join(removed)}",
                    )
            if (current.get("phase"), current.get("reason"), current.get("message")) != (
                "Failed",
                "InvalidSpec",
                patch["message"],
            ):
                reconcile.post_event(body, "Warning", "InvalidSpec", patch["message"])
            ctx.metrics.observe_phase(meta["namespace"], meta["name"], "Failed")
            ctx.metrics.observe_status(
                meta["namespace"], meta["name"], current, status.merged(current, patch)
            )
            raise kopf.PermanentError(f"invalid spec: {exc}") from None

        generation = meta.get("generation") or 1
        plan = builders.plan_attempt(job, current)
        attempt = plan.attempt
        obs = status.Observed(
            generation=generation,
            attempt=attempt.name,
            job=None,
            pods=[],
            status=current,
            now=reconcile.utc_now(),
        )
        # What this reconcile decides about the status is written once, with what the children show
        # (reconcile.refresh_status), or before raising if creating them fails. Attempt names are
        # deterministic (the generation), so a crash before that write resumes the same attempt.
        pending: dict[str, Any] = {}
        if plan.action == "new":
            # A new generation (or the first, or the first valid one): start its attempt.
            pending = status.new_attempt_status(obs, attempt.fingerprint)
        elif plan.action != "keep":
            # adopt: a new generation that only flipped runPolicy.suspend; rebaseline: the same
            # generation read differently after an upgrade. Either way the attempt goes on as it is.
            if plan.action == "rebaseline":
                logger.info(
                    "spec of generation %s reads differently (upgrade?): keeping attempt %s",
                    generation,
                    attempt.name,
                )
            pending = {"observedGeneration": generation, "attemptFingerprint": attempt.fingerprint}
            if not current.get("attemptGeneration"):
                pending["attemptGeneration"] = attempt.generation
        before = current
        current = status.merged(current, pending)
        obs = dataclasses.replace(obs, status=current)

        finished = current.get("phase") in status.TERMINAL_PHASES
        created = reconcile.Created()
        try:
            # The old attempt goes, its record stays (status.history, ModelVersions). Generation 1
            # has no older attempt to look for: attempt names carry the generation that started them.
            if (plan.action == "new" or not finished) and generation > 1:
                removed = reconcile.remove_stale_attempts(ctx.api, job, attempt.name)
                if removed:
                    logger.info("replaced attempt: removed %s", ", ".join(removed))
                    reconcile.post_event(
                        body,
                        "Normal",
                        "AttemptReplaced",
                        f"generation {generation}: removed {', '.join(removed)}",
                    )
            if not finished:
                created = reconcile.ensure_children(ctx.api, job, ctx.settings, attempt)
                if created.names:
                    logger.info("created %s", ", ".join(created.names))
                # A Job created just now is already as runPolicy asks (builders.job_suspended_at_creation).
                if created.job is None and reconcile.apply_suspend(ctx.api, job, attempt.name, ctx.settings):
                    verb = "suspended" if job.spec.run_policy.suspend else "resumed"
                    reconcile.post_event(body, "Normal", verb.capitalize(), f"Job {attempt.name} {verb}")
        except reconcile.ChildRejected as exc:
            _report_rejection(ctx, body, before, pending, obs, exc, retry)
        except Exception:
            if pending:
                reconcile.patch_status(ctx.api, meta["namespace"], meta["name"], pending)
            raise
        fresh = dict(body)
        fresh["status"] = before
        reconcile.refresh_status(ctx, fresh, pending=pending, created=created)


# --- level-based mirroring --------------------------------------------------------------------


def needs_resync(body: kopf.Body, **_: Any) -> bool:
    """False for a FineTuneJob whose current generation has finished: nothing of it changes any more
    (a spec change raises the generation and the update handler runs anyway)."""
    meta, st = body.get("metadata") or {}, body.get("status") or {}
    done = st.get("phase") in status.TERMINAL_PHASES and st.get("observedGeneration") == meta.get(
        "generation"
    )
    return not done


def resync_finetunejob(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Periodic status refresh: correct even if a child event was missed."""
    ctx = _ctx(memo)
    with ctx.metrics.timed("resync"):
        reconcile.refresh_status(ctx, body)


def child_changed(
    body: kopf.Body, memo: kopf.Memo, type: str | None, resource: kopf.Resource | None = None, **_: Any
) -> None:
    """A Job or pod of ours changed: refresh its FineTuneJob's status now rather than at the next resync.

    ADDED events are skipped: a Job appears because the reconcile handler just created it (and
    refreshed the status right after), and a new pod is Pending, which its next change (scheduled,
    running, unschedulable) reports. After an operator restart kopf lists existing objects with no
    event type, so those are still refreshed. In a burst of 200 jobs this halves the refreshes.
    """
    if type == "ADDED":
        return
    ctx = _ctx(memo)
    meta = body.get("metadata", {})
    name = (meta.get("annotations") or {}).get("kubetune.io/finetunejob-name")
    if not name:
        return
    with ctx.metrics.timed("child"):
        # The FineTuneJob is read fresh (the watch's copy may not have our last status write yet).
        ftj = reconcile.read_finetunejob(ctx.api, meta["namespace"], name)
        if ftj is not None:
            # A Job's event carries the Job as it is now: no need to read it again.
            seen = dict(body) if resource is not None and resource.plural == "jobs" else None
            reconcile.refresh_status(ctx, ftj, seen_job=seen)


def finetunejob_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Children are garbage-collected through ownerReferences; ModelVersions are kept. Forget metrics."""
    ctx = _ctx(memo)
    meta = body["metadata"]
    ctx.metrics.observe_phase(meta["namespace"], meta["name"], None)


# --- FineTuneSweep ----------------------------------------------------------------------------


def reconcile_sweep(body: kopf.Body, memo: kopf.Memo, retry: int = 0, **_: Any) -> None:
    """One step of the sweep: record finished and pruned trials, start new ones, then the winner."""
    ctx = _ctx(memo)
    with ctx.metrics.timed("sweep"):
        _step_sweep(ctx, body, retry)


def _step_sweep(ctx: Context, body: Mapping[str, Any], retry: int) -> None:
    meta = body["metadata"]
    current = dict(body.get("status") or {})
    try:
        plan = reconcile.reconcile_sweep(ctx, body)
    except SpecInvalid as exc:
        patch = sweeps.invalid_status(str(exc), meta.get("generation") or 1, current, reconcile.utc_now())
        reconcile.patch_status(ctx.api, meta["namespace"], meta["name"], patch, plural=reconcile.SWEEP_PLURAL)
        # Nothing runs for an invalid spec: trials still running from before the edit are stopped.
        stopped = reconcile.stop_sweep_children(ctx, meta["namespace"], meta["name"])
        if (current.get("reason"), current.get("message")) != ("InvalidSpec", patch["message"]):
            note = f" (stopped {', '.join(stopped)})" if stopped else ""
            reconcile.post_event(body, "Warning", "InvalidSpec", patch["message"] + note)
        raise kopf.PermanentError(f"invalid sweep: {exc}") from None
    except reconcile.ChildRejected as exc:
        message = f"the API server refused to create {exc.kind} {exc.name} (HTTP {exc.status}): {exc.message}"
        reconcile.post_event(body, "Warning", exc.reason, message)
        raise kopf.TemporaryError(message, delay=rejected_retry_delay(retry)) from None
    if plan.create or plan.delete:
        logging.getLogger(__name__).info(
            "sweep %s/%s: created %s; deleted %s",
            meta["namespace"],
            meta["name"],
            ", ".join(c["metadata"]["name"] for c in plan.create) or "nothing",
            ", ".join(plan.delete) or "nothing",
        )


def sweep_needs_resync(body: kopf.Body, **_: Any) -> bool:
    """False for a sweep whose current generation has finished (published, or failed)."""
    meta, st = body.get("metadata") or {}, body.get("status") or {}
    return not (
        st.get("phase") in ("Succeeded", "Failed") and st.get("observedGeneration") == meta.get("generation")
    )


def sweep_child_changed(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """A trial (or the winner) changed — a report, a phase: step its sweep now, not at the resync."""
    if type == "DELETED":
        return
    meta = body.get("metadata") or {}
    sweep = (meta.get("annotations") or {}).get(names.ANNOTATION_SWEEP)
    if not sweep:
        return
    ctx = _ctx(memo)
    fresh = reconcile.read_finetunejob(ctx.api, meta["namespace"], sweep, plural=reconcile.SWEEP_PLURAL)
    if fresh is None or not sweep_needs_resync(fresh):  # type: ignore[arg-type]
        return
    # Refusals are reported on the sweep (status, Events); its own handlers retry them.
    with ctx.metrics.timed("sweep"), contextlib.suppress(kopf.PermanentError, kopf.TemporaryError):
        _step_sweep(ctx, fresh, 0)


# --- start-up ---------------------------------------------------------------------------------


def make_startup(ours: OperatorSettings, ctx_factory: Any) -> Any:
    """The startup handler: configure kopf on purpose, build the context."""

    def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Our own API group for kopf's marks, so nothing of ours is named after another project.
        settings.persistence.finalizer = f"{names.API_GROUP}/finalizer"
        # Annotations, not status.kopf: the status schema is ours (generated) and prunes unknown keys.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=names.API_GROUP, key="last-handled-configuration"
        )
        # Leader election between replicas: only the highest-priority operator acts; refuse to run
        # unpeered when peering is expected, because two active replicas would both create children.
        settings.peering.name = ours.peering_name
        settings.peering.priority = ours.priority
        settings.peering.standalone = ours.standalone
        settings.peering.mandatory = not ours.standalone
        # Server-side label selectors on the children's watches: in cluster-wide mode an unfiltered
        # pod watch would stream every pod of the cluster through the operator. The handlers'
        # labels= filters alone are client-side.
        for child in (("batch", "v1", "jobs"), ("v1", "pods")):
            settings.watching.label_selectors[child] = CHILD_SELECTOR
        # Watches end server-side, then client-side: a silently dropped connection cannot stall us.
        settings.watching.server_timeout = ours.watch_server_timeout
        settings.watching.client_timeout = ours.watch_client_timeout
        settings.networking.request_timeout = ours.request_timeout
        # Our Events say what happened; kopf's per-handler "succeeded" Events would only add noise.
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "kubetune-operator"
        # Sync handlers do blocking API calls in this pool; bounded so a burst cannot exhaust memory.
        settings.execution.max_workers = ours.max_workers
        ctx = ctx_factory()
        memo["ctx"] = ctx
        if ours.metrics_port is not None:
            ctx.metrics.serve(ours.metrics_port, ours.metrics_address)

    return startup


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings, ctx_factory: Any) -> None:
    """Attach every handler to ``registry``. ``ctx_factory()`` builds the :class:`Context` at start-up."""
    kopf.on.startup(registry=registry)(make_startup(settings, ctx_factory))
    kopf.on.login(registry=registry)(kopf.login_via_client)
    for decorator in (kopf.on.create, kopf.on.resume, kopf.on.update):
        decorator(*FTJ, registry=registry, id="reconcile")(reconcile_finetunejob)
    # optional=True: this handler adds no finalizer (the resync timer's does: docs/operator.md).
    kopf.on.delete(*FTJ, registry=registry, optional=True, id="forget")(finetunejob_deleted)
    # initial_delay: a new object is reconciled by its create handler; an immediate timer run would
    # only repeat that work during a burst of creations.
    kopf.timer(
        *FTJ,
        registry=registry,
        interval=settings.resync_seconds,
        initial_delay=settings.resync_seconds,
        when=needs_resync,
        id="resync",
    )(resync_finetunejob)
    for decorator in (kopf.on.create, kopf.on.resume, kopf.on.update):
        decorator(*FTS, registry=registry, id="sweep")(reconcile_sweep)
    kopf.timer(
        *FTS,
        registry=registry,
        interval=settings.resync_seconds,
        initial_delay=settings.resync_seconds,
        when=sweep_needs_resync,
        id="sweep-resync",
    )(reconcile_sweep)
    kopf.on.event(
        *FTJ, labels={names.LABEL_SWEEP: kopf.PRESENT}, registry=registry, id="sweep-child-changed"
    )(sweep_child_changed)
    kopf.on.event("batch", "v1", "jobs", labels=MANAGED, registry=registry, id="job-changed")(child_changed)
    kopf.on.event("v1", "pods", labels=MANAGED, registry=registry, id="pod-changed")(child_changed)
