"""Every example parses through the models and validates against the generated CRD schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune_api.loader import load_finetunejob, load_sweep
from kubetune_api.models import FineTuneJob
from kubetune_api.runconfig import resolve_run_config
from tests.support.crd_schema import validate

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*.yaml"))


def documents() -> list[tuple[Path, int, dict]]:  # type: ignore[type-arg]
    out = []
    for path in EXAMPLES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("apiVersion", "").startswith("kubetune.io/"):
                out.append((path, i, doc))
    return out


def test_there_are_examples_for_each_documented_scenario() -> None:
    names = {p.parent.name for p in EXAMPLES}
    assert {"quickstart", "lora-7b-multinode", "qlora-single-gpu", "chained", "gates-and-promotion"} <= names


@pytest.mark.parametrize(
    ("path", "index", "doc"), documents(), ids=lambda v: str(v)[-60:] if isinstance(v, Path) else None
)
def test_example_is_valid(path: Path, index: int, doc: dict) -> None:  # type: ignore[type-arg]
    assert validate(doc, doc["kind"]) == [], path
    if doc["kind"] == "FineTuneSweep":  # the models check it too, and its template resolves as a trial's
        sweep = load_sweep(path)
        resolve_run_config(FineTuneJob(metadata=sweep.metadata, spec=sweep.spec.template))
    if doc["kind"] == "FineTuneJob" and len(list(yaml.safe_load_all(path.read_text()))) == 1:
        job = load_finetunejob(path)
        resolve_run_config(job)


def test_the_examples_check_fails_on_a_broken_example(tmp_path: Path) -> None:
    """The same checks reject an example with a mistake a user could make (so the test above can fail)."""
    import pytest

    from kubetune_api.loader import SpecError

    text = (REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text()
    broken = text.replace("batchSize: 8", "batchSize: -8")
    assert broken != text
    doc = yaml.safe_load(broken)
    assert any("batchSize" in e for e in validate(doc, "FineTuneJob"))
    path = tmp_path / "finetunejob.yaml"
    path.write_text(broken)
    with pytest.raises(SpecError, match=r"spec\.training\.batchSize"):
        load_finetunejob(path)
