"""Synthetic inputs for the benches: long-tailed instruction data, a tokenizer, Llama-shaped models.

Nothing here is real data or a real model. The point is the *shape*: instruction data whose token
lengths are long-tailed like public instruction sets (most examples short, a tail reaching past the
512-token window), and Llama-architecture networks of a chosen size with random weights, so that
throughput, memory and latency behave as they would for real checkpoints of the same shape.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SYLLABLES = (
    "ka", "lo", "mi", "ren", "tu", "sa", "vor", "ne", "pi", "dra", "ul", "fen", "go", "ti", "ash",
    "bel", "cor", "di", "es", "ym", "qua", "zo", "har", "in", "ost", "ple", "ru", "sik", "ta", "wen",
)  # fmt: skip

INSTRUCTIONS = (
    "Summarise the following text.",
    "Answer the question in detail.",
    "Rewrite the passage in a formal tone.",
    "Explain the steps below to a beginner.",
    "Continue the story.",
    "List the key points of the text.",
    "Translate the text into plain language.",
    "Write a short essay on the topic.",
)


@dataclass(frozen=True)
class LengthModel:
    """Word counts drawn from log-normal distributions (long right tail), clipped to a range."""

    prompt_median_words: float = 20.0
    prompt_sigma: float = 0.9
    answer_median_words: float = 70.0
    answer_sigma: float = 1.0
    max_words: int = 900


def _vocabulary(size: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def _lognormal_words(rng: random.Random, median: float, sigma: float, max_words: int) -> int:
    return max(1, min(max_words, round(rng.lognormvariate(math.log(median), sigma))))


def instruction_records(
    n: int, *, seed: int, lengths: LengthModel | None = None, vocabulary_size: int = 4000
) -> list[dict[str, str]]:
    """``n`` instruction/input/output records with long-tailed lengths; deterministic for ``seed``.

    Words follow a Zipf-like frequency over a pseudo-word vocabulary, so a trained BPE tokenizer
    behaves like one on natural text (frequent words one token, rare ones several).
    """
    lm = lengths or LengthModel()
    vocab_rng = random.Random("kubetune-bench-vocabulary")  # same vocabulary for every seed
    vocab = _vocabulary(vocabulary_size, vocab_rng)
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    rng = random.Random(f"kubetune-bench-records:{seed}")
    out: list[dict[str, str]] = []
    for _ in range(n):
        p = _lognormal_words(rng, lm.prompt_median_words, lm.prompt_sigma, lm.max_words)
        a = _lognormal_words(rng, lm.answer_median_words, lm.answer_sigma, lm.max_words)
        words = rng.choices(vocab, weights=weights, k=p + a)
        out.append(
            {
                "instruction": rng.choice(INSTRUCTIONS),
                "input": " ".join(words[:p]),
                "output": " ".join(words[p:]) + ".",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    """One JSON object per line; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """The records of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def chatml_prompt(record: dict[str, str]) -> str:
    """The ChatML user turn plus the assistant header: what every contender trains the answer after.

    The user turn is the instruction, then a blank line and the input when there is one: the same
    text kubetune's data layer renders for an instruction record (``template: chatml``).
    """
    user = f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def chatml_completion(record: dict[str, str]) -> str:
    """The answer and the end-of-turn marker."""
    return f"{record['output']}<|im_end|>\n"


def build_tokenizer(out_dir: Path, records: list[dict[str, str]], *, vocab_size: int = 8192) -> Path:
    """Train a byte-level BPE tokenizer on the records (ChatML-rendered) and save it to ``out_dir``.

    The demo's builder (same special tokens and ChatML template as the trainer's data layer expects),
    trained on this data set's text instead of the toy vocabulary.
    """
    from kubetune_trainer.demo import build_demo_tokenizer

    corpus = (chatml_prompt(r) + chatml_completion(r) for r in records)
    build_demo_tokenizer(out_dir, vocab_size=vocab_size, corpus=corpus, model_max_length=4096)
    return out_dir


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture shape (untied embeddings, as Llama 2/3 use)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def params(self, vocab: int) -> int:
        """Parameter count for a vocabulary of ``vocab`` tokens (norms included)."""
        h, i = self.hidden, self.intermediate
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return self.layers * per_layer + 2 * vocab * h + h


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny", hidden=64, layers=2, heads=4, intermediate=172),
    "5m": ModelShape("5m", hidden=192, layers=4, heads=4, intermediate=512),
    "25m": ModelShape("25m", hidden=512, layers=6, heads=8, intermediate=1376),
    "100m": ModelShape("100m", hidden=768, layers=12, heads=12, intermediate=2048),
    "1b": ModelShape("1b", hidden=2048, layers=16, heads=32, intermediate=8192),
}
"""Sizes by name; parameter counts with the 8192-token bench tokenizer: ~5M, ~27M, ~98M, ~1.0B."""


def build_llama(out_dir: Path, tokenizer_dir: Path, shape: ModelShape, *, seed: int = 0) -> dict[str, Any]:
    """Save a randomly initialised Llama of ``shape`` (fp32 safetensors) with the tokenizer beside it.

    Returns ``{"params", "non_embedding_params", "vocab", "head_params", "tied_embeddings"}``.
    ``non_embedding_params`` excludes the input embedding (a lookup, no matmul) but keeps ``lm_head``
    (a matmul): the N of 6·N·T; ``head_params`` is that head (for the executed-FLOPs count).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    im_end: Any = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    embed = int(model.get_input_embeddings().weight.numel())
    info = {
        "params": params,
        "non_embedding_params": params - embed,
        "vocab": len(tokenizer),
        "head_params": int(model.get_output_embeddings().weight.numel()),
        "tied_embeddings": False,
    }
    (out_dir / "bench-model.json").write_text(json.dumps({"shape": shape.name, **info}, indent=2))
    return info
