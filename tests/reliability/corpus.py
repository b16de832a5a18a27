"""The corpus of broken FineTuneJobs (``tests/reliability/corpus/*.yaml``) and its annotations.

Every file starts with comment lines saying what is broken and what must catch it::

    # Broken on purpose: batchSize 0.
    # expect: spec.training.batchSize      <- the field path every rejection must name
    # layer: schema                         <- what catches it at the API server

``layer`` is one of ``schema`` (the CRD's openAPIV3Schema: types, enums, ranges, patterns,
required), ``cel`` (only the CRD's ``x-kubernetes-validations``: cross-field rules; a v1.20 API
server ignores them, so the operator must catch these) or ``pruned`` (unknown fields: a structural
CRD prunes them silently instead of rejecting; only the pydantic models and ``kubetune run``
refuse them, and ``kubectl apply`` on >= 1.27 with its default ``--validate=strict``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
Layer = Literal["schema", "cel", "pruned"]
_EXPECT = re.compile(r"^# expect: (\S+)$", re.MULTILINE)
_LAYER = re.compile(r"^# layer: (schema|cel|pruned)$", re.MULTILINE)


@dataclass(frozen=True)
class BrokenSpec:
    """One corpus file: its path, the field path it must be rejected for, and the catching layer."""

    path: Path
    expect: str
    layer: Layer

    @property
    def name(self) -> str:
        return self.path.stem

    def load(self) -> dict[str, Any]:
        """The YAML document as a dict (the corpus files are valid YAML, only invalid FineTuneJobs)."""
        doc = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        assert isinstance(doc, dict), self.path
        return doc


def load_corpus() -> list[BrokenSpec]:
    """Every corpus file, sorted by name. Raises AssertionError for a file without annotations."""
    out = []
    for path in sorted(CORPUS_DIR.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        expect, layer = _EXPECT.search(text), _LAYER.search(text)
        assert expect and layer, f"{path}: needs '# expect: <field path>' and '# layer: schema|cel|pruned'"
        out.append(BrokenSpec(path, expect.group(1), layer.group(1)))  # type: ignore[arg-type]
    return out


def names_field(messages: str, field: str) -> bool:
    """True when ``messages`` name ``field``: the dotted path itself, a ``[i]``/``.i`` index below it,
    or (for a missing required field) its parent path with the leaf quoted, as JSON Schema words it."""
    if field in messages:
        return True
    parent, _, leaf = field.rpartition(".")
    return any(line.startswith(f"{parent}:") and f"'{leaf}'" in line for line in messages.splitlines())
