"""Load FineTuneJob YAML with errors that name the file, the line and the field.

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

# Messages of kubetune_api.rules start with the spec path they are about; several are joined by "; ".
_RULE_MESSAGE = re.compile(r"^spec\.[A-Za-z0-9.]+: ")
_RULE_SPLIT = re.compile(r"; (?=spec\.[A-Za-z0-9.]+: )")


class SpecError(ValueError):
    """A FineTuneJob that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"invalid FineTuneJob {source}:\n  " + "\n  ".join(self.problems))


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


def parse_finetunejob(text: str, source: str = "<string>") -> FineTuneJob:
    """Parse and validate one FineTuneJob document. Raises :class:`SpecError`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise SpecError(source, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [f"{source}:1: expected a FineTuneJob object, got {type(data).__name__}"])
    if data.get("kind") not in (None, "FineTuneJob"):
        raise SpecError(source, [f"{source}:1: kind: expected FineTuneJob, got {data.get('kind')!r}"])
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "value_error" and _RULE_MESSAGE.match(msg):
                # Cross-field rules fail on the whole spec; point each at the field it names.
                for part in _RULE_SPLIT.split(msg):
                    field, _, text = part.partition(": ")
                    node = _node_at(root, field.split("."))
                    line = node.start_mark.line + 1 if node is not None else 1
                    problems.append(f"{source}:{line}: {field}: {text}")
                continue
            node = _node_at(root, loc)
            line = node.start_mark.line + 1 if node is not None else 1
            field = _format_loc(loc)
            problems.append(f"{source}:{line}: {field}: {msg}" if field else f"{source}:{line}: {msg}")
        raise SpecError(source, problems) from None


def load_finetunejob(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob YAML file. Raises :class:`SpecError` (naming file, line and field)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(p), [f"{p}: cannot read: {exc}"]) from None
    return parse_finetunejob(text, str(p))
