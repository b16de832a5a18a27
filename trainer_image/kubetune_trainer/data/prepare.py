"""From data files to tokenised train/eval examples, with a report of everything that happened.

Order of work, and what a caller may rely on:

1. Every file is read, cleaned and validated (:mod:`~kubetune_trainer.data.records`).
2. Exact duplicates (after cleaning) are removed within train and within eval, first one kept.
3. Without eval files, a seeded share of the training records is held out: each record's rank is
   a hash of (seed, content), so the same seed gives the same split whatever the order of files or
   records, and appending data does not reshuffle the old split.
4. If any file is unusable, or more records are invalid than ``maxInvalidRecords``,
   :class:`~kubetune_trainer.data.records.DataValidationError` is raised here — before a tokenizer or
   a model is touched. Within the limit, bad records are skipped and listed in the report.
5. Records are rendered with the template and tokenised with labels on answer tokens only.
   Over-long examples are **truncated** to ``max_seq_length`` from the right: the prompt and as much
   of the answer as fits are kept (the start of an answer is the most useful part to learn, and
   dropping would silently bias the data towards short answers). An example left with no answer
   token is **dropped**. Both are counted in the report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune_trainer.data.records import (
    DataValidationError,
    FileReadResult,
    Record,
    RecordError,
    read_file,
)
from kubetune_trainer.data.settings import DEFAULT_EVAL_SPLIT, DataSettings
from kubetune_trainer.data.templates import IGNORE_INDEX, Tokenizer, encode, render, resolve_template

_REPORTED_ERRORS = 1000


class RecordAugmenter(Protocol):
    """Adds augmented copies of training records (kubetune_trainer.data.augment.Augmenter is one).

    ``augment`` returns the records to train on (originals first, then the copies) and a JSON-ready
    summary for the data report's ``augmentation`` key.
    """

    def augment(self, records: list[Record]) -> tuple[list[Record], dict[str, Any]]: ...


@dataclass(frozen=True)
class TokenizedExample:
    """One training or evaluation example.

    ``input_ids``/``labels`` are at most ``max_seq_length`` long; labels are -100 except on answer
    tokens. ``prompt_ids`` are the tokens before the final answer, untruncated (the generation
    prompt for evaluation); ``prompt_text`` is the same as text and ``answer_text`` the reference
    answer (cleaned, untemplated). ``source``/``line`` locate the record in its file.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    prompt_text: str
    answer_text: str
    source: str
    line: int
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class FileReport:
    """Per file: which split it feeds, its record form, rows read, valid and invalid records."""

    file: str
    split: str
    form: str | None
    records_read: int
    valid: int
    invalid: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "split": self.split,
            "form": self.form,
            "recordsRead": self.records_read,
            "valid": self.valid,
            "invalid": self.invalid,
        }


@dataclass
class DataReport:
    """What data preparation saw and did; ``to_dict()`` is the JSON written next to a run.

    Record counts (``train_records``/``eval_records``) are after de-duplication and split; example
    counts (``train_examples``/``eval_examples``) after tokenisation drops. Token statistics stay
    zero when the report comes from :func:`validate_files` (no tokenizer).
    """

    files: list[FileReport] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    invalid_records: int = 0
    max_invalid_records: int = 0
    duplicates_removed: int = 0
    eval_source: str = "split"
    eval_split: float | None = None
    train_records: int = 0
    eval_records: int = 0
    template: str | None = None
    max_seq_length: int | None = None
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_at: list[str] = field(default_factory=list)  # file:line of each record dropped as too long
    total_tokens: int = 0
    train_tokens: int = 0
    train_label_tokens: int = 0
    token_length_histogram: dict[str, int] = field(default_factory=dict)
    record_length_histogram: dict[str, int] = field(default_factory=dict)
    augmentation: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True when training may go ahead: no unusable file, invalid records within the limit."""
        return not any(e.whole_file for e in self.errors) and self.invalid_records <= self.max_invalid_records

    def raise_if_failed(self) -> None:
        """Raise DataValidationError with the first errors when :attr:`ok` is False."""
        if not self.ok:
            raise DataValidationError(
                self.errors,
                invalid_records=self.invalid_records,
                max_invalid_records=self.max_invalid_records,
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, camelCase; at most the first 1000 errors are listed (``errorsListed`` says how many)."""
        listed = self.errors[:_REPORTED_ERRORS]
        return {
            "ok": self.ok,
            "files": [f.to_dict() for f in self.files],
            "recordsRead": sum(f.records_read for f in self.files),
            "invalidRecords": self.invalid_records,
            "maxInvalidRecords": self.max_invalid_records,
            "errors": [e.to_dict() for e in listed],
            "errorsListed": len(listed),
            "duplicatesRemoved": self.duplicates_removed,
            "evalSource": self.eval_source,
            "evalSplit": self.eval_split,
            "trainRecords": self.train_records,
            "evalRecords": self.eval_records,
            "template": self.template,
            "maxSeqLength": self.max_seq_length,
            "trainExamples": self.train_examples,
            "evalExamples": self.eval_examples,
            "truncated": self.truncated,
            "droppedTooLong": self.dropped_too_long,
            "totalTokens": self.total_tokens,
            "trainTokens": self.train_tokens,
            "trainLabelTokens": self.train_label_tokens,
            "tokenLengthHistogram": dict(self.token_length_histogram),
            "recordLengthHistogram": dict(self.record_length_histogram),
        } | ({"augmentation": self.augmentation} if self.augmentation is not None else {})


