"""The real quickstart end to end, timed stage by stage, with its quality section.

    .venv/bin/python -m bench.quickstart_real --json bench/results/quickstart-real.json

Runs what ``make quickstart`` runs after set-up — ``kubetune demo prepare --real`` and ``kubetune
run examples/quickstart-real/finetunejob.yaml`` — in a fresh store (so nothing is reused), stamps
every line the trainer prints with the wall clock, and reports:

* the wall-clock breakdown: import of the inputs, then each trainer stage from its ``[kubetune]
  stage ...`` line to the next (fetch incl. GGUF dequantisation, data, train, evaluation of the
  tuned and the base model, merge, quantize, publish);
* base vs tuned on the held-out questions with the paired bootstrap 95% intervals, from the
  version's ``eval/report.json`` (``paired``); when a report has none (an older trainer), the text
  metrics' intervals are computed here from ``eval/samples.jsonl`` and the glossary;
* the first two held-out questions with both answers (file order, not picked).

``--set KEY=VALUE`` overrides a spec field for a probe (``training.maxSteps=3``); the published
quickstart figures use none. Nothing here imports torch in the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

from bench._common import REPO_ROOT, machine_info, thread_env

JOB = REPO_ROOT / "examples" / "quickstart-real" / "finetunejob.yaml"
BUDGET_S = 15 * 60
_STAGE_LINE = re.compile(r"^\[kubetune\] stage (?P<stage>[A-Za-z]+)(?::? ?(?P<detail>.*))?$")
_EVAL_PHASE = re.compile(r"^\[kubetune\] evaluating (?P<which>base|tuned)\b")


def _kubetune() -> str:
    return str(Path(sys.executable).with_name("kubetune"))


def _apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, _, raw = item.partition("=")
        node = doc["spec"]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return doc


def run_stamped(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd``; return its exit code and every output line with the seconds since start."""
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    with (
        subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc,
        log.open("w", encoding="utf-8") as fh,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.monotonic() - start
            lines.append((t, line.rstrip("\n")))
            fh.write(f"{t:9.2f} {line}")
        code = proc.wait()
    lines.append((time.monotonic() - start, "[kubetune] stage End"))
    return code, lines


def stage_breakdown(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """Consecutive stage spans from the stamped lines (``Quantizing: merging`` counts as ``Merging``)."""
    marks: list[tuple[float, str]] = [(0.0, "Start-up")]
    for t, line in lines:
        m = _STAGE_LINE.match(line)
        if m:
            stage, detail = m.group("stage"), (m.group("detail") or "")
            if stage == "Quantizing" and "merging" in detail:
                stage = "Merging"
            if marks and marks[-1][1] == stage:
                continue
            marks.append((t, stage))
            continue
        e = _EVAL_PHASE.match(line)
        if e:
            marks.append((t, f"Evaluating {e.group('which')}"))
    spans: list[dict[str, Any]] = []
    for (t0, name), (t1, _) in pairwise(marks):
        spans.append({"stage": name, "seconds": round(t1 - t0, 1)})
    return spans


def _version_dir(store: Path, model: str) -> Path:
    versions = sorted((store / "kubetune-demo" / "models" / model / "versions").glob("v*"))
    if not versions:
        raise SystemExit(f"no version of {model} was published under {store}")
    return versions[-1]


def quality(version: Path, glossary: Path, *, resamples: int, seed: int) -> dict[str, Any]:
    """Base vs tuned with intervals: the report's own, else computed from the samples (text metrics)."""
    report = json.loads((version / "eval" / "report.json").read_text())["evaluation"]
    paired = report.get("paired")
    source = "eval/report.json"
    if not paired:
        from kubetune_trainer.evaluate.paired import paired_from_samples
        from kubetune_trainer.evaluate.terminology import TermMatcher, load_glossary

        matcher = TermMatcher(load_glossary(glossary))
        diffs = paired_from_samples(
            version / "eval" / "samples.jsonl",
            ("exact_match", "bleu", "rouge_l", "terminology_coverage"),
            matcher=matcher,
            resamples=resamples,
            seed=seed,
        )
        paired = {k: d.to_dict() for k, d in diffs.items()}
        source = "computed here from eval/samples.jsonl"
    samples = [
        json.loads(line) for line in (version / "eval" / "samples.jsonl").read_text().splitlines() if line
    ]
    return {
        "source": source,
        "tuned": report.get("tuned"),
        "base": report.get("base"),
        "paired": paired,
        "num_examples": report.get("num_examples"),
        "examples": samples[:2],
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables BENCHMARKS.md shows."""
    out = ["| stage | seconds |", "|---|---:|"]
    for span in result["stages"]:
        out.append(f"| {span['stage']} | {span['seconds']:,.1f} |")
    out.append(f"| **total after set-up** | **{result['total_s']:,.1f}** |")
    out += [
        "",
        "| metric | base | tuned | tuned - base | 95% CI | significant |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, d in (result["quality"]["paired"] or {}).items():
        out.append(
            f"| {name} | {d['base']:.4g} | {d['tuned']:.4g} | {d['difference']:+.4g} | "
            f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}] | {'yes' if d['significant'] else 'no'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--store-dir", type=Path, default=None, help="store root (default: a fresh temp dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="spec override KEY=VALUE"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="default: every core, as make quickstart",
    )
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-qs-"))
    store = args.store_dir or tmp / "store"
    env = {**os.environ, **thread_env(args.threads)}
    doc = _apply_overrides(yaml.safe_load(JOB.read_text()), args.overrides)
    job = tmp / "finetunejob.yaml"
    job.write_text(yaml.safe_dump(doc, sort_keys=False))

    t0 = time.monotonic()
    prep = subprocess.run(
        [_kubetune(), "demo", "prepare", "--real", "--store-dir", str(store)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    import_s = time.monotonic() - t0
    if prep.returncode != 0:
        print(prep.stdout + prep.stderr, file=sys.stderr)
        return prep.returncode
    code, lines = run_stamped(
        [_kubetune(), "run", str(job), "--store-dir", str(store), "--workdir", str(tmp / "work")],
        env,
        tmp / "run.log",
    )
    if code != 0:
        print("\n".join(line for _, line in lines[-40:]), file=sys.stderr)
    stages: list[dict[str, Any]] = [
        {"stage": "Import model + data (demo prepare --real)", "seconds": round(import_s, 1)}
    ]
    stages += stage_breakdown(lines)
    total = sum(s["seconds"] for s in stages)
    model = doc["spec"]["model"]["name"]
    glossary = store / "kubetune-demo" / "datasets" / "construction-faq" / "glossary.txt"
    result = {
        "machine": machine_info(),
        "threads": args.threads,
        "overrides": args.overrides,
        "exit_code": code,
        "stages": stages,
        "total_s": round(total, 1),
        "budget_s": BUDGET_S,
        "within_budget": total <= BUDGET_S,
        "load_average_end": os.getloadavg(),
        # The trainer's own lines with their wall-clock stamps (the run's evidence; no local paths).
        "log_lines": [
            f"{t:8.2f} {line}".replace(str(tmp), "<tmp>")
            for t, line in lines
            if line.startswith("[kubetune] ")
        ],
        "quality": quality(_version_dir(store, model), glossary, resamples=args.resamples, seed=0),
    }
    print(markdown(result))
    print(f"full log: {tmp / 'run.log'}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
