"""Status reducers: the children's observed state plus the trainer's result in, a status patch out.

Level-based: the patch is computed from what exists *now* (the attempt's Job, its pods, their
termination messages), never from remembered events, so it is right after an operator restart.
Everything here is pure: no I/O, the clock comes in as ``now``, inputs are never mutated.

The patch holds only fields the operator owns. ``status.progress`` and (while running)
``status.stage`` belong to the trainer, which patches them itself; a JSON merge patch without
those keys leaves them as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune_api.reports import RESULT_LOG_PREFIX, TrainerResult
from kubetune_operator.builders import CONTAINER_NAME, FAIL_FAST_EXIT_CODES

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
#: Condition types the operator maintains; each is always present, True or False.
CONDITION_TYPES = ("Invalid", "Suspended", "Stalled", "Running", "Succeeded", "Failed")
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

OOM_HINT = (
    "the trainer ran out of memory (OOMKilled): raise spec.resources.memory, or lower "
    "spec.training.batchSize or maxSeqLength, or enable spec.training.gradientCheckpointing"
)
#: Reasons of a Stalled condition: each is posted as a Warning Event.
STALLED_REASONS = frozenset(
    {
        "ImagePullBackOff",
        "SecretNotFound",
        "Unschedulable",
        "CreateContainerConfigError",
        "QuotaExceeded",
        "PodCreationFailed",
        "ChildRejected",
        "Forbidden",
        "ServiceAccountMissing",
    }
)
#: Reasons the reconcile handler records when the API server refuses a child.
REJECTION_REASONS = frozenset({"ChildRejected", "Forbidden", "QuotaExceeded"})
_IMAGE_PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})


@dataclass(frozen=True)
class Observed:
    """What the operator saw of one FineTuneJob and the current attempt's children."""

    generation: int
    attempt: str
    job: Mapping[str, Any] | None
    pods: Sequence[Mapping[str, Any]]
    status: Mapping[str, Any]
    now: str
    suspend_requested: bool = False
    queue_name: str | None = None
    nodes: int = 1
    #: ``FailedCreate`` Events the Job controller posted on the attempt's Job (read only while it has no pods).
    job_events: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class Verdict:
    """Phase and why: the heart of the status, before conditions are derived from it."""

    phase: str
    reason: str
    message: str
    stalled: bool = False


# --- reading the children ---------------------------------------------------------------------


def _trainer_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME:
            return cs
    return {}


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    state = _trainer_status(pod).get("state") or {}
    term = state.get("terminated")
    return term if isinstance(term, Mapping) else None


def parse_termination_message(text: str | None) -> TrainerResult | None:
    """The TrainerResult in a termination message: the whole message, or a ``KUBETUNE_RESULT`` log line.

    With ``FallbackToLogsOnError`` a crashed trainer's message is its log tail; a result line in it
    still counts. Returns None when there is no valid result (never raises).
    """
    if not text or not text.strip():
        return None
    candidates = [text.strip()]
    candidates += [
        line.split(RESULT_LOG_PREFIX, 1)[1]
        for line in reversed(text.splitlines())
        if RESULT_LOG_PREFIX in line
    ]
    for candidate in candidates:
        try:
            return TrainerResult.model_validate_json(candidate)
        except ValidationError:
            continue
    return None


def _is_rank0(pod: Mapping[str, Any]) -> bool:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return annotations.get(COMPLETION_INDEX_ANNOTATION, "0") == "0"


def trainer_result(pods: Sequence[Mapping[str, Any]]) -> TrainerResult | None:
    """The newest TrainerResult written by a rank-0 pod of the attempt, if any."""
    finished = [(p, t) for p in pods if _is_rank0(p) and (t := _terminated(p)) is not None]
    finished.sort(key=lambda pt: str(pt[1].get("finishedAt") or ""))
    for _, term in reversed(finished):
        result = parse_termination_message(term.get("message"))
        if result is not None:
            return result
    return None


