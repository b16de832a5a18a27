"""The FineTuneSweep API: a hyperparameter search over a FineTuneJob template (docs/adr/0001).

A sweep names a FineTuneJob spec (``spec.template``), the fields to search (``spec.parameters``:
a path into that spec, a distribution), what to optimise (``spec.objective``), a trial budget and
how weak trials are stopped early (``spec.pruning``). Every trial is the template with the sampled
values set at their paths, validated as any FineTuneJob is; only the best trial becomes a version.

Bad search spaces are refused with the field named: an unknown path, a path to a non-numeric field
for a numeric distribution, empty choices, ``low > high``, a log range touching 0, a value the
template's own field refuses (``method.lora.r: 0``), a budget of 0.

This module is pure (pydantic only); the search itself (Optuna) runs where the sweep is held
(``kubetune_trainer.sweep`` for ``kubetune run``).
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, Field, ValidationError, model_validator

from kubetune_api.metrics import LOWER_IS_BETTER, METRIC_NAMES
from kubetune_api.models import ApiModel, Condition, FineTuneJobSpec, ObjectMeta, VersionRef

ParameterType = Literal["uniform", "logUniform", "int", "choice"]
Direction = Literal["minimize", "maximize"]
TrialState = Literal["running", "complete", "pruned", "failed"]

NUMERIC_TYPES = ("uniform", "logUniform", "int")


class SearchParameter(ApiModel):
    """One searched field of the template and the distribution its values are drawn from."""

    path: str = Field(
        description=(
            "A field of the FineTuneJob spec, dotted and camelCase as in YAML: training.learningRate, "
            "method.lora.r, training.warmupRatio."
        ),
        min_length=1,
        max_length=200,
    )
    type: ParameterType = Field(
        description=(
            "uniform / logUniform: a float in [low, high] (logUniform: uniform in log space, for "
            "learning rates); int: an integer in [low, high] (step: its spacing); choice: one of choices."
        )
    )
    low: float | None = Field(default=None, description="Lower bound (uniform, logUniform, int).")
    high: float | None = Field(default=None, description="Upper bound, inclusive (uniform, logUniform, int).")
    step: int | None = Field(default=None, ge=1, description="int: spacing of the values (default 1).")
    choices: list[Any] | None = Field(default=None, description="choice: the values to choose from.")


class Objective(ApiModel):
    """What the sweep optimises: one evaluation metric of each trial."""

    metric: str = Field(
        default="eval_loss",
        description="An evaluation metric (eval_loss, rouge_l, exact_match ...), measured on the eval set.",
    )
    direction: Direction | None = Field(
        default=None,
        description="minimize or maximize; default: minimize for losses and latencies, maximize otherwise.",
    )

    @property
    def resolved_direction(self) -> Direction:
        if self.direction is not None:
            return self.direction
        return "minimize" if self.metric in LOWER_IS_BETTER else "maximize"


class SamplerSpec(ApiModel):
    """How the next trial's values are drawn (Optuna)."""

    type: Literal["tpe", "random"] = Field(
        default="tpe",
        description="tpe: Optuna's tree-structured Parzen estimator; random: independent draws.",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Trial n is drawn with seed + n: the same sweep draws the same trials.",
    )
    startup_trials: int = Field(
        default=3, ge=0, le=1000, description="tpe: random draws before the model of good values takes over."
    )


class PruningSpec(ApiModel):
    """Early stopping of weak trials from their intermediate eval_loss reports."""

    type: Literal["median", "none"] = Field(
        default="median",
        description=(
            "median: stop a trial whose best eval_loss so far is worse than the median of the complete "
            "trials at the same step (Optuna's MedianPruner); none: every trial runs to the end."
        ),
    )
    startup_trials: int = Field(
        default=2,
        ge=0,
        le=1000,
        description="Complete trials before any is pruned (Optuna's MedianPruner prunes nothing before the first).",
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=10_000_000, description="Evaluations before this step never prune."
    )


