"""Gates pass and fail as a user reads them in the report: never silently."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from kubetune_trainer.evaluate.gates import check_gates


@dataclass
class Gate:  # the shape of kubetune_api's Gate model: attributes, not a dict
    min: float | None = None
    max: float | None = None


def test_all_gates_pass() -> None:
    report = check_gates(
        {"accuracy": 0.95, "latency_p95_ms": 320.0, "peak_memory_ratio": 1.2},
        {"accuracy": {"min": 0.92}, "latency_p95_ms": Gate(max=500), "peak_memory_ratio": {"max": 1.2}},
    )
    assert report.passed
    assert [r.metric for r in report.results] == ["accuracy", "latency_p95_ms", "peak_memory_ratio"]
    assert report.results[0].message == "accuracy = 0.95 meets >= 0.92"
    assert report.summary() == "3/3 gates passed"


def test_below_min_and_above_max_fail_with_values_in_the_message() -> None:
    report = check_gates(
        {"accuracy": 0.91, "latency_p95_ms": 612.5, "consistency": 0.97},
        {"accuracy": {"min": 0.92}, "latency_p95_ms": {"max": 500}, "consistency": {"min": 0.95, "max": 1.0}},
    )
    assert not report.passed
    assert [r.message for r in report.failed] == [
        "accuracy = 0.91 is below min 0.92",
        "latency_p95_ms = 612.5 is above max 500",
    ]
    assert report.summary().startswith("1/3 gates passed; accuracy = 0.91 is below min 0.92")


def test_missing_metric_fails_and_says_why() -> None:
    report = check_gates({"accuracy": 0.99}, {"json_validity": Gate(min=0.99)})
    assert not report.passed
    (result,) = report.results
    assert result.value is None and not result.passed
    assert "json_validity was not computed" in result.message
    assert "spec.evaluation.metrics" in result.message


def test_nan_fails_even_against_a_max_only_gate() -> None:
    report = check_gates({"eval_loss": math.nan}, {"eval_loss": {"max": 1.5}})
    assert not report.passed
    assert report.results[0].message == "eval_loss is NaN (required <= 1.5)"
    # JSON has no NaN: the report writes null.
    assert json.dumps(report.to_dict(), allow_nan=False)
    assert report.to_dict()["results"][0]["value"] is None


def test_gate_without_bounds_fails() -> None:
    report = check_gates({"bleu": 30.0}, {"bleu": {}})
    assert not report.passed
    assert "neither min nor max" in report.results[0].message


def test_bounds_are_inclusive_and_no_gates_pass() -> None:
    assert check_gates({"accuracy": 0.92}, {"accuracy": Gate(min=0.92, max=0.92)}).passed
    empty = check_gates({"accuracy": 0.1}, None)
    assert empty.passed and empty.results == []


def test_missing_metric_message_quotes_the_reason() -> None:
    report = check_gates(
        {},
        {"json_validity": {"min": 0.99}},
        not_computed={"json_validity": "spec.evaluation.jsonSchema is not set"},
    )
    assert report.results[0].message == (
        "json_validity was not computed, so its gate (>= 0.99) cannot pass (spec.evaluation.jsonSchema is not set)"
    )
