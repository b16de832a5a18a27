"""Quality gates: per-metric min/max thresholds that decide whether a model version is promotable.

A gate is ``{min: float | None, max: float | None}`` keyed by a metric name from
``spec.evaluation.gates`` (the same snake_case names :mod:`kubetune_trainer.evaluate.evaluator` produces).
Bounds are inclusive: ``min <= value <= max``.

A gate never passes silently:

* a gate naming a metric that was not computed FAILS (its message says so, e.g. ``json_validity``
  without ``spec.evaluation.jsonSchema``);
* a NaN value FAILS (a diverged loss must not sneak through a ``max`` bound, since every comparison
  with NaN is false);
* a gate with neither ``min`` nor ``max`` FAILS as misconfigured.

Common production bars, as examples for ``spec.evaluation.gates``::

    gates:
      accuracy:          {min: 0.92}   # task answers right at least 92% of the time
      consistency:       {min: 0.95}   # the same prompt sampled 5x gives near-identical answers
      latency_p95_ms:    {max: 500}    # p95 generation latency of the shipped artifact
      peak_memory_ratio: {max: 1.2}    # serving memory at most 1.2x the base model's
      eval_loss:         {max: 1.5}
      json_validity:     {min: 0.99}   # with evaluation.jsonSchema set

No heavy imports: this module is used by light code (the operator-facing report models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GateReport", "GateResult", "check_gates"]


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate; ``message`` is a sentence a user can act on."""

    metric: str
    min: float | None
    max: float | None
    value: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; a NaN value is written as ``None`` (JSON has no NaN)."""
        data = asdict(self)
        if self.value is not None and math.isnan(self.value):
            data["value"] = None
        return data


@dataclass(frozen=True)
class GateReport:
    """All gate results; ``passed`` is true only when every gate passed (vacuously true with no gates)."""

    passed: bool
    results: list[GateResult] = field(default_factory=list)

    @property
    def failed(self) -> list[GateResult]:
        """The gates that failed, in spec order."""
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        """One line for logs, status messages and Events, e.g. ``2/3 gates passed; accuracy = 0.9 ...``."""
        passed = sum(r.passed for r in self.results)
        line = f"{passed}/{len(self.results)} gates passed"
        if self.failed:
            line += "; " + "; ".join(r.message for r in self.failed)
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"passed": bool, "results": [GateResult.to_dict(), ...]}``."""
        return {"passed": self.passed, "results": [r.to_dict() for r in self.results]}


def _bound(gate: Any, name: str) -> float | None:
    """Read ``min``/``max`` from a pydantic model, a plain object or a dict."""
    raw = gate.get(name) if isinstance(gate, Mapping) else getattr(gate, name, None)
    return None if raw is None else float(raw)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _check_one(
    metric: str, lo: float | None, hi: float | None, value: float | None, why_missing: str | None
) -> GateResult:
    def result(passed: bool, message: str) -> GateResult:
        return GateResult(metric=metric, min=lo, max=hi, value=value, passed=passed, message=message)

    bounds = " and ".join(
        part
        for part in (f">= {_fmt(lo)}" if lo is not None else "", f"<= {_fmt(hi)}" if hi is not None else "")
        if part
    )
    if lo is None and hi is None:
        return result(False, f"gate on {metric} sets neither min nor max; set at least one bound")
    if value is None:
        missing = f"{metric} was not computed, so its gate ({bounds}) cannot pass"
        if why_missing:
            return result(False, f"{missing} ({why_missing})")
        return result(False, f"{missing}; add {metric} to spec.evaluation.metrics or remove the gate")
    if math.isnan(value):
        return result(False, f"{metric} is NaN (required {bounds})")
    if lo is not None and value < lo:
        return result(False, f"{metric} = {_fmt(value)} is below min {_fmt(lo)}")
    if hi is not None and value > hi:
        return result(False, f"{metric} = {_fmt(value)} is above max {_fmt(hi)}")
    return result(True, f"{metric} = {_fmt(value)} meets {bounds}")


def check_gates(
    metrics: Mapping[str, float],
    gates: Mapping[str, Any] | None,
    *,
    not_computed: Mapping[str, str] | None = None,
) -> GateReport:
    """Check every gate against the computed metrics.

    Args:
        metrics: metric name -> value, as computed for the tuned model (see
            :meth:`kubetune_trainer.evaluate.evaluator.EvalReport.gate_metrics`).
        gates: metric name -> gate; a gate is any object or dict with optional ``min``/``max``
            (``kubetune_api`` Gate models, plain dicts from YAML). ``None`` or empty means no gates.
        not_computed: metric -> why it was not computed (``EvalReport.skipped``), quoted in the
            failure message of a gate on that metric.

    Returns:
        A :class:`GateReport` with one result per gate in the order given. Never raises for a
        missing metric, a NaN or a bound-less gate: those are failed results with a message.

    Raises:
        ValueError: a bound is not a number (the spec validation should have caught it).
    """
    results = [
        _check_one(
            metric,
            _bound(gate, "min"),
            _bound(gate, "max"),
            None if metrics.get(metric) is None else float(metrics[metric]),
            (not_computed or {}).get(metric),
        )
        for metric, gate in (gates or {}).items()
    ]
    return GateReport(passed=all(r.passed for r in results), results=results)
