"""``kubetune versions list|show|diff|verify|serve-manifest|mlflow-sync`` and ``kubetune alias set|history``.

:func:`add_commands` adds both command groups to the ``kubetune`` parser. Every leaf command sets
``func`` (``args.func(args) -> int``, the exit code). Each takes ``--output URI --model NAME``, plus
``--store-dir DIR`` (s3:// URIs map into that local directory: the embedded object store) and
``--endpoint`` / ``--region`` for an S3-compatible endpoint; credentials come from the environment.
Exit codes: 0 ok; 1 ``verify`` found a missing or altered file; 2 a usage or lookup error (the
message goes to stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Any

from rich.console import Console
from rich.table import Table

from kubetune_registry.mlflow_sync import MlflowMirror, MlflowSyncError, MlflowTarget
from kubetune_registry.serving import (
    ServingError,
    ServingOptions,
    render_yaml,
    serving_manifests,
    serving_source,
)
from kubetune_registry.storage import StorageError, StoreSettings, open_uri
from kubetune_registry.versions import (
    AliasConflict,
    IntegrityError,
    ModelRegistry,
    PublishedVersion,
    RegistryError,
    VersionNotFound,
)


def _console() -> Any:
    # Wide enough for digests when output is not a terminal (pipes, CI logs).
    width = None if os.isatty(1) else int(os.environ.get("COLUMNS", "160"))
    return Console(width=width, soft_wrap=False, highlight=False)


def _registry(args: argparse.Namespace) -> ModelRegistry:
    settings = StoreSettings(endpoint=args.endpoint, region=args.region, local_root=args.store_dir)
    return ModelRegistry(args.output, args.model, settings)


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = registry.list_versions()
    aliases: dict[str, list[str]] = {}
    for record in registry.list_aliases():
        aliases.setdefault(record.version, []).append(record.alias)
    table = Table(title=f"{registry.model_name}: {len(versions)} version(s)")
    for column in ("Version", "Created", "Parent", "Aliases", "Metrics", "Gates", "Inputs digest"):
        table.add_column(column)
    for pv in versions:
        m = pv.manifest
        metrics = ", ".join(f"{k}={_fmt_number(v)}" for k, v in sorted((m.get("metrics") or {}).items()))
        gates = m.get("gates") or {}
        passed = gates.get("passed")
        table.add_row(
            pv.name,
            str(m.get("created", "")),
            str(m.get("parent") or "-"),
            ", ".join(sorted(aliases.get(pv.name, []))) or "-",
            metrics or "-",
            "-" if passed is None else ("passed" if passed else "failed"),
            str(m.get("inputsDigest", ""))[:16],
        )
    _console().print(table)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    pv = _registry(args).get_version(args.ref)
    console = _console()
    if args.json:
        console.print_json(json.dumps(pv.manifest))
        return 0
    m = pv.manifest
    summary = Table(title=f"{pv.name} of {m.get('model')}", show_header=False)
    summary.add_column("Field")
    summary.add_column("Value")
    summary.add_row("uri", pv.uri)
    summary.add_row("manifest sha256", pv.manifest_digest)
    summary.add_row("created", str(m.get("created", "")))
    summary.add_row("parent", str(m.get("parent") or "-"))
    summary.add_row("inputs digest", str(m.get("inputsDigest", "")))
    for name, value in sorted((m.get("metrics") or {}).items()):
        summary.add_row(f"metric {name}", _fmt_number(value))
    console.print(summary)
    files = Table(title="files")
    files.add_column("Path")
    files.add_column("Size", justify="right")
    files.add_column("sha256")
    for entry in pv.files:
        files.add_row(entry["path"], str(entry["size"]), entry["sha256"][:16])
    console.print(files)
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    result = _registry(args).diff(args.a, args.b)
    a, b = result["a"], result["b"]
    console = _console()
    table = Table(title=f"{args.model}: {a} -> {b}")
    table.add_column("Section")
    table.add_column("Field")
    table.add_column(a)
    table.add_column(b)
    table.add_column("Delta", justify="right")
    for change in result["changes"]:
        table.add_row(change["section"], change["field"], _short(change["a"]), _short(change["b"]), "")
    for name, values in result["metrics"].items():
        delta = values["delta"]
        table.add_row(
            "metrics",
            name,
            _fmt_number(values["a"]),
            _fmt_number(values["b"]),
            "" if delta is None else f"{delta:+.6g}",
        )
    files = result["files"]
    table.add_row(
        "files",
        "added/removed/changed",
        "",
        "",
        f"+{len(files['added'])} -{len(files['removed'])} ~{len(files['changed'])}",
    )
    console.print(table)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    report = _registry(args).verify(args.ref)
    console = _console()
    if report.missing or report.altered or report.unexpected:
        table = Table(title=f"{report.version}: problems")
        table.add_column("Problem")
        table.add_column("Path")
        table.add_column("Detail")
        for path in report.missing:
            table.add_row("missing", path, "listed in manifest.json, not in storage")
        for altered in report.altered:
            table.add_row(
                "altered",
                altered.path,
                f"size {altered.actual_size} (expected {altered.expected_size}), "
                f"sha256 {altered.actual_sha256[:16]}… (expected {altered.expected_sha256[:16]}…)",
            )
        for path in report.unexpected:
            table.add_row("unexpected", path, "in storage, not in manifest.json (ignored)")
        console.print(table)
    verdict = "OK" if report.ok else "FAILED"
    console.print(
        f"{report.version}: {verdict} — {report.checked} file(s) checked, {len(report.missing)} missing, "
        f"{len(report.altered)} altered, {len(report.unexpected)} unexpected"
    )
    return 0 if report.ok else 1


RUN_CONFIG_PATH = "training/run-config.json"


def _run_config(registry: ModelRegistry, pv: PublishedVersion) -> dict[str, Any]:
    """The version's training/run-config.json (checked against the manifest); {} when it has none."""
    entry = next((f for f in pv.files if f["path"] == RUN_CONFIG_PATH), None)
    if entry is None:
        return {}
    store, key = open_uri(f"{pv.uri}/{RUN_CONFIG_PATH}", registry.settings)
    data, _ = store.get_bytes(key)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IntegrityError(f"{pv.uri}/{RUN_CONFIG_PATH} does not match the manifest's sha256")
    return dict(json.loads(data))


