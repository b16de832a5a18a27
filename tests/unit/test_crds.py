"""The committed CRDs are exactly what the models generate, and carry what kubectl users see."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import crdgen

REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_models() -> None:
    assert crdgen.main(["--repo", str(REPO), "--check"]) == 0, "run `python -m kubetune_api.crdgen`"


def test_drift_check_fails_when_a_crd_was_edited_by_hand(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    shutil.copytree(REPO / "crds", tmp_path / "crds")
    target = tmp_path / "crds" / "finetunejobs.kubetune.io.yaml"
    target.write_text(target.read_text().replace("maximum: 256", "maximum: 9999"))
    assert crdgen.main(["--repo", str(tmp_path), "--check"]) == 1
    assert "maximum: 9999" in capsys.readouterr().err


def test_kubectl_facing_parts() -> None:
    ftj = yaml.safe_load((REPO / "crds" / "finetunejobs.kubetune.io.yaml").read_text())["spec"]
    assert ftj["names"]["shortNames"] == ["ftj"] and ftj["names"]["plural"] == "finetunejobs"
    version = ftj["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Phase", "Progress", "Version", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    lora = schema["properties"]["spec"]["properties"]["method"]["properties"]["lora"]["properties"]
    assert lora["r"]["default"] == 16 and lora["r"]["description"]
    mv = yaml.safe_load((REPO / "crds" / "modelversions.kubetune.io.yaml").read_text())["spec"]
    assert mv["names"]["shortNames"] == ["mv"]
    assert [c["name"] for c in mv["versions"][0]["additionalPrinterColumns"]] == [
        "Model",
        "Version",
        "Base",
        "Metric",
        "Gates",
        "Age",
    ]


def test_schema_is_structural() -> None:
    """No $ref/anyOf/nullable left, every object typed: what apiextensions requires."""
    text = (REPO / "crds" / "finetunejobs.kubetune.io.yaml").read_text()
    for banned in ("$ref", "anyOf", "allOf", "oneOf", "title:", "'null'"):
        assert banned not in text

    def visit(node: dict, path: str) -> None:  # type: ignore[type-arg]
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for key, sub in node.get("properties", {}).items():
            visit(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"], f"{path}{{}}")

    crd = yaml.safe_load(text)
    visit(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")


def _ftj_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "finetunejobs.kubetune.io.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_every_generated_default_passes_its_own_schema_and_cel_rules() -> None:
    for name in crdgen.build_crds():
        crd = yaml.safe_load((REPO / "crds" / name).read_text())
        assert crdgen.check_defaults(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]) == [], name


def test_checkpoint_default_is_resolved_because_an_empty_one_breaks_its_rule() -> None:
    """Issue #14: a current API server validates `default: {}` as written, so has(self.everySteps) fails."""
    checkpoint = _ftj_schema()["properties"]["spec"]["properties"]["training"]["properties"]["checkpoint"]
    assert checkpoint["default"] == {"everySteps": 200, "everyMinutes": 30, "keep": 2}
    problems = crdgen.default_problems({}, checkpoint, "spec.training.checkpoint")
    assert problems and "set checkpoint.everySteps or checkpoint.everyMinutes" in problems[0]
    # Where `{}` passes, it stays `{}` (the server applies the nested defaults).
    training = _ftj_schema()["properties"]["spec"]["properties"]["training"]
    assert training["default"] == {}


def test_the_default_check_names_schema_cel_and_pruning_failures() -> None:
    schema = _ftj_schema()
    spec = schema["properties"]["spec"]["properties"]
    spec["training"]["properties"]["checkpoint"]["default"] = {}  # the CEL rule
    spec["method"]["properties"]["lora"]["properties"]["r"]["default"] = 0  # minimum: 1
    spec["training"]["properties"]["health"]["default"] = {"gradNorm": True}  # unknown: pruned
    problems = "\n".join(crdgen.check_defaults(schema))
    assert "default of spec.training.checkpoint: " in problems and "everySteps" in problems
    assert "default of spec.method.lora.r: " in problems and "minimum" in problems
    assert "default of spec.training.health: " in problems and "gradNorm: unknown field" in problems
    # And a default whose nested defaults break a rule only once applied is caught too.
    nested = {
        "type": "object",
        "properties": {"a": {"type": "integer", "default": 5}},
        "default": {},
        "x-kubernetes-validations": [{"rule": "!has(self.a) || self.a < 3", "message": "a < 3"}],
    }
    assert crdgen.check_defaults(nested) == [
        "default of <root>: <root>: CEL rule '!has(self.a) || self.a < 3' is false: a < 3 (nested defaults applied)"
    ]


def test_generator_refuses_to_emit_a_default_that_fails_its_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the step that resolves defaults where `{}` fails, build_crds raises instead of writing."""
    monkeypatch.setattr(crdgen, "_settle_object_defaults", lambda schema: _strip_resolved(schema))
    with pytest.raises(crdgen.DefaultError, match=r"spec\.training\.checkpoint"):
        crdgen.build_crds()


def _strip_resolved(node: dict[str, Any]) -> None:
    node.pop(crdgen._RESOLVED, None)
    for sub in node.get("properties", {}).values():
        _strip_resolved(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _strip_resolved(node[key])
