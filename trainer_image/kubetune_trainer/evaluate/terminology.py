"""Terminology coverage: how many of the reference answer's domain terms the generated answer uses.

The glossary is a spec input (``evaluation.glossary.uri``): a UTF-8 text file with one term per
line; blank lines and lines starting with ``#`` are ignored. A term may be several words. Terms
match case-insensitively as whole words: not inside a longer word, and a hyphen counts as part of
a word (``f-skatt`` does not match inside ``f-skattsedel``, ``abs`` matches ``ABS 18``).

For one example the coverage is ``|terms(reference) ∩ terms(answer)| / |terms(reference)|``; the
metric ``terminology_coverage`` is the mean over the examples whose reference contains at least
one glossary term (the others have nothing to cover and are left out; :func:`coverage_scores`
says which they are). Range 0..1.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence

from kubetune_trainer.data.glossary import GlossaryError, load_glossary, parse_glossary

__all__ = [
    "GlossaryError",
    "TermMatcher",
    "coverage_scores",
    "load_glossary",
    "parse_glossary",
    "terminology_coverage",
]


class TermMatcher:
    """Finds glossary terms in text (case-insensitive, whole words, longest term first)."""

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = sorted(
            {" ".join(t.split()).lower() for t in terms if t.strip()}, key=lambda t: (-len(t), t)
        )
        if not self.terms:
            raise GlossaryError("the glossary has no terms")
        alternatives = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in self.terms)
        self._pattern = re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)

    def find(self, text: str) -> set[str]:
        """The glossary terms that occur in ``text`` (normalised as in the glossary)."""
        return {" ".join(m.group(0).split()).lower() for m in self._pattern.finditer(text)}


def coverage_scores(
    predictions: Sequence[str], references: Sequence[str], matcher: TermMatcher
) -> list[float | None]:
    """Per-example coverage; None where the reference has no glossary term. ValueError on unequal lengths."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scores: list[float | None] = []
    for prediction, reference in zip(predictions, references, strict=True):
        wanted = matcher.find(reference)
        scores.append(len(wanted & matcher.find(prediction)) / len(wanted) if wanted else None)
    return scores


def terminology_coverage(
    predictions: Sequence[str], references: Sequence[str], matcher: TermMatcher
) -> float:
    """Mean coverage over examples whose reference has a glossary term.

    Raises ValueError when no reference contains a glossary term (the glossary does not fit the data).
    """
    scored = [s for s in coverage_scores(predictions, references, matcher) if s is not None]
    if not scored:
        raise ValueError(
            "no reference answer contains a glossary term: the glossary does not fit this eval set"
        )
    return statistics.fmean(scored)
