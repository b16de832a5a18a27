"""The pre-flight stage of a run: the plan, before any weight is downloaded.

Input: the :class:`~kubetune_trainer.context.RunContext` and the fetched data
(:class:`~kubetune_trainer.fetch.inputs.DataInputs`). Output: the :class:`~.plan.Plan` (None when
the base's shape cannot be read before its download: a ``hf://`` base, a config the plan does not
understand — said in the log, never a failure), logged line by line, reported into the
FineTuneJob's ``status.plan`` (the operator turns it into the ``Fits`` condition), and kept for
``training/plan.json``, where the measured peak is put beside it after training.

The memory bound of one device, in this order: ``spec.resources.gpuMemory`` (GPU jobs) or
``spec.resources.memory`` (CPU jobs), then the device itself (a GPU's total memory; on CPU the
machine's available memory shared by the processes on it).

Raises :class:`WillNotFitError` when the estimate is over the bound, unless
``spec.runPolicy.ignorePlan``: the run stops before it spends anything (exit code 3: retrying
cannot help).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kubetune_registry.storage import ObjectNotFound, StorageError, file_uri_path, join_key, open_uri
from kubetune_trainer.context import RunContext
from kubetune_trainer.fetch.inputs import DataInputs
from kubetune_trainer.plan.plan import Plan, available_memory, data_stats, make_plan
from kubetune_trainer.plan.shape import ShapeError, read_base_shape

log = logging.getLogger("kubetune.trainer")

TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_MAX_BYTES = 64 * 1024 * 1024


class WillNotFitError(Exception):
    """The plan's estimate of peak memory is over the device's bound (the message says both and
    the changes that would fit)."""


def plan_stage(ctx: RunContext, data: DataInputs) -> Plan | None:
    """Plan ``ctx.rc`` on ``data`` (rank 0 plans; every rank gets the verdict). Raises
    WillNotFitError (every rank) when it will not fit and the spec does not say to ignore it."""
    rc, runtime = ctx.rc, ctx.runtime
    plan: Plan | None = None
    verdict: dict[str, Any] | None = None
    if runtime.is_main:
        plan = _plan(ctx, data)
        if plan is not None:
            for line in plan.render():
                print(f"[kubetune] plan: {line}", file=ctx.reporter.stream, flush=True)
            status = plan.status(rc.job.generation)
            if plan.fits is False and rc.plan.ignore:
                status["summary"] = (status["summary"] + " (spec.runPolicy.ignorePlan: running anyway)")[
                    :1000
                ]
            ctx.reporter.plan(status)
            verdict = {"fits": plan.fits, "summary": plan.summary()}
            if plan.fits is False and rc.plan.ignore:
                print(
                    "[kubetune] plan: it will not fit, but spec.runPolicy.ignorePlan is true: running anyway",
                    file=ctx.reporter.stream,
                    flush=True,
                )
    verdict = runtime.broadcast(verdict)
    if verdict is not None and verdict["fits"] is False and not rc.plan.ignore:
        raise WillNotFitError(
            f"{verdict['summary']}. Nothing was downloaded or trained; apply one of the changes, give "
            "the job more memory per device, or set spec.runPolicy.ignorePlan: true to run anyway"
        )
    return plan


def _plan(ctx: RunContext, data: DataInputs) -> Plan | None:
    rc, runtime = ctx.rc, ctx.runtime
    base_uri = data.parent or rc.model.base.uri
    try:
        shape = read_base_shape(base_uri, ctx.store, registry_output_uri=rc.output.uri)
    except (ShapeError, StorageError, ValueError) as exc:
        print(
            f"[kubetune] plan: skipped, the base's shape is not known before its download ({exc})",
            file=ctx.reporter.stream,
            flush=True,
        )
        return None
    tokenizer = _tokenizer_json(ctx, base_uri)
    try:
        stats = data_stats(
            data.train_files,
            data.eval_files,
            rc.data,
            seed=rc.training.seed,
            display_names=data.display_names,
            tokenizer_json=tokenizer,
        )
    except (ValueError, OSError) as exc:
        log.info("plan without data statistics: %s", exc)
        stats = None
    capacity, source = device_capacity(ctx)
    device = runtime.device.type
    return make_plan(
        rc,
        shape,
        stats,
        device=device,
        world_size=runtime.world_size,
        capacity=capacity,
        capacity_source=source,
        threads=_threads() if device == "cpu" else 1,
    )


def device_capacity(ctx: RunContext) -> tuple[int | None, str]:
    """The memory bound of one device and where it came from (see the module docstring)."""
    policy = ctx.rc.plan
    if policy.device_memory_bytes is not None:
        return policy.device_memory_bytes, policy.device_memory_source or "the spec"
    runtime = ctx.runtime
    if runtime.device.type == "cuda":
        import torch

        total = int(torch.cuda.get_device_properties(runtime.device).total_memory)
        return total, f"{torch.cuda.get_device_name(runtime.device)} total memory"
    available = available_memory()
    if available is None:
        return None, "the machine's memory is unknown"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = available // max(1, local)
    return share, "this machine's available memory" + (f" / {local} processes" if local > 1 else "")


def _threads() -> int:
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "") or len(os.sched_getaffinity(0))))
    except (ValueError, AttributeError):
        return 1


def _tokenizer_json(ctx: RunContext, base_uri: str) -> Path | None:
    """The base's tokenizer.json on local disk (a file:// base: in place; s3://: one small GET), or None."""
    if base_uri.startswith("file://"):
        path = file_uri_path(base_uri)
        candidate = path / TOKENIZER_FILE if path.is_dir() else None
        return candidate if candidate is not None and candidate.is_file() else None
    if not base_uri.startswith("s3://"):
        return None
    try:
        store, key = open_uri(base_uri, ctx.store)
        if key.lower().endswith(".gguf"):
            return None
        data, _ = store.get_bytes(join_key(key.rstrip("/"), TOKENIZER_FILE) if key else TOKENIZER_FILE)
    except (ObjectNotFound, StorageError, ValueError):
        return None
    if len(data) > _TOKENIZER_MAX_BYTES:
        return None
    target = ctx.workdir / "inputs" / "plan" / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def write_plan_report(
    staging: Path, plan: Plan | None, measured: dict[str, Any] | None
) -> dict[str, Any] | None:
    """``training/plan.json``: the plan and, after training, the measured peak beside the estimate."""
    if plan is None:
        return None
    report = plan.to_dict()
    if measured is not None:
        report["measured"] = measured
        peak = measured.get("peakBytes")
        if peak:
            report["estimateError"] = round(plan.memory.peak / peak - 1, 4)
    (staging / "training").mkdir(parents=True, exist_ok=True)
    (staging / "training" / "plan.json").write_text(json.dumps(report, indent=2))
    return report