def _base_uri(registry: ModelRegistry, pv: PublishedVersion, override: str | None) -> str | None:
    """The base model's URI, a ``modelversion://model/vN`` base resolved to that version's merged/."""
    base = override or str((pv.manifest.get("extra") or {}).get("base") or "")
    if not base.startswith("modelversion://"):
        return base or None
    model, _, version = base.removeprefix("modelversion://").partition("/")
    if not version:
        raise ServingError(f"the base {base} names no version: pass --base-uri")
    # The parent lives under the same registry root (that is where modelversion:// resolves).
    parent = ModelRegistry(registry.output_uri, model, registry.settings).get_version(version)
    if not any(f["path"].startswith("merged/") for f in parent.files):
        raise ServingError(f"the base {base} has no merged/ folder to serve as a base: pass --base-uri")
    return f"{parent.uri}/merged"


def _cmd_serve_manifest(args: argparse.Namespace) -> int:
    registry = _registry(args)
    pv = registry.get_version(args.ref)
    storage = _run_config(registry, pv).get("storage") or {}
    options = ServingOptions(
        name=args.name,
        namespace=args.namespace,
        storage_secret=args.secret or storage.get("credentialsSecret"),
        storage_endpoint=args.storage_endpoint or storage.get("endpoint"),
        storage_region=args.storage_region or storage.get("region"),
        gpus=args.gpus,
        **({"vllm_image": args.image} if args.image else {}),
        max_model_len=args.max_model_len,
    )
    source = serving_source(pv, base_uri=_base_uri(registry, pv, args.base_uri), merged=args.merged)
    manifests = serving_manifests(source, options)
    targets = ["kserve", "vllm"] if args.target == "all" else [args.target]
    served = source.model if source.mode == "merged" else f"{source.model} (LoRA on {source.model}-base)"
    notes = [
        f"{registry.model_name} {pv.name} ({pv.uri}), manifest sha256 {pv.manifest_digest}",
        f"serves {source.mode}: {source.model_uri}"
        + (f" + {source.adapter_uri}" if source.adapter_uri else "")
        + (f" ({source.why_merged})" if source.why_merged else ""),
        f"OpenAI API model name: {served}",
    ]
    if options.storage_secret and "kserve" in targets and options.storage_endpoint:
        notes.append(
            f"KServe reads the S3 endpoint from the Secret: kubectl annotate secret {options.storage_secret} "
            f"serving.kserve.io/s3-endpoint={options.storage_endpoint.split('://', 1)[-1]} "
            f"serving.kserve.io/s3-usehttps={'1' if options.storage_endpoint.startswith('https') else '0'}"
        )
    out: list[str] = []
    for target in targets:
        title = {
            "kserve": "KServe InferenceService (Hugging Face runtime, vLLM backend)",
            "vllm": "vLLM Deployment + Service",
        }
        header = "\n".join([f"{title[target]} for {registry.model_name} {pv.name}", *notes[1:]])
        out.append(render_yaml(manifests[target], header if target == targets[0] else title[target]))
    print("---\n".join(out), end="")
    return 0


