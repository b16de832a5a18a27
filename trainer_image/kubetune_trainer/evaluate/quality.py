"""The default quality gates: a version is promotable only if the tuned model beats its base.

Unless the spec opts out explicitly (``spec.evaluation.requireImprovement: false``), these gates
run on every version, next to the ones in ``spec.evaluation.gates``:

* ``eval_loss_vs_base``: the tuned model's held-out eval loss must be strictly below the base's,
  on the same examples. It fails (never passes vacuously) when the base was not evaluated
  (``compareBase: false``) or eval loss could not be computed.
* ``<metric>_vs_base`` for every quality metric gated in the spec on the tuned model (exact_match,
  rouge_l ...): the tuned model must be no worse than the base in that metric's direction. Latency
  and memory are properties of serving, not of learning, and keep only their absolute bounds; gates
  on an artifact (``int8.rouge_l``) add nothing here: they compare the artifact with the tuned model
  (``maxDropVsTuned``), see :mod:`~kubetune_trainer.evaluate.gates`.
* ``train_loss_decrease``: the training loss must have fallen by at least
  ``training.health.minLossDecrease`` (relative) from the run's first steps to its last
  (:meth:`kubetune_trainer.train.divergence.DivergenceMonitor.learning`): a run that does not
  learn fails here with a diagnosis naming the fields to change.

:func:`promotable` is what ``promote.when: gatesPassed`` asks: a version that ran no gate at all is
not promotable by that rule.

No heavy imports (pure functions over metric dicts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kubetune_api.metrics import LOWER_IS_BETTER
from kubetune_trainer.evaluate.gates import GateReport, GateResult, tuned_gates

#: Metrics whose direction says nothing about learning: they keep their absolute bounds only.
SERVING_METRICS = frozenset({"latency_p50_ms", "latency_p95_ms", "peak_memory_ratio"})
TRAIN_LOSS_GATE = "train_loss_decrease"
VS_BASE_SUFFIX = "_vs_base"


def is_default_gate(metric: str) -> bool:
    """True for a gate this module adds (as opposed to one from ``spec.evaluation.gates``)."""
    return metric == TRAIN_LOSS_GATE or metric.endswith(VS_BASE_SUFFIX)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _vs_base(
    metric: str, tuned: float | None, base: float | None, why_no_base: str, *, strict: bool
) -> GateResult:
    name = metric + VS_BASE_SUFFIX
    lower = metric in LOWER_IS_BETTER
    opt_out = "or opt out explicitly with spec.evaluation.requireImprovement: false"

    def result(passed: bool, message: str) -> GateResult:
        return GateResult(
            metric=name,
            min=None if lower else base,
            max=base if lower else None,
            value=tuned,
            passed=passed,
            message=message,
        )

    if tuned is None or (isinstance(tuned, float) and math.isnan(tuned)):
        return result(
            False, f"{metric} of the tuned model was not computed, so it cannot beat the base; {opt_out}"
        )
    if base is None:
        return result(False, f"{metric} cannot be compared with the base: {why_no_base}; {opt_out}")
    if not math.isfinite(tuned):
        return result(False, f"tuned {metric} is {tuned} (base {_fmt(base)})")
    word = "below" if lower else "above"
    if strict:
        better = tuned < base if lower else tuned > base
        need = f"strictly {word} the base's {_fmt(base)}"
    else:
        better = tuned <= base if lower else tuned >= base
        need = f"no worse than the base's {_fmt(base)}"
    if better:
        return result(True, f"tuned {metric} = {_fmt(tuned)} is {need}")
    return result(
        False,
        f"tuned {metric} = {_fmt(tuned)} does not beat the base ({_fmt(base)}): the fine-tune made the "
        f"model worse on held-out data; check training.learningRate, the data, or raise training.epochs",
    )


def _train_loss_gate(
    learning: Mapping[str, Any] | None, min_decrease: float, learning_rate: float
) -> GateResult:
    def result(passed: bool, value: float | None, message: str) -> GateResult:
        return GateResult(
            metric=TRAIN_LOSS_GATE, min=min_decrease, max=None, value=value, passed=passed, message=message
        )

    decrease = None if learning is None else learning.get("decrease")
    if decrease is None:
        return result(False, None, "no training step was recorded, so learning cannot be judged")
    initial, final = float(learning["initialLoss"]), float(learning["finalLoss"])  # type: ignore[index]
    if decrease >= min_decrease:
        return result(
            True,
            decrease,
            f"training loss fell {decrease:.1%} ({_fmt(initial)} -> {_fmt(final)}), at least {min_decrease:.1%}",
        )
    return result(
        False,
        decrease,
        f"not learning: training loss went {_fmt(initial)} -> {_fmt(final)} (a {-decrease:+.1%} change; a fall of at least {min_decrease:.1%} is required). Raise "
        f"training.learningRate (now {learning_rate:g}) if the loss barely moved, lower it if it rose; "
        "check that data.format/template put the answers where the loss is taken; or raise "
        "training.epochs / training.maxSteps",
    )


def default_gates(
    tuned: Mapping[str, float],
    base: Mapping[str, float] | None,
    spec_gates: Mapping[str, Any] | None,
    *,
    learning: Mapping[str, Any] | None,
    min_loss_decrease: float,
    learning_rate: float,
    why_no_base: str = "the base model was not evaluated (spec.evaluation.compareBase: false)",
) -> list[GateResult]:
    """The default gates' results, in a fixed order (eval loss, the spec's quality metrics, training loss).

    ``tuned``/``base``: metrics of the tuned and base models on the same eval examples (``base``
    None when it was not evaluated); ``learning``: :meth:`DivergenceMonitor.learning` of the run.
    """
    results = [
        _vs_base("eval_loss", tuned.get("eval_loss"), (base or {}).get("eval_loss"), why_no_base, strict=True)
    ]
    for metric in tuned_gates(spec_gates):
        if metric == "eval_loss" or metric in SERVING_METRICS:
            continue
        results.append(
            _vs_base(metric, tuned.get(metric), (base or {}).get(metric), why_no_base, strict=False)
        )
    results.append(_train_loss_gate(learning, min_loss_decrease, learning_rate))
    return results


def with_default_gates(report: GateReport, defaults: list[GateResult]) -> GateReport:
    """``report`` (the spec's gates) followed by the default gates; passed only if all pass."""
    results = [*report.results, *defaults]
    return GateReport(passed=all(r.passed for r in results), results=results)


def promotable(report: GateReport) -> tuple[bool, str]:
    """What ``promote.when: gatesPassed`` decides, and why: at least one gate ran and all passed."""
    if not report.results:
        return False, (
            "no gate ran (spec.evaluation.requireImprovement is false and spec.evaluation.gates is empty), "
            "so promote.when gatesPassed does not move the alias; add a gate or use when: always"
        )
    if not report.passed:
        return False, report.summary()
    return True, report.summary()


__all__ = [
    "SERVING_METRICS",
    "TRAIN_LOSS_GATE",
    "default_gates",
    "is_default_gate",
    "promotable",
    "with_default_gates",
]
