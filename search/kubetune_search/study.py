"""The search: Optuna over a sweep's trial records (both `kubetune run sweep.yaml` and the operator).

The records are the study's only state. Every decision rebuilds an in-memory Optuna study from
them, so whatever holds the records (a JSON file in the object store for ``kubetune run``, the
FineTuneSweep's status on a cluster) restarts without losing or repeating a trial:

* :func:`next_params`: trial ``n`` is drawn by the sampler seeded with ``seed + n`` over the
  finished trials before it, so the same sweep draws the same trials, run after run;
* :func:`should_prune`: a running trial's intermediate eval_loss reports against the finished
  trials', by the sweep's pruner (Optuna's ``MedianPruner``);
* :func:`best`: the winning complete trial;
* :func:`lineage`: what the winner's version records of the sweep.

Optuna is the search library (``optuna==5.1.0``, pinned in the trainer and operator extras); only its in-memory
storage is used: the records, not an Optuna database, are what is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState as OptunaState
from optuna.trial import create_trial

from kubetune_api.sweep import FineTuneSweep, FineTuneSweepSpec, TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

_STATES = {"complete": OptunaState.COMPLETE, "pruned": OptunaState.PRUNED, "failed": OptunaState.FAIL}


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    """One Optuna distribution per parameter path."""
    out: dict[str, BaseDistribution] = {}
    for p in spec.parameters:
        if p.type == "choice":
            out[p.path] = CategoricalDistribution(list(p.choices or []))
        elif p.type == "int":
            out[p.path] = IntDistribution(int(p.low or 0), int(p.high or 0), step=int(p.step or 1))
        else:
            out[p.path] = FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.type == "logUniform")
    return out


def _study(spec: FineTuneSweepSpec, records: Sequence[TrialRecord], seed: int) -> optuna.Study:
    sampler: optuna.samplers.BaseSampler
    if spec.sampler.type == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruning.startup_trials, n_warmup_steps=spec.pruning.warmup_steps
        )
        if spec.pruning.type == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(direction=spec.objective.resolved_direction, sampler=sampler, pruner=pruner)
    dists = distributions(spec)
    for r in sorted(records, key=lambda r: r.number):
        if r.state not in _STATES:
            continue  # running: not evidence yet
        study.add_trial(
            create_trial(
                params=r.params,
                distributions=dists,
                value=r.value if r.state == "complete" else None,
                state=_STATES[r.state],
                intermediate_values={int(k): float(v) for k, v in r.intermediate.items()},
            )
        )
    return study


def next_params(spec: FineTuneSweepSpec, records: Sequence[TrialRecord], number: int) -> dict[str, Any]:
    """The values trial ``number`` runs with, from the trials finished before it."""
    before = [r for r in records if r.number < number]
    trial = _study(spec, before, spec.sampler.seed + number).ask(distributions(spec))
    return dict(trial.params)


def should_prune(spec: FineTuneSweepSpec, records: Sequence[TrialRecord], running: TrialRecord) -> bool:
    """Whether the pruner stops ``running`` after its latest intermediate report."""
    if spec.pruning.type == "none" or not running.intermediate:
        return False
    others = [r for r in records if r.number != running.number]
    study = _study(spec, others, spec.sampler.seed + running.number)
    study.enqueue_trial(running.params)
    trial = study.ask(distributions(spec))
    for step, value in sorted((int(k), float(v)) for k, v in running.intermediate.items()):
        trial.report(value, step)
    return bool(trial.should_prune())


def best(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the best objective (the earliest on a tie); None when none completed."""
    complete = [r for r in records if r.state == "complete" and r.value is not None]
    if not complete:
        return None
    sign = 1.0 if spec.objective.resolved_direction == "minimize" else -1.0
    return min(complete, key=lambda r: (sign * float(r.value or 0.0), r.number))


def lineage(sweep: FineTuneSweep, records: Sequence[TrialRecord], winner: int) -> dict[str, Any]:
    """What the winner's manifest (``extra.sweep``) and model card record of the sweep."""
    spec = sweep.spec
    return {
        "name": sweep.metadata.name or "sweep",
        "digest": sweep.digest()[:16],
        "objective": {"metric": spec.objective.metric, "direction": spec.objective.resolved_direction},
        "parameters": [p.to_api() for p in spec.parameters],
        "sampler": spec.sampler.to_api(),
        "pruning": spec.pruning.to_api(),
        "maxTrials": spec.max_trials,
        "winner": winner,
        "trials": [r.to_api() for r in sorted(records, key=lambda r: r.number)],
    }
