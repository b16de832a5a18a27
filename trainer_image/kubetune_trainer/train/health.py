"""Training health: per-layer gradient norms, a heat map of them, and loss warnings with hints.

* :func:`layer_grad_norms` groups the gradients of trainable parameters by transformer layer
  (``layers.0``, ``layers.1`` ...; other parameters by their module, e.g. ``embed_tokens``) and
  returns each group's L2 norm, taken before clipping. The recipe records one row every
  ``logEverySteps`` on rank 0 into ``training/grad-norms.jsonl``; :func:`plot_grad_norms` turns
  those rows into ``training/grad-norms.png`` (layers x steps, log10 colour scale).
* :class:`LossHealth` watches the logged loss and returns a warning (printed, kept in
  ``training/health.json``) when it plateaus or rises, each with the likely causes for this run:
  learning rate too high, context too short (many examples truncated at ``maxSeqLength``), too
  little domain data. It only warns; :class:`~kubetune_trainer.train.divergence.DivergenceMonitor` stops a
  run whose loss is NaN or runs away.

matplotlib is imported by :func:`plot_grad_norms` alone: 2 s and 54 MB to import (measured), spent
once, when the run's reports are written, instead of before training.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_LAYER = re.compile(r"(?:^|\.)(layers|h|blocks|layer)\.(\d+)\.")
# Below this loss a flat curve means "learned", not "stuck".
_CONVERGED_LOSS = 0.05
_SMALL_DATA = 1000
_TRUNCATED_SHARE = 0.1


def layer_group(param_name: str) -> str:
    """The heat-map row a parameter belongs to: ``layers.N`` or its module's last name."""
    m = _LAYER.search(param_name)
    if m:
        return f"layers.{int(m.group(2))}"
    parts = [p for p in param_name.split(".") if p not in ("weight", "bias", "default")]
    return parts[-1] if parts else param_name


def layer_grad_norms(named_parameters: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """L2 norm of the gradients per :func:`layer_group`, for parameters that have a gradient.

    Layers come first in numeric order, then the other groups by name.
    """
    squares: dict[str, float] = {}
    for name, p in named_parameters:
        if getattr(p, "grad", None) is None:
            continue
        group = layer_group(name)
        squares[group] = squares.get(group, 0.0) + float(p.grad.detach().float().norm()) ** 2

    def order(key: str) -> tuple[int, int, str]:
        return (0, int(key.split(".")[1]), "") if key.startswith("layers.") else (1, 0, key)

    return {k: math.sqrt(squares[k]) for k in sorted(squares, key=order)}


def plot_grad_norms(grad_norms_jsonl: Path, out_png: Path) -> bool:
    """Write the heat map (rows: layers, columns: logged steps). False when there is nothing to plot."""
    rows = [json.loads(line) for line in grad_norms_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("norms")]
    if not rows:
        return False
    import matplotlib  # deferred: 2 s to import (see the module docstring)

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    groups: list[str] = []
    for r in rows:
        groups += [g for g in r["norms"] if g not in groups]
    grid = np.full((len(groups), len(rows)), np.nan)
    for j, r in enumerate(rows):
        for i, g in enumerate(groups):
            value = r["norms"].get(g)
            if value is not None and value > 0:
                grid[i, j] = math.log10(value)
    fig = Figure(figsize=(max(4.0, 0.35 * len(rows) + 2), max(2.5, 0.3 * len(groups) + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(groups)), labels=groups)
    ticks = list(range(0, len(rows), max(1, len(rows) // 10)))
    ax.set_xticks(ticks, labels=[str(rows[j]["step"]) for j in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title("gradient norm per layer (log10, before clipping)")
    fig.colorbar(image, ax=ax, label="log10 ||grad||")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out_png), dpi=100)
    return True


@dataclass
class RunFacts:
    """What the hints are based on: the run's data and settings."""

    train_examples: int
    truncated_examples: int
    max_seq_length: int
    learning_rate: float


@dataclass
class LossHealth:
    """Plateau and rising-loss warnings over the logged (window-mean) training loss.

    ``windows``: logged values without ``min_improvement`` relative progress before a plateau is
    reported; ``warmup_steps``: no warning before warm-up ends. Each kind is reported once per
    episode (again only after the loss improved in between).
    """

    facts: RunFacts
    windows: int = 5
    min_improvement: float = 0.01
    warmup_steps: int = 0
    losses: list[float] = field(default_factory=list)
    _plateau_open: bool = False
    _rising_open: bool = False

    def hints(self, kind: str) -> list[str]:
        """Likely causes for this run, most specific first."""
        f = self.facts
        out: list[str] = []
        if kind == "rising":
            out.append(
                f"learning rate too high: lower training.learningRate (now {f.learning_rate:g}) or raise "
                "training.warmupRatio"
            )
        share = f.truncated_examples / f.train_examples if f.train_examples else 0.0
        if share >= _TRUNCATED_SHARE:
            out.append(
                f"context too short: {share:.0%} of training examples were truncated at "
                f"maxSeqLength={f.max_seq_length}; raise training.maxSeqLength"
            )
        if f.train_examples < _SMALL_DATA:
            out.append(
                f"too little domain data: {f.train_examples} training examples; add data or turn on "
                "data.augmentation"
            )
        if kind == "plateau":
            out.append(
                f"learning rate: try a higher or lower training.learningRate (now {f.learning_rate:g})"
            )
        return out

    def update(self, step: int, loss: float | None) -> dict[str, Any] | None:
        """Feed one logged loss; returns a warning dict (step, kind, message, hints) or None."""
        if loss is None or not math.isfinite(loss):
            return None
        previous_best = min(self.losses) if self.losses else None
        self.losses.append(loss)
        if step <= self.warmup_steps:
            return None
        best = min(self.losses)
        if previous_best is not None and loss < previous_best * (1 - self.min_improvement):
            # A real improvement ends the episode: the next plateau or rise is reported again.
            self._plateau_open = self._rising_open = False
        if len(self.losses) >= 3 and loss > 1.5 * min(self.losses[:-1]) and not self._rising_open:
            self._rising_open = True
            return self._warning(
                step,
                "rising",
                f"training loss is rising: {loss:.4f} at step {step}, best so far {min(self.losses[:-1]):.4f}",
            )
        if len(self.losses) > self.windows and not self._plateau_open and best > _CONVERGED_LOSS:
            reference = self.losses[-self.windows - 1]
            recent = min(self.losses[-self.windows :])
            if reference > 0 and (reference - recent) / reference < self.min_improvement:
                self._plateau_open = True
                return self._warning(
                    step,
                    "plateau",
                    f"training loss has plateaued: {recent:.4f} after {self.windows} logged windows "
                    f"(was {reference:.4f}, less than {self.min_improvement:.0%} better)",
                )
        return None

    def _warning(self, step: int, kind: str, message: str) -> dict[str, Any]:
        return {"step": step, "kind": kind, "message": message, "hints": self.hints(kind)}


def format_warning(warning: dict[str, Any]) -> str:
    """One line for the log: the message, then the hints separated by ' | '."""
    return f"warning: {warning['message']}; likely: " + " | ".join(warning["hints"])