@dataclass
class PreparedData:
    """Tokenised examples in file order (batching shuffles) and the report."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    report: DataReport


def _dedupe(records: list[Record]) -> tuple[list[Record], int]:
    seen: set[tuple[object, ...]] = set()
    kept: list[Record] = []
    for r in records:
        k = r.key()
        if k not in seen:
            seen.add(k)
            kept.append(r)
    return kept, len(records) - len(kept)


def split_records(
    records: Sequence[Record], eval_split: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out: ``round(n * eval_split)`` records (at least 1, at most n-1) go to eval.

    Which ones depends only on (seed, record content), never on file or record order. Both lists
    keep the input order. Raises ValueError for fewer than two records or a split outside (0, 1).
    """
    if not 0 < eval_split < 1:
        raise ValueError(f"evalSplit must be between 0 and 1, got {eval_split}")
    n = len(records)
    if n < 2:
        raise ValueError(f"evalSplit needs at least 2 valid training records to hold some out, got {n}")
    k = min(max(1, round(n * eval_split)), n - 1)

    def rank(i: int) -> tuple[bytes, str, int]:
        payload = json.dumps([seed, records[i].key()], ensure_ascii=False).encode()
        # file/line only break ties between identical records (possible when deduplicate is off).
        return hashlib.blake2b(payload, digest_size=16).digest(), records[i].file, records[i].line

    held = set(sorted(range(n), key=rank)[:k])
    return [r for i, r in enumerate(records) if i not in held], [
        r for i, r in enumerate(records) if i in held
    ]


def _names(paths: Sequence[Path], display_names: Mapping[Path, str] | None) -> list[str]:
    return [display_names.get(p, str(p)) if display_names else str(p) for p in paths]


def _read_and_split(
    train_files: Sequence[Path],
    eval_files: Sequence[Path] | None,
    settings: DataSettings,
    *,
    seed: int,
    display_names: Mapping[Path, str] | None,
) -> tuple[DataReport, list[Record], list[Record]]:
    if not train_files:
        raise ValueError("no training data files")
    if eval_files and settings.eval_split:
        raise ValueError("give either eval data files or evalSplit, not both")
    report = DataReport(max_invalid_records=settings.max_invalid_records)
    results: dict[str, list[FileReadResult]] = {"train": [], "eval": []}
    for split, paths in (("train", train_files), ("eval", eval_files or [])):
        for path, name in zip(paths, _names(paths, display_names), strict=True):
            res = read_file(Path(path), settings, name=name)
            results[split].append(res)
            report.files.append(FileReport(name, split, res.form, res.rows, len(res.records), res.invalid))
            report.errors += res.errors
            report.invalid_records += res.invalid
    train = [r for res in results["train"] for r in res.records]
    evals = [r for res in results["eval"] for r in res.records]
    if settings.cleaning.deduplicate:
        train, dropped_train = _dedupe(train)
        evals, dropped_eval = _dedupe(evals)
        report.duplicates_removed = dropped_train + dropped_eval
    # Characters per valid record (all turns): a length picture that needs no tokenizer.
    report.record_length_histogram = _char_histogram(
        [sum(len(m.content) for m in r.messages) for r in (*train, *evals)]
    )
    if not report.ok:
        return report, train, evals
    if eval_files:
        report.eval_source = "files"
    else:
        share = settings.eval_split if settings.eval_split is not None else DEFAULT_EVAL_SPLIT
        report.eval_split = share
        train, evals = split_records(train, share, seed)
    report.train_records, report.eval_records = len(train), len(evals)
    return report, train, evals


def validate_files(
    train_files: Sequence[Path],
    eval_files: Sequence[Path] | None,
    data_cfg: DataSettings,
    *,
    seed: int = 0,
    display_names: Mapping[Path, str] | None = None,
) -> DataReport:
    """Read, clean, validate, de-duplicate and split without a tokenizer; never raises for bad data.

    The report's ``ok`` says whether :func:`prepare_data` would go ahead; its errors name file, line
    and field. Raises ValueError only for a wrong call (no train files, eval files and evalSplit both).
    """
    report, _, _ = _read_and_split(train_files, eval_files, data_cfg, seed=seed, display_names=display_names)
    return report


def read_records(
    train_files: Sequence[Path],
    eval_files: Sequence[Path] | None,
    data_cfg: DataSettings,
    *,
    seed: int = 0,
    display_names: Mapping[Path, str] | None = None,
) -> tuple[list[Record], list[Record]]:
    """The cleaned, de-duplicated train and eval records, split as :func:`prepare_data` splits them
    (no tokenizer; invalid records left out). The pre-flight plan counts its tokens from them."""
    _report, train, evals = _read_and_split(
        train_files, eval_files, data_cfg, seed=seed, display_names=display_names
    )
    return train, evals


