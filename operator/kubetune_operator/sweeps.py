"""A FineTuneSweep on a cluster, pure: from the sweep, its status and its child FineTuneJobs to
what to write, create and delete (docs/sweeps.md).

Each trial is an ordinary FineTuneJob owned by the sweep (``<sweep>-<study>-t<n>``, ``<study>`` the
first 6 hex of the spec's digest, so a changed spec's trials never meet the old study's still being
deleted; own pods, the sweep's
Kueue queue label, garbage-collected with it) whose RunConfig says it is a trial
(``kubetune.io/sweep-trial``): it trains, reports every intermediate eval_loss to its own
``status.trial`` and ends with its objective in ``status.metrics``, publishing nothing. When the
budget is spent the best trial's spec runs once more as ``<sweep>-<study>-winner`` with the sweep's lineage
(``kubetune.io/sweep-lineage``): same inputs digest, so it resumes from the trial's final checkpoint,
is evaluated with the template's gates and published as the next version, with every trial in its
manifest and model card.

The trial records in ``status.trials`` are the study. :func:`plan` rebuilds the search from them
(kubetune_search) on every reconcile, and a new trial is recorded in the status *before* its
FineTuneJob is created (by deterministic name), so an operator restart neither loses nor repeats
one: a record without its child gets the child (same name, same values), a child without a
record cannot exist. A pruned trial is recorded first, then its FineTuneJob deleted (its pods get
SIGTERM and stop within one evaluation interval of the report that pruned it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune_api import names
from kubetune_api.sweep import FineTuneSweep, TrialStatus, apply_parameters
from kubetune_operator import naming
from kubetune_search.study import best, lineage, next_params, should_prune

LABEL_SWEEP_DIGEST = f"{names.API_GROUP}/sweep-digest"
LABEL_TRIAL = f"{names.API_GROUP}/trial"
#: Trial failures caused by the template's inputs, whatever the drawn values: the sweep stops.
INPUT_FAILURES = ("FetchFailed", "InvalidData", "UnsafeModel")
#: The winner's lineage annotation is kept below this (annotations total at most 256 KiB).
LINEAGE_MAX_BYTES = 200_000
#: Phases of a child FineTuneJob that are final.
_FINAL = ("Succeeded", "Failed")


def sweep_label(name: str) -> str:
    """The sweep's name as a label value (shortened with a hash past 63 characters)."""
    return naming.label_value(name)


def trial_name(sweep: str, study: str, number: int) -> str:
    return _child_name(sweep, f"{study[:6]}-t{number}")


def winner_name(sweep: str, study: str) -> str:
    return _child_name(sweep, f"{study[:6]}-winner")


def _child_name(sweep: str, suffix: str) -> str:
    name = f"{sweep}-{suffix}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(sweep.encode()).hexdigest()[:8]
    return f"{sweep[: 253 - len(suffix) - 10]}-{digest}-{suffix}"


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass
class SweepPlan:
    """What one reconcile of a sweep does, in this order: write ``status``, create ``create``,
    delete ``delete``, post ``events`` (type, reason, message)."""

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)


