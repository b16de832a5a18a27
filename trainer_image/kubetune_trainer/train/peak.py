"""The peak memory a training stage really used, to put beside the plan's estimate.

* GPU: ``torch.cuda.max_memory_reserved`` after ``reset_peak_memory_stats`` at the stage's start,
  plus what was already reserved then (the caching allocator's view: what the device had to hold).
* CPU (Linux): the process's resident high-water mark (``VmHWM``) after resetting it through
  ``/proc/self/clear_refs`` at the stage's start, minus the resident size the process had when
  the run started (:func:`mark_run_start`: the imported interpreter, before any input was read) —
  what the run needs on top of its imports while it trains, which is what the plan estimates.
  Memory an earlier stage freed but the heap kept (a GGUF base's dequantisation) is counted when
  still resident: the pod holds it too. Without ``/proc`` (another OS), nothing is measured.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


_run_start_rss: int | None = None


def mark_run_start() -> None:
    """Remember the resident size now (the run's start, after imports) as the CPU baseline."""
    global _run_start_rss
    _run_start_rss = _status_kib("VmRSS")


class PeakMemory:
    """Start at construction; :meth:`read` returns ``{"peakBytes", "baselineBytes", "method"}`` or None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline: int | None = None
        self.method = ""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = 0
            self.method = "torch.cuda.max_memory_reserved"
            return
        try:
            _CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            return
        now = _status_kib("VmRSS")
        self.baseline = _run_start_rss if _run_start_rss is not None and now is not None else now
        self.method = "VmHWM during training above the RSS at the run's start (/proc/self/clear_refs)"

    def read(self) -> dict[str, Any] | None:
        if self.baseline is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_reserved(self.device))
            return {"peakBytes": peak, "baselineBytes": 0, "method": self.method}
        hwm = _status_kib("VmHWM")
        if hwm is None:
            return None
        return {"peakBytes": hwm - self.baseline, "baselineBytes": self.baseline, "method": self.method}
