"""Curriculum keys (``spec.data.curriculum``): how easy each training example is.

``order: length`` uses the example's token count; ``order: field`` a numeric per-record field
(``difficultyField``) read from the data files. The keys go to
:func:`kubetune_trainer.data.iter_batches` (``order_keys``), which orders an epoch easy-to-hard,
deterministically and resumably.

A record without a usable difficulty (field missing, not a number) is not an error: it sorts last
(treated as the hardest) and is counted in the report's ``curriculum.missingDifficulty`` with its
first locations, so the user can fix it.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# The same row readers as kubetune_trainer.data.records, so line numbers match Record.line exactly
# (JSONL/CSV physical lines, JSON array index, Parquet row).
from kubetune_trainer.data.records import (
    CSV_SUFFIXES,
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    _iter_csv,
    _iter_json,
    _iter_jsonl,
    _iter_parquet,
)

_LISTED = 10


def _rows(path: Path, name: str, column: str) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows: Iterator[Any] = _iter_jsonl(path, name)
    elif suffix in JSON_SUFFIXES:
        rows = _iter_json(path, name)
    elif suffix in CSV_SUFFIXES:
        rows = _iter_csv(path, name)
    elif suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq  # Parquet only: not in the [cli] extra, and 0.5 s / 53 MB (measured)

        if column not in pq.ParquetFile(path).schema_arrow.names:
            return
        rows = _iter_parquet(path, name, [column])
    else:
        return
    for line, row in rows:
        if isinstance(row, Mapping):
            yield line, row.get(column)


def read_difficulties(
    files: Sequence[Path], field: str, display_names: Mapping[Path, str] | None = None
) -> dict[tuple[str, int], float]:
    """``(file name, line) -> difficulty`` for every record whose ``field`` holds a finite number.

    File names are ``display_names[path]`` when given (as in TokenizedExample.source). Numbers in
    CSV cells (text) are parsed; booleans are not numbers.
    """
    out: dict[tuple[str, int], float] = {}
    for path in files:
        name = display_names.get(path, str(path)) if display_names else str(path)
        for line, value in _rows(Path(path), name, field):
            if isinstance(value, bool):
                continue
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    continue
            if isinstance(value, int | float) and math.isfinite(value):
                out[(name, line)] = float(value)
    return out


def curriculum_keys(
    examples: Sequence[Any],
    order: str,
    *,
    difficulties: Mapping[tuple[str, int], float] | None = None,
    difficulty_field: str | None = None,
) -> tuple[list[float] | None, dict[str, Any]]:
    """One key per example (lower = easier) and the report's ``curriculum`` summary.

    ``examples`` need ``input_ids``, ``source`` and ``line`` (TokenizedExample). ``order`` none
    returns (None, summary). Raises ValueError for an unknown order, or ``field`` without
    ``difficulties``.
    """
    summary: dict[str, Any] = {"order": order}
    if order == "none":
        return None, summary
    if order == "length":
        keys = [float(len(e.input_ids)) for e in examples]
        summary["easiest"], summary["hardest"] = (min(keys), max(keys)) if keys else (None, None)
        return keys, summary
    if order != "field":
        raise ValueError(f"data.curriculum.order must be none, length or field, got {order!r}")
    if difficulties is None:
        raise ValueError("data.curriculum.order field needs the difficulties read from the data files")
    keys = []
    missing: list[str] = []
    for e in examples:
        value = difficulties.get((e.source, e.line))
        if value is None:
            missing.append(f"{e.source}:{e.line}")
            value = math.inf  # no difficulty: trained last
        keys.append(value)
    summary["difficultyField"] = difficulty_field
    summary["missingDifficulty"] = len(missing)
    summary["missingAt"] = missing[:_LISTED]
    finite = [k for k in keys if math.isfinite(k)]
    summary["easiest"], summary["hardest"] = (min(finite), max(finite)) if finite else (None, None)
    return keys, summary
