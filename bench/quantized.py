"""Quantized artifacts: size ratio and generation latency of each CPU format vs full precision.

    .venv/bin/python -m bench.quantized                          # ~98M Llama shape, int8 + onnx-int8
    .venv/bin/python -m bench.quantized --formats int8,int4,onnx-int8   # int4 compiles ~50 s first
    .venv/bin/python -m bench.quantized --size tiny --prompts 2 --new-tokens 4   # smoke

A Llama-architecture model of the chosen shape with random weights (size and latency do not
depend on what the weights learned) is written as the "merged" full-precision folder, then
:func:`kubetune_trainer.artifacts.quantize.quantize_artifacts` writes, reloads and measures every format —
the same call the trainer makes before publishing. The full-precision latency is measured the
same way in the same process (:func:`kubetune_trainer.evaluate.evaluator.generate`: batch 1, greedy, the
same prompts and new-token count), so the speed-ups are pair by pair in one run.

Latency is per ``generate`` call with ``--new-tokens`` new tokens (EOS never stops it early: the
model is random, and ``min_new_tokens`` is not used, so a call may stop early only if EOS is drawn;
the token counts are printed). Threads: ``--threads`` (default 1) for torch and onnxruntime alike.
Targets: int8 size <= 0.35x, onnx-int8 latency >= 1.5x faster than full precision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import format_machine, format_table, machine_info, thread_env, verdict

TARGET_INT8_SIZE = 0.35
TARGET_ONNX_SPEEDUP = 1.5


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table (and writes JSON with --json)."""
    p = argparse.ArgumentParser(prog="python -m bench.quantized", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="100m", help="model shape (tiny, 5m, 25m, 100m)")
    p.add_argument("--formats", default="int8,onnx-int8")
    p.add_argument("--prompts", type=int, default=8, help="prompts (latency samples per format)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--measure-memory", action="store_true", help="also peak memory per format (fresh processes)"
    )
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    os.environ.update(thread_env(a.threads))  # before torch and onnxruntime start their pools
    import torch

    torch.set_num_threads(a.threads)
    from bench._synth import SHAPES, build_llama, build_tokenizer, instruction_records
    from kubetune_trainer.artifacts.quantize import quantize_artifacts
    from kubetune_trainer.evaluate.evaluator import ModelSource, generate, latency_percentiles, load_model

    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-quant-"))
    try:
        records = instruction_records(max(a.prompts, 200), seed=5)
        build_tokenizer(tmp / "tokenizer", records)
        info = build_llama(tmp / "merged", tmp / "tokenizer", SHAPES[a.size])
        (tmp / "merged" / "bench-model.json").unlink()  # not part of a real merged folder
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tmp / "merged")
        prompts = [
            tokenizer(
                f"<|im_start|>user\n{r['instruction']}\n\n{r['input']}<|im_end|>\n<|im_start|>assistant\n",
                add_special_tokens=False,
            )["input_ids"][:96]
            for r in records[: a.prompts]
        ]
        fp32 = load_model(ModelSource("transformers", tmp / "merged"))
        generate(
            fp32, tokenizer, prompts[:1], max_new_tokens=2
        )  # warm-up, as artifacts get in their smoke test
        gens = generate(fp32, tokenizer, prompts, max_new_tokens=a.new_tokens)
        ref = latency_percentiles([g.latency_ms for g in gens])
        ref_tokens = sum(g.new_tokens for g in gens)
        del fp32
        reports = quantize_artifacts(
            tmp / "merged",
            formats,
            tmp / "quantized",
            sample_prompt_ids=prompts,
            max_new_tokens=a.new_tokens,
            measure_memory=a.measure_memory,
        )
        ref_size = reports[0].reference_size_bytes if reports else 0
        rows: list[list[Any]] = [
            [
                "fp32 (merged)",
                ref_size / 1e6,
                "1.00x",
                ref["latency_p50_ms"],
                ref["latency_p95_ms"],
                "1.00x",
                ref_tokens,
                "-",
                "-",
            ]
        ]
        checks: list[list[Any]] = []
        for r in reports:
            speedup = ref["latency_p50_ms"] / r.latency_p50_ms
            rows.append(
                [
                    r.format,
                    r.size_bytes / 1e6,
                    f"{r.size_ratio:.2f}x",
                    r.latency_p50_ms,
                    r.latency_p95_ms,
                    f"{speedup:.2f}x",
                    r.new_tokens,
                    f"{r.logit_drift_mean_abs:.3g}",
                    f"{r.peak_memory_ratio:.2f}x" if r.peak_memory_ratio is not None else "-",
                ]
            )
            if r.format == "int8":
                checks.append(
                    [
                        "int8 size ratio",
                        f"{r.size_ratio:.3f}",
                        f"<= {TARGET_INT8_SIZE}",
                        verdict(r.size_ratio, TARGET_INT8_SIZE, higher_is_better=False),
                    ]
                )
            if r.format == "onnx-int8":
                checks.append(
                    [
                        "onnx-int8 p50 speed-up",
                        f"{speedup:.2f}x",
                        f">= {TARGET_ONNX_SPEEDUP}x",
                        verdict(speedup, TARGET_ONNX_SPEEDUP),
                    ]
                )
        print(format_machine(machine_info(a.threads)))
        print(
            f"model: Llama shape {a.size}, {info['params'] / 1e6:.1f}M parameters, random weights; "
            f"{len(prompts)} prompts of <= 96 tokens, {a.new_tokens} new tokens, batch 1, greedy"
        )
        print(
            format_table(
                [
                    "format",
                    "size MB",
                    "size ratio",
                    "p50 ms",
                    "p95 ms",
                    "p50 speed-up",
                    "new tokens",
                    "mean |drift|",
                    "peak mem",
                ],
                rows,
            )
        )
        print()
        print(format_table(["target", "value", "target", "verdict"], checks))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(
                json.dumps(
                    {
                        "machine": machine_info(a.threads),
                        "model": info,
                        "size": a.size,
                        "reference": {"size_bytes": ref_size, **ref, "new_tokens": ref_tokens},
                        "artifacts": [r.to_dict() for r in reports],
                    },
                    indent=2,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
