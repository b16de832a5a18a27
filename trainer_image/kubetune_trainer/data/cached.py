"""Tokenised data from the node cache: the same files, tokenizer and settings are tokenised once per node.

Input: the RunConfig, the fetched data files (their display names and sha256s), the tokenizer and
the augmentation term dictionary. Output: :func:`tokenized_key` — a sha256 over everything that
decides :func:`~kubetune_trainer.data.prepare_data`'s result — and the
:class:`~kubetune_trainer.data.PreparedData` stored under ``tokenized/<key>/prepared.json``
(:func:`dump_prepared` / :func:`load_prepared`: JSON, never pickle, since the cache is shared by
jobs of different teams; the round trip is exact, so a hit gives the examples and the report a
fresh tokenisation would).

The key covers: each train and eval file's name (examples and the report cite it) and sha256 in
order; the tokenizer's files (sha256 of every tokenizer file in its folder, its pad token, its
class and the transformers and tokenizers versions); ``spec.data`` without the sources' URIs
(format, template, system prompt, fields, cleaning, eval split, invalid-record limit, augmentation,
curriculum); ``maxSeqLength``, ``packing`` and the seed (the split and augmentation draw on it);
the term dictionary's sha256; the trainer version and this format's version. A tokenizer that
does not come from a local folder gives no key: nothing is cached.

Torch-free: the tokenizer is only read (its attributes and folder), never imported.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubetune_api.runconfig import RunConfig
from kubetune_registry.digests import digest_json, sha256_file
from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.data.prepare import DataReport, FileReport, PreparedData, TokenizedExample
from kubetune_trainer.data.records import RecordError

FORMAT = 1
PREPARED_FILE = "prepared.json"

# The files a Hugging Face tokenizer is loaded from (config.json: AutoTokenizer picks the class by it).
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "config.json",
    }
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A digest of what decides the tokenizer's output, from its local folder; None when it was
    not loaded from one (then nothing is cached)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return None
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name in TOKENIZER_FILES or p.suffix in (".tiktoken", ".jinja"))
    )
    if not any(p.name != "config.json" for p in files):
        return None
    return digest_json(
        {
            "files": [[p.name, sha256_file(p)] for p in files],
            "class": type(tokenizer).__name__,
            "padToken": str(getattr(tokenizer, "pad_token", None)),
            "transformers": _version("transformers"),
            "tokenizers": _version("tokenizers"),
        }
    )


def tokenized_key(
    rc: RunConfig,
    train_files: Sequence[Path],
    eval_files: Sequence[Path] | None,
    display_names: Mapping[Path, str],
    tokenizer: Any,
    terms_path: Path | None,
) -> str | None:
    """The node-cache key of the data stage's result, or None when it cannot be keyed (see the
    module docstring for what it covers)."""
    tok = tokenizer_digest(tokenizer)
    if tok is None:
        return None

    def files(paths: Sequence[Path]) -> list[list[str]]:
        return [[display_names.get(p, str(p)), sha256_file(p)] for p in paths]

    return digest_json(
        {
            "format": FORMAT,
            "trainerVersion": TRAINER_VERSION,
            "train": files(train_files),
            "eval": files(eval_files) if eval_files is not None else None,
            "tokenizer": tok,
            "data": rc.data.model_dump(mode="json", by_alias=True, exclude={"train", "eval"}),
            "maxSeqLength": rc.training.max_seq_length,
            "packing": rc.training.packing,
            "seed": rc.training.seed,
            "terms": sha256_file(terms_path) if terms_path is not None else None,
        }
    )


def dump_prepared(prepared: PreparedData) -> str:
    """``prepared`` as JSON text (examples in order and the whole report)."""
    return json.dumps(
        {
            "format": FORMAT,
            "train": [dataclasses.asdict(e) for e in prepared.train],
            "eval": [dataclasses.asdict(e) for e in prepared.eval],
            "report": dataclasses.asdict(prepared.report),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def load_prepared(text: str) -> PreparedData:
    """The inverse of :func:`dump_prepared`. Raises ValueError (or KeyError/TypeError) for text of
    another format."""
    raw = json.loads(text)
    if raw.get("format") != FORMAT:
        raise ValueError(f"prepared data of format {raw.get('format')!r}, expected {FORMAT}")
    report: dict[str, Any] = dict(raw["report"])
    report["files"] = [FileReport(**f) for f in report["files"]]
    report["errors"] = [RecordError(**e) for e in report["errors"]]
    return PreparedData(
        train=[TokenizedExample(**e) for e in raw["train"]],
        eval=[TokenizedExample(**e) for e in raw["eval"]],
        report=DataReport(**report),
    )
