"""DivergenceMonitor and the default quality gates as plain functions (issue 17, items 1 and 2).

The loss curves are the ones measured on the demo model with the issue's recipe (full fine-tuning,
learningRate 1.0, maxGradNorm 1000, warmupRatio 0, constant schedule): the old monitor waited for
step 10 and compared against a best loss taken after the blow-up, so it never stopped that run.
"""

from __future__ import annotations

import math

import pytest

from kubetune_trainer.evaluate.gates import check_gates
from kubetune_trainer.evaluate.quality import (
    default_gates,
    is_default_gate,
    promotable,
    with_default_gates,
)
from kubetune_trainer.train.divergence import DivergenceMonitor, RecipeFacts, TrainingDivergedError

ISSUE_RECIPE = RecipeFacts(learning_rate=1.0, max_grad_norm=1000, warmup_ratio=0.0, scheduler="constant")
SANE_RECIPE = RecipeFacts(learning_rate=2e-4, max_grad_norm=1.0, warmup_ratio=0.03, scheduler="cosine")
# Measured: full FT, the issue's recipe, demo model, per-step loss (steps 1..8).
DIVERGED_FULL_FT = [8.49, 14.23, 20.84, 24.86, 36.62, 70.86, 60.48, 56.50]
# Measured: the quickstart's LoRA run at its own rate (falls to ~0.01), with small-batch noise.
HEALTHY = [8.49, 6.1, 4.9, 3.2, 2.5, 2.9, 1.7, 1.1, 0.8, 1.3, 0.4, 0.2, 0.35, 0.05, 0.02, 0.08, 0.01]


def feed(monitor: DivergenceMonitor, losses: list[float], norms: list[float] | None = None) -> int:
    for i, loss in enumerate(losses):
        monitor.update(i + 1, loss, None if norms is None else norms[i])
    return len(losses)


def test_the_issues_diverged_run_stops_at_step_5_and_names_the_fields_to_change() -> None:
    monitor = DivergenceMonitor(ISSUE_RECIPE)
    with pytest.raises(TrainingDivergedError) as err:
        feed(monitor, DIVERGED_FULL_FT)
    message = str(err.value)
    assert "diverged" in message and "at step 5" in message
    assert "step 1 was 8.49" in message
    for field in (
        "training.learningRate (now 1",
        "training.maxGradNorm",
        "training.warmupRatio",
        "training.scheduler",
    ):
        assert field in message, message
    assert "plateau" not in message and "domain data" not in message


def test_a_sane_recipe_is_not_told_to_change_what_it_already_does_right() -> None:
    monitor = DivergenceMonitor(SANE_RECIPE)
    with pytest.raises(TrainingDivergedError) as err:
        feed(monitor, [2.0, 2.1, 5.0, 6.0, 7.0])
    message = str(err.value)
    assert "learningRate (now 0.0002" in message
    assert "maxGradNorm" not in message and "warmupRatio" not in message and "scheduler" not in message


def test_a_healthy_noisy_run_is_never_stopped_and_counts_as_learning() -> None:
    monitor = DivergenceMonitor(ISSUE_RECIPE)
    feed(monitor, HEALTHY, norms=[5.0, 4.0, 3.0, 2.5, 2.0, 6.0, 1.5, 1.0] + [0.5] * 9)
    learning = monitor.learning()
    assert learning["initialLoss"] == pytest.approx(6.1)  # median of the first 3 steps
    assert learning["decrease"] > 0.9


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_or_gradient_norm_stops_at_step_1(bad: float) -> None:
    with pytest.raises(TrainingDivergedError, match="at step 1"):
        DivergenceMonitor(ISSUE_RECIPE).update(1, bad, 1.0)
    with pytest.raises(TrainingDivergedError, match=r"gradient norm became .* at step 1"):
        DivergenceMonitor(ISSUE_RECIPE).update(1, 3.0, bad)
    with pytest.raises(TrainingDivergedError, match="at step 1"):
        DivergenceMonitor(ISSUE_RECIPE).check_finite(1, bad, 1.0)


