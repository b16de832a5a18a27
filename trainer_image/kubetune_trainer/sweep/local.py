"""``kubetune run sweep.yaml``: a FineTuneSweep on one machine (docs/adr/0001).

The loop: draw trial n's values (:func:`~kubetune_search.study.next_params`), set them
in the template, run the job as a trial (trained, evaluated, its intermediate eval_loss reported
to the pruner, nothing published), record the outcome; when the budget is spent, run the best
trial's spec once more as an ordinary job. Its inputs digest is the winning trial's, so it resumes
from that trial's final checkpoint (no second training), is evaluated with the template's gates and
published as the next version, with the sweep's lineage in its manifest (``extra.sweep``) and card.
The losers' checkpoints are deleted.

The study's state is one JSON document in the output store,
``<output>/<model>/sweeps/<sweep>/<spec digest>/study.json``, written after every trial and every
intermediate report: an interrupted ``kubetune run`` resumes where it stopped (a trial that was
running re-runs with the same values and resumes from its own checkpoint), and re-running an
unchanged, finished sweep runs nothing and reports the published winner. Trials run one at a time
here; ``spec.parallelism`` is for a cluster.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from kubetune_api.models import FineTuneJob, FineTuneJobSpec, ObjectMeta
from kubetune_api.reports import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_OK
from kubetune_api.runconfig import RunConfig, resolve_run_config
from kubetune_api.sweep import FineTuneSweep, TrialRecord, apply_parameters
from kubetune_registry.storage import ObjectNotFound, ObjectStore, join_key, open_uri
from kubetune_search.study import best, lineage, next_params, should_prune
from kubetune_trainer import pipeline
from kubetune_trainer.context import Trial, store_settings
from kubetune_trainer.train.stage import checkpoint_prefix

INPUT_FAILURES = ("FetchFailed", "InvalidData", "UnsafeModel")
"""Trial failures caused by the template's inputs (base model, data), whatever the drawn values."""


class Study:
    """The sweep's records and winner, kept as one JSON object in the output store."""

    def __init__(self, store: ObjectStore, key: str) -> None:
        self.store, self.key = store, key
        self.records: list[TrialRecord] = []
        self.winner: dict[str, Any] | None = None
        try:
            data = json.loads(store.get_bytes(key)[0])
        except ObjectNotFound:
            return
        self.records = [TrialRecord.model_validate(r) for r in data.get("trials", [])]
        self.winner = data.get("winner")

    def save(self) -> None:
        body = {"trials": [r.to_api() for r in self.records], "winner": self.winner}
        self.store.put_bytes(self.key, json.dumps(body, indent=2, sort_keys=True).encode())


def _job(sweep: FineTuneSweep, spec: FineTuneJobSpec) -> FineTuneJob:
    """A trial (or the winner) as the FineTuneJob it is: the sweep's name, the trial's spec."""
    meta = ObjectMeta(name=sweep.metadata.name or "sweep", namespace=sweep.metadata.namespace)
    return FineTuneJob(metadata=meta, spec=spec)


def leaderboard(sweep: FineTuneSweep, records: list[TrialRecord], winner: int | None) -> str:
    """The trials as console lines, best first."""
    sign = 1.0 if sweep.spec.objective.resolved_direction == "minimize" else -1.0
    metric = sweep.spec.objective.metric

    def order(r: TrialRecord) -> tuple[int, float, int]:
        return (0 if r.value is not None else 1, sign * (r.value or 0.0), r.number)

    lines = []
    for r in sorted(records, key=order):
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items()
        )
        value = f"{metric} {r.value:.4f}" if r.value is not None else (r.message or "")
        mark = "  <- published" if r.number == winner else ""
        lines.append(f"[kubetune]   trial {r.number:>3}  {r.state:<8}  {value}  ({params}){mark}")
    return "\n".join(lines)