class FineTuneSweepSpec(ApiModel):
    """A search over a FineTuneJob template; only the best trial is published."""

    template: FineTuneJobSpec = Field(description="The FineTuneJob spec every trial starts from.")
    parameters: list[SearchParameter] = Field(
        min_length=1, max_length=32, description="The searched fields and their distributions."
    )
    objective: Objective = Field(default_factory=Objective, description="What to optimise.")
    max_trials: int = Field(ge=1, le=1000, description="The trial budget (pruned and failed trials count).")
    parallelism: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Trials running at once on a cluster; `kubetune run` runs them one at a time.",
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="The sampler.")
    pruning: PruningSpec = Field(default_factory=PruningSpec, description="Early stopping of weak trials.")

    @model_validator(mode="after")
    def _search_space(self) -> FineTuneSweepSpec:
        problems = sweep_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TrialRecord(ApiModel):
    """One trial as the study remembers it (the sweep's durable state)."""

    number: int = Field(ge=0, description="Trial number, from 0.")
    params: dict[str, Any] = Field(description="Sampled value per parameter path.")
    state: TrialState = Field(description="running, complete, pruned or failed.")
    value: float | None = Field(default=None, description="The objective (complete trials).")
    intermediate: dict[int, float] = Field(
        default_factory=dict, description="eval_loss by step, as the trial reported it."
    )
    inputs_digest: str | None = Field(default=None, description="The trial's inputs digest.")
    message: str | None = Field(default=None, description="Why it was pruned or failed.")


class TrialStatus(TrialRecord):
    """A trial as a cluster sweep records it: the record and the child FineTuneJob running it."""

    job_name: str | None = Field(
        default=None, description="The child FineTuneJob of this trial (none for a repeated draw)."
    )


SweepPhase = Literal["Running", "Succeeded", "Failed"]


