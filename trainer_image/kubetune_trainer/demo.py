"""DEMO ONLY: a tiny synthetic tokenizer, tiny Llama models and a learnable toy task.

Nothing here is a real language model. These builders exist so that the quickstart
(``kubetune run examples/quickstart/...``) and the test suite can fine-tune *something* end to end
on a CPU with no downloads: a byte-level BPE tokenizer trained locally on the toy vocabulary, a
randomly initialised Llama of a few hundred thousand parameters, and a base model pre-trained for
about a minute on toy word tasks so that a LoRA fine-tune has a prior to build on (LoRA on a
random model barely learns; see shared/FACTS.md).

The toy language: sixteen English words and their made-up "Zorbish" counterparts. The base model
learns to repeat three-word lists (both languages); the fine-tuning task,
``synthetic_records(task="translate")``, maps English word lists to Zorbish word by word — related
(same words, same format, position-wise copying) but new (the word mapping).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from kubetune_trainer.data import iter_batches, model_inputs, prepare_data
from kubetune_trainer.evaluate.evaluator import loss_and_perplexity

DEMO_MODEL_NAME = "tiny-llama-demo"
DEMO_BUCKET = "kubetune-demo"

ENGLISH = (
    "red", "blue", "green", "black", "white", "cat", "dog", "fish",
    "bird", "tree", "sun", "moon", "star", "rain", "snow", "fire",
)  # fmt: skip
ZORBISH = (
    "zar", "kel", "mip", "tov", "lun", "rask", "bim", "fod",
    "pex", "gul", "nor", "vey", "sib", "quo", "dax", "hep",
)  # fmt: skip
TO_ZORBISH = dict(zip(ENGLISH, ZORBISH, strict=True))

TASKS: dict[str, str] = {
    "translate": "Translate the words to Zorbish.",
    "copy": "Repeat the words.",
    "reverse": "Reverse the words.",
}
"""Toy tasks and their instructions; ``translate`` is the fine-tuning task, the others the base's prior."""

BASE_TASKS = ("copy",)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_README = """# {name} — DEMO MODEL, NOT A REAL LLM

This folder holds a **tiny synthetic demo model** built by `kubetune_trainer.demo` for the
kubetune quickstart and tests. It is a Llama-architecture network with {params} parameters and a
{vocab}-token byte-level BPE tokenizer trained locally on a toy vocabulary. {trained}

It knows nothing about language. Use it only to try the fine-tuning pipeline end to end.
"""


