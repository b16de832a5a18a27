"""The evaluation glossary file (``spec.evaluation.glossary.uri``): read and checked at fetch time.

A UTF-8 text file with one term per line; blank lines and lines starting with ``#`` are ignored; a
term may be several words. Read here, in the data layer, so the fetch stage can refuse a bad
glossary before any model byte is downloaded; matching terms in answers is
:mod:`kubetune_trainer.evaluate.terminology`.
"""

from __future__ import annotations

from pathlib import Path


class GlossaryError(Exception):
    """A glossary file is empty or unreadable; the message names it."""


def parse_glossary(text: str) -> list[str]:
    """Terms of a glossary file's text: stripped, lowercased, de-duplicated in file order."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        term = " ".join(line.split()).lower()
        if term and not term.startswith("#"):
            seen.setdefault(term, None)
    return list(seen)


def load_glossary(path: Path) -> list[str]:
    """Read and parse a glossary file; GlossaryError when unreadable or without terms."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GlossaryError(f"{Path(path).name}: cannot read the glossary ({exc})") from None
    terms = parse_glossary(text)
    if not terms:
        raise GlossaryError(f"{Path(path).name}: the glossary has no terms (one per line, # for comments)")
    return terms