def test_one_gradient_spike_warns_a_sustained_explosion_stops() -> None:
    # Measured on the LoRA variant of the issue's recipe: 4.8 at step 1, 105.9 at step 2, then 0.8.
    monitor = DivergenceMonitor(ISSUE_RECIPE)
    assert monitor.update(1, 8.49, 4.8) is None
    warning = monitor.update(2, 6.42, 105.9)
    assert warning is not None and warning["kind"] == "gradient-spike"
    assert "22x" in warning["message"] and "maxGradNorm to 1.0" in warning["hints"][0]
    assert monitor.update(3, 5.41, 0.8) is None

    exploding = DivergenceMonitor(ISSUE_RECIPE)
    exploding.update(1, 3.0, 2.0)
    exploding.update(2, 3.0, 2.5)
    exploding.update(3, 3.0, 100.0)
    with pytest.raises(TrainingDivergedError, match=r"gradient norm exploded: .* at step 4"):
        exploding.update(4, 3.1, 400.0)


def test_a_flat_loss_is_not_learning() -> None:
    monitor = DivergenceMonitor(ISSUE_RECIPE)
    feed(monitor, [8.49, 8.50, 8.48, 8.49, 8.47, 8.49, 8.48, 8.50])
    assert abs(monitor.learning()["decrease"]) < 0.01


def test_state_survives_a_checkpoint_round_trip() -> None:
    straight, resumed = DivergenceMonitor(ISSUE_RECIPE), DivergenceMonitor(ISSUE_RECIPE)
    feed(straight, DIVERGED_FULL_FT[:3])
    resumed.load_state_dict(straight.state_dict())
    with pytest.raises(TrainingDivergedError, match="at step 5"):
        for step, loss in enumerate(DIVERGED_FULL_FT[3:], start=4):
            resumed.update(step, loss)


# --- default gates ------------------------------------------------------------------------------

LEARNED = {"initialLoss": 8.5, "finalLoss": 0.5, "decrease": 0.94}


def gates_for(
    tuned: dict[str, float], base: dict[str, float] | None, spec: dict | None = None, learning=LEARNED
):  # type: ignore[no-untyped-def]
    spec_report = check_gates(tuned, spec or {})
    defaults = default_gates(tuned, base, spec, learning=learning, min_loss_decrease=0.02, learning_rate=1.0)
    return with_default_gates(spec_report, defaults)


def test_the_issues_published_diverged_model_fails_the_default_gate() -> None:
    # The issue's numbers: tuned eval_loss 58.5 against the base's 9.27, and no gates in the spec.
    report = gates_for({"eval_loss": 58.5}, {"eval_loss": 9.27})
    assert not report.passed
    [vs_base] = [r for r in report.results if r.metric == "eval_loss_vs_base"]
    assert not vs_base.passed and "58.5" in vs_base.message and "9.27" in vs_base.message
    assert promotable(report)[0] is False


def test_a_better_model_passes_and_gated_quality_metrics_must_not_get_worse() -> None:
    report = gates_for(
        {"eval_loss": 1.0, "rouge_l": 0.5, "latency_p95_ms": 900.0},
        {"eval_loss": 8.0, "rouge_l": 0.6, "latency_p95_ms": 100.0},
        spec={"rouge_l": {"min": 0.1}, "latency_p95_ms": {"max": 1000}},
    )
    by_metric = {r.metric: r for r in report.results}
    assert by_metric["eval_loss_vs_base"].passed
    assert not by_metric["rouge_l_vs_base"].passed  # 0.5 < base 0.6
    assert "latency_p95_ms_vs_base" not in by_metric  # serving metrics keep absolute bounds only
    assert by_metric["rouge_l"].passed and not report.passed
    assert [is_default_gate(m) for m in by_metric] == [False, False, True, True, True]


def test_the_default_gate_never_passes_without_a_base() -> None:
    report = gates_for({"eval_loss": 1.0}, None)
    [vs_base] = [r for r in report.results if r.metric == "eval_loss_vs_base"]
    assert not vs_base.passed and "compareBase" in vs_base.message and "requireImprovement" in vs_base.message


def test_not_learning_fails_its_default_gate_with_a_diagnosis() -> None:
    flat = {"initialLoss": 8.49, "finalLoss": 8.46, "decrease": 0.0035}
    report = gates_for({"eval_loss": 8.40}, {"eval_loss": 8.41}, learning=flat)
    [train] = [r for r in report.results if r.metric == "train_loss_decrease"]
    assert not train.passed and "not learning" in train.message and "training.learningRate" in train.message
    assert not report.passed


def test_promote_when_gates_passed_never_passes_vacuously() -> None:
    ok, why = promotable(check_gates({"eval_loss": 1.0}, {}))
    assert ok is False and "no gate ran" in why
    assert promotable(gates_for({"eval_loss": 1.0}, {"eval_loss": 2.0}))[0] is True