class FineTuneSweepStatus(ApiModel):
    """What the operator records of a sweep: every trial, the best so far, the winner's version.

    ``trials`` is the study's durable state on a cluster: an operator restart rebuilds the search
    from it (kubetune_search), so no trial is lost or drawn twice."""

    phase: SweepPhase | None = Field(default=None, description="Running, Succeeded or Failed.")
    reason: str | None = Field(default=None, description="Why (CamelCase).")
    message: str | None = Field(default=None, description="What happened and what to do.")
    observed_generation: int | None = Field(default=None, description="Spec generation last reconciled.")
    study_digest: str | None = Field(
        default=None, description="The spec's digest (16 hex): a changed spec is a new study."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    trials: list[TrialStatus] = Field(
        default_factory=list, max_length=1000, description="Every trial so far."
    )
    done: str | None = Field(default=None, description="Finished trials of the budget, e.g. '4/6'.")
    running: int = Field(default=0, ge=0, description="Trials running now.")
    pruned: int = Field(default=0, ge=0, description="Trials stopped early by the pruner.")
    failed: int = Field(default=0, ge=0, description="Trials that failed.")
    best_trial: int | None = Field(default=None, description="The best complete trial so far.")
    best_value: float | None = Field(
        default=None, description="Its objective value, to 5 significant digits (exact in its trial record)."
    )
    best_params: str | None = Field(default=None, description="Its values, as 'path=value, ...'.")
    winner_job: str | None = Field(default=None, description="The child FineTuneJob publishing the winner.")
    version: VersionRef | None = Field(default=None, description="The version the winner published.")


class FineTuneSweep(ApiModel):
    """A hyperparameter sweep over a FineTuneJob template. Only the winning trial becomes a version."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default="kubetune.io/v1alpha1", description="API version."
    )
    kind: Literal["FineTuneSweep"] = Field(default="FineTuneSweep", description="Kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: FineTuneSweepSpec = Field(description="The template, search space, objective and budget.")
    status: FineTuneSweepStatus | None = Field(default=None, description="Written by the operator.")

    def digest(self) -> str:
        """sha256 of the spec (canonical JSON): an unchanged sweep is the same study."""
        canonical = json.dumps(self.spec.to_api(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# --- the search space, checked against the template ----------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """``X | None`` and ``Optional[X]`` -> X (other unions stay)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


def resolve_path(path: str) -> tuple[list[str], Any] | str:
    """The Python attribute names along a camelCase spec path and the leaf's type, or a problem."""
    model: type[BaseModel] = FineTuneJobSpec
    attrs: list[str] = []
    parts = path.split(".")
    for i, part in enumerate(parts):
        by_alias = {(info.alias or name): name for name, info in model.model_fields.items()}
        name = by_alias.get(part)
        if name is None:
            where = ".".join(parts[:i]) or "the spec"
            known = ", ".join(sorted(by_alias))
            return f"unknown field {part!r} in {where} (fields: {known})"
        attrs.append(name)
        leaf = _unwrap(model.model_fields[name].annotation)
        if i == len(parts) - 1:
            return attrs, leaf
        if not (isinstance(leaf, type) and issubclass(leaf, BaseModel)):
            return f"{'.'.join(parts[: i + 1])} is a value, not an object: nothing below it to set"
        model = leaf
    return attrs, None  # unreachable: a path has at least one part


def _is_number(leaf: Any) -> bool:
    return leaf in (int, float) or (
        typing.get_origin(leaf) in (Union, types.UnionType)
        and all(a in (int, float) for a in typing.get_args(leaf))
    )


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at the camelCase ``path`` of a spec dumped by alias (objects made as needed)."""
    node = spec
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_parameters(template: FineTuneJobSpec, params: dict[str, Any]) -> FineTuneJobSpec:
    """The template with each ``path: value`` set, validated as a FineTuneJob spec."""
    data = template.to_api()
    for path, value in params.items():
        set_path(data, path, value)
    return FineTuneJobSpec.model_validate(data)


def _bound_values(p: SearchParameter) -> list[Any]:
    """The values a parameter can take at its edges (all of them for choice)."""
    if p.type == "choice":
        return list(p.choices or [])
    if p.type == "int":
        return [int(p.low or 0), int(p.high or 0)]
    return [p.low, p.high]


def sweep_problems(spec: FineTuneSweepSpec) -> list[str]:
    """Every problem of the search space, each starting with the field it is about."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, p in enumerate(spec.parameters):
        field = f"spec.parameters[{i}]"
        if p.path in seen:
            problems.append(f"{field}.path: {p.path} is searched twice")
            continue
        seen.add(p.path)
        resolved = resolve_path(p.path)
        if isinstance(resolved, str):
            problems.append(f"{field}.path: {resolved}")
            continue
        _, leaf = resolved
        if p.type == "choice":
            if not p.choices:
                problems.append(f"{field}.choices: a choice parameter needs at least one value")
                continue
            if p.low is not None or p.high is not None:
                problems.append(f"{field}: a choice parameter takes choices, not low/high")
                continue
        else:
            if p.choices is not None:
                problems.append(f"{field}.choices: only a choice parameter takes choices (type is {p.type})")
                continue
            if p.step is not None and p.type != "int":
                problems.append(f"{field}.step: only an int parameter takes a step (type is {p.type})")
                continue
            if p.low is None or p.high is None:
                problems.append(f"{field}: type {p.type} needs low and high")
                continue
            if not _is_number(leaf):
                problems.append(f"{field}.path: {p.path} is not a number; search it with type: choice")
                continue
            if p.low > p.high:
                problems.append(f"{field}.low: {p.low:g} is greater than high {p.high:g}")
                continue
            if p.type == "logUniform" and p.low <= 0:
                problems.append(f"{field}.low: a logUniform range must be above 0 (got {p.low:g})")
                continue
            if p.type in ("uniform", "logUniform") and leaf is int:
                problems.append(f"{field}.type: {p.path} takes integers; use type: int")
                continue
            if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
                problems.append(f"{field}: type int needs whole-number low and high")
                continue
        # Every value at the edges must be one the template's field itself accepts.
        for value in _bound_values(p):
            try:
                apply_parameters(spec.template, {p.path: value})
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                msg = first["msg"].removeprefix("Value error, ")
                problems.append(f"{field}: {p.path}={value!r} is refused by the FineTuneJob spec: {msg}")
                break
    metric = spec.objective.metric
    if metric not in METRIC_NAMES:
        problems.append(
            f"spec.objective.metric: unknown metric {metric!r} (known: {', '.join(METRIC_NAMES)})"
        )
    elif metric != "eval_loss" and metric not in spec.template.evaluation.metrics:
        problems.append(
            f"spec.objective.metric: {metric} is not computed: add it to spec.template.evaluation.metrics"
        )
    if spec.pruning.type != "none":
        if metric != "eval_loss":
            problems.append(
                f"spec.pruning.type: pruning reads the eval_loss reports made during training; the objective "
                f"is {metric}, which is measured only after it: set pruning.type none"
            )
        elif spec.template.training.eval_every_steps is None:
            problems.append(
                "spec.template.training.evalEverySteps: pruning needs intermediate evaluations: set it "
                "(a trial is stopped within one such interval), or set spec.pruning.type none"
            )
    if spec.template.stages:
        problems.append("spec.template.stages: a sweep over a multi-stage job is not supported")
    return problems
