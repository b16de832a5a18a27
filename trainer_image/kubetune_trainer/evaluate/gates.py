"""Quality gates: per-metric thresholds that decide whether a model version is promotable.

A gate is ``{min, max, maxDropVsTuned, significant}`` (all optional, at least one set) keyed in
``spec.evaluation.gates`` by what it judges:

* ``<metric>`` (e.g. ``rouge_l``): the **tuned model as evaluated** — for LoRA/QLoRA/IA3 the adapter
  on its base in the training precision (peft), for full fine-tuning the trained weights — checked by
  :func:`check_gates` in the evaluate stage;
* ``<artifact>.<metric>`` (e.g. ``int8.latency_p95_ms``, ``onnx-int8.rouge_l``): a **published
  artifact** — ``merged`` or a format of ``spec.quantization.formats`` — reloaded from disk and
  evaluated on the same eval set (the same loss examples, the same generation samples), checked by
  :func:`check_artifact_gates` once the artifacts exist. ``maxDropVsTuned: 0.02`` bounds it relative
  to the tuned model's value of the same metric: at most 2% worse in the metric's bad direction
  (``value >= 0.98 x tuned`` for rouge_l, ``value <= 1.02 x tuned`` for latency or eval_loss).

``significant: true`` (tuned-model gates only) also requires the paired bootstrap interval of
``tuned - base`` on the same held-out examples (the eval report's ``paired`` section,
:mod:`kubetune_trainer.evaluate.paired`) to exclude 0 on the metric's better side: a gain, not noise.
It fails when there is no interval (no base comparison, a metric without per-example scores).

The metric names are the snake_case ones :mod:`kubetune_trainer.evaluate.evaluator` produces.
Bounds are inclusive: ``min <= value <= max``.

A gate never passes silently:

* a gate naming a metric that was not computed FAILS (its message says so, e.g. ``json_validity``
  without ``spec.evaluation.jsonSchema``); so does one on an artifact that was not evaluated, and a
  ``maxDropVsTuned`` whose tuned value is missing;
* a NaN value FAILS (a diverged loss must not sneak through a ``max`` bound, since every comparison
  with NaN is false);
* a gate with no bound at all FAILS as misconfigured.

Common production bars, as examples for ``spec.evaluation.gates``::

    gates:
      accuracy:          {min: 0.92}   # task answers right at least 92% of the time
      consistency:       {min: 0.95}   # the same prompt sampled 5x gives near-identical answers
      peak_memory_ratio: {max: 1.2}    # the tuned model's memory at most 1.2x the base model's
      eval_loss:         {max: 1.5}
      json_validity:     {min: 0.99}   # with evaluation.jsonSchema set
      int8.latency_p95_ms: {max: 500}  # p95 generation latency of the shipped int8 artifact
      int8.accuracy:     {maxDropVsTuned: 0.02}  # ship int8 only within 2% of the tuned model
      rouge_l:           {significant: true}  # better than the base beyond its 95% CI

No heavy imports: this module is used by light code (the operator-facing report models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kubetune_api.metrics import LOWER_IS_BETTER, PAIRED_METRICS
from kubetune_api.rules import split_gate_key

__all__ = [
    "GateReport",
    "GateResult",
    "artifact_gates",
    "check_artifact_gates",
    "check_gates",
    "significance_verdict",
    "tuned_gates",
]


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

    def plus(self, results: Sequence[GateResult]) -> GateReport:
        """This report followed by ``results``; passed only if every gate of both passed."""
        merged = [*self.results, *results]
        return GateReport(passed=all(r.passed for r in merged), results=merged)


def _bound(gate: Any, name: str) -> float | None:
    """Read ``min``/``max``/``max_drop_vs_tuned`` from a pydantic model, a plain object or a dict
    (snake_case or, as YAML writes it, camelCase)."""
    if isinstance(gate, Mapping):
        camel = "".join(w.capitalize() if i else w for i, w in enumerate(name.split("_")))
        raw = gate.get(name, gate.get(camel))
    else:
        raw = getattr(gate, name, None)
    return None if raw is None else float(raw)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _check_one(
    metric: str,
    lo: float | None,
    hi: float | None,
    value: float | None,
    why_missing: str | None,
    *,
    drop: float | None = None,
    tuned: float | None = None,
    lower_is_better: bool = False,
) -> GateResult:
    """One gate. ``drop``/``tuned``: an artifact gate's maxDropVsTuned and the tuned model's value
    of the same metric; the relative bound is folded into min (or max, for a lower-is-better
    metric), so the result's min/max are the bounds that were applied."""

    def result(passed: bool, message: str, low: float | None = lo, high: float | None = hi) -> GateResult:
        return GateResult(metric=metric, min=low, max=high, value=value, passed=passed, message=message)

    def bounds_text(low: float | None, high: float | None) -> str:
        parts = (f">= {_fmt(low)}" if low is not None else "", f"<= {_fmt(high)}" if high is not None else "")
        return " and ".join(p for p in parts if p)

    if lo is None and hi is None and drop is None:
        return result(False, f"gate on {metric} sets neither min nor max; set at least one bound")
    relative: str | None = None
    if drop is not None:
        if tuned is None or math.isnan(tuned):
            return result(
                False,
                f"{metric}: the tuned model's value was not computed, so maxDropVsTuned {drop:g} "
                "cannot be judged",
            )
        if lower_is_better:
            bound = tuned * (1 + drop)
            hi = bound if hi is None else min(hi, bound)
        else:
            bound = tuned * (1 - drop)
            lo = bound if lo is None else max(lo, bound)
        relative = f"within {drop:.1%} of the tuned model's {_fmt(tuned)}"
    bounds = bounds_text(lo, hi)
    if value is None:
        missing = f"{metric} was not computed, so its gate ({bounds}) cannot pass"
        if why_missing:
            return result(False, f"{missing} ({why_missing})", lo, hi)
        return result(False, f"{missing}; add {metric} to spec.evaluation.metrics or remove the gate", lo, hi)
    if math.isnan(value):
        return result(False, f"{metric} is NaN (required {bounds})", lo, hi)
    if lo is not None and value < lo:
        why = f"; required {relative}" if relative else ""
        return result(False, f"{metric} = {_fmt(value)} is below min {_fmt(lo)}{why}", lo, hi)
    if hi is not None and value > hi:
        why = f"; required {relative}" if relative else ""
        return result(False, f"{metric} = {_fmt(value)} is above max {_fmt(hi)}{why}", lo, hi)
    return result(
        True, f"{metric} = {_fmt(value)} meets {bounds}" + (f" ({relative})" if relative else ""), lo, hi
    )


