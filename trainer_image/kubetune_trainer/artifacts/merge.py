"""Merge a LoRA adapter into its base model and save the result as a plain transformers model.

The merged model is what users load without peft, and the input of every quantized format.
Merging happens in float32 (the LoRA product B @ A * scale is added to the weights at full
precision) and the result is saved in the base model's own dtype, so ``merged/`` is the base's size.
With a float32 base, merged logits equal the adapter's within ``MERGE_TOLERANCE`` (tested).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

__all__ = ["MERGE_TOLERANCE", "max_logit_difference", "merge_adapter"]

#: Max abs logit difference allowed between the adapter model and the merged model in float32.
#: Only summation order differs (x@W + x@A^T@B^T*s vs x@(W + B@A*s)), so 1e-4 is generous for fp32.
MERGE_TOLERANCE = 1e-4

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the adapter in ``adapter_dir`` into the model in ``base_dir``; save to ``out_dir``.

    ``out_dir`` receives ``config.json``, ``generation_config.json``, ``model.safetensors`` (sharded
    for large models) and the tokenizer (the adapter's if training saved one, since it may have
    added a pad token, else the base's). The files are written to a temporary sibling and renamed
    into place, so ``out_dir`` is either absent or complete.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty (a merge never overwrites).
        OSError / ValueError: the base or adapter cannot be loaded (from transformers / peft).
    """
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"merge output {out_dir} already exists and is not empty")

    saved_dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None) or torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    merged: Any = peft_model.merge_and_unload()
    merged = merged.to(saved_dtype)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if _has_tokenizer(adapter_dir) else base_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def max_logit_difference(model_a: Any, model_b: Any, input_ids: torch.Tensor) -> float:
    """Max absolute difference of the two models' logits on ``input_ids`` ([batch, seq] long tensor).

    Both models are run in eval mode without gradients; logits are compared in float32.

    Raises:
        ValueError: the logits have different shapes (different vocabularies).
    """
    with torch.no_grad():
        a = model_a.eval()(input_ids=input_ids).logits.float()
        b = model_b.eval()(input_ids=input_ids).logits.float()
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())
