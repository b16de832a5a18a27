"""How close the pre-flight plan's memory estimate is to the peak a run really reaches.

Each case is a real ``kubetune run`` in its own process, on a locally built Llama of a given shape
(random weights, the demo tokenizer) and the quickstart's data, for a few optimizer steps; the run
itself writes ``training/plan.json`` with the plan's estimate and the peak it measured
(``kubetune_trainer.train.peak``: the RSS high-water mark above the stage's starting RSS on CPU).
The table prints estimate, measurement and the error per case; the goal is within +-20%.

    python -m bench.plan_accuracy                 # the tiny shapes (a few minutes)
    python -m bench.plan_accuracy --real          # + SmolLM2-135M-Instruct (make quickstart-inputs first)

``tests/integration/test_plan.py`` runs the same cases' smallest two and asserts the tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench._common import REPO_ROOT, thread_env

DEMO_BUCKET = "kubetune-demo"
TOLERANCE = 0.20


@dataclass(frozen=True)
class Case:
    """One run: a model shape and the training settings that matter for memory."""

    name: str
    hidden: int = 256
    layers: int = 4
    intermediate: int = 688
    heads: int = 4
    method: str = "lora"
    batch_size: int = 8
    seq: int = 256
    gradient_checkpointing: bool = False
    dropout: float = 0.05
    base_uri: str | None = None  # a real model instead of a built one
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("lora-4M", hidden=256, layers=4, intermediate=688),
    Case("full-4M", hidden=256, layers=4, intermediate=688, method="full"),
    Case("lora-4M-gradckpt", hidden=256, layers=4, intermediate=688, gradient_checkpointing=True),
    Case("lora-20M-seq512", hidden=512, layers=8, intermediate=1376, heads=8, batch_size=4, seq=512),
]
REAL_CASE = Case(
    "smollm2-135m-lora",
    batch_size=4,
    seq=256,
    base_uri="s3://kubetune-demo/base-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def build_model(case: Case, store: Path) -> str:
    """Build ``case``'s model into the local store (once) and return its s3:// URI."""
    from kubetune_trainer.demo import DEMO_MODEL_NAME, build_tiny_llama, prepare_quickstart

    prepare_quickstart(store)
    name = f"plan-{case.hidden}x{case.layers}x{case.intermediate}"
    target = store / DEMO_BUCKET / "base-models" / name
    if not (target / "config.json").is_file():
        tokenizer_dir = store / DEMO_BUCKET / "base-models" / DEMO_MODEL_NAME
        build_tiny_llama(
            target,
            tokenizer_dir,
            hidden_size=case.hidden,
            num_layers=case.layers,
            num_heads=case.heads,
            intermediate_size=case.intermediate,
        )
    return f"s3://{DEMO_BUCKET}/base-models/{name}/"


def job_yaml(case: Case, base_uri: str, real: bool) -> dict[str, Any]:
    """A FineTuneJob of a few steps that trains, reports its plan and publishes little else."""
    data = (
        {
            "train": {"uri": f"s3://{DEMO_BUCKET}/datasets/construction-faq/train.jsonl"},
            "eval": {"uri": f"s3://{DEMO_BUCKET}/datasets/construction-faq/eval.jsonl"},
            "format": "instruction",
            "template": "auto",
        }
        if real
        else {
            "train": {"uri": f"s3://{DEMO_BUCKET}/datasets/quickstart/train.jsonl"},
            "eval": {"uri": f"s3://{DEMO_BUCKET}/datasets/quickstart/eval.jsonl"},
            "format": "instruction",
            "template": "chatml",
        }
    )
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"plan-{case.name.lower()}"},
        "spec": {
            "model": {"name": f"plan-{case.name.lower()}", "base": {"uri": base_uri}},
            "data": data,
            "method": {
                "type": case.method,
                "lora": {"r": 16, "alpha": 32, "dropout": case.dropout, "targetModules": ["all-linear"]},
            },
            "training": {
                "maxSteps": 3,
                "batchSize": case.batch_size,
                "gradientAccumulationSteps": 1,
                "maxSeqLength": case.seq,
                "precision": "fp32",
                "gradientCheckpointing": case.gradient_checkpointing,
                "logEverySteps": 1,
                "checkpoint": {"everySteps": 1000},
            },
            "distributed": {"gpusPerNode": 0},
            "evaluation": {
                "metrics": ["eval_loss"],
                "maxSamples": 4,
                "requireImprovement": False,
                "minTrainLossDecrease": 0,
            },
            "output": {"uri": f"s3://{DEMO_BUCKET}/plan-models", "merge": False},
            **case.extra,
        },
    }


