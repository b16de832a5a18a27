"""Base vs tuned on the real quickstart's held-out questions, from a trained adapter, with paired CIs.

    .venv/bin/python -m bench.quickstart_real_eval --base DIR --adapter DIR --store-dir STORE \
        --json bench/results/quickstart-real-quality.json

The evaluation the quickstart's FineTuneJob asks for, run on its own: the held-out set tokenised
exactly as the trainer does (``prepare_data`` with the job's data spec), per-example answer-token
losses, greedy answers of both models in left-padded batches (:mod:`kubetune_trainer.evaluate.batched`;
identical to batch-1 greedy answers, measured faster on CPU), and the paired bootstrap 95% interval
of ``tuned - base`` for eval_loss, perplexity, ROUGE-L, BLEU and terminology coverage. The base is
the same peft model with its adapter disabled. Timings of each phase are reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune_api.loader import load_finetunejob
from kubetune_trainer.data import prepare_data
from kubetune_trainer.evaluate.batched import generate_greedy_batched
from kubetune_trainer.evaluate.evaluator import per_example_losses, stop_token_ids
from kubetune_trainer.evaluate.paired import paired_differences, paired_table
from kubetune_trainer.evaluate.terminology import TermMatcher, load_glossary

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "examples" / "quickstart-real" / "finetunejob.yaml"
METRICS = ("eval_loss", "perplexity", "rouge_l", "bleu", "terminology_coverage", "exact_match")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the dequantised base model folder")
    parser.add_argument("--adapter", type=Path, required=True, help="the trained LoRA adapter folder")
    parser.add_argument("--store-dir", type=Path, required=True, help="store prepared by demo prepare --real")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-samples", type=int, default=None, help="default: the job's maxSamples")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    spec = load_finetunejob(JOB).spec
    data_dir = args.store_dir / "kubetune-demo" / "datasets" / "construction-faq"
    timings: dict[str, float] = {}
    t = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    timings["load"] = time.monotonic() - t
    no_split = spec.data.model_copy(update={"eval_split": None})
    examples = prepare_data(
        [data_dir / "train.jsonl"],
        [data_dir / "eval.jsonl"],
        tokenizer,
        no_split,
        max_seq_length=spec.training.max_seq_length,
        seed=spec.training.seed,
    ).eval
    examples = examples[: args.max_samples or spec.evaluation.max_samples]
    eos = stop_token_ids(model, tokenizer)
    prompts = [list(ex.prompt_ids) for ex in examples]
    references = [ex.answer_text for ex in examples]
    n_new = spec.evaluation.max_new_tokens

    answers: dict[str, list[str]] = {}
    losses: dict[str, tuple[list[float], list[int]]] = {}
    for which in ("tuned", "base"):
        t = time.monotonic()
        if which == "base":
            with model.disable_adapter():
                losses[which] = per_example_losses(model, examples, batch_size=8)
                ids = generate_greedy_batched(
                    model,
                    prompts,
                    max_new_tokens=n_new,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    batch_size=args.batch_size,
                )
        else:
            losses[which] = per_example_losses(model, examples, batch_size=8)
            ids = generate_greedy_batched(
                model,
                prompts,
                max_new_tokens=n_new,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                batch_size=args.batch_size,
            )
        answers[which] = [str(tokenizer.decode(x, skip_special_tokens=True)) for x in ids]
        timings[f"eval_{which}"] = time.monotonic() - t

    matcher = TermMatcher(load_glossary(data_dir / "glossary.txt"))
    diffs = paired_differences(
        METRICS,
        references,
        answers["base"],
        answers["tuned"],
        base_losses=losses["base"],
        tuned_losses=losses["tuned"],
        matcher=matcher,
        resamples=args.resamples,
    )
    paired = {k: d.to_dict() for k, d in diffs.items()}
    result: dict[str, Any] = {
        "n": len(examples),
        "max_new_tokens": n_new,
        "batch_size": args.batch_size,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paired": paired,
        "samples": [
            {"question": ex.prompt_text, "reference": r, "base": b, "tuned": tu}
            for ex, r, b, tu in zip(examples, references, answers["base"], answers["tuned"], strict=True)
        ],
    }
    print(paired_table(paired))
    print(json.dumps(result["timings_s"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
