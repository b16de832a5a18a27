"""Decoding for the logits-only runners (ONNX in :mod:`~kubetune_trainer.evaluate.loading`, GGUF in
:mod:`~kubetune_trainer.evaluate.gguf_runner`): one next-token rule and one stop-id rule, so every
artifact decodes the same way. numpy only.
"""

from __future__ import annotations

import numpy as np


def stop_ids(eos_token_id: int | list[int] | None) -> set[int]:
    """The ids generation stops at, from a generation config's ``eos_token_id`` (one id or a list)."""
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())


def next_token(last: np.ndarray, *, do_sample: bool, temperature: float, rng: np.random.Generator) -> int:
    """The next token from the last position's logits: argmax, or a softmax sample at ``temperature``
    drawn from ``rng`` (the decoding every logits-only runner shares: ONNX, GGUF)."""
    last = last.astype(np.float64)
    if not do_sample:
        return int(last.argmax())
    scaled = last / max(temperature, 1e-6)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))
