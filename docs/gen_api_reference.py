"""Generate docs/api-reference.md from the pydantic models (the single source of the API).

    .venv/bin/python docs/gen_api_reference.py            # (re)write docs/api-reference.md
    .venv/bin/python docs/gen_api_reference.py --check    # exit 1 when the committed file is stale

Every field of FineTuneJob (spec and status), ModelVersion and the trainer's result is listed with
its YAML path, type, default, bounds and description: the same text `kubectl explain` shows.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kubetune_api.models import FineTuneJobSpec, FineTuneJobStatus, ModelVersionSpec
from kubetune_api.reports import TrainerResult
from kubetune_api.sweep import FineTuneSweepSpec, TrialRecord

TARGET = Path(__file__).resolve().parent / "api-reference.md"
SECTIONS: list[tuple[str, str, type[BaseModel], str]] = [
    (
        "FineTuneJob spec",
        "spec",
        FineTuneJobSpec,
        "What an ML engineer writes (`kubectl apply`, `kubetune run`, `kubetune submit`).",
    ),
    (
        "FineTuneJob status",
        "status",
        FineTuneJobStatus,
        "Written by the operator and (progress) by the trainer's rank 0. Read it with "
        "`kubectl get ftj -o yaml` or `kubetune status NAME`.",
    ),
    (
        "ModelVersion spec",
        "spec",
        ModelVersionSpec,
        "The immutable catalogue record the operator creates for each published version.",
    ),
    (
        "FineTuneSweep spec",
        "spec",
        FineTuneSweepSpec,
        "A hyperparameter search over a FineTuneJob template (`kubetune run sweep.yaml`; no CRD yet, "
        "docs/sweeps.md). `template` is a FineTuneJob spec (above); its fields are not repeated here.",
    ),
    (
        "FineTuneSweep trial record",
        "",
        TrialRecord,
        "One trial in the sweep's study (`<output>/<model>/sweeps/<sweep>/<digest>/study.json`) and in "
        "the winner's manifest (`extra.sweep.trials`).",
    ),
    (
        "Trainer result",
        "",
        TrainerResult,
        "The trainer -> operator contract (`kubetune_api/reports.py`): compact JSON in the pod's "
        "termination message. Exit codes: 0 ok, 1 error (retried), 3 bad input, 4 gates failed, "
        "5 diverged (3-5 fail the Job at once).",
    ),
]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(defaults below)"
        return f"`{value}`" if value not in ([], {}) else "empty"
    if info.default is None:
        return "-"
    value = info.default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _bounds(info: FieldInfo) -> str:
    out = []
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {getattr(meta, attr)}")
        if getattr(meta, "min_length", None) is not None:
            out.append(f"min length {meta.min_length}")
        if getattr(meta, "max_length", None) is not None:
            out.append(f"max length {meta.max_length}")
        if getattr(meta, "pattern", None) is not None:
            out.append("pattern")
    return ", ".join(out)


def _rows(model: type[BaseModel], prefix: str, seen: tuple[type[BaseModel], ...]) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        alias = info.alias or name
        path = f"{prefix}.{alias}" if prefix else alias
        desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
        bounds = _bounds(info)
        cells = [f"`{path}`", _type_name(info.annotation), _default(info), bounds, desc]
        rows.append("| " + " | ".join(cells) + " |")
        nested = _model_of(info.annotation)
        if nested is not None and nested not in seen:
            sub = path + ("[]" if get_origin(info.annotation) is list else "")
            if get_origin(info.annotation) is dict:
                sub = path + ".<key>"
            rows.extend(_rows(nested, sub, (*seen, nested)))
    return rows


def render() -> str:
    """The whole reference as Markdown. Pure and deterministic."""
    out = [
        "# API reference",
        "",
        "<!-- GENERATED by `python docs/gen_api_reference.py` from api/kubetune_api. Do not edit. -->",
        "",
        "Group `kubetune.io`, version `v1alpha1`. YAML uses camelCase. Unknown fields are errors.",
        "Cross-field rules (for example: `data.eval` and `data.evalSplit` are exclusive) are listed in",
        "`api/kubetune_api/rules.py` and enforced by the API server (CEL) and by `kubetune run`.",
        "",
    ]
    for title, prefix, model, intro in SECTIONS:
        out += [f"## {title}", "", intro, ""]
        out += ["| Field | Type | Default | Bounds | Description |", "| --- | --- | --- | --- | --- |"]
        out += _rows(model, prefix, (model, FineTuneJobSpec))  # a sweep's template: see its own section
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """CLI: write or check docs/api-reference.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed file is stale")
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args(argv)
    text = render()
    current = args.target.read_text() if args.target.exists() else ""
    if args.check:
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), str(args.target), "generated", lineterm=""
            )
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            print(f"{args.target} is stale: run `python docs/gen_api_reference.py`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.target.write_text(text)
        print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
