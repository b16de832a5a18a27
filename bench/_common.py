"""Shared plumbing for the bench scripts: machine facts, pinned threads, worker processes, tables.

Every contender of a benchmark runs in its own fresh Python process (:func:`run_worker`) so that
its peak memory is its own (the RSS high-water mark the kernel reports for that child through
``wait4``) and no contender inherits another one's warm caches or thread pools. Threads are pinned
the same way for every contender (:func:`thread_env`); the count is printed with every table.

Nothing here imports torch: the parent processes of the benches stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WorkerRun:
    """One finished worker: what it reported, its peak RSS and its wall time."""

    result: dict[str, Any]
    peak_rss_bytes: int
    wall_s: float


class WorkerFailed(RuntimeError):
    """A worker process exited non-zero; the message carries the tail of its log."""


def thread_env(threads: int) -> dict[str, str]:
    """Environment pinning every math library to ``threads`` threads (the same for all contenders)."""
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "TOKENIZERS_PARALLELISM": "false",
        # Quiet, offline, and no telemetry: nothing may reach the network from a bench.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "WANDB_DISABLED": "true",
        "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    }


def pin_torch_threads(threads: int) -> None:
    """Inside a worker: torch's intra- and inter-op pools to ``threads`` (call before any work)."""
    import torch

    torch.set_num_threads(threads)
    # Refused once work ran in this process; intra-op is what matters for the benches.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, core count, memory, Python and (if importable cheaply) library versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if threads is not None:
        info["threads_per_contender"] = threads
    return info


def format_machine(info: Mapping[str, Any]) -> str:
    """One line describing the machine, for the head of every table."""
    parts = [f"{info['cpu']}", f"nproc={info['nproc']}", f"mem={info['memory_gib']} GiB"]
    if "threads_per_contender" in info:
        parts.append(f"threads/contender={info['threads_per_contender']}")
    if info.get("gpu"):
        parts.append(f"gpu={info['gpu']}")
    return "machine: " + ", ".join(parts)


#: Runs ``python -m MODULE ARGS`` and, at exit, writes the process's own peak RSS since exec (VmHWM)
#: beside its result file. wait4's ru_maxrss is not enough: it survives exec, so it would include the
#: bench parent's high-water mark (the child starts as a copy of the parent).
_PEAK_RSS_WRAPPER = """
import atexit, runpy, sys
module, result = sys.argv[1], sys.argv[3]
def _record_peak():
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    with open(result + ".vmhwm", "w") as out:
        out.write(str(kib * 1024))
atexit.register(_record_peak)
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_worker(
    module: str,
    args: Sequence[str],
    *,
    threads: int,
    log_path: Path,
    timeout_s: float = 3600.0,
    extra_env: Mapping[str, str] | None = None,
) -> WorkerRun:
    """Run ``python -m module --result FILE args...`` in a fresh process; return its JSON result.

    The worker must write one JSON object to the file named by ``--result``. Its stdout and stderr
    go to ``log_path``. Peak RSS is the child's own VmHWM since exec (falling back to ``wait4``'s
    ru_maxrss, which includes this parent's high-water mark). Raises :class:`WorkerFailed` on a non-zero exit or a timeout (the worker
    is killed by its PID first).
    """
    with tempfile.NamedTemporaryFile(prefix="bench-result-", suffix=".json", delete=False) as fh:
        result_path = Path(fh.name)
    env = {**os.environ, **thread_env(threads), **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", _PEAK_RSS_WRAPPER, module, "--result", str(result_path), *args]
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
            status, rusage = _wait_with_timeout(proc, timeout_s)
        wall = time.monotonic() - started
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        if code != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            why = "timed out" if code is None else f"exited with {code}"
            raise WorkerFailed(f"{module} {' '.join(args)} {why}; log {log_path}:\n{tail}")
        result = json.loads(result_path.read_text())
        hwm_path = Path(str(result_path) + ".vmhwm")
        peak = int(hwm_path.read_text()) if hwm_path.exists() else int(rusage.ru_maxrss) * 1024
    finally:
        result_path.unlink(missing_ok=True)
        Path(str(result_path) + ".vmhwm").unlink(missing_ok=True)
    return WorkerRun(result=result, peak_rss_bytes=peak, wall_s=wall)


def _wait_with_timeout(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, rusage
        if time.monotonic() > deadline:
            proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return None, rusage
        time.sleep(0.05)


def write_result(path: str | Path, result: Mapping[str, Any]) -> None:
    """Inside a worker: the JSON object :func:`run_worker` reads back."""
    Path(path).write_text(json.dumps(dict(result), indent=2, default=float))


def median(values: Iterable[float]) -> float:
    """Median of the values (raises ValueError when there are none)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median of no values")
    return float(statistics.median(vals))


def verdict(value: float | None, target: float, *, higher_is_better: bool = True) -> str:
    """``PASS`` or ``MISS`` against a target; ``n/a`` when there is no value."""
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned numeric columns (what the benches print)."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            item.rjust(w) if _numeric(item) else item.ljust(w) for item, w in zip(items, widths, strict=True)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep, *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("x", "").replace("%", "").strip()
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def mib(n_bytes: float) -> float:
    """Bytes to MiB."""
    return n_bytes / (1024 * 1024)
