"""Opt-in, seeded augmentation of training prompts (``spec.data.augmentation``).

What a caller may rely on:

* Only **user** text changes (instruction and input, the prompt, or every user turn of a chat); the
  answer and any system prompt stay exactly as written, so the model learns to give the same
  answer to varied, noisy phrasings. Eval data is never augmented (the trainer augments after the
  split).
* Reproducible: whether a record gets a copy and what the copy says depend only on (seed, record
  content), never on file order, process or machine.
* Each chosen record gets at most one augmented copy, added after the originals; a copy identical to
  its original (no dictionary term found, nothing changed) is not added.
* Transforms, in this order: synonym replacement from a user term dictionary (whole words and
  phrases, case-insensitive, capitalisation of the first letter kept); one simple sentence
  transformation (first-letter casing, final punctuation, a polite prefix); OCR-like character
  noise (``rn``/``m``, ``l``/``1``, ``O``/``0`` confusions, dropped or doubled characters).

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer.data.records import Message, Record

_EXAMPLES = 3
_EXAMPLE_CHARS = 300
_PREFIXES = ("Please answer: ", "Question: ", "Could you help with this? ", "I need this: ")
# Characters OCR engines commonly confuse (one direction each; "rn" -> "m" is handled as a pair).
_OCR_CONFUSIONS = {
    "m": "rn",
    "l": "1",
    "1": "l",
    "I": "l",
    "O": "0",
    "0": "O",
    "o": "0",
    "e": "c",
    "S": "5",
    "B": "8",
    "g": "q",
}


class TermDictionaryError(ValueError):
    """The term dictionary cannot be used; the message names the file and the entry."""


def load_term_dictionary(path: Path, *, name: str | None = None) -> dict[str, list[str]]:
    """Read a JSON or YAML term dictionary.

    Accepted forms: a mapping ``term -> [synonyms]`` (or ``term -> "synonym"``), or a list of synonym
    groups (``[["MI", "myocardial infarction", "heart attack"], ...]``) where every member may be
    replaced by any other. Raises TermDictionaryError naming the file (``name``, default the path)
    and the bad entry.
    """
    where = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TermDictionaryError(f"{where}: cannot read the term dictionary: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TermDictionaryError(f"{where}: not valid JSON/YAML: {exc}") from None
    terms: dict[str, list[str]] = {}
    if isinstance(raw, Mapping):
        for term, value in raw.items():
            synonyms = [value] if isinstance(value, str) else value
            if not isinstance(term, str) or not term.strip():
                raise TermDictionaryError(f"{where}: entry {term!r}: a term must be a non-empty string")
            if not isinstance(synonyms, list) or not all(isinstance(s, str) and s.strip() for s in synonyms):
                raise TermDictionaryError(
                    f"{where}: entry {term!r}: synonyms must be a string or a list of non-empty strings"
                )
            terms[term.strip()] = [s.strip() for s in synonyms if s.strip() != term.strip()]
    elif isinstance(raw, list):
        for i, group in enumerate(raw):
            if (
                not isinstance(group, list)
                or len(group) < 2
                or not all(isinstance(s, str) and s.strip() for s in group)
            ):
                raise TermDictionaryError(
                    f"{where}: group {i + 1}: a synonym group must be a list of at least two non-empty strings"
                )
            members = [s.strip() for s in group]
            for m in members:
                terms.setdefault(m, []).extend(o for o in members if o != m and o not in terms.get(m, []))
    else:
        raise TermDictionaryError(
            f"{where}: expected a mapping term -> [synonyms] or a list of synonym groups"
        )
    terms = {t: s for t, s in terms.items() if s}
    if not terms:
        raise TermDictionaryError(f"{where}: the term dictionary has no term with a synonym")
    return terms


def _match_case(original: str, replacement: str) -> str:
    if original[:1].isupper() and replacement[:1].islower():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def replace_synonyms(
    text: str, terms: Mapping[str, Sequence[str]], rng: random.Random, probability: float
) -> tuple[str, int]:
    """Replace dictionary terms found in ``text`` (each with ``probability``); returns (text, count).

    Longer terms win over shorter ones they contain ("heart attack" before "heart").
    """
    if not terms:
        return text, 0
    lookup = {t.lower(): list(s) for t, s in terms.items()}
    pattern = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")(?!\w)",
        re.IGNORECASE,
    )
    count = 0

    def swap(match: re.Match[str]) -> str:
        nonlocal count
        found = match.group(0)
        if rng.random() >= probability:
            return found
        count += 1
        return _match_case(found, rng.choice(lookup[found.lower()]))

    return pattern.sub(swap, text), count


def transform_sentence(text: str, rng: random.Random) -> str:
    """One simple, meaning-preserving rewrite: first-letter casing, final punctuation, or a prefix."""
    options = []
    if text[:1].isupper():
        options.append(lambda t: t[:1].lower() + t[1:])
    if text[-1:] in ".?!":
        options.append(lambda t: t[:-1])
    elif text[-1:].isalnum():
        options.append(lambda t: t + ("?" if t.split(" ", 1)[0].lower() in _QUESTION_WORDS else "."))
    options.append(lambda t: rng.choice(_PREFIXES) + (t[:1].lower() + t[1:] if t[:2].istitle() else t))
    return str(rng.choice(options)(text))


_QUESTION_WORDS = {"what", "why", "how", "when", "where", "which", "who", "is", "are", "can", "does", "do"}


def ocr_noise(text: str, rate: float, rng: random.Random) -> str:
    """OCR-like character errors at about ``rate`` per non-space character (seeded by ``rng``)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace() or rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        if text.startswith("rn", i):
            out.append("m")
            i += 2
            continue
        kind = rng.random()
        if ch in _OCR_CONFUSIONS and kind < 0.7:
            out.append(_OCR_CONFUSIONS[ch])
        elif kind < 0.85:
            pass  # dropped character
        else:
            out.append(ch + ch)  # doubled character
        i += 1
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Augmenter:
    """Seeded augmentation of training records (see the module docstring).

    ``share`` is the chance that a record gets a copy; ``terms`` the term dictionary (None: no
    synonym replacement); ``ocr_noise_rate`` 0 turns the noise off.
    """

    seed: int
    share: float
    terms: Mapping[str, Sequence[str]] | None = None
    synonym_probability: float = 0.5
    sentence_transforms: bool = False
    ocr_noise_rate: float = 0.0

    def _rng(self, record: Record) -> random.Random:
        digest = hashlib.blake2b(
            json.dumps([self.seed, record.key()], ensure_ascii=False).encode(), digest_size=16
        ).hexdigest()
        return random.Random(f"kubetune-augment:{digest}")

    def _text(self, text: str, rng: random.Random, used: dict[str, int]) -> str:
        if not text:
            return text
        if self.terms:
            text, n = replace_synonyms(text, self.terms, rng, self.synonym_probability)
            used["synonyms"] += n
        if self.sentence_transforms:
            changed = transform_sentence(text, rng)
            used["sentenceTransforms"] += changed != text
            text = changed
        if self.ocr_noise_rate > 0:
            noisy = ocr_noise(text, self.ocr_noise_rate, rng)
            used["ocrNoise"] += noisy != text
            text = noisy
        return text

    def augment_record(self, record: Record, used: dict[str, int] | None = None) -> Record | None:
        """The augmented copy of ``record``, or None when it is not chosen or nothing changed."""
        rng = self._rng(record)
        if rng.random() >= self.share:
            return None
        used = used if used is not None else {"synonyms": 0, "sentenceTransforms": 0, "ocrNoise": 0}
        if record.form == "instruction" and record.instruction is not None:
            instruction = self._text(record.instruction, rng, used)
            extra = self._text(record.input or "", rng, used)
            user = f"{instruction}\n\n{extra}" if extra else instruction
            messages = tuple(Message("user", user) if m.role == "user" else m for m in record.messages)
            copy = dataclasses.replace(record, messages=messages, instruction=instruction, input=extra)
        else:
            messages = tuple(
                Message("user", self._text(m.content, rng, used)) if m.role == "user" else m
                for m in record.messages
            )
            copy = dataclasses.replace(record, messages=messages)
        return None if copy.key() == record.key() else copy

    def augment(self, records: list[Record]) -> tuple[list[Record], dict[str, Any]]:
        """Originals followed by their augmented copies, and the report summary.

        The summary has the configured ``share``, ``originalRecords``, ``augmentedRecords``,
        ``augmentedShare`` (copies / all training records), per-transform counts, and up to three
        ``examples`` (source ``file:line``, the user text before and after).
        """
        used = {"synonyms": 0, "sentenceTransforms": 0, "ocrNoise": 0}
        copies: list[Record] = []
        examples: list[dict[str, str]] = []
        for record in records:
            copy = self.augment_record(record, used)
            if copy is None:
                continue
            copies.append(copy)
            if len(examples) < _EXAMPLES:
                before = "\n".join(m.content for m in record.messages if m.role == "user")
                after = "\n".join(m.content for m in copy.messages if m.role == "user")
                examples.append(
                    {
                        "source": f"{record.file}:{record.line}",
                        "before": before[:_EXAMPLE_CHARS],
                        "after": after[:_EXAMPLE_CHARS],
                    }
                )
        total = len(records) + len(copies)
        summary: dict[str, Any] = {
            "seed": self.seed,
            "share": self.share,
            "originalRecords": len(records),
            "augmentedRecords": len(copies),
            "augmentedShare": round(len(copies) / total, 4) if total else 0.0,
            "transforms": used,
            "examples": examples,
        }
        return [*records, *copies], summary


def augmenter_from_spec(
    spec: Any, *, default_seed: int, terms_path: Path | None, terms_name: str | None = None
) -> Augmenter:
    """An Augmenter for ``spec.data.augmentation`` (an AugmentationSpec).

    ``terms_path`` is the fetched term dictionary (required when ``spec.synonyms`` is set). Raises
    TermDictionaryError for an unusable dictionary and ValueError when it is missing.
    """
    terms = None
    if spec.synonyms is not None:
        if terms_path is None:
            raise ValueError("data.augmentation.synonyms is set but no term dictionary was fetched")
        terms = load_term_dictionary(terms_path, name=terms_name)
    return Augmenter(
        seed=spec.seed if spec.seed is not None else default_seed,
        share=spec.share,
        terms=terms,
        synonym_probability=spec.synonyms.probability if spec.synonyms is not None else 0.5,
        sentence_transforms=spec.sentence_transforms,
        ocr_noise_rate=spec.ocr_noise,
    )
