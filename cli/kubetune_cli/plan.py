"""``kubetune plan job.yaml``: will this job fit, how many steps, how long — before anything is spent.

The same plan every run makes as its first step (``kubetune_trainer.plan``), from the base model's
config alone (``config.json`` or a GGUF header: no weight is downloaded) and the training data
(small: fetched to a temporary folder when it is not in the local store). Torch-free.

Exit codes: 0 when it fits (or there is no bound to check), 3 when it will not fit (what a run
would stop with), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kubetune_api.loader import SpecError, load_finetunejob
from kubetune_api.names import parse_quantity
from kubetune_api.reports import EXIT_BAD_INPUT
from kubetune_api.runconfig import RunConfig, resolve_run_config
from kubetune_registry.storage import StorageError, StoreSettings, file_uri_path
from kubetune_trainer.data import DATA_SUFFIXES
from kubetune_trainer.plan.plan import Plan, available_memory, data_stats, make_plan
from kubetune_trainer.plan.shape import ShapeError, read_base_shape

DEFAULT_STORE = ".kubetune/store"


def _store(rc: RunConfig) -> StoreSettings:
    s = rc.storage
    return StoreSettings(
        endpoint=s.endpoint, region=s.region, addressing_style=s.addressing_style, local_root=s.local_root
    )


def _data_files(uri: str, settings: StoreSettings, scratch: Path) -> list[Path]:
    if uri.startswith("file://"):
        root = file_uri_path(uri)
    else:
        from kubetune_trainer.fetch.sources import fetch

        root = fetch(uri, scratch / "data", settings)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def make_job_plan(rc: RunConfig, args: argparse.Namespace) -> Plan:
    """The plan of ``rc`` as ``kubetune plan`` computes it (devices from the spec or the flags)."""
    settings = _store(rc)
    base = rc.model.base.uri
    shape = read_base_shape(base, settings, registry_output_uri=rc.output.uri)
    gpus = rc.distributed.gpus_per_node if args.gpus is None else args.gpus
    device = "cuda" if gpus > 0 else "cpu"
    world = rc.distributed.nodes * (gpus if gpus > 0 else (args.nproc or 1))
    capacity: int | None
    if args.device_memory:
        capacity, source = int(parse_quantity(args.device_memory)), f"--device-memory {args.device_memory}"
    elif rc.plan.device_memory_bytes is not None:
        capacity, source = rc.plan.device_memory_bytes, rc.plan.device_memory_source or "the spec"
    elif device == "cpu":
        available = available_memory()
        procs = args.nproc or 1
        capacity = available // procs if available is not None else None
        source = "this machine's available memory" + (f" / {procs} processes" if procs > 1 else "")
    else:
        capacity, source = None, "set spec.resources.gpuMemory (or --device-memory) to check it"
    with tempfile.TemporaryDirectory(prefix="kubetune-plan-") as scratch:
        train = _data_files(rc.data.train.uri, settings, Path(scratch))
        evals = _data_files(rc.data.eval.uri, settings, Path(scratch) / "eval") if rc.data.eval else None
        tokenizer = None
        if base.startswith("file://") and (file_uri_path(base) / "tokenizer.json").is_file():
            tokenizer = file_uri_path(base) / "tokenizer.json"
        elif rc.storage.local_root and base.startswith("s3://"):
            local = Path(rc.storage.local_root) / base.removeprefix("s3://") / "tokenizer.json"
            tokenizer = local if local.is_file() else None
        stats = data_stats(train, evals, rc.data, seed=rc.training.seed, tokenizer_json=tokenizer)
    return make_plan(
        rc,
        shape,
        stats,
        device=device,
        world_size=world,
        capacity=capacity,
        capacity_source=source,
        threads=args.threads,
        price_per_device_hour=args.price_per_device_hour,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        job = load_finetunejob(args.job)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    store_dir = Path(args.store_dir).resolve()
    rc = resolve_run_config(job, local_root=None if args.remote else str(store_dir))
    try:
        plan = make_job_plan(rc, args)
    except (ShapeError, StorageError, ValueError, OSError) as exc:
        print(f"error: cannot plan {args.job}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(f"plan for FineTuneJob {rc.job.name!r} (model {rc.model.name}, base {rc.model.base.uri}):")
        for line in plan.render():
            print(f"  {line}")
    return EXIT_BAD_INPUT if plan.fits is False else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="estimate memory per GPU, steps and time of a FineTuneJob before running it"
    )
    p.add_argument("job", type=Path, help="FineTuneJob YAML")
    p.add_argument(
        "--store-dir", default=DEFAULT_STORE, help=f"local object store root (default {DEFAULT_STORE})"
    )
    p.add_argument(
        "--remote", action="store_true", help="read the base's config and the data from the spec's store"
    )
    p.add_argument(
        "--gpus", type=int, default=None, help="GPUs per node (default: spec.distributed.gpusPerNode)"
    )
    p.add_argument(
        "--nproc", type=int, default=None, help="CPU processes on this machine (as kubetune run --nproc)"
    )
    p.add_argument(
        "--device-memory", default=None, help="memory of one device, e.g. 80Gi (default: from the spec)"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process, for the time estimate")
    p.add_argument(
        "--price-per-device-hour",
        type=float,
        default=None,
        help="what one GPU (or CPU process) hour costs, for a cost estimate",
    )
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.set_defaults(func=cmd_plan)