def _char_histogram(lengths: Sequence[int]) -> dict[str, int]:
    """Counts per power-of-two character bucket (<=64 ... <=16384, >16384); empty buckets kept."""
    edges = [64 << i for i in range(9)]
    hist = {f"<={e}": 0 for e in edges} | {f">{edges[-1]}": 0}
    for n in lengths:
        hist[next((f"<={e}" for e in edges if n <= e), f">{edges[-1]}")] += 1
    return hist


def _histogram(lengths: Sequence[int], max_seq_length: int) -> dict[str, int]:
    edges: list[int] = []
    edge = 16
    while edge < max_seq_length:
        edges.append(edge)
        edge *= 2
    edges.append(max_seq_length)
    hist = {f"<={e}": 0 for e in edges}
    hist[f">{max_seq_length}"] = 0
    for n in lengths:
        bucket = next((f"<={e}" for e in edges if n <= e), f">{max_seq_length}")
        hist[bucket] += 1
    return hist


def _tokenize(
    records: Sequence[Record], template: str, tokenizer: Tokenizer, max_seq_length: int, report: DataReport
) -> tuple[list[TokenizedExample], list[int]]:
    examples: list[TokenizedExample] = []
    lengths: list[int] = []
    chunk = 256
    for start in range(0, len(records), chunk):
        batch = records[start : start + chunk]
        rendered = [render(r, template, tokenizer) for r in batch]
        for record, shown, (ids, labels, answer_at) in zip(
            batch, rendered, encode(rendered, tokenizer), strict=True
        ):
            lengths.append(len(ids))
            truncated = len(ids) > max_seq_length
            if truncated:
                full_ids = ids
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
                if all(t == IGNORE_INDEX for t in labels):
                    report.dropped_too_long += 1
                    report.dropped_at.append(f"{record.file}:{record.line}")
                    continue
                report.truncated += 1
            else:
                full_ids = ids
            examples.append(
                TokenizedExample(
                    input_ids=ids,
                    labels=labels,
                    prompt_ids=full_ids[:answer_at],
                    prompt_text=shown.prompt_text,
                    answer_text=record.answer,
                    source=record.file,
                    line=record.line,
                    truncated=truncated,
                )
            )
    return examples, lengths


def prepare_data(
    train_files: list[Path],
    eval_files: list[Path] | None,
    tokenizer: Tokenizer,
    data_cfg: DataSettings,
    *,
    max_seq_length: int,
    seed: int,
    display_names: Mapping[Path, str] | None = None,
    augmenter: RecordAugmenter | None = None,
) -> PreparedData:
    """Read, validate, clean, split and tokenise; see the module docstring for the order of work.

    With an ``augmenter`` (``data.augmentation``), augmented copies of training records are added
    after the split and before tokenising: eval data is never augmented, and no copy of an eval
    record can leak into training. The report's ``augmentation`` key summarises them.

    ``display_names`` maps local paths to the names used in errors and the report (for example the
    object key a file was fetched from). Raises DataValidationError (bad data, before tokenising),
    TemplateError (template unusable with this tokenizer), ValueError (no train files, both eval
    files and evalSplit, too few records to split, or no training example left).
    """
    if max_seq_length < 2:
        raise ValueError(f"maxSeqLength must be at least 2, got {max_seq_length}")
    report, train_records, eval_records = _read_and_split(
        train_files, eval_files, data_cfg, seed=seed, display_names=display_names
    )
    report.raise_if_failed()
    if augmenter is not None:
        train_records, report.augmentation = augmenter.augment(train_records)
    template = resolve_template(data_cfg.template, tokenizer)
    report.template = template
    report.max_seq_length = max_seq_length
    train, train_lengths = _tokenize(train_records, template, tokenizer, max_seq_length, report)
    evals, eval_lengths = _tokenize(eval_records, template, tokenizer, max_seq_length, report)
    if not train:
        shown = report.dropped_at[:10]
        more = (
            f", ... and {len(report.dropped_at) - len(shown)} more"
            if len(report.dropped_at) > len(shown)
            else ""
        )
        raise ValueError(
            f"no training examples left: {len(train_records)} valid records, "
            f"{report.dropped_too_long} dropped as longer than maxSeqLength={max_seq_length} "
            "(the prompt alone fills it, so no answer token is left to learn)"
            + (f": {', '.join(shown)}{more}" if shown else "")
        )
    report.train_examples, report.eval_examples = len(train), len(evals)
    report.token_length_histogram = _histogram(train_lengths + eval_lengths, max_seq_length)
    report.train_tokens = sum(len(e.input_ids) for e in train)
    report.total_tokens = report.train_tokens + sum(len(e.input_ids) for e in evals)
    report.train_label_tokens = sum(e.num_label_tokens for e in train)
    return PreparedData(train=train, eval=evals, report=report)
