"""The LM head restricted to labelled positions gives the model's own loss and gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.data import iter_batches, model_inputs
from kubetune_trainer.train.label_head import LabelPositionHead
from tests.unit.test_data_batching import examples


def _lora(tiny_model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    # Non-zero B so the adapter matters for the gradient comparison.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("packing", [True, False])
def test_restricted_head_matches_the_models_own_loss_and_gradients(
    tiny_model_dir: Path, packing: bool
) -> None:
    model = _lora(tiny_model_dir)
    [batch] = list(
        iter_batches(
            examples(9, seed=3),
            batch_size=9,
            max_seq_length=64,
            packing=packing,
            pad_token_id=0,
            seed=0,
            epoch=0,
        )
    )
    inputs = model_inputs(batch)

    reference = model(**inputs).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    head = LabelPositionHead(model)
    out = head.forward(model, inputs)
    # Only the trained tokens got logits: one row per label after the causal shift.
    assert out.logits.shape[0] == int(batch["num_label_tokens"])
    loss = out.cross_entropy()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)

    # Outside forward() the model is untouched: full logits again.
    with torch.no_grad():
        full = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert full.shape[:2] == batch["input_ids"].shape
    head.remove()


def test_no_labelled_tokens_gives_zero_loss_with_a_graph(tiny_model_dir: Path) -> None:
    model = _lora(tiny_model_dir)
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 8]]),
        "labels": torch.full((1, 4), -100),
        "use_cache": False,
    }
    loss = LabelPositionHead(model).forward(model, inputs).cross_entropy()
    assert float(loss.detach()) == 0.0
    loss.backward()  # must not raise: DDP needs every rank to run backward
