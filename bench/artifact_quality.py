"""What ships, on the same eval set: every artifact of one trained version, side by side.

    .venv/bin/python -m bench.artifact_quality --json bench/results/artifact-quality-demo.json
    .venv/bin/python -m bench.artifact_quality --formats int8,onnx-int8   # without llama.cpp

One real ``kubetune run`` of the quickstart (the tiny demo model, trained: real weights that learned
the task) with ``output.merge`` on and every CPU quantization format requested. The trainer itself
scores the tuned model, the merged model and each artifact on the same eval set (loss over the whole
set; generation metrics and batch-1 greedy latency on the same first ``maxSamples`` prompts, same
seed) and writes them to the version's ``eval/report.json``; this script only reads that file and the
artifact sizes, so the figures are exactly what the version's gates judged. Ratios are against the
tuned model (quality, latency) and the merged fp32 folder (size), all from the same run.

bench/quantized.py measures the same formats at larger shapes (random weights: size and latency,
no quality).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench._common import format_machine, format_table, machine_info

REPO = Path(__file__).resolve().parents[1]
FORMATS = "int8,onnx-int8,gguf-f16,gguf-q8_0,gguf-q4_k_m"
METRICS = ["eval_loss", "perplexity", "exact_match", "rouge_l", "latency_p50_ms", "latency_p95_ms"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.artifact_quality", description=__doc__.split("\n")[0])
    p.add_argument("--formats", default=FORMATS)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-artifacts-"))
    try:
        store = tmp / "store"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cli = [sys.executable, "-m", "kubetune_cli.main"]
        subprocess.run([*cli, "demo", "prepare", "--store-dir", str(store)], check=True, env=env)
        job = yaml.safe_load((REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text())
        spec = job["spec"]
        spec.setdefault("output", {})["merge"] = True
        spec["output"].pop("promote", None)
        spec["quantization"] = {"formats": formats}
        spec["evaluation"]["metrics"] = METRICS
        (tmp / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
        proc = subprocess.run(
            [*cli, "run", str(tmp / "job.yaml"), "--store-dir", str(store), "--workdir", str(tmp / "w")],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode not in (0, 4):
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        name = spec["model"]["name"]
        vdir = store / "kubetune-demo" / "models" / name / "versions" / "v1"
        report = json.loads((vdir / "eval" / "report.json").read_text())
        tuned = report["evaluation"]["tuned"]
        evaluations = {e["artifact"]: e for e in report["artifact_evaluations"]}
        merged_size = _dir_bytes(vdir / "merged")
        rows: list[list[Any]] = []
        out: dict[str, Any] = {"machine": machine_info(1), "formats": formats, "artifacts": {}}

        def row(label: str, metrics: dict[str, Any], size: int | None) -> None:
            def rel(key: str) -> str:
                if metrics.get(key) is None or not tuned.get(key):
                    return "-"
                return f"{metrics[key] / tuned[key]:.3f}x"

            rows.append(
                [
                    label,
                    size / 1e6 if size is not None else None,
                    f"{size / merged_size:.2f}x" if size is not None else "-",
                    metrics.get("eval_loss"),
                    rel("eval_loss"),
                    metrics.get("exact_match"),
                    metrics.get("rouge_l"),
                    rel("rouge_l"),
                    metrics.get("latency_p50_ms"),
                    metrics.get("latency_p95_ms"),
                ]
            )
            out["artifacts"][label] = {"size_bytes": size, "metrics": metrics}

        row("tuned (peft, as evaluated)", tuned, None)
        for artifact in ["merged", *formats]:
            e = evaluations.get(artifact)
            if e is None:
                continue
            folder = vdir / e["path"]
            size = _dir_bytes(folder) if folder.exists() else None
            row(artifact, e["metrics"], size)
        print(format_machine(out["machine"]))
        print(f"version: {vdir.relative_to(tmp)} ({report['evaluation']['num_examples']} eval examples)")
        print(
            format_table(
                [
                    "artifact",
                    "size MB",
                    "size vs merged",
                    "eval_loss",
                    "vs tuned",
                    "exact_match",
                    "rouge_l",
                    "vs tuned",
                    "p50 ms",
                    "p95 ms",
                ],
                rows,
            )
        )
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
