"""Divergence and non-learning, judged against the run's own first steps, from step 1.

:class:`DivergenceMonitor` is fed every optimizer step's loss (the mean over its micro-batches,
all-reduced across ranks) and its total gradient norm before clipping (the same on every rank:
DDP gradients are synced, DeepSpeed reports the global norm). It stops a run
(:class:`TrainingDivergedError`, exit code 5) when

* a loss or gradient norm is NaN/inf — at once, from step 1;
* the loss explodes: ``patience`` consecutive steps above both ``loss_factor`` x and
  ``loss_margin`` nats above the best smoothed loss so far, the first step's loss included (so a
  run that blows up at step 2 is caught at step 4, not after a warm-up of ten steps);
* the gradient norm explodes: ``grad_patience`` consecutive steps above ``grad_factor`` x the
  smallest of the first ``reference_steps`` norms. A single spike only warns.

Each diagnosis says what happened (values, steps) and which spec fields to change, naming only the
ones that are out of the ordinary for this run (a ``maxGradNorm`` that clips nothing, no warm-up, a
constant schedule, fp16).

"Not learning" does not stop a run: :meth:`DivergenceMonitor.learning` measures how much the
training loss fell from the first steps to the last, and the default quality gate
``train_loss_decrease`` (:mod:`kubetune_trainer.evaluate.quality`) fails a version whose loss fell
by less than ``training.health.minLossDecrease``.

The monitor's state is plain JSON (:meth:`state_dict`), kept in every checkpoint, so a resumed run
judges against the same first steps. Importing this module does not import torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN/inf or exploded; the message says what to change."""


@dataclass(frozen=True)
class RecipeFacts:
    """The settings a diagnosis may point at (values as the spec resolved them)."""

    learning_rate: float
    max_grad_norm: float
    warmup_ratio: float
    scheduler: str
    precision: str = "fp32"


#: A maxGradNorm above this clips (almost) nothing: a diagnosis says so.
_NO_CLIPPING = 10.0


def advice(facts: RecipeFacts, *, gradient: bool = False) -> str:
    """The spec fields to change for an exploding or non-finite run, most effective first."""
    tips = [f"lower training.learningRate (now {facts.learning_rate:g}; try 10x lower)"]
    if facts.max_grad_norm > _NO_CLIPPING:
        tips.append(
            f"set training.maxGradNorm to 1.0 (now {facts.max_grad_norm:g}, which clips almost nothing)"
        )
    elif gradient:
        tips.append(f"lower training.maxGradNorm (now {facts.max_grad_norm:g})")
    if facts.warmup_ratio <= 0:
        tips.append("set training.warmupRatio to e.g. 0.03 (now 0: the full rate from step 1)")
    if facts.scheduler == "constant":
        tips.append("use training.scheduler cosine or linear (now constant)")
    if facts.precision == "fp16":
        tips.append("use training.precision bf16 or fp32 instead of fp16")
    return "; ".join(tips)


