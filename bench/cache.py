"""The node cache: a second job on the same base model and data vs the first (issue 21, part 2).

    .venv/bin/python -m bench.cache                  # the tiny demo model (builds the demo store, ~1 min)
    .venv/bin/python -m bench.cache --quick          # a 2-second demo pre-training
    .venv/bin/python -m bench.cache --real           # SmolLM2-135M (GGUF) on the real quickstart's data

Three fresh ``kubetune run`` processes of the quickstart job (``--real``: the real quickstart's),
each with a fresh work directory, killed (SIGKILL, by PID) once the first optimizer step prints:

1. **job A, cold cache** — an empty ``--cache-dir``: the base is downloaded and inserted, the
   data tokenised and inserted;
2. **job B, warm cache** — another job (learning rate halved: a different inputs digest, so not a
   reuse) on the same base and data, same cache dir;
3. **job B, no cache** — the same job B with the cache off (``--cache-dir ''``), for reference.

Reported per run: model bytes read from the object store (the trainer's own count, from its
``base:`` line), whether tokenisation was skipped, the fetch and data stage seconds and the time to
the first optimizer step; then B-warm / A-cold ratios. Goal: B reads no model byte, and its time
to first step is dominated by imports (the ``runtime`` stage).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench._common import REPO_ROOT, format_machine, format_table, machine_info, thread_env
from bench.startup import MARKERS, build_store, stage_durations

QUICKSTART = REPO_ROOT / "examples" / "quickstart" / "finetunejob.yaml"
QUICKSTART_REAL = REPO_ROOT / "examples" / "quickstart-real" / "finetunejob.yaml"
MISS = re.compile(r"\[kubetune\] base: not in the node cache; ([\d,]+) bytes read")
HIT = re.compile(r"\[kubetune\] base: .*from the node cache .*; ([\d,]+) model bytes read")
SKIPPED = "tokenization skipped"


def job_file(source: Path, out: Path, *, lr_factor: float) -> Path:
    """``source`` with ``logEverySteps: 1`` and the learning rate scaled (another job, same inputs)."""
    doc = yaml.safe_load(source.read_text())
    training = doc["spec"].setdefault("training", {})
    training["logEverySteps"] = 1
    training["learningRate"] = float(training.get("learningRate") or 2e-4) * lr_factor
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def model_bytes(lines: list[str]) -> int | None:
    """Model bytes read from the store, from the trainer's ``base:`` line (None without a cache)."""
    for line in lines:
        for pattern in (HIT, MISS):
            m = pattern.search(line)
            if m:
                return int(m.group(1).replace(",", ""))
    return None


def one_run(
    job: Path, store: Path, workdir: Path, cache: str, *, threads: int, timeout_s: float
) -> dict[str, Any]:
    """One ``kubetune run`` until its first optimizer step: marker times and the lines it printed."""
    env = {**os.environ, **thread_env(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "kubetune_cli.main", "run", str(job), "--store-dir", str(store)]
    cmd += ["--workdir", str(workdir), "--cache-dir", cache]
    seen: dict[str, float] = {}
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    done = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            for name, marker in MARKERS:
                if name not in seen and line.startswith(marker):
                    seen[name] = time.monotonic() - started
            if "first step" in seen:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    finished = done.wait(timeout_s)
    if proc.poll() is None:
        proc.kill()  # our own child, by PID
    proc.wait()
    if not finished or "first step" not in seen:
        raise RuntimeError(f"kubetune run did not reach its first step:\n{''.join(lines[-30:])}")
    seen.setdefault("model load", seen["first step"])  # no bench marker around setup here
    return {
        "stages": stage_durations(seen),
        "model_bytes": model_bytes(lines),
        "tokenization_skipped": any(SKIPPED in ln for ln in lines),
        "cache_lines": [ln.strip() for ln in lines if "node cache" in ln or SKIPPED in ln],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n")[0])
    p.add_argument("--store-dir", type=Path, default=None, help="an existing store (default: build one)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M GGUF + the real quickstart's data")
    p.add_argument("--quick", action="store_true", help="2-second demo pre-training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-cache-"))
    try:
        store = a.store_dir.resolve() if a.store_dir else tmp / "store"
        if a.store_dir is None:
            print(f"[bench] building the {'real' if a.real else 'demo'} store in {store}", file=sys.stderr)
            if a.real:
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "kubetune_cli.main",
                        "demo",
                        "prepare",
                        "--real",
                        "--store-dir",
                        str(store),
                    ],
                    check=True,
                    cwd=REPO_ROOT,
                    stdout=subprocess.DEVNULL,
                )
            else:
                build_store(store, seconds_budget=2.0 if a.quick else None, threads=a.threads)
        source = QUICKSTART_REAL if a.real else QUICKSTART
        job_a = job_file(source, tmp / "job-a.yaml", lr_factor=1.0)
        job_b = job_file(source, tmp / "job-b.yaml", lr_factor=0.5)
        cache = str(tmp / "node-cache")
        plan = [("A, cold cache", job_a, cache), ("B, warm cache", job_b, cache), ("B, no cache", job_b, "")]
        runs: dict[str, dict[str, Any]] = {}
        for i, (name, job, cache_dir) in enumerate(plan):
            print(f"[bench] run {i + 1}/{len(plan)}: job {name}", file=sys.stderr, flush=True)
            runs[name] = one_run(
                job, store, tmp / f"work-{i}", cache_dir, threads=a.threads, timeout_s=a.timeout
            )
            shutil.rmtree(tmp / f"work-{i}", ignore_errors=True)
        rows = [
            [
                name,
                r["model_bytes"] if r["model_bytes"] is not None else "n/a (no cache)",
                "yes" if r["tokenization_skipped"] else "no",
                r["stages"]["runtime"],
                r["stages"]["fetch"],
                r["stages"]["data"],
                r["stages"]["model load"],  # model load + the first step: no marker between them here
                r["stages"]["total"],
            ]
            for name, r in runs.items()
        ]
        cold, warm = runs["A, cold cache"], runs["B, warm cache"]
        print(format_machine(machine_info(a.threads)))
        print(f"node cache, {'SmolLM2-135M GGUF' if a.real else 'tiny demo model'}: first vs second job")
        print(
            format_table(
                [
                    "job",
                    "model bytes read",
                    "tokenization skipped",
                    "runtime s",
                    "fetch s",
                    "data s",
                    "load+step s",
                    "to step 1 s",
                ],
                rows,
            )
        )
        ratio = warm["stages"]["total"] / cold["stages"]["total"]
        imports = warm["stages"]["cli+spec"] + warm["stages"]["runtime"]
        print(
            f"B-warm / A-cold time to first step: {ratio:.2f}; model bytes {warm['model_bytes']} vs "
            f"{cold['model_bytes']}; imports (cli+spec+runtime) are {100 * imports / warm['stages']['total']:.0f}% "
            "of B-warm's time to first step"
        )
        goal = warm["model_bytes"] == 0 and warm["tokenization_skipped"]
        print(f"goal (no model byte read, tokenization skipped): {'PASS' if goal else 'MISS'}")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"machine": machine_info(a.threads), "runs": runs}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