def _print_records(title: str, records: list[Any]) -> None:
    table = Table(title=title)
    for column in ("#", "Version", "Previous", "Time", "Actor", "Reason"):
        table.add_column(column)
    for r in records:
        table.add_row(str(r.sequence), r.version, r.previous or "-", r.time, r.actor or "-", r.reason or "-")
    _console().print(table)


def _cmd_alias_set(args: argparse.Namespace) -> int:
    registry = _registry(args)
    kwargs: dict[str, Any] = {"reason": args.reason, "actor": args.actor or os.environ.get("USER", "")}
    if args.expect is not None:
        kwargs["expected"] = None if args.expect.strip().lower() in ("", "none") else args.expect
    record = registry.set_alias(args.alias, args.version, **kwargs)
    _console().print(
        f"{registry.model_name}: alias {record.alias} -> {record.version} (was {record.previous or '-'})"
    )
    mirror = _mlflow_mirror(args, registry)
    if mirror is not None:
        number = mirror.set_alias(record.alias, registry.get_version(record.version))
        _console().print(
            f"MLflow {mirror.target.registered_model}: alias {record.alias} -> version {number} ({record.version})"
        )
    return 0


def _mlflow_mirror(args: argparse.Namespace, registry: ModelRegistry) -> MlflowMirror | None:
    """The MLflow mirror the command was given (--mlflow-uri or $KUBETUNE_MLFLOW_TRACKING_URI)."""
    uri = args.mlflow_uri or os.environ.get("KUBETUNE_MLFLOW_TRACKING_URI")
    if not uri:
        return None
    return MlflowMirror(MlflowTarget(uri, args.mlflow_model or registry.model_name))


def _cmd_mlflow_sync(args: argparse.Namespace) -> int:
    registry = _registry(args)
    mirror = _mlflow_mirror(args, registry)
    if mirror is None:
        raise ValueError(
            "name the MLflow tracking server: --mlflow-uri URI (or $KUBETUNE_MLFLOW_TRACKING_URI)"
        )
    versions = {pv.name: pv for pv in registry.list_versions()}
    for pv in versions.values():
        mirror.ensure_version(pv)
    aliases = registry.list_aliases()
    for record in aliases:
        mirror.set_alias(record.alias, versions[record.version])
    _console().print(
        f"MLflow {mirror.target.registered_model} at {mirror.target.tracking_uri}: {len(versions)} version(s), "
        f"{len(aliases)} alias(es) mirrored"
    )
    return 0


def _cmd_alias_history(args: argparse.Namespace) -> int:
    registry = _registry(args)
    records = registry.alias_history(args.alias)
    if not records:
        _console().print(f"alias {args.alias} of {registry.model_name} was never set")
        return 0
    _print_records(f"{registry.model_name}: alias {args.alias}", records)
    return 0