def _run_trial(
    sweep: FineTuneSweep,
    study: Study,
    record: TrialRecord,
    rc: RunConfig,
    workdir: Path,
    out: TextIO,
) -> int | None:
    """Run one trial to its end (or its pruning) and record it. Returns the exit code when the
    trial was stopped by SIGTERM (it stays ``running``: the next run resumes it), else None."""
    spec = sweep.spec

    def on_eval(step: int, eval_loss: float) -> bool:
        record.intermediate[step] = eval_loss
        study.save()  # durable before the decision: a restart sees every report
        return should_prune(spec, study.records, record)

    trial = Trial(number=record.number, objective=spec.objective.metric, on_eval=on_eval)
    outcome = pipeline.run(rc, workdir=workdir / f"trial-{record.number}", trial=trial)
    record.inputs_digest = trial.inputs_digest
    if outcome.exit_code == pipeline.EXIT_PREEMPTED:  # its checkpoint is saved; not a result
        study.save()
        print(
            f"[kubetune] sweep stopped during trial {record.number}; run it again to resume there",
            file=out,
            flush=True,
        )
        return outcome.exit_code
    if outcome.pruned is not None:
        record.state, record.message = "pruned", str(outcome.pruned)
    elif outcome.objective is not None and not math.isfinite(outcome.objective):
        record.state, record.message = "failed", f"{spec.objective.metric} is {outcome.objective}"
    elif outcome.exit_code != EXIT_OK or outcome.objective is None:
        record.state = "failed"
        if outcome.result is not None:
            record.message = outcome.result.message
        else:
            record.message = f"exit code {outcome.exit_code}" if outcome.exit_code else "no objective value"
    else:
        record.state, record.value = "complete", outcome.objective
    study.save()
    print(
        f"[kubetune] trial {record.number} ({record.number + 1} of {spec.max_trials}): {record.state}"
        + (f", {spec.objective.metric} {record.value:.4f}" if record.value is not None else "")
        + (f" ({record.message})" if record.message and record.state != "complete" else ""),
        file=out,
        flush=True,
    )
    reason = outcome.result.reason if outcome.result is not None else None
    if record.state == "failed" and reason in INPUT_FAILURES:
        # The inputs, not the drawn values, are at fault: every other trial would fail the same way.
        print(f"[kubetune] FAILED: sweep stopped: {reason} is the same for every trial", file=out, flush=True)
        return outcome.exit_code or EXIT_BAD_INPUT
    return None


def _same_values(records: list[TrialRecord], record: TrialRecord) -> TrialRecord | None:
    """An earlier finished trial with exactly these values (TPE repeats choice and int draws)."""
    return next(
        (
            r
            for r in records
            if r.number < record.number and r.state != "running" and r.params == record.params
        ),
        None,
    )


def _prefix(sweep: FineTuneSweep, record: TrialRecord, local_root: str | None) -> str | None:
    """Where trial ``record`` kept its checkpoints (its own spec: a searched path may move them)."""
    if record.inputs_digest is None:
        return None
    rc = resolve_run_config(
        _job(sweep, apply_parameters(sweep.spec.template, record.params)), local_root=local_root
    )
    return checkpoint_prefix(rc, store_settings(rc), record.inputs_digest)


def _delete_checkpoints(
    store: ObjectStore,
    sweep: FineTuneSweep,
    records: list[TrialRecord],
    *,
    keep: str | None,
    local_root: str | None,
) -> None:
    """Every trial's checkpoints but those of inputs digest ``keep`` (spent by the winner's publish)."""
    done: set[str] = set()
    for r in records:
        prefix = _prefix(sweep, r, local_root)
        if prefix is None or r.inputs_digest == keep or prefix in done:
            continue
        store.delete_prefix(prefix + "/")
        done.add(prefix)


