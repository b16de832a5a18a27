"""Merging a LoRA adapter: merged logits equal the adapter model's within MERGE_TOLERANCE (fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.artifacts.merge import MERGE_TOLERANCE, max_logit_difference, merge_adapter
from tests.unit.test_evaluate import build_tiny_llama, build_tiny_tokenizer


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge")
    tokenizer = build_tiny_tokenizer(root / "base")
    base = build_tiny_llama(root / "base", len(tokenizer))
    torch.manual_seed(3)
    # init_lora_weights=False: B is random, not zero, so the adapter really changes the logits.
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "tokenizer": tokenizer}


def test_merged_logits_equal_adapter_logits(base_and_adapter: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = base_and_adapter["root"]
    out = merge_adapter(root / "base", root / "adapter", root / "merged")
    assert out == root / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(n.startswith("adapter_") or n.endswith(".bin") for n in names)

    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    ids = torch.randint(
        4, len(base_and_adapter["tokenizer"]), (2, 12), generator=torch.Generator().manual_seed(0)
    )

    assert max_logit_difference(merged, adapter, ids) < MERGE_TOLERANCE
    # The adapter is not a no-op: otherwise the equality above would prove nothing.
    assert max_logit_difference(base, adapter, ids) > 100 * MERGE_TOLERANCE


def test_merge_never_overwrites(base_and_adapter: dict[str, Any], tmp_path: Path) -> None:
    root = base_and_adapter["root"]
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(target)):
        merge_adapter(root / "base", root / "adapter", target)
    assert (target / "keep.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging directory left behind
