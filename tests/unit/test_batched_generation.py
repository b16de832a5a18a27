"""Batched greedy answers equal batch-1 greedy answers, in the caller's order."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer.evaluate.batched import generate_greedy_batched
from kubetune_trainer.evaluate.evaluator import generate_token_ids, stop_token_ids


def test_batched_matches_one_by_one(demo_base_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.demo import synthetic_records

    tok = AutoTokenizer.from_pretrained(demo_base_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_base_dir, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}" + " red" * (i % 3)}],
            add_generation_prompt=True,
        )
        for i, r in enumerate(synthetic_records(7, seed=5, task="copy"))
    ]
    prompts = [
        list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts
    ]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    eos = stop_token_ids(model, tok)
    one_by_one = [
        generate_token_ids(
            model,
            p,
            max_new_tokens=12,
            do_sample=False,
            temperature=1.0,
            seed=0,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        for p in prompts
    ]
    batched = generate_greedy_batched(
        model, prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id, batch_size=3
    )
    assert batched == [[t for t in ids if t not in eos] for ids in one_by_one]
    assert any(batched)  # the demo base answers something


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        generate_greedy_batched(
            object(), [[1]], max_new_tokens=1, eos_token_id=None, pad_token_id=0, batch_size=0
        )
    with pytest.raises(ValueError, match="at least one token"):
        generate_greedy_batched(object(), [[]], max_new_tokens=1, eos_token_id=None, pad_token_id=0)