def synthetic_records(n: int, *, seed: int, task: str = "translate") -> list[dict[str, str]]:
    """``n`` instruction/input/output records of a toy task (DEMO data), deterministic for ``seed``.

    Tasks: ``translate`` (English word list -> Zorbish, word by word), ``copy`` and ``reverse``
    (word lists drawn from both languages). Lists are always three words long: every answer word
    then sits at a fixed distance from its source word, which a two-layer model finds within a
    minute of CPU training; with varying lengths it needs many times longer. Raises ValueError for
    an unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}; expected one of {sorted(TASKS)}")
    rng = random.Random(f"kubetune-demo:{task}:{seed}")
    pool = ENGLISH if task == "translate" else ENGLISH + ZORBISH
    out: list[dict[str, str]] = []
    for _ in range(n):
        words = [rng.choice(pool) for _ in range(3)]
        if task == "translate":
            answer = [TO_ZORBISH[w] for w in words]
        elif task == "reverse":
            answer = words[::-1]
        else:
            answer = list(words)
        out.append({"instruction": TASKS[task], "input": " ".join(words), "output": " ".join(answer)})
    return out


def _tokenizer_corpus() -> Iterator[str]:
    for task in TASKS:
        for rec in synthetic_records(200, seed=0, task=task):
            yield (
                f"<|im_start|>user\n{rec['instruction']}\n\n{rec['input']}<|im_end|>\n"
                f"<|im_start|>assistant\n{rec['output']}<|im_end|>\n"
            )
    # Template markup of the other built-in templates, so they tokenise compactly too.
    yield "[INST] <<SYS>>\n<</SYS>>\n\n [/INST] ### Instruction:\n### Input:\n### Response:\n system user assistant"


def build_demo_tokenizer(
    out_dir: Path,
    *,
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train and save a DEMO byte-level BPE tokenizer for the toy vocabulary (or ``corpus``); no downloads.

    It has ``<s>``/``</s>``/``<pad>``/``<unk>``, the ChatML tokens ``<|im_start|>``/``<|im_end|>`` and a
    ChatML ``chat_template``; any text is encodable (byte-level). ``AutoTokenizer.from_pretrained(out_dir)``
    reloads it. Deterministic for the same ``vocab_size``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def _write_readme(out_dir: Path, params: int, vocab: int, trained: str) -> None:
    text = _README.format(name=out_dir.name, params=f"{params:,}", vocab=vocab, trained=trained)
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def build_tiny_llama(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised DEMO Llama (safetensors, fp32) with the tokenizer beside it.

    Generation stops at ``</s>`` or ``<|im_end|>``. Returns ``out_dir``, loadable with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``. Deterministic for ``seed``.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    im_end = cast(int, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end],
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    _write_readme(out_dir, params, len(tokenizer), "Its weights are random.")
    return out_dir


@dataclass(frozen=True)
class _ToyData:
    """Plain settings object satisfying kubetune_trainer.data.DataSettings for the toy records."""

    @dataclass(frozen=True)
    class _Fields:
        instruction: str = "instruction"
        input: str = "input"
        output: str = "output"
        prompt: str = "prompt"
        completion: str = "completion"
        messages: str = "messages"

    @dataclass(frozen=True)
    class _Cleaning:
        strip_control_chars: bool = True
        normalize_whitespace: bool = True
        normalize_quotes: bool = True
        deduplicate: bool = False
        min_answer_chars: int = 1
        max_record_chars: int = 20_000

    eval_split: float | None = None
    format: str = "instruction"
    template: str = "auto"
    fields: _Fields = field(default_factory=_Fields)
    system_prompt: str | None = None
    cleaning: _Cleaning = field(default_factory=_Cleaning)
    max_invalid_records: int = 0


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    """Write records as UTF-8 JSONL (one object per line); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def pretrain_demo_base(
    out_dir: Path,
    *,
    seconds_budget: float = 60,
    seed: int = 0,
    max_steps: int = 1000,
    log: bool = False,
) -> Path:
    """Build the DEMO base model: a tiny Llama fully trained on the toy copy task.

    Plain torch loop, fp32, one thread (restored afterwards), packed batches of the ChatML-templated
    records, AdamW with a short warm-up and a constant rate, ``max_steps`` steps or until ``seconds_budget``
    runs out (whichever first; the step count reached is written to ``demo-training.json``). The
    model, tokenizer and a README saying it is a demo land in ``out_dir``, which is returned.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="kubetune-demo-") as tmp:
            work = Path(tmp)
            build_demo_tokenizer(work / "tokenizer")
            build_tiny_llama(out_dir, work / "tokenizer", seed=seed)
            tokenizer = AutoTokenizer.from_pretrained(out_dir)
            records = [r for task in BASE_TASKS for r in synthetic_records(3000, seed=seed, task=task)]
            data_file = write_jsonl(work / "base.jsonl", records)
            prepared = prepare_data(
                [data_file], None, tokenizer, _ToyData(eval_split=0.02), max_seq_length=256, seed=seed
            )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        warmup = max(1, max_steps // 20)

        def lr_at(step: int) -> float:
            # Constant after warm-up: with cosine decay the copy skill was measurably weaker at the
            # end of the step budget.
            return min(1.0, (step + 1) / warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        started = time.monotonic()
        step, epoch, loss_value = 0, 0, float("nan")
        while step < max_steps and time.monotonic() - started < seconds_budget:
            for batch in iter_batches(
                prepared.train,
                batch_size=2,
                max_seq_length=256,
                packing=True,
                pad_token_id=tokenizer.pad_token_id,
                seed=seed,
                epoch=epoch,
            ):
                loss = model(**model_inputs(batch)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_value = float(loss.detach())
                if log and step % 50 == 0:
                    print(f"demo base step {step} loss {loss_value:.4f} {time.monotonic() - started:.1f}s")
                if step >= max_steps or time.monotonic() - started >= seconds_budget:
                    break
            epoch += 1
        elapsed = time.monotonic() - started
        model.eval()
        eval_loss = _mean_loss(model, prepared.eval, tokenizer.pad_token_id)
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    summary = {
        "demo": True,
        "tasks": list(BASE_TASKS),
        "steps": step,
        "seconds": round(elapsed, 1),
        "finalTrainLoss": round(loss_value, 4),
        "evalLoss": round(eval_loss, 4),
        "seed": seed,
    }
    (out_dir / "demo-training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    _write_readme(
        out_dir,
        params,
        len(tokenizer),
        f"It was trained for {step} steps on a toy word-copying task (eval loss {eval_loss:.3f}).",
    )
    return out_dir


def _mean_loss(model: Any, examples: list[Any], pad_token_id: int) -> float:
    """Token-weighted mean answer loss: the evaluator's own measure, so demo figures match eval reports."""
    del pad_token_id  # loss_and_perplexity batches without padding ambiguity
    return loss_and_perplexity(model, examples, batch_size=32)[0]