def _flag(gate: Any, name: str) -> bool:
    """A boolean field of a gate (pydantic model, object or dict); absent is False."""
    raw = gate.get(name, False) if isinstance(gate, Mapping) else getattr(gate, name, False)
    return bool(raw)


def significance_verdict(metric: str, paired: Mapping[str, Mapping[str, Any]] | None) -> tuple[bool, str]:
    """Whether a ``significant: true`` gate on ``metric`` passes, and the sentence that says why.

    ``paired``: metric -> ``PairedDifference.to_dict()`` (the eval report's ``paired`` section). It
    passes when the interval of ``tuned - base`` excludes 0 on the better side; it fails when there
    is no interval (no base comparison, or a metric without per-example scores).
    """
    d = (paired or {}).get(metric)
    if d is None:
        return False, (
            f"{metric}: no paired confidence interval, so 'significant' cannot pass (needs compareBase "
            f"and one of {', '.join(PAIRED_METRICS)})"
        )
    pct = round(float(d["confidence"]) * 100)
    ci = f"{pct}% CI [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
    if d["improved"]:
        return True, f"{metric} improved on the base by {d['difference']:+.4g} ({ci})"
    if d["significant"]:
        return False, f"{metric} is significantly worse than the base: {d['difference']:+.4g} ({ci})"
    return (
        False,
        f"{metric} difference from the base {d['difference']:+.4g} is not significant ({ci} includes 0)",
    )


def tuned_gates(gates: Mapping[str, Any] | None) -> dict[str, Any]:
    """The gates on the tuned model (keys ``<metric>``), in spec order."""
    return {k: g for k, g in (gates or {}).items() if split_gate_key(k)[0] is None}


def artifact_gates(gates: Mapping[str, Any] | None) -> dict[str, Any]:
    """The gates on a published artifact (keys ``<artifact>.<metric>``), in spec order."""
    return {k: g for k, g in (gates or {}).items() if split_gate_key(k)[0] is not None}


