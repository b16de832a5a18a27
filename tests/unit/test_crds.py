"""The committed CRDs are exactly what the models generate, and carry what kubectl users see."""

from __future__ import annotations

import shutil
from pathlib import Path

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