QUICKSTART_MARKER = ".kubetune-quickstart.json"


def prepare_quickstart(
    store_root: Path,
    bucket: str = DEMO_BUCKET,
    *,
    seconds_budget: float = 900,
) -> dict[str, str]:
    """Lay out the DEMO quickstart in a local object store; idempotent.

    Writes the demo base model to ``<store_root>/<bucket>/base-models/tiny-llama-demo/`` and the
    toy translate task to ``<store_root>/<bucket>/datasets/quickstart/{train,eval}.jsonl``, then a
    marker ``<store_root>/<bucket>/.kubetune-quickstart.json`` (last, so a crash half-way is redone
    on the next call). With the marker present nothing is rebuilt. Returns the ``s3://`` URIs:
    keys ``base_model``, ``train``, ``eval``. The base trains a fixed number of steps, so it comes
    out the same on a busy machine; ``seconds_budget`` is only a safety net.
    """
    root = store_root / bucket
    uris = {
        "base_model": f"s3://{bucket}/base-models/{DEMO_MODEL_NAME}/",
        "train": f"s3://{bucket}/datasets/quickstart/train.jsonl",
        "eval": f"s3://{bucket}/datasets/quickstart/eval.jsonl",
    }
    marker = root / QUICKSTART_MARKER
    if marker.is_file():
        return uris
    model_dir = root / "base-models" / DEMO_MODEL_NAME
    root.mkdir(parents=True, exist_ok=True)
    # Built beside its destination and renamed into place, so readers never see half a model.
    staging = Path(tempfile.mkdtemp(prefix=".demo-base-", dir=root))
    try:
        pretrain_demo_base(staging / DEMO_MODEL_NAME, seconds_budget=seconds_budget)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / DEMO_MODEL_NAME, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data_dir = root / "datasets" / "quickstart"
    train = synthetic_records(800, seed=1, task="translate")
    seen = {r["input"] for r in train}
    # Held-out word lists only, so the eval loss measures generalisation, not recall.
    held_out = [r for r in synthetic_records(200, seed=2, task="translate") if r["input"] not in seen][:100]
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "eval.jsonl", held_out)
    (data_dir / "README.md").write_text(
        "# quickstart — DEMO DATA\n\nSynthetic toy task built by kubetune_trainer.demo: translate lists of "
        "English words into the made-up language Zorbish, word by word. Not real data.\n",
        encoding="utf-8",
    )
    marker.write_text(json.dumps({"demo": True, **uris}, indent=2) + "\n", encoding="utf-8")
    return uris