def child_job(
    sweep: FineTuneSweep,
    meta: Mapping[str, Any],
    name: str,
    params: Mapping[str, Any],
    annotations: Mapping[str, str],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """A child FineTuneJob of the sweep: the template with ``params`` set, owned by the sweep."""
    spec = apply_parameters(sweep.spec.template, dict(params))
    sweep_name = str(meta["name"])
    child_labels = {
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        names.LABEL_SWEEP: sweep_label(sweep_name),
        LABEL_SWEEP_DIGEST: sweep.digest()[:16],
        **labels,
    }
    queue = (meta.get("labels") or {}).get(naming.LABEL_QUEUE)
    if queue:  # Kueue admits each trial from the sweep's queue, as it would any FineTuneJob
        child_labels[naming.LABEL_QUEUE] = queue
    return {
        "apiVersion": names.GROUP_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": child_labels,
            # kopf's own marker, set from the start: kopf's diff base then leaves every kubetune.io
            # annotation out, so the lineage is not stored a second time in last-handled-configuration.
            "annotations": {
                f"{names.API_GROUP}/kopf-managed": "yes",
                names.ANNOTATION_SWEEP: sweep_name,
                **annotations,
            },
            "ownerReferences": [
                {
                    "apiVersion": names.GROUP_VERSION,
                    "kind": "FineTuneSweep",
                    "name": sweep_name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec.to_api(),
    }


def trial_job(sweep: FineTuneSweep, meta: Mapping[str, Any], record: TrialStatus) -> dict[str, Any]:
    trial = {"sweep": str(meta["name"]), "number": record.number, "objective": sweep.spec.objective.metric}
    return child_job(
        sweep,
        meta,
        record.job_name or trial_name(str(meta["name"]), sweep.digest(), record.number),
        record.params,
        {names.ANNOTATION_SWEEP_TRIAL: json.dumps(trial, sort_keys=True)},
        {LABEL_TRIAL: str(record.number)},
    )


def lineage_text(sweep: FineTuneSweep, records: list[TrialStatus], winner: TrialStatus) -> str:
    """The sweep's lineage as the winner's annotation, under :data:`LINEAGE_MAX_BYTES`. Hundreds of
    trials: first the eval_loss curves go, then the messages and child names, then every trial but
    the 100 best and the winner keeps only its number, state and inputs digest (the winner deletes
    each trial's checkpoints by it); ``omitted`` says so."""
    story = lineage(sweep, list(records), winner.number)

    def encoded() -> str:
        return json.dumps(story, sort_keys=True, separators=(",", ":"))

    text = encoded()
    for drop in (("intermediate",), ("message", "jobName")):
        if len(text.encode()) <= LINEAGE_MAX_BYTES:
            return text
        for t in story["trials"]:
            for key in drop:
                t.pop(key, None)
        story["omitted"] = sorted({*story.get("omitted", []), *drop})
        text = encoded()
    if len(text.encode()) > LINEAGE_MAX_BYTES:
        sign = 1.0 if sweep.spec.objective.resolved_direction == "minimize" else -1.0
        ranked = sorted(
            (t for t in story["trials"] if t.get("value") is not None), key=lambda t: sign * t["value"]
        )
        keep = {t["number"] for t in ranked[:100]} | {winner.number}
        story["trials"] = [
            t if t["number"] in keep else {k: t[k] for k in ("number", "state", "inputsDigest") if k in t}
            for t in story["trials"]
        ]
        story["omitted"] = [*story["omitted"], "the values of all but the 100 best trials"]
        text = encoded()
    return text


def winner_job(
    sweep: FineTuneSweep, meta: Mapping[str, Any], records: list[TrialStatus], winner: TrialStatus
) -> dict[str, Any]:
    text = lineage_text(sweep, records, winner)
    return child_job(
        sweep,
        meta,
        winner_name(str(meta["name"]), sweep.digest()),
        winner.params,
        {names.ANNOTATION_SWEEP_LINEAGE: text},
        {LABEL_TRIAL: "winner"},
    )


def _finished(child: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(phase, reason, message) of a child whose current generation has finished, else None."""
    st = child.get("status") or {}
    gen = (child.get("metadata") or {}).get("generation")
    if st.get("phase") in _FINAL and st.get("observedGeneration") == gen:
        return str(st["phase"]), str(st.get("reason") or ""), str(st.get("message") or "")
    return None


def unfinished(child: Mapping[str, Any]) -> bool:
    """A child FineTuneJob that is still working (not being deleted, its generation not finished)."""
    return not (child.get("metadata") or {}).get("deletionTimestamp") and _finished(child) is None


def _observe_trial(
    sweep: FineTuneSweep, record: TrialStatus, child: Mapping[str, Any]
) -> tuple[str, str, str] | None:
    """Update ``record`` from its child; the child's final (phase, reason, message) if finished."""
    st = child.get("status") or {}
    report = st.get("trial") or {}
    if report.get("number") == record.number:
        for step, value in (report.get("intermediate") or {}).items():
            record.intermediate[int(step)] = float(value)
        record.inputs_digest = report.get("inputsDigest") or record.inputs_digest
    done = _finished(child)
    if done is None:
        return None
    phase, reason, message = done
    metric = sweep.spec.objective.metric
    value = (st.get("metrics") or {}).get(metric)
    if phase == "Succeeded" and reason == "TrialComplete" and value is not None and math.isfinite(value):
        record.state, record.value, record.message = "complete", float(value), None
    elif phase == "Succeeded":
        record.state, record.message = "failed", f"{metric} was not measured ({reason}: {message})"
    else:
        record.state, record.message = "failed", f"{reason}: {message}"[:500]
    return done


def _same_values(records: list[TrialStatus], record: TrialStatus) -> TrialStatus | None:
    return next(
        (
            r
            for r in records
            if r.number < record.number and r.state != "running" and r.params == record.params
        ),
        None,
    )


def plan(
    sweep: FineTuneSweep,
    meta: Mapping[str, Any],
    current: Mapping[str, Any],
    children: Mapping[str, Mapping[str, Any]],
    now: str,
) -> SweepPlan:
    """The next step of the sweep (see the module docstring). Inputs are not mutated."""
    spec = sweep.spec
    name = str(meta["name"])
    digest = sweep.digest()[:16]
    generation = meta.get("generation") or 1
    out = SweepPlan(status={})
    same_study = current.get("studyDigest") == digest
    records = [TrialStatus.model_validate(t) for t in current.get("trials") or []] if same_study else []
    if not same_study and current.get("studyDigest"):
        out.events.append(("Normal", "StudyRestarted", f"the sweep's spec changed: a new study {digest}"))
    ours: dict[str, Mapping[str, Any]] = {}
    for child_name, child in children.items():
        child_meta = child.get("metadata") or {}
        if child_meta.get("deletionTimestamp"):  # being deleted (pruned, or an old study's): gone
            continue
        if (child_meta.get("labels") or {}).get(LABEL_SWEEP_DIGEST) == digest:
            ours[child_name] = child
        else:  # a trial or winner of the study before the spec changed
            out.delete.append(child_name)
    stopped: str | None = (
        current.get("message") if same_study and current.get("reason") == "InputsFailed" else None
    )

    # 1. The running trials, from their FineTuneJobs.
    for record in records:
        if record.state != "running":
            if record.state == "pruned" and record.job_name in ours:  # its delete was lost: again
                out.delete.append(str(record.job_name))
            continue
        trial_child = ours.get(record.job_name or "")
        if trial_child is None:  # recorded, not created yet (a restart between the two): create it now
            out.create.append(trial_job(sweep, meta, record))
            continue
        done = _observe_trial(sweep, record, trial_child)
        if done is not None:
            phase, reason, message = done
            value = f", {spec.objective.metric} {record.value:.4f}" if record.value is not None else ""
            out.events.append(
                (
                    "Normal" if record.state == "complete" else "Warning",
                    "TrialComplete" if record.state == "complete" else "TrialFailed",
                    f"trial {record.number} ({format_params(record.params)}): {record.state}{value}"
                    + (f": {record.message}" if record.state != "complete" else ""),
                )
            )
            if record.state == "failed" and reason in INPUT_FAILURES:
                stopped = f"trial {record.number} failed with {reason}, the same for every trial: {message}"[
                    :1000
                ]
            continue
        if should_prune(spec, records, record):
            step = max(record.intermediate)
            record.state = "pruned"
            record.message = (
                f"eval_loss {record.intermediate[step]:.4f} at step {step} is worse than the median of "
                "the complete trials there"
            )
            out.delete.append(str(record.job_name))
            out.events.append(("Normal", "TrialPruned", f"trial {record.number}: {record.message}"))

    # A stopped sweep stops its running trials too (parallelism > 1: they would fail the same way).
    if stopped is not None:
        for record in records:
            if record.state == "running":
                record.state, record.message = "failed", "stopped: the sweep failed on its inputs"
                if record.job_name in ours:
                    out.delete.append(str(record.job_name))
                out.create = [c for c in out.create if c["metadata"]["name"] != record.job_name]

    # 2. New trials, up to the budget and the parallelism.
    while stopped is None and len(records) < spec.max_trials:
        if sum(r.state == "running" for r in records) >= spec.parallelism:
            break
        number = len(records)
        record = TrialStatus(number=number, params=next_params(spec, records, number), state="running")
        records.append(record)
        same = _same_values(records, record)
        try:
            apply_parameters(spec.template, record.params)
        except ValidationError as exc:  # each value fits its field, together they break a rule
            first = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            record.state, record.message = "failed", f"these values make an invalid FineTuneJob: {first}"
            continue
        if same is not None:  # nothing new to learn: the earlier trial's result stands for it
            record.state, record.value, record.intermediate = same.state, same.value, dict(same.intermediate)
            record.inputs_digest, record.message = same.inputs_digest, f"same values as trial {same.number}"
            continue
        record.job_name = trial_name(name, digest, number)
        out.create.append(trial_job(sweep, meta, record))
        out.events.append(("Normal", "TrialStarted", f"trial {number}: {format_params(record.params)}"))

    # 3. The winner, once every trial has finished.
    running = sum(r.state == "running" for r in records)
    winner = best(spec, records)
    version = current.get("version") if same_study else None
    winner_job_name: str | None = None
    if stopped is not None:
        phase, reason, message = "Failed", "InputsFailed", stopped
    elif running or len(records) < spec.max_trials:
        phase, reason = "Running", "Searching"
        message = f"{running} trial(s) running, {len(records)} of {spec.max_trials} started"
    elif winner is None:
        phase, reason, message = "Failed", "NoTrialCompleted", "no trial completed: nothing is published"
    else:
        assert isinstance(winner, TrialStatus)
        winner_job_name = winner_name(name, digest)
        winner_child = ours.get(winner_job_name)
        done = _finished(winner_child) if winner_child is not None else None
        if winner_child is None:
            out.create.append(winner_job(sweep, meta, records, winner))
            out.events.append(
                (
                    "Normal",
                    "PublishingWinner",
                    f"trial {winner.number} is best ({spec.objective.metric} {winner.value:.4f}): "
                    f"{winner_job_name} publishes it",
                )
            )
        if done is None:
            phase, reason = "Running", "PublishingWinner"
            message = f"trial {winner.number} is best; {winner_job_name} is publishing it"
        else:
            child_status = (winner_child or {}).get("status") or {}
            version = child_status.get("version") or version
            w_phase, w_reason, w_message = done
            phase, reason = ("Succeeded" if w_phase == "Succeeded" else "Failed"), w_reason
            message = f"winner trial {winner.number} ({winner_job_name}): {w_message}"
    counts = {s: sum(r.state == s for r in records) for s in ("running", "pruned", "failed")}
    finished = sum(r.state != "running" for r in records)
    out.status = {
        "phase": phase,
        "reason": reason,
        "message": message[:1000],
        "observedGeneration": generation,
        "studyDigest": digest,
        "trials": [r.to_api() for r in records],
        "done": f"{finished}/{spec.max_trials}",
        **counts,
        "bestTrial": winner.number if winner else None,
        # Rounded for `kubectl get fts` (its Best column); the trial record keeps the exact value.
        "bestValue": float(f"{winner.value:.5g}") if winner and winner.value is not None else None,
        "bestParams": format_params(winner.params) if winner else None,
        "winnerJob": winner_job_name,
        "version": version,
        "conditions": [_condition(phase, reason, message, generation, current, now)],
    }
    if phase != current.get("phase") and phase in _FINAL:
        out.events.append(("Normal" if phase == "Succeeded" else "Warning", reason, message))
    return out


def _condition(
    phase: str, reason: str, message: str, generation: int, current: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """One ``Complete`` condition: True once the winner is published (or the sweep has failed)."""
    value = "True" if phase in _FINAL else "False"
    before: Mapping[str, Any] = next(
        (c for c in current.get("conditions") or [] if c.get("type") == "Complete"), {}
    )
    cond = {
        "type": "Complete",
        "status": value,
        "reason": reason,
        "message": message[:1000],
        "observedGeneration": generation,
        # Kubernetes convention: when the status last flipped, not the time of this write.
        "lastTransitionTime": before.get("lastTransitionTime", now) if before.get("status") == value else now,
    }
    return cond


def invalid_status(problems: str, generation: int, current: Mapping[str, Any], now: str) -> dict[str, Any]:
    """An invalid sweep: Failed, reason InvalidSpec, the fields named; nothing runs."""
    return {
        "phase": "Failed",
        "reason": "InvalidSpec",
        "message": problems[:1000],
        "observedGeneration": generation,
        "conditions": [_condition("Failed", "InvalidSpec", problems, generation, current, now)],
    }
