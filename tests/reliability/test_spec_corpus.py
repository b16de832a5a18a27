"""Issue #9: every broken FineTuneJob of the corpus is refused, with the field named, by every gate.

Gates: the pydantic models (what the operator and ``kubetune run`` use), the generated CRD
(openAPIV3Schema + CEL evaluated with cel-python, as a >= 1.29 API server would), the real
``kubetune run`` command (exit 3, ``file:line: field``, no traceback). The real v1.20 API server and
the operator are in tests/reliability/test_spec_corpus_cluster.py.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune_api.loader import SpecError, load_finetunejob
from kubetune_api.models import FineTuneJob
from kubetune_api.reports import EXIT_BAD_INPUT
from tests.fixtures.trainer import kubetune_cmd, trainer_env
from tests.reliability.corpus import BrokenSpec, load_corpus, names_field
from tests.support.crd_schema import crd_schema, validate

CORPUS = load_corpus()
IDS = [c.name for c in CORPUS]


def test_the_corpus_covers_every_kind_of_mistake() -> None:
    assert len(CORPUS) >= 30
    kinds = {c.name.split("-")[0] for c in CORPUS}
    assert {"type", "enum", "range", "name", "alias", "uri", "quantity", "missing", "cross", "gate"} <= kinds
    assert {"unknown"} <= kinds
    layers = {c.layer for c in CORPUS}
    assert layers == {"schema", "cel", "pruned"}


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_the_models_reject_it_naming_the_field(case: BrokenSpec) -> None:
    with pytest.raises(ValidationError):
        FineTuneJob.model_validate(case.load())
    # The loader formats pydantic's locations as dotted paths with the file and line.
    with pytest.raises(SpecError) as err:
        load_finetunejob(case.path)
    problems = err.value.problems
    named = [p for p in problems if case.expect in p]
    assert named, f"no problem names {case.expect}: {problems}"
    match = re.match(rf"^{re.escape(str(case.path))}:(\d+): ", named[0])
    assert match, named[0]
    first, last = field_lines(case.path, case.expect)
    assert first <= int(match.group(1)) <= last, (
        f"{named[0]!r} points outside lines {first}-{last}, where {case.expect} (or its parent) is"
    )


def field_lines(path: Path, field: str) -> tuple[int, int]:
    """1-based first and last line of ``field`` in the YAML file: from its key to the end of its value.
    For an absent field, the block of its deepest present ancestor."""
    node: yaml.Node | None = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    first = 1
    for part in field.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        hit = next(((k, v) for k, v in node.value if k.value == part), None)
        if hit is None:
            break
        first, node = hit[0].start_mark.line + 1, hit[1]
    assert node is not None
    return first, node.end_mark.line + 1


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_the_crd_rejects_it_at_the_layer_the_file_names(case: BrokenSpec) -> None:
    errors = validate(case.load())
    joined = "\n".join(errors)
    if case.layer == "pruned":
        # A structural CRD has no additionalProperties: false; the API server drops unknown fields.
        assert errors == [], joined
        parent, _, leaf = case.expect.rpartition(".")
        node = crd_schema("FineTuneJob")
        for part in parent.split("."):
            node = node["properties"][part]
        assert leaf not in node["properties"] and "additionalProperties" not in node
        return
    assert errors, f"the CRD accepted {case.path.name}"
    assert names_field(joined, case.expect), joined
    cel_only = all(": Invalid value: " in e for e in errors)
    assert cel_only == (case.layer == "cel"), (
        f"{case.name} is caught by {'CEL' if cel_only else 'the schema'}"
    )


@pytest.mark.integration
def test_kubetune_run_refuses_every_one_with_exit_3_file_line_and_field(tmp_path: Path) -> None:
    def run(case: BrokenSpec) -> tuple[BrokenSpec, subprocess.CompletedProcess[str]]:
        proc = subprocess.run(
            kubetune_cmd(
                "run",
                str(case.path),
                "--store-dir",
                str(tmp_path / "store"),
                "--workdir",
                str(tmp_path / "work" / case.name),
            ),
            env=trainer_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return case, proc

    # Two at a time: each is a short Python start-up; the box has two cores shared with others.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, CORPUS))
    failures = []
    for case, proc in results:
        out = proc.stdout + proc.stderr
        ok = (
            proc.returncode == EXIT_BAD_INPUT
            and "Traceback" not in out
            and re.search(rf"{re.escape(str(case.path))}:\d+: {re.escape(case.expect)}", proc.stderr)
        )
        if not ok:
            failures.append(f"{case.name}: exit {proc.returncode}\n{out[-800:]}")
    assert not failures, "\n\n".join(failures)
    # Nothing started: no object store, no work directory content.
    assert not (tmp_path / "store").exists()