def _guarded(handler: Any) -> Any:
    """Turn expected failures into a one-line message on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except (
            VersionNotFound,
            AliasConflict,
            RegistryError,
            StorageError,
            ServingError,
            MlflowSyncError,
            ValueError,
        ) as exc:
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {exc}", markup=False)
            return 2

    return run


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="URI", help="registry root (the job's output.uri)")
    parser.add_argument("--model", required=True, metavar="NAME", help="model name (the job's model.name)")
    parser.add_argument(
        "--store-dir",
        metavar="DIR",
        default=None,
        help="use a local directory as the object store: s3://bucket/... maps to DIR/bucket/...",
    )
    parser.add_argument("--endpoint", default=None, help="S3-compatible endpoint URL (AWS when unset)")
    parser.add_argument("--region", default=None, help="S3 region")


def _mlflow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        metavar="URI",
        help="also mirror into MLflow's model registry at URI (default: $KUBETUNE_MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--mlflow-model", default=None, metavar="NAME", help="MLflow registered model (default: --model)"
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``versions list|show|diff|verify`` and ``alias set|history`` to a ``kubetune`` parser."""
    versions = subparsers.add_parser("versions", help="published model versions")
    vsub = versions.add_subparsers(dest="versions_command", required=True)

    p = vsub.add_parser("list", help="list published versions")
    _store_options(p)
    p.set_defaults(func=_guarded(_cmd_list))

    p = vsub.add_parser("show", help="show one version's manifest")
    _store_options(p)
    p.add_argument("ref", help="vN or an alias")
    p.add_argument("--json", action="store_true", help="print manifest.json as is")
    p.set_defaults(func=_guarded(_cmd_show))

    p = vsub.add_parser("diff", help="what changed between two versions (config, data digests, metrics)")
    _store_options(p)
    p.add_argument("a", help="vN or an alias")
    p.add_argument("b", help="vN or an alias")
    p.set_defaults(func=_guarded(_cmd_diff))

    p = vsub.add_parser(
        "verify", help="re-hash a version against its manifest; exit 1 on missing/altered files"
    )
    _store_options(p)
    p.add_argument("ref", help="vN or an alias")
    p.set_defaults(func=_guarded(_cmd_verify))

    p = vsub.add_parser(
        "serve-manifest",
        help="print Kubernetes manifests that serve a version (KServe InferenceService, vLLM Deployment)",
        description=(
            "Print ready manifests for serving a version: a KServe InferenceService (Hugging Face runtime, "
            "vLLM backend) and a plain vLLM Deployment + Service, loading the base model plus the LoRA "
            "adapter from the version's s3:// URIs (or merged/ when vLLM cannot load the adapter). The "
            "storage Secret, endpoint and region default to the version's run config. Pipe to kubectl apply -f -."
        ),
    )
    _store_options(p)
    p.add_argument("ref", help="vN or an alias")
    p.add_argument(
        "--target", choices=["all", "kserve", "vllm"], default="all", help="which manifests (default: all)"
    )
    p.add_argument(
        "--namespace", default=None, help="metadata.namespace of the objects (default: none, kubectl's)"
    )
    p.add_argument("--name", default=None, help="object name (default: <model>-<version>)")
    p.add_argument(
        "--secret", default=None, help="Secret with the S3 credentials (default: the job's credentialsSecret)"
    )
    p.add_argument("--storage-endpoint", default=None, help="S3 endpoint the pods use (default: the job's)")
    p.add_argument("--storage-region", default=None, help="S3 region the pods use (default: the job's)")
    p.add_argument("--base-uri", default=None, help="base model URI to serve the adapter on (s3:// or hf://)")
    p.add_argument("--merged", action="store_true", help="serve merged/ instead of base + adapter")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per replica (default: 1)")
    p.add_argument("--image", default=None, help="vLLM image for the Deployment")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM --max-model-len")
    p.set_defaults(func=_guarded(_cmd_serve_manifest))

    p = vsub.add_parser(
        "mlflow-sync", help="mirror every version and alias into an MLflow registered model (idempotent)"
    )
    _store_options(p)
    _mlflow_options(p)
    p.set_defaults(func=_guarded(_cmd_mlflow_sync))

    alias = subparsers.add_parser("alias", help="move and inspect aliases (production, candidate, ...)")
    asub = alias.add_subparsers(dest="alias_command", required=True)

    p = asub.add_parser("set", help="point an alias at a version (compare-and-swap); also how to roll back")
    _store_options(p)
    p.add_argument("alias")
    p.add_argument("version", help="vN")
    p.add_argument(
        "--expect",
        default=None,
        metavar="VERSION",
        help="only move if the alias points to VERSION now ('none': only if unset)",
    )
    p.add_argument("--reason", default="", help="recorded in the alias history")
    p.add_argument("--actor", default="", help="who moved it (default: $USER)")
    _mlflow_options(p)
    p.set_defaults(func=_guarded(_cmd_alias_set))

    p = asub.add_parser("history", help="every move of an alias")
    _store_options(p)
    p.add_argument("alias")
    p.set_defaults(func=_guarded(_cmd_alias_history))
