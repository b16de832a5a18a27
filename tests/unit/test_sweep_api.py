"""FineTuneSweep: the search space is checked against the FineTuneJob spec with the field and line
named; values land at their paths; the Optuna search is reproducible and prunes from the records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api.loader import SpecError, document_kind, load_sweep, parse_sweep
from kubetune_api.sweep import FineTuneSweep, TrialRecord, apply_parameters

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sweep" / "finetunesweep.yaml"


def _doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "template": {
            "model": {"name": "m", "base": {"uri": "file:///tmp/base"}},
            "data": {"train": {"uri": "file:///tmp/train.jsonl"}},
            "training": {"evalEverySteps": 5},
            "output": {"uri": "file:///tmp/out"},
        },
        "parameters": [{"path": "training.learningRate", "type": "logUniform", "low": 1e-5, "high": 1e-2}],
        "maxTrials": 4,
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "s"},
        "spec": base,
    }


def _problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_sweep(yaml.safe_dump(doc, sort_keys=False), "sweep.yaml")
    return err.value.problems


def test_the_example_is_a_valid_sweep() -> None:
    sweep = load_sweep(EXAMPLE)
    assert document_kind(EXAMPLE) == "FineTuneSweep"
    assert [p.path for p in sweep.spec.parameters] == ["training.learningRate", "method.lora.r"]
    assert sweep.spec.objective.resolved_direction == "minimize"


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        (
            {"path": "training.learnRate", "type": "uniform", "low": 0.1, "high": 0.2},
            "spec.parameters[0].path: unknown field 'learnRate' in training",
        ),
        (
            {"path": "method.lora.r", "type": "choice", "choices": []},
            "spec.parameters[0].choices: a choice parameter needs at least one value",
        ),
        (
            {"path": "training.warmupRatio", "type": "uniform", "low": 0.3, "high": 0.1},
            "spec.parameters[0].low: 0.3 is greater than high 0.1",
        ),
        (
            {"path": "training.learningRate", "type": "logUniform", "low": 0, "high": 0.1},
            "spec.parameters[0].low: a logUniform range must be above 0",
        ),
        (
            {"path": "training.scheduler", "type": "uniform", "low": 0, "high": 1},
            "spec.parameters[0].path: training.scheduler is not a number",
        ),
        (
            {"path": "training.batchSize", "type": "uniform", "low": 1, "high": 8},
            "spec.parameters[0].type: training.batchSize takes integers; use type: int",
        ),
        (
            {"path": "method.lora.r", "type": "choice", "choices": [0, 8]},
            "spec.parameters[0]: method.lora.r=0 is refused by the FineTuneJob spec",
        ),
        (
            {"path": "training.learningRate.value", "type": "uniform", "low": 0.1, "high": 0.2},
            "spec.parameters[0].path: training.learningRate is a value, not an object",
        ),
        (
            {"path": "training.warmupRatio", "type": "uniform", "low": 0.0, "high": 0.1, "step": 1},
            "spec.parameters[0].step: only an int parameter takes a step",
        ),
        (
            {"path": "method.lora.r", "type": "int", "low": 4, "high": 16, "step": 0.5},
            "spec.parameters[0].step: Input should be a valid integer",
        ),
    ],
)
def test_an_invalid_search_space_is_refused_with_its_field_and_line(
    parameter: dict[str, Any], expected: str
) -> None:
    text = yaml.safe_dump(_doc(parameters=[parameter]), sort_keys=False)
    problems = _problems(_doc(parameters=[parameter]))
    assert len(problems) == 1, problems
    where, _, message = problems[0].partition(": ")
    assert message.startswith(expected), problems
    # The line is the named field's own: spec.parameters[0].low -> the `low:` line; the whole
    # parameter -> its first line.
    line = text.splitlines()[int(where.removeprefix("sweep.yaml:")) - 1]
    field = expected.split(":", 1)[0].rsplit(".", 1)[-1]
    assert (f"{field}:" in line) if not field.endswith("]") else line.strip().startswith("- path:"), line


def test_a_budget_of_zero_is_refused() -> None:
    text = yaml.safe_dump(_doc(maxTrials=0), sort_keys=False)
    line = text.splitlines().index("  maxTrials: 0") + 1
    assert _problems(_doc(maxTrials=0)) == [
        f"sweep.yaml:{line}: spec.maxTrials: Input should be greater than or equal to 1"
    ]


def test_the_objective_and_pruning_must_be_measurable() -> None:
    problems = _problems(_doc(objective={"metric": "rouge"}))
    assert any(
        p.split(": ", 1)[1].startswith("spec.objective.metric: unknown metric 'rouge'") for p in problems
    )
    problems = _problems(_doc(objective={"metric": "json_validity"}, pruning={"type": "none"}))
    assert any(
        "json_validity is not computed: add it to spec.template.evaluation.metrics" in p for p in problems
    )
    doc = _doc()
    del doc["spec"]["template"]["training"]["evalEverySteps"]
    (problem,) = _problems(doc)
    assert "spec.template.training.evalEverySteps: pruning needs intermediate evaluations" in problem
    doc["spec"]["pruning"] = {"type": "none"}
    parse_sweep(yaml.safe_dump(doc))  # no pruning: no intermediate evaluations needed


def test_parameters_land_at_their_paths_and_the_digest_follows_the_spec() -> None:
    sweep = FineTuneSweep.model_validate(_doc())
    spec = apply_parameters(sweep.spec.template, {"training.learningRate": 3e-4, "method.lora.r": 4})
    assert spec.training.learning_rate == 3e-4 and spec.method.lora.r == 4
    assert sweep.spec.template.method.lora.r == 16  # the template is not changed
    again = FineTuneSweep.model_validate(_doc())
    assert sweep.digest() == again.digest()
    assert FineTuneSweep.model_validate(_doc(maxTrials=5)).digest() != sweep.digest()


# --- the search (Optuna) -----------------------------------------------------------------------


def _spec(**spec: Any) -> Any:
    return FineTuneSweep.model_validate(_doc(**spec)).spec


def test_trials_are_reproducible_by_seed_and_follow_the_records() -> None:
    from kubetune_search.study import next_params

    spec = _spec(
        parameters=[
            {"path": "training.learningRate", "type": "logUniform", "low": 1e-5, "high": 1e-2},
            {"path": "method.lora.r", "type": "choice", "choices": [4, 8, 16]},
        ]
    )
    first = [next_params(spec, [], n) for n in range(3)]
    assert first == [next_params(spec, [], n) for n in range(3)]  # same sweep, same draws
    assert len({p["training.learningRate"] for p in first}) == 3  # seed + n: distinct draws
    assert all(1e-5 <= p["training.learningRate"] <= 1e-2 and p["method.lora.r"] in (4, 8, 16) for p in first)
    other = _spec(parameters=[p.to_api() for p in spec.parameters], sampler={"seed": 1})
    assert [next_params(other, [], n) for n in range(3)] != first


def _record(number: int, lr: float, state: Any, **fields: Any) -> TrialRecord:
    return TrialRecord(number=number, params={"training.learningRate": lr}, state=state, **fields)


def test_the_median_pruner_stops_a_trial_worse_than_the_finished_ones() -> None:
    from kubetune_search.study import best, should_prune

    spec = _spec(pruning={"type": "median", "startupTrials": 2})
    done = [
        _record(0, 1e-3, "complete", value=2.0, intermediate={5: 3.0, 10: 2.0}),
        _record(1, 2e-3, "complete", value=2.2, intermediate={5: 3.2, 10: 2.2}),
    ]
    worse = _record(2, 1e-5, "running", intermediate={5: 8.0})
    better = _record(3, 3e-3, "running", intermediate={5: 2.5})
    assert should_prune(spec, [*done, worse], worse)
    assert not should_prune(spec, [*done, better], better)
    assert not should_prune(spec, [*done[:1], worse], worse)  # one finished trial: still starting up
    assert not should_prune(_spec(pruning={"type": "none"}), [*done, worse], worse)
    assert best(spec, done) is done[0]
    assert best(_spec(objective={"metric": "eval_loss", "direction": "maximize"}), done) is done[1]


def test_the_study_rebuilds_from_records_as_json_gives_them_back() -> None:
    """Pruned and failed trials, step keys as strings (a JSON round trip)."""
    import json

    from kubetune_search.study import next_params, should_prune

    spec = _spec(pruning={"type": "median", "startupTrials": 1})
    records = [
        _record(0, 1e-3, "complete", value=2.0, intermediate={5: 3.0, 10: 2.0}),
        _record(1, 1e-5, "pruned", intermediate={5: 8.0}, message="pruned"),
        _record(2, 5e-3, "failed", message="Diverged"),
    ]
    again = [TrialRecord.model_validate(json.loads(json.dumps(r.to_api()))) for r in records]
    assert again == records and all(isinstance(k, int) for r in again for k in r.intermediate)
    assert 1e-5 <= next_params(spec, again, 3)["training.learningRate"] <= 1e-2
    worse = _record(3, 2e-5, "running", intermediate={5: 7.5})
    assert should_prune(spec, [*again, worse], worse)
