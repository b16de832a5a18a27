"""`kubetune run` users get errors naming file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_api.loader import SpecError, load_finetunejob

GOOD = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: demo
spec:
  model:
    name: demo
    base:
      uri: s3://models/base
  data:
    train:
      uri: s3://data/train.jsonl
  training:
    batchSize: 0
    scheduler: sideways
  output:
    uri: s3://models/registry
"""


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    with pytest.raises(SpecError) as exc:
        load_finetunejob(path)
    problems = exc.value.problems
    assert any(p.startswith(f"{path}:14: spec.training.batchSize:") for p in problems), problems
    assert any(p.startswith(f"{path}:15: spec.training.scheduler:") and "cosine" in p for p in problems), (
        problems
    )


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("spec:\n  model: [unclosed\n  data: 1\n")
    with pytest.raises(SpecError) as exc:
        load_finetunejob(path)
    assert f"{path}:" in str(exc.value) and "not valid YAML" in str(exc.value)


def test_wrong_kind_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\n")
    with pytest.raises(SpecError, match="expected FineTuneJob"):
        load_finetunejob(path)
    with pytest.raises(SpecError, match="cannot read"):
        load_finetunejob(tmp_path / "absent.yaml")
