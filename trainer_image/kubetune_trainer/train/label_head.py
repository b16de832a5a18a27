"""The LM head applied only where a token is trained on: the loss's logits, without the waste.

A causal LM computes ``lm_head(hidden)`` — a ``hidden x vocab`` matmul and a softmax over the
vocabulary — at every position, but completion-only SFT trains on the answer tokens alone: prompt
tokens, packing padding and the last token of every example have no label, so their logits are
thrown away by the loss. For small and mid-sized models with large vocabularies that head is a
large share of a step (at 4M parameters and 8k tokens it is ~25% of the FLOPs, before the
softmax). :class:`LabelPositionHead` computes it only at the positions whose shifted label is set.

How: a forward *pre-hook* on the model's output embedding (``get_output_embeddings()``) replaces
the head's input ``[batch, seq, hidden]`` by the selected rows ``[1, n_labelled, hidden]``. The
model is still called as a whole (``forward_model(**inputs)``), so DDP's and DeepSpeed's forward
bookkeeping is untouched; only the tensor the head sees changes. The loss is then the mean
cross-entropy over exactly the tokens the model's own loss would average over (the same
``ignore_index=-100`` positions after the causal shift), so results equal the model's own loss up
to summation order (a test checks it to 1e-6).

Why not ``logits_to_keep``: transformers accepts one 1-D index for the whole batch, but packed rows
have their answer tokens at different positions in every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kubetune_trainer.data.templates import IGNORE_INDEX


@dataclass
class LabelledLogits:
    """Logits and targets at the trained positions of one batch.

    ``logits`` is ``[n, vocab]`` (the model's dtype); ``targets`` ``[n]``; ``rows`` and ``cols`` say
    where each position sits in the batch (the logits at ``(row, col)`` predict ``labels[row, col+1]``).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    def cross_entropy(self) -> torch.Tensor:
        """Mean cross-entropy over the positions (0 with an intact graph when there are none)."""
        if self.targets.numel() == 0:
            return self.logits.float().sum() * 0.0
        return F.cross_entropy(self.logits.float(), self.targets)


class LabelPositionHead:
    """Makes ``model``'s LM head run only at labelled positions while :meth:`forward` runs.

    Create once per model (it registers one pre-hook on the output embedding); call
    :meth:`forward` instead of ``forward_model(**inputs).loss``. Outside :meth:`forward` the hook is
    inert, so generation, saving and evaluation elsewhere see the unmodified model.
    """

    def __init__(self, model: Any) -> None:
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output embedding (LM head) to restrict")
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = head.register_forward_pre_hook(self._select)

    def _select(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._index is None:
            return None
        rows, cols = self._index
        hidden = args[0]
        return (hidden[rows, cols].unsqueeze(0), *args[1:])

    def remove(self) -> None:
        """Unregister the hook (the model behaves exactly as before)."""
        self._handle.remove()

    def forward(self, forward_model: Any, inputs: dict[str, Any]) -> LabelledLogits:
        """Run the model on ``inputs`` (which must hold ``labels``) and return the labelled logits.

        ``labels`` is not passed to the model: the model's own loss would need full logits.
        """
        labels = inputs["labels"]
        shifted = labels[:, 1:]
        rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        targets = shifted[rows, cols]
        model_args = {k: v for k, v in inputs.items() if k != "labels"}
        self._index = (rows, cols)
        try:
            out = forward_model(**model_args)
        finally:
            self._index = None
        return LabelledLogits(logits=out.logits[0], targets=targets, rows=rows, cols=cols)