def check_gates(
    metrics: Mapping[str, float],
    gates: Mapping[str, Any] | None,
    *,
    not_computed: Mapping[str, str] | None = None,
    paired: Mapping[str, Mapping[str, Any]] | None = None,
) -> GateReport:
    """Check every gate against the computed metrics.

    Args:
        metrics: metric name -> value, as computed for the tuned model (see
            :meth:`kubetune_trainer.evaluate.evaluator.EvalReport.gate_metrics`).
        gates: metric name -> gate; a gate is any object or dict with optional ``min``/``max``
            (``kubetune_api`` Gate models, plain dicts from YAML). ``None`` or empty means no gates.
            Pass only gates on the tuned model (:func:`tuned_gates`): an ``<artifact>.<metric>``
            key is looked up as a metric name here, finds none and fails.
        not_computed: metric -> why it was not computed (``EvalReport.skipped``), quoted in the
            failure message of a gate on that metric.
        paired: metric -> paired interval of tuned - base (``EvalReport.paired``), read by
            ``significant: true`` gates (see :func:`significance_verdict`).

    Returns:
        A :class:`GateReport` with one result per gate in the order given. Never raises for a
        missing metric, a NaN or a bound-less gate: those are failed results with a message.

    Raises:
        ValueError: a bound is not a number (the spec validation should have caught it).
    """
    results: list[GateResult] = []
    for metric, gate in (gates or {}).items():
        lo, hi = _bound(gate, "min"), _bound(gate, "max")
        value = None if metrics.get(metric) is None else float(metrics[metric])
        if not _flag(gate, "significant"):
            results.append(_check_one(metric, lo, hi, value, (not_computed or {}).get(metric)))
            continue
        ok, why = significance_verdict(metric, paired)
        if lo is None and hi is None:
            results.append(GateResult(metric=metric, min=None, max=None, value=value, passed=ok, message=why))
            continue
        bounded = _check_one(metric, lo, hi, value, (not_computed or {}).get(metric))
        if not bounded.passed:
            results.append(bounded)
        else:
            results.append(replace(bounded, passed=ok, message=f"{bounded.message}; {why}"))
    return GateReport(passed=all(r.passed for r in results), results=results)


def check_artifact_gates(
    gates: Mapping[str, Any] | None,
    tuned: Mapping[str, float],
    artifacts: Mapping[str, Mapping[str, float]],
    *,
    not_computed: Mapping[str, Mapping[str, str]] | None = None,
    not_evaluated: Mapping[str, str] | None = None,
    tuned_for: Mapping[str, Mapping[str, float]] | None = None,
) -> list[GateResult]:
    """Check the ``<artifact>.<metric>`` gates against each artifact's own evaluation.

    Args:
        gates: ``spec.evaluation.gates`` (gates on the tuned model are ignored here).
        tuned: the tuned model's metrics on the same eval set (``maxDropVsTuned`` compares with them).
        artifacts: artifact name (``merged``, ``int8``, ...) -> its metrics on the eval set.
        not_computed: artifact -> metric -> why that metric was not computed for it.
        not_evaluated: artifact -> why it was not evaluated at all (quoted by a gate on it).
        tuned_for: artifact -> the tuned model's metrics on that artifact's examples, where they
            differ from ``tuned`` (an artifact judged on the first ``artifactMaxSamples``).

    Returns:
        One :class:`GateResult` per artifact gate, in spec order, ``metric`` being the gate key
        (``int8.rouge_l``). Never raises for a missing artifact or metric: those fail.
    """
    results: list[GateResult] = []
    for key, gate in artifact_gates(gates).items():
        artifact, metric = split_gate_key(key)
        assert artifact is not None  # artifact_gates() keeps only <artifact>.<metric> keys
        drop = _bound(gate, "max_drop_vs_tuned")
        measured = artifacts.get(artifact)
        if measured is None:
            why = (not_evaluated or {}).get(artifact) or f"artifact {artifact} was not built or evaluated"
            results.append(
                GateResult(
                    metric=key,
                    min=_bound(gate, "min"),
                    max=_bound(gate, "max"),
                    value=None,
                    passed=False,
                    message=f"{key} cannot pass: {why}",
                )
            )
            continue
        raw = measured.get(metric)
        reference = (tuned_for or {}).get(artifact, tuned)
        results.append(
            _check_one(
                key,
                _bound(gate, "min"),
                _bound(gate, "max"),
                None if raw is None else float(raw),
                (not_computed or {}).get(artifact, {}).get(metric),
                drop=drop,
                tuned=None if reference.get(metric) is None else float(reference[metric]),
                lower_is_better=metric in LOWER_IS_BETTER,
            )
        )
    return results