def _job_condition(job: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for cond in (job or {}).get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def _stall(pods: Sequence[Mapping[str, Any]]) -> Verdict | None:
    """Pods that cannot start, for a reason the user must fix (image, Secret, scheduling)."""
    for pod in pods:
        if pod.get("status", {}).get("phase") not in (None, "Pending"):
            continue
        waiting = (_trainer_status(pod).get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        message = waiting.get("message", "")
        name = pod.get("metadata", {}).get("name", "?")
        if reason in _IMAGE_PULL_REASONS:
            return Verdict(
                "Pending",
                "ImagePullBackOff",
                f"pod {name} cannot pull its image ({reason}): {message}. Check spec.image or the "
                "operator's trainer image and the registry credentials",
                stalled=True,
            )
        if reason == "CreateContainerConfigError":
            if "secret" in message.lower() and "not found" in message.lower():
                return Verdict(
                    "Pending",
                    "SecretNotFound",
                    f"pod {name}: {message}. Create it in this namespace (spec.storage.credentialsSecret) "
                    "with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; the pod starts once it exists",
                    stalled=True,
                )
            return Verdict("Pending", "CreateContainerConfigError", f"pod {name}: {message}", stalled=True)
        for cond in pod.get("status", {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return Verdict(
                    "Pending",
                    "Unschedulable",
                    f"pod {name} cannot be scheduled: {cond.get('message', '')}. Check spec.resources "
                    "(GPUs, nodeSelector, tolerations)",
                    stalled=True,
                )
    return None


def _failed_create(obs: Observed) -> Verdict | None:
    """The Job controller cannot create the pods (an exceeded ResourceQuota, an admission webhook)."""
    if obs.pods or not obs.job_events:
        return None
    newest = max(obs.job_events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    message = str(newest.get("message") or "")
    if "exceeded quota" in message:
        return Verdict(
            "Pending",
            "QuotaExceeded",
            f"the Job cannot create its pods: {message}. Ask for more quota or lower spec.resources; "
            "the pods start once they fit",
            stalled=True,
        )
    if "service account" in message or "serviceaccount" in message:
        # The ServiceAccount admission plugin refuses a pod whose account (or, in v1.20, its token
        # Secret) is missing; the operator recreates its per-job account on the next refresh.
        return Verdict(
            "Pending",
            "ServiceAccountMissing",
            f"the Job cannot create its pods: {message}. The operator recreates the attempt's "
            "ServiceAccount; the pods start once it and its token exist",
            stalled=True,
        )
    return Verdict("Pending", "PodCreationFailed", f"the Job cannot create its pods: {message}", stalled=True)


def rejected_status(obs: Observed, reason: str, message: str) -> dict[str, Any]:
    """Status patch for a child the API server refused to create (reason: ChildRejected, Forbidden,
    QuotaExceeded): Pending and Stalled with the server's message; the operator retries with back-off."""
    v = Verdict("Pending", reason, message, stalled=True)
    return {
        "phase": v.phase,
        "reason": v.reason,
        "message": v.message,
        "observedGeneration": obs.generation,
        "conditions": conditions_for(v, obs),
    }


def _fail_fast_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for pod in pods:
        term = _terminated(pod)
        if term is not None and term.get("exitCode") in FAIL_FAST_EXIT_CODES:
            return term
    return None


def _oom_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for pod in pods:
        term = _terminated(pod)
        if term is not None and term.get("reason") == "OOMKilled":
            return term
        last = (_trainer_status(pod).get("lastState") or {}).get("terminated") or {}
        if last.get("reason") == "OOMKilled":
            return last
    return None


def _last_failure_text(pods: Sequence[Mapping[str, Any]]) -> str:
    failed = [t for p in pods if (t := _terminated(p)) is not None and t.get("exitCode", 0) != 0]
    if not failed:
        return ""
    failed.sort(key=lambda t: str(t.get("finishedAt") or ""))
    term = failed[-1]
    tail = (term.get("message") or "").strip()[-300:]
    return f"; last pod exited with {term.get('exitCode')}" + (f": {tail}" if tail else "")


def _failure(
    job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], result: TrainerResult | None
) -> Verdict:
    """Why the attempt failed, in the most actionable words available."""
    if result is not None and result.outcome == "Failed":
        return Verdict("Failed", result.reason, result.message or result.reason)
    if _oom_pod(pods) is not None:
        return Verdict("Failed", "OOMKilled", OOM_HINT)
    cond = _job_condition(job, "Failed") or {}
    reason = cond.get("reason") or "Error"
    if reason == "DeadlineExceeded":
        return Verdict(
            "Failed",
            "DeadlineExceeded",
            "the run took longer than spec.runPolicy.activeDeadlineSeconds" + _last_failure_text(pods),
        )
    if reason == "BackoffLimitExceeded":
        return Verdict(
            "Failed",
            "BackoffLimitExceeded",
            "the trainer failed more often than spec.runPolicy.backoffLimit allows"
            + _last_failure_text(pods),
        )
    return Verdict("Failed", reason, (cond.get("message") or "the Job failed") + _last_failure_text(pods))


def _recorded_outcome(obs: Observed) -> Verdict | None:
    """The outcome the status already records for this attempt (None while it has none)."""
    st = obs.status
    if st.get("jobName") != obs.attempt or st.get("phase") not in TERMINAL_PHASES:
        return None
    return Verdict(st["phase"], st.get("reason") or "", st.get("message") or "")


def job_finished(job: Mapping[str, Any]) -> bool:
    """The Job has its Complete or Failed condition."""
    return _job_condition(job, "Complete") is not None or _job_condition(job, "Failed") is not None


def verdict(obs: Observed, result: TrainerResult | None) -> Verdict:
    """The phase of the FineTuneJob from its current attempt (see module docstring)."""
    job = obs.job
    recorded = _recorded_outcome(obs)
    if job is None:
        if recorded is not None:
            # The finished Job was deleted by its TTL: the recorded outcome still stands.
            return recorded
        if obs.suspend_requested:
            return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true: no pods run")
        if obs.status.get("phase") == "Pending" and obs.status.get("reason") in REJECTION_REASONS:
            # The reconcile handler's record of a refused create stands until its retry succeeds.
            return Verdict("Pending", obs.status["reason"], obs.status.get("message") or "", stalled=True)
        return Verdict("Pending", "Creating", "creating the training Job")
    if recorded is not None and not job_finished(job):
        # A finished attempt does not run again: a Job that shows it unfinished is an older copy of
        # it (a watch event handled late), and must not move the recorded outcome back.
        return recorded
    if _job_condition(job, "Complete") is not None:
        if result is None:
            return Verdict("Succeeded", "Completed", "the trainer finished but left no result")
        if result.outcome == "Succeeded":
            version = result.version.name if result.version else "?"
            return Verdict("Succeeded", result.reason, result.message or f"published {version}")
        return Verdict("Failed", result.reason, result.message or result.reason)
    if _job_condition(job, "Failed") is not None:
        return _failure(job, obs.pods, result)
    fail_fast = _fail_fast_pod(obs.pods)
    if fail_fast is not None and result is not None and result.outcome == "Failed":
        # The trainer said retrying cannot help; podFailurePolicy fails the Job (>= 1.26) at once.
        return Verdict("Failed", result.reason, result.message or result.reason)
    if job.get("spec", {}).get("suspend"):
        if obs.queue_name and not obs.suspend_requested:
            return Verdict(
                "Queued", "WaitingForAdmission", f"waiting for Kueue to admit it from queue {obs.queue_name}"
            )
        return Verdict("Suspended", "Suspended", "spec.runPolicy.suspend is true: no pods run")
    stall = _stall(obs.pods) or _failed_create(obs)
    if stall is not None:
        return stall
    if any(p.get("status", {}).get("phase") == "Running" for p in obs.pods):
        return Verdict("Running", "Running", "training pods are running")
    return Verdict("Pending", "PodsPending", "waiting for the training pods to start")


# --- the patch --------------------------------------------------------------------------------


def _condition(
    kind: str, true: bool, reason: str, message: str, previous: Mapping[str, Mapping[str, Any]], obs: Observed
) -> dict[str, Any]:
    status = "True" if true else "False"
    before = previous.get(kind)
    changed = before is None or before.get("status") != status
    condition = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        # Kubernetes convention: the time the status last flipped, not the time of this write.
        "lastTransitionTime": obs.now if changed else before.get("lastTransitionTime", obs.now),  # type: ignore[union-attr]
        "observedGeneration": obs.generation,
    }
    # Empty strings are left out: they carry nothing, and the v1.20 test server rejects them as null.
    return {k: v for k, v in condition.items() if v != ""}


def _fits_condition(obs: Observed, previous: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``Fits``: the trainer's pre-flight plan (``status.plan``) for this generation, or Unknown.

    True (Fits) or False (WillNotFit) with the plan's one-line summary; Unknown while no plan of
    this generation has been reported (NotPlanned) or when the plan had no memory bound to check
    (NoMemoryBound: set spec.resources.gpuMemory)."""
    plan = obs.status.get("plan") or {}
    if plan.get("generation") != obs.generation:
        status, reason, message = "Unknown", "NotPlanned", ""
    elif plan.get("fits") is True:
        status, reason, message = "True", "Fits", plan.get("summary", "")
    elif plan.get("fits") is False:
        status, reason, message = "False", "WillNotFit", plan.get("summary", "")
    else:
        status, reason, message = "Unknown", "NoMemoryBound", plan.get("summary", "")
    before = previous.get("Fits")
    changed = before is None or before.get("status") != status
    condition = {
        "type": "Fits",
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": obs.now if changed else before.get("lastTransitionTime", obs.now),  # type: ignore[union-attr]
        "observedGeneration": obs.generation,
    }
    return {k: v for k, v in condition.items() if v != ""}


def conditions_for(v: Verdict, obs: Observed, *, invalid_message: str | None = None) -> list[dict[str, Any]]:
    """Every condition type, True or False, derived from the verdict (and ``Fits`` from the plan)."""
    previous = {c.get("type", ""): c for c in obs.status.get("conditions") or []}
    suspended = v.phase in ("Suspended", "Queued")
    return [
        _condition(
            "Invalid",
            invalid_message is not None,
            "InvalidSpec" if invalid_message is not None else "Valid",
            invalid_message or "",
            previous,
            obs,
        ),
        _condition(
            "Suspended",
            suspended,
            v.reason if suspended else "NotSuspended",
            v.message if suspended else "",
            previous,
            obs,
        ),
        _condition(
            "Stalled",
            v.stalled,
            v.reason if v.stalled else "NotStalled",
            v.message if v.stalled else "",
            previous,
            obs,
        ),
        _condition(
            "Running",
            v.phase == "Running",
            v.reason if v.phase == "Running" else "NotRunning",
            "",
            previous,
            obs,
        ),
        _condition(
            "Succeeded",
            v.phase == "Succeeded",
            v.reason if v.phase == "Succeeded" else "NotSucceeded",
            v.message if v.phase == "Succeeded" else "",
            previous,
            obs,
        ),
        _condition(
            "Failed",
            v.phase == "Failed",
            v.reason if v.phase == "Failed" else "NotFailed",
            v.message if v.phase == "Failed" else "",
            previous,
            obs,
        ),
        _fits_condition(obs, previous),
    ]


def _restarts(obs: Observed) -> int:
    if obs.job is None:
        return int(obs.status.get("restarts") or 0)
    failed = int(obs.job.get("status", {}).get("failed") or 0)
    # Evicted and preempted pods are not counted as failed (podFailurePolicy Ignore) but were restarts.
    return max(failed, len(obs.pods) - obs.nodes, 0)


def reduce_status(obs: Observed) -> dict[str, Any]:
    """The status merge patch for ``obs`` (operator-owned fields only). Inputs are not mutated."""
    result = trainer_result(obs.pods)
    v = verdict(obs, result)
    job_status = (obs.job or {}).get("status", {})
    patch: dict[str, Any] = {
        "phase": v.phase,
        "reason": v.reason or None,
        # None deletes the key in a merge patch; an empty string would leave nothing useful either.
        "message": v.message or None,
        "observedGeneration": obs.generation,
        "jobName": obs.attempt,
        "conditions": conditions_for(v, obs),
        "restarts": _restarts(obs),
    }
    start = job_status.get("startTime") or obs.status.get("startTime")
    if start:
        patch["startTime"] = start
    if v.phase in TERMINAL_PHASES:
        patch["completionTime"] = (
            job_status.get("completionTime") or obs.status.get("completionTime") or obs.now
        )
    if v.phase == "Running" and not obs.status.get("stage"):
        # Until the trainer's first report; after that the stage is the trainer's to write.
        patch["stage"] = "Initializing"
    if result is not None:
        if result.version is not None:
            patch["version"] = result.version.to_api()
        if result.metrics:
            patch["metrics"] = dict(result.metrics)
        if result.gates is not None:
            patch["gates"] = result.gates.to_api()
        if result.resumed_from_step is not None:
            patch["resumedFromStep"] = result.resumed_from_step
    if v.phase in TERMINAL_PHASES and obs.attempt:
        version = result.version.name if result is not None and result.version is not None else None
        version = version or (obs.status.get("version") or {}).get("name")
        entry = history_entry(
            obs.generation, obs.attempt, v.phase, v.reason, version, patch.get("completionTime")
        )
        history = with_history(obs.status.get("history"), entry)
        if history != list(obs.status.get("history") or []):
            patch["history"] = history
    return patch


def invalid_status(problems: Sequence[tuple[str, str]], obs: Observed) -> dict[str, Any]:
    """Status patch for a spec that can never work: Failed, reason InvalidSpec, Invalid=True."""
    message = "; ".join(f"{f}: {m}" for f, m in problems)
    v = Verdict("Failed", "InvalidSpec", message)
    return {
        "phase": "Failed",
        "reason": "InvalidSpec",
        "message": message,
        "observedGeneration": obs.generation,
        "conditions": conditions_for(v, obs, invalid_message=message),
        # No attempt belongs to an invalid spec: once fixed, the spec starts a fresh attempt.
        "jobName": None,
        "attemptGeneration": None,
        "attemptFingerprint": None,
        "history": _invalid_history(obs),
    }


def _invalid_history(obs: Observed) -> list[dict[str, Any]]:
    history: Sequence[Mapping[str, Any]] = obs.status.get("history") or []
    previous = _entry_from_status(obs.status)
    if previous is not None:
        history = with_history(history, previous)
    return with_history(history, history_entry(obs.generation, None, "Failed", "InvalidSpec"))


#: How many earlier attempts ``status.history`` keeps.
HISTORY_LIMIT = 20


def history_entry(
    generation: int,
    job_name: str | None,
    phase: str,
    reason: str | None = None,
    version: str | None = None,
    completion_time: str | None = None,
) -> dict[str, Any]:
    """One ``status.history`` record (empty fields left out)."""
    entry = {
        "generation": generation,
        "jobName": job_name,
        "phase": phase,
        "reason": reason,
        "version": version,
        "completionTime": completion_time,
    }
    return {k: v for k, v in entry.items() if v not in (None, "")}


def with_history(
    history: Sequence[Mapping[str, Any]] | None, entry: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """``history`` with ``entry`` recorded: it replaces the record of the same Job (or, for a spec
    that never had a Job, of the same generation); the oldest records beyond the limit go."""

    def same(old: Mapping[str, Any]) -> bool:
        if entry.get("jobName"):
            return old.get("jobName") == entry["jobName"]
        return not old.get("jobName") and old.get("generation") == entry.get("generation")

    kept = [dict(old) for old in history or [] if not same(old)]
    kept.append(dict(entry))
    return kept[-HISTORY_LIMIT:]


def _entry_from_status(st: Mapping[str, Any]) -> dict[str, Any] | None:
    """The history record of the attempt ``st`` describes (None when it has none)."""
    name = st.get("jobName")
    if not name:
        return None
    phase = st.get("phase")
    finished = phase in TERMINAL_PHASES
    return history_entry(
        int(st.get("observedGeneration") or st.get("attemptGeneration") or 1),
        str(name),
        str(phase) if finished else "Superseded",
        (st.get("reason") if finished else "NewGeneration"),
        ((st.get("version") or {}).get("name") if finished else None),
        st.get("completionTime") if finished else None,
    )


def new_attempt_status(obs: Observed, fingerprint: str | None = None) -> dict[str, Any]:
    """Patch that starts the attempt ``obs.attempt`` for generation ``obs.generation``.

    The previous attempt's outcome goes to ``history`` and everything that described it is cleared:
    the phase is ``Pending`` and every condition is False at the new generation, so nothing (not
    ``Succeeded``, not ``Failed``, not ``Invalid``) claims an outcome for a generation that has not
    had one. The only operator write that touches ``progress`` and ``stage``: they described the
    replaced attempt. ``None`` deletes a key in a JSON merge patch.
    """
    v = Verdict("Pending", "Creating", f"creating the training Job for generation {obs.generation}")
    patch: dict[str, Any] = {
        "phase": v.phase,
        "reason": v.reason,
        "message": v.message,
        "observedGeneration": obs.generation,
        "conditions": conditions_for(v, obs),
        "jobName": obs.attempt,
        "attemptGeneration": obs.generation,
        "attemptFingerprint": fingerprint,
        "progress": None,
        "stage": None,
        "plan": None,
        "version": None,
        "metrics": None,
        "gates": None,
        "resumedFromStep": None,
        "completionTime": None,
        "startTime": None,
        "restarts": 0,
    }
    previous = _entry_from_status(obs.status)
    if previous is not None and obs.status.get("jobName") != obs.attempt:
        patch["history"] = with_history(obs.status.get("history"), previous)
    return patch


@dataclass(frozen=True)
class Transition:
    """An Event to post about a status change."""

    type: str
    reason: str
    message: str


def transition(before: Mapping[str, Any], patch: Mapping[str, Any]) -> Transition | None:
    """The Event for moving from status ``before`` to ``patch``; None when phase and reason are unchanged."""
    phase, reason = patch.get("phase"), patch.get("reason")
    if phase is None or (before.get("phase"), before.get("reason")) == (phase, reason):
        return None
    warn = phase == "Failed" or reason in STALLED_REASONS
    return Transition(
        "Warning" if warn else "Normal", str(reason or phase), f"{phase}: {patch.get('message') or ''}"
    )


def merged(status: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``status`` with a JSON merge patch applied (None deletes), as the API server would store it."""
    out = copy.deepcopy(dict(status))
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out