def run_sweep(
    sweep: FineTuneSweep, *, workdir: Path, local_root: str | None, out: TextIO | None = None
) -> int:
    """Run ``sweep`` to its budget and publish the winner; returns the winner's exit code.
    Progress goes to ``out`` (default: ``sys.stderr`` as it is at the call)."""
    out = out if out is not None else sys.stderr
    spec = sweep.spec
    base_rc = resolve_run_config(_job(sweep, spec.template), local_root=local_root)
    store, prefix = open_uri(base_rc.output.uri, store_settings(base_rc))
    name = sweep.metadata.name or "sweep"
    digest = sweep.digest()[:16]
    key = join_key(*([prefix] if prefix else []), base_rc.model.name, "sweeps", name, digest, "study.json")
    study = Study(store, key)
    if study.winner is not None:
        print(
            f"[kubetune] Reused: sweep {name!r} (digest {digest}) is complete; its winner, trial "
            f"{study.winner['trial']}, is {base_rc.model.name} {study.winner['version']} "
            f"({study.winner['uri']}, {study.winner.get('reason', 'Published')}): nothing ran",
            file=out,
            flush=True,
        )
        print(leaderboard(sweep, study.records, study.winner["trial"]), file=out, flush=True)
        # The winner's outcome is remembered: one that failed its gates fails again (exit 4).
        return int(study.winner.get("exitCode", EXIT_OK))
    print(
        f"[kubetune] sweep {name!r}: {spec.max_trials} trials of {base_rc.model.name}, objective "
        f"{spec.objective.metric} ({spec.objective.resolved_direction}), sampler {spec.sampler.type} "
        f"seed {spec.sampler.seed}, pruning {spec.pruning.type}; study {store.uri_for(key)}",
        file=out,
        flush=True,
    )
    while True:
        running = [r for r in study.records if r.state == "running"]
        if running:  # interrupted before: same values, resumed from its own checkpoint (its
            record = running[0]  # reports are kept; those made again overwrite theirs by step)
        elif len(study.records) < spec.max_trials:
            number = len(study.records)
            record = TrialRecord(
                number=number, params=next_params(spec, study.records, number), state="running"
            )
            study.records.append(record)
            study.save()
        else:
            break
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.params.items()
        )
        print(
            f"[kubetune] trial {record.number} ({record.number + 1} of {spec.max_trials}): {params}",
            file=out,
            flush=True,
        )
        same = _same_values(study.records, record)
        try:
            rc = resolve_run_config(
                _job(sweep, apply_parameters(spec.template, record.params)), local_root=local_root
            )
        except ValidationError as exc:  # each value fits its field, together they break a rule
            first = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            record.state, record.message = "failed", f"these values make an invalid FineTuneJob: {first}"
        else:
            if same is not None:  # nothing new to learn: the earlier trial's result stands for it
                record.state, record.value, record.intermediate = (
                    same.state,
                    same.value,
                    dict(same.intermediate),
                )
                record.inputs_digest, record.message = (
                    same.inputs_digest,
                    f"same values as trial {same.number}",
                )
            else:
                stopped = _run_trial(sweep, study, record, rc, workdir, out)
                if stopped is not None:
                    return stopped
                continue
        study.save()
        print(f"[kubetune] trial {record.number}: {record.state} ({record.message})", file=out, flush=True)
    winner = best(spec, study.records)
    if winner is None:
        _delete_checkpoints(store, sweep, study.records, keep=None, local_root=local_root)
        print(f"[kubetune] FAILED: sweep {name!r}: no trial completed", file=out, flush=True)
        print(leaderboard(sweep, study.records, None), file=out, flush=True)
        return EXIT_ERROR
    print(
        f"[kubetune] sweep {name!r}: trial {winner.number} is best ({spec.objective.metric} "
        f"{winner.value:.4f}); publishing it",
        file=out,
        flush=True,
    )
    win_rc = resolve_run_config(
        _job(sweep, apply_parameters(spec.template, winner.params)), local_root=local_root
    )
    outcome = pipeline.run(
        win_rc, workdir=workdir / "winner", sweep=lineage(sweep, study.records, winner.number)
    )
    result = outcome.result
    version = result.version if result is not None else None
    if result is not None and version is not None:
        study.winner = {
            "trial": winner.number,
            "version": version.name,
            "uri": version.uri,
            "reason": result.reason,
            "exitCode": outcome.exit_code,
        }
        study.save()
        # A publish spends the winner's checkpoints; a reused version spent none, so they go too.
        keep = winner.inputs_digest if result.reason != "Reused" else None
        _delete_checkpoints(store, sweep, study.records, keep=keep, local_root=local_root)
    print(
        leaderboard(sweep, study.records, winner.number if study.winner is not None else None),
        file=out,
        flush=True,
    )
    return outcome.exit_code
