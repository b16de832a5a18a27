"""Load FineTuneJob (and FineTuneSweep) YAML with errors that name the file, the line and the field.

``kubectl apply`` users get errors from the API server; ``kubetune run`` users get the same
rules from the pydantic models, reported as ``job.yaml:14: spec.training.batchSize: Input should
be greater than or equal to 1``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune_api.models import FineTuneJob
from kubetune_api.sweep import FineTuneSweep

# Messages of kubetune_api.rules (and of the sweep's search-space checks) start with the spec path
# they are about; several are joined by "; ".
_RULE_MESSAGE = re.compile(r"^spec\.[A-Za-z0-9.\[\]]+: ")
_RULE_SPLIT = re.compile(r"; (?=spec\.[A-Za-z0-9.\[\]]+: )")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class SpecError(ValueError):
    """A FineTuneJob (or FineTuneSweep) that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: Sequence[str], kind: str = "FineTuneJob") -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid {kind} {source}:\n  " + "\n  ".join(self.problems))


def _split_path(field: str) -> list[Any]:
    """``spec.parameters[0].path`` -> ``["spec", "parameters", 0, "path"]``."""
    return [int(index) if index else name for name, index in _PATH_PART.findall(field)]


def _node_at(root: yaml.Node | None, loc: Sequence[Any]) -> yaml.Node | None:
    """The deepest YAML node along ``loc`` (a pydantic error location)."""
    node = root
    best = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        else:
            nxt = None
        if nxt is None:
            break
        node = best = nxt
    return best


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _parse(text: str, source: str, kind: str) -> Any:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise SpecError(source, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"], kind) from None
    if not isinstance(data, dict):
        raise SpecError(source, [f"{source}:1: expected a {kind} object, got {type(data).__name__}"], kind)
    if data.get("kind") not in (None, kind):
        raise SpecError(source, [f"{source}:1: kind: expected {kind}, got {data.get('kind')!r}"], kind)
    model = FineTuneSweep if kind == "FineTuneSweep" else FineTuneJob
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "value_error" and _RULE_MESSAGE.match(msg):
                # Cross-field rules fail on the whole spec; point each at the field it names.
                for part in _RULE_SPLIT.split(msg):
                    field, _, text = part.partition(": ")
                    node = _node_at(root, _split_path(field))
                    line = node.start_mark.line + 1 if node is not None else 1
                    problems.append(f"{source}:{line}: {field}: {text}")
                continue
            node = _node_at(root, loc)
            line = node.start_mark.line + 1 if node is not None else 1
            field = _format_loc(loc)
            problems.append(f"{source}:{line}: {field}: {msg}" if field else f"{source}:{line}: {msg}")
        raise SpecError(source, problems, kind) from None


def parse_finetunejob(text: str, source: str = "<string>") -> FineTuneJob:
    """Parse and validate one FineTuneJob document. Raises :class:`SpecError`."""
    job: FineTuneJob = _parse(text, source, "FineTuneJob")
    return job


def parse_sweep(text: str, source: str = "<string>") -> FineTuneSweep:
    """Parse and validate one FineTuneSweep document. Raises :class:`SpecError`."""
    sweep: FineTuneSweep = _parse(text, source, "FineTuneSweep")
    return sweep


def document_kind(path: str | Path) -> str | None:
    """The ``kind`` of a YAML file (None when it has none or cannot be read as a mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def load_sweep(path: str | Path) -> FineTuneSweep:
    """Read a FineTuneSweep YAML file. Raises :class:`SpecError` (naming file, line and field)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(p), [f"{p}: cannot read: {exc}"], "FineTuneSweep") from None
    return parse_sweep(text, str(p))


def load_finetunejob(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob YAML file. Raises :class:`SpecError` (naming file, line and field)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(p), [f"{p}: cannot read: {exc}"]) from None
    return parse_finetunejob(text, str(p))
