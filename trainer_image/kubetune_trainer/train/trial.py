"""A sweep trial stopped early (docs/adr/0001): raised at an intermediate evaluation."""

from __future__ import annotations


class TrialPrunedError(Exception):
    """The sweep's pruner stopped this trial at an intermediate evaluation (nothing is published)."""

    def __init__(self, step: int, eval_loss: float) -> None:
        self.step = step
        self.eval_loss = eval_loss
        super().__init__(
            f"pruned at step {step}: eval_loss {eval_loss:.4f} is worse than the median of earlier trials"
        )