@dataclass
class DivergenceMonitor:
    """Watches every optimizer step (see the module docstring). Raises TrainingDivergedError."""

    facts: RecipeFacts
    reference_steps: int = 3
    loss_factor: float = 2.0
    loss_margin: float = 1.0
    patience: int = 3
    grad_factor: float = 20.0
    grad_patience: int = 2
    ema_decay: float = 0.9
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    ema: float | None = None
    best: float | None = None
    loss_strikes: int = 0
    grad_strikes: int = 0
    _spike_open: bool = False

    # --- checks -------------------------------------------------------------------------------
    def check_finite(self, step: int, loss: float, lr: float) -> None:
        """One micro-batch's loss (single process: before backward). Raises when it is NaN/inf."""
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss} at step {step} (lr {lr:.2e}); {advice(self.facts)}"
            )

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> dict[str, Any] | None:
        """Feed one optimizer step. Returns a warning dict (step, kind, message, hints) for a single
        gradient spike, else None. Raises TrainingDivergedError (see the module docstring)."""
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"training loss became {loss} at step {step}; {advice(self.facts)}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDivergedError(
                f"gradient norm became {grad_norm} at step {step} (loss {loss:.4g}); "
                f"{advice(self.facts, gradient=True)}"
            )
        self.steps.append(step)
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        # The best smoothed loss includes the first step's loss: the reference exists from step 1.
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        self.best = self.ema if self.best is None else min(self.best, self.ema)
        self._check_loss(step, loss)
        return self._check_grad(step, loss, grad_norm)

    def _check_loss(self, step: int, loss: float) -> None:
        assert self.best is not None
        limit = max(self.loss_factor * self.best, self.best + self.loss_margin)
        self.loss_strikes = self.loss_strikes + 1 if loss > limit else 0
        if self.loss_strikes < self.patience:
            return
        first = self.losses[0]
        raise TrainingDivergedError(
            f"training loss diverged: {loss:.4g} at step {step}, {loss / self.best:.1f}x the best "
            f"smoothed loss of this run ({self.best:.4g}; step 1 was {first:.4g}) for {self.patience} "
            f"steps in a row; {advice(self.facts)}"
        )

    def _grad_reference(self) -> float | None:
        ref = self.grad_norms[: self.reference_steps]
        positive = [g for g in ref if g > 0]
        return min(positive) if positive else None

    def _check_grad(self, step: int, loss: float, grad_norm: float | None) -> dict[str, Any] | None:
        if grad_norm is None or len(self.grad_norms) <= 1:
            return None
        reference = self._grad_reference()
        if reference is None:
            return None
        ratio = grad_norm / reference
        if ratio <= self.grad_factor:
            self.grad_strikes = 0
            self._spike_open = False
            return None
        self.grad_strikes += 1
        if self.grad_strikes >= self.grad_patience:
            raise TrainingDivergedError(
                f"gradient norm exploded: {grad_norm:.4g} at step {step}, {ratio:.0f}x this run's first "
                f"steps ({reference:.4g}) for {self.grad_patience} steps in a row (loss {loss:.4g}); "
                f"{advice(self.facts, gradient=True)}"
            )
        if self._spike_open:
            return None
        self._spike_open = True
        return {
            "step": step,
            "kind": "gradient-spike",
            "message": (
                f"gradient norm spiked to {grad_norm:.4g} at step {step}, {ratio:.0f}x this run's first "
                f"steps ({reference:.4g})"
            ),
            "hints": [advice(self.facts, gradient=True)],
        }

    # --- not learning -------------------------------------------------------------------------
    def learning(self) -> dict[str, Any]:
        """How much the training loss fell: the median of the first steps against the mean of the
        last ones (``reference_steps`` each, fewer on a short run, at least 10% of the steps at the
        end). ``decrease`` is relative (0.25 = fell by a quarter; negative = rose); None without
        steps."""
        n = len(self.losses)
        if n == 0:
            return {"steps": 0, "initialLoss": None, "finalLoss": None, "decrease": None}
        k = max(1, min(self.reference_steps, n // 2))
        tail = max(k, n // 10)
        initial = statistics.median(self.losses[:k])
        final = sum(self.losses[-tail:]) / tail
        decrease = (initial - final) / initial if initial > 0 else 0.0
        return {
            "steps": n,
            "initialLoss": initial,
            "finalLoss": final,
            "decrease": decrease,
            "firstSteps": self.steps[:k],
            "lastSteps": [self.steps[-tail], self.steps[-1]],
        }

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state for a checkpoint."""
        return {
            "losses": list(self.losses),
            "gradNorms": list(self.grad_norms),
            "steps": list(self.steps),
            "ema": self.ema,
            "best": self.best,
            "lossStrikes": self.loss_strikes,
            "gradStrikes": self.grad_strikes,
            "spikeOpen": self._spike_open,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty dict leaves a fresh monitor)."""
        self.losses = [float(x) for x in state.get("losses", [])]
        self.grad_norms = [float(x) for x in state.get("gradNorms", [])]
        self.steps = [int(x) for x in state.get("steps", [])]
        self.ema = state.get("ema")
        self.best = state.get("best")
        self.loss_strikes = int(state.get("lossStrikes", 0))
        self.grad_strikes = int(state.get("gradStrikes", 0))
        self._spike_open = bool(state.get("spikeOpen", False))


__all__ = ["DivergenceMonitor", "RecipeFacts", "TrainingDivergedError", "advice"]
