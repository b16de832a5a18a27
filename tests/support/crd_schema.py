"""Validate objects against the generated CRD the way a current (>= 1.29) API server would.

The real test API server is v1.20: it ignores CEL rules. So this helper applies the structural
defaults, validates against the openAPIV3Schema (OpenAPI 3.0 = JSON Schema draft 4 semantics
for the keywords we use), and evaluates every ``x-kubernetes-validations`` CEL rule with
cel-python. It returns messages that name the field path, like the API server's.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of the committed CRD for ``kind`` (FineTuneJob, ModelVersion, FineTuneSweep)."""
    plural = {
        "FineTuneJob": "finetunejobs",
        "ModelVersion": "modelversions",
        "FineTuneSweep": "finetunesweeps",
    }[kind]
    crd = yaml.safe_load((REPO / "crds" / f"{plural}.kubetune.io.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it (defaults of absent properties, recursively)."""
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(obj[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in list(obj):
                obj[key] = apply_defaults(obj[key], extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(x, schema["items"]) for x in obj]
    return obj


def _cel_errors(obj: Any, schema: dict[str, Any], path: str) -> list[str]:
    errors: list[str] = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if rule["rule"] == "self == oldSelf":  # transition rule: needs an old object
            continue
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(obj)})
        if isinstance(result, Exception) or not bool(result):
            errors.append(f"{path}: Invalid value: {rule['message']}")
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in obj:
                errors += _cel_errors(obj[key], sub, f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, value in obj.items():
                errors += _cel_errors(value, extra, f"{path}[{key}]")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            errors += _cel_errors(value, schema["items"], f"{path}[{i}]")
    return errors


def validate(obj: dict[str, Any], kind: str = "FineTuneJob") -> list[str]:
    """Every schema and CEL violation of ``obj``, as '<field path>: <message>' lines."""
    schema = crd_schema(kind)
    obj = apply_defaults(copy.deepcopy(obj), schema)
    validator = jsonschema.Draft4Validator(schema)
    errors = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in err.absolute_path) or "<root>"
        errors.append(f"{path}: {err.message}")
    if not errors:
        errors += _cel_errors(obj, schema, "")
    return [e.lstrip(".") for e in errors]
