"""Time to first optimizer step of the quickstart, broken down by stage, cold and warm.

    .venv/bin/python -m bench.startup                # builds the demo store (~1 min), 1 cold + 3 warm runs
    .venv/bin/python -m bench.startup --quick        # a 2-second demo pre-training, 1 cold + 1 warm run
    .venv/bin/python -m bench.startup --store-dir .kubetune/store   # reuse an existing demo store

Each run is ``kubetune run examples/quickstart/finetunejob.yaml`` in a fresh process with a fresh
work directory against the local store, exactly as the quickstart runs it, with one change:
``training.logEverySteps: 1`` so that the first optimizer step prints its progress line (the
inputs digest ignores logEverySteps). The process is killed (SIGKILL, by its PID) once that line
appears, so no checkpoint or version is written and every run starts from the same state.

Stages, from the trainer's own stderr markers (``[kubetune] ...``, timestamped on arrival) and two
markers this bench adds around ``SFTRecipe.setup`` (model load, LoRA wrap, optimizer):

* ``cli+spec``    process start -> "running FineTuneJob" (interpreter, CLI, API models, YAML)
* ``runtime``     -> "stage Fetching" (torch import, device and precision)
* ``fetch``       -> "stage PreparingData" (inputs from the store, digests, registry lookup)
* ``data``        -> "stage Training" (transformers import, tokenizer, prepare_data)
* ``model load``  -> end of SFTRecipe.setup (weights, LoRA, optimizer, schedule, resume check)
* ``first step``  -> "step 1/..." progress line (batching, forward, backward, optimizer step)

"Cold" is the first run after the demo store was built in this invocation (the page cache is
not controllable here: the files were just written, so they are likely cached; Python's bytecode
caches of the installed libraries already exist). "Warm" runs follow it; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._common import REPO_ROOT, format_machine, format_table, machine_info, median, thread_env

QUICKSTART = REPO_ROOT / "examples" / "quickstart" / "finetunejob.yaml"
# "[kubetune]" lines, so the quiet console of `kubetune run` shows them (everything else goes to console.log).
SETUP_BEGIN = "[kubetune] bench-startup: setup begin"
SETUP_END = "[kubetune] bench-startup: setup end"

MARKERS = (
    ("cli+spec", "[kubetune] running FineTuneJob"),
    ("runtime", "[kubetune] stage Fetching"),
    ("fetch", "[kubetune] stage PreparingData"),
    ("data", "[kubetune] stage Training"),
    ("model load", SETUP_END),
    ("first step", "[kubetune] step 1/"),
)


def _child_main(argv: list[str]) -> int:
    """In the measured process: time SFTRecipe.setup, then run the real ``kubetune run`` CLI."""
    from kubetune_cli import main as cli
    from kubetune_trainer.train.recipe import SFTRecipe

    original = SFTRecipe.setup

    def timed_setup(self: SFTRecipe) -> None:
        print(SETUP_BEGIN, file=sys.stderr, flush=True)
        original(self)
        print(SETUP_END, file=sys.stderr, flush=True)

    SFTRecipe.setup = timed_setup  # type: ignore[method-assign]
    return cli.main(argv)


def quickstart_job(out: Path) -> Path:
    """The quickstart FineTuneJob with ``logEverySteps: 1`` (nothing else changed)."""
    import yaml

    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["training"]["logEverySteps"] = 1
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def build_store(store: Path, *, seconds_budget: float | None, threads: int) -> float:
    """Build the demo store like ``kubetune demo prepare`` (optionally with a shorter pre-training)."""
    env = {**os.environ, **thread_env(threads)}
    if seconds_budget is None:
        cmd = [sys.executable, "-m", "kubetune_cli.main", "demo", "prepare", "--store-dir", str(store)]
    else:
        code = (
            "import sys; from pathlib import Path; from kubetune_trainer.demo import prepare_quickstart; "
            f"prepare_quickstart(Path(sys.argv[1]), seconds_budget={seconds_budget!r})"
        )
        cmd = [sys.executable, "-c", code, str(store)]
    started = time.monotonic()
    subprocess.run(cmd, env=env, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - started


def time_one_run(
    job: Path, store: Path, workdir: Path, *, threads: int, timeout_s: float
) -> dict[str, float]:
    """Start ``kubetune run`` in a fresh process; seconds from start to each marker; kill after step 1."""
    env = {**os.environ, **thread_env(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "bench.startup",
        "--child",
        "run",
        str(job),
        "--store-dir",
        str(store),
        "--workdir",
        str(workdir),
    ]
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
            now = time.monotonic() - started
            lines.append(line)
            for name, marker in MARKERS:
                if name not in seen and line.startswith(marker):
                    seen[name] = now
            if "first step" in seen:
                done.set()
                return
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    finished = done.wait(timeout_s)
    if proc.poll() is None:
        proc.kill()  # SIGKILL, our own child: no checkpoint on the way out
    proc.wait()
    if not finished or "first step" not in seen:
        tail = "".join(lines[-30:])
        raise RuntimeError(f"kubetune run did not reach its first step (exit {proc.returncode}):\n{tail}")
    return seen


def stage_durations(seen: dict[str, float]) -> dict[str, float]:
    """Per-stage seconds from the cumulative marker times (in the order of MARKERS)."""
    out: dict[str, float] = {}
    previous = 0.0
    for name, _ in MARKERS:
        out[name] = seen[name] - previous
        previous = seen[name]
    out["total"] = previous
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the table (and writes JSON with --json)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    p.add_argument(
        "--store-dir", type=Path, default=None, help="existing demo store (default: build a fresh one)"
    )
    p.add_argument("--warm-runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2-second demo pre-training, 1 warm run")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.warm_runs = 1
    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-startup-"))
    try:
        store = a.store_dir.resolve() if a.store_dir else tmp / "store"
        build_s = None
        if a.store_dir is None:
            print(f"[bench] building the demo store in {store}", file=sys.stderr, flush=True)
            build_s = build_store(store, seconds_budget=2.0 if a.quick else None, threads=a.threads)
        job = quickstart_job(tmp / "finetunejob.yaml")
        runs: list[dict[str, Any]] = []
        for i in range(1 + a.warm_runs):
            kind = "cold" if i == 0 else "warm"
            print(f"[bench] run {i + 1}/{1 + a.warm_runs} ({kind})", file=sys.stderr, flush=True)
            seen = time_one_run(job, store, tmp / f"work-{i}", threads=a.threads, timeout_s=a.timeout)
            runs.append({"kind": kind, "stages": stage_durations(seen)})
            shutil.rmtree(tmp / f"work-{i}", ignore_errors=True)
        stages: list[dict[str, float]] = [r["stages"] for r in runs]
        cold = stages[0]
        warm = {k: median(s[k] for s in stages[1:]) for k in cold} if stages[1:] else {}
        rows = [
            [name, cold[name], warm.get(name), f"{100 * warm[name] / warm['total']:.0f}%" if warm else "-"]
            for name in [*(n for n, _ in MARKERS), "total"]
        ]
        print(format_machine(machine_info(a.threads)))
        if build_s is not None:
            print(
                f"demo store built in {build_s:.1f} s" + (" (--quick: 2 s pre-training)" if a.quick else "")
            )
        print(f"time to first optimizer step of the quickstart, seconds ({a.warm_runs} warm runs, median)")
        print(format_table(["stage", "cold s", "warm s", "warm share"], rows))
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(
                json.dumps(
                    {
                        "machine": machine_info(a.threads),
                        "build_s": build_s,
                        "runs": runs,
                        "cold": cold,
                        "warm_median": warm,
                    },
                    indent=2,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["MARKERS", "main", "quickstart_job", "stage_durations", "time_one_run"]