def run_case(case: Case, store: Path, workdir: Path, *, threads: int = 1) -> dict[str, Any]:
    """Run ``case`` with ``kubetune run`` in a fresh process; its ``training/plan.json``."""
    real = case.base_uri is not None
    if real:
        from kubetune_trainer.demo_real import prepare_real_quickstart

        prepare_real_quickstart(store)
    base_uri = case.base_uri if real else build_model(case, store)
    assert base_uri is not None
    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh registry and work dir each time: a published version would be reused, not trained.
    shutil.rmtree(store / DEMO_BUCKET / "plan-models", ignore_errors=True)
    shutil.rmtree(workdir / case.name, ignore_errors=True)
    job = workdir / f"{case.name}.yaml"
    job.write_text(yaml.safe_dump(job_yaml(case, base_uri, real), sort_keys=False))
    env = {**os.environ, **thread_env(threads)}
    cmd = [
        str(Path(sys.executable).parent / "kubetune"),
        "run",
        str(job),
        "--store-dir",
        str(store),
        "--workdir",
        str(workdir / case.name),
        "--cache-dir",
        str(workdir / "cache"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode not in (0, 4):
        raise RuntimeError(f"{case.name}: kubetune run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    plan_file = workdir / case.name / "staging" / "training" / "plan.json"
    report = json.loads(plan_file.read_text())
    if "measured" not in report:
        raise RuntimeError(f"{case.name}: no measured peak in {plan_file}")
    return report


def error(report: dict[str, Any]) -> float:
    """estimate / measured - 1."""
    return float(report["memory"]["peakBytes"]) / float(report["measured"]["peakBytes"]) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path(".kubetune/bench-plan/store"))
    parser.add_argument("--workdir", type=Path, default=Path(".kubetune/bench-plan/work"))
    parser.add_argument(
        "--real", action="store_true", help="add SmolLM2-135M-Instruct (kubetune demo prepare --real)"
    )
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    if args.real:
        cases.append(REAL_CASE)
    rows = []
    for case in cases:
        report = run_case(case, args.store.resolve(), args.workdir.resolve())
        rows.append((case, report))
        print(
            f"{case.name}: estimated {report['memory']['peakBytes'] / 2**20:,.0f} MiB, "
            f"measured {report['measured']['peakBytes'] / 2**20:,.0f} MiB ({error(report):+.1%})",
            flush=True,
        )
    print()
    print("| case | parameters | settings | estimated MiB | measured MiB | error | within ±20% |")
    print("|---|---:|---|---:|---:|---:|---|")
    for case, report in rows:
        err = error(report)
        print(
            f"| {case.name} | {report['shape']['parameters'] / 1e6:.1f}M | {report['memory']['settings']} | "
            f"{report['memory']['peakBytes'] / 2**20:,.0f} | {report['measured']['peakBytes'] / 2**20:,.0f} | "
            f"{err:+.1%} | {'yes' if abs(err) <= TOLERANCE else '**MISS**'} |"
        )
    print()
    print("terms of each estimate (MiB):")
    for case, report in rows:
        terms = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in report["memory"]["terms"].items() if v)
        print(f"  {case.name}: {terms}; load {report['memory']['loadPeakBytes'] / 2**20:,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
