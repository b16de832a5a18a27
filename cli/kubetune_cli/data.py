"""``kubetune data validate`` and ``kubetune data prepare``: fix data before spending GPU time.

    kubetune data validate FILE... [--eval FILE...] [--job JOB.yaml] [--tokenizer DIR] [--json]
    kubetune data prepare INPUT... -o OUT.jsonl [--instruction TEMPLATE] [--input TEMPLATE] [--output TEMPLATE]

``validate`` runs the trainer's own checks (:func:`kubetune_trainer.data.validate_files`, and
:func:`~kubetune_trainer.data.prepare_data` with ``--tokenizer``) with the job's data settings
(``--job``) or the API defaults, and prints the same report the trainer writes to
``training/data-report.json``: per-file counts, invalid records by ``file:line``, duplicates, the
split, and length histograms. Exit code 3 means the trainer would fail the run on this data.

``prepare`` turns exports into instruction JSONL (``{"instruction", "input"?, "output"}``):

* CSV, JSON (array or ``{"data": [...]}``) and JSONL exports: each field is a ``str.format``
  template over the row's columns (``--instruction "Classify: {subject}" --output "{label}"``);
* SQLite databases (``.db``, ``.sqlite``, ``.sqlite3``) with ``--query``: the query's rows, as for CSV;
* DOCX (python-docx) and PDF (pypdf): one record per section (DOCX headings; PDF pages), chunked to
  ``--chunk-chars``, the instruction from ``--doc-instruction`` with ``{title}`` and ``{section}``.

Rows that cannot become a record (a missing column, an empty instruction or answer) are skipped and
listed by ``file:line``; more than ``--max-invalid`` of them exits 3.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import string
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.loader import SpecError, load_finetunejob
from kubetune_api.models import CleaningSpec, FieldMapping, TrainingSpec

# The trainer's data layer is torch-free at import time (tests/unit/test_layering.py checks it).
from kubetune_trainer.data import DataValidationError, prepare_data, validate_files

EXIT_OK = 0
EXIT_BAD_DATA = 3  # the same code the trainer exits with for unusable data
_ERRORS_SHOWN = 20
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
DOC_SUFFIXES = (".docx", ".pdf")


# --- validate ---------------------------------------------------------------------------------


@dataclass
class CliDataSettings:
    """The data settings validate uses without a job: the API's defaults (DataSettings protocol)."""

    eval_split: float | None = None
    format: str = "auto"
    template: str = "auto"
    fields: FieldMapping = field(default_factory=FieldMapping)
    system_prompt: str | None = None
    cleaning: CleaningSpec = field(default_factory=CleaningSpec)
    max_invalid_records: int = 0


def _settings(args: argparse.Namespace) -> tuple[Any, int, int]:
    """(data settings, seed, maxSeqLength) from --job or the defaults, with command-line overrides."""
    if args.job is not None:
        spec = load_finetunejob(args.job).spec
        data: Any = spec.data.model_copy(deep=True)
        seed, max_seq = spec.training.seed, spec.training.max_seq_length
        if args.eval:  # eval files on the command line replace the job's evalSplit
            data = data.model_copy(update={"eval_split": None})
    else:
        data = CliDataSettings()
        seed, max_seq = TrainingSpec().seed, TrainingSpec().max_seq_length
    updates: dict[str, Any] = {}
    if args.format is not None:
        updates["format"] = args.format
    if args.max_invalid_records is not None:
        updates["max_invalid_records"] = args.max_invalid_records
    if args.eval_split is not None:
        updates["eval_split"] = args.eval_split
    for key, value in updates.items():
        data = (
            data.model_copy(update={key: value})
            if hasattr(data, "model_copy")
            else _replace(data, key, value)
        )
    return data, args.seed if args.seed is not None else seed, args.max_seq_length or max_seq


def _replace(data: CliDataSettings, key: str, value: Any) -> CliDataSettings:
    setattr(data, key, value)
    return data


def _histogram_line(hist: Mapping[str, int]) -> str:
    # Empty buckets at the ends say nothing: show from the first to the last non-empty bucket.
    keys = [k for k, v in hist.items() if v]
    if not keys:
        return "(no records)"
    names = list(hist)
    first, last = names.index(keys[0]), names.index(keys[-1])
    return "  ".join(f"{k}: {hist[k]}" for k in names[first : last + 1])


def render_report(report: Mapping[str, Any], *, seed: int) -> str:
    """The data report (DataReport.to_dict()) as text: what the trainer would see and do."""
    out = ["data report (the trainer's checks)", "files:"]
    for f in report["files"]:
        out.append(
            f"  {f['split']:<5} {f['file']}  form={f['form'] or '?'}  read={f['recordsRead']} "
            f"valid={f['valid']} invalid={f['invalid']}"
        )
    out.append(
        f"records: {report['recordsRead']} read, {report['invalidRecords']} invalid "
        f"(maxInvalidRecords {report['maxInvalidRecords']}), {report['duplicatesRemoved']} duplicate(s) removed"
    )
    if report["ok"]:
        split = (
            f"evalSplit {report['evalSplit']:g}, seed {seed}"
            if report["evalSource"] == "split"
            else "eval from files"
        )
        out.append(f"split: {report['trainRecords']} train / {report['evalRecords']} eval records ({split})")
    out.append("length (characters per record): " + _histogram_line(report.get("recordLengthHistogram", {})))
    if report.get("tokenLengthHistogram"):
        out.append(
            f"length (tokens, template {report['template']}, maxSeqLength {report['maxSeqLength']}): "
            + _histogram_line(report["tokenLengthHistogram"])
        )
        out.append(
            f"examples: {report['trainExamples']} train / {report['evalExamples']} eval; "
            f"{report['truncated']} truncated, {report['droppedTooLong']} dropped (no answer token left)"
        )
    errors = report["errors"]
    if errors:
        out.append(f"errors ({len(errors)} listed):")
        for e in errors[:_ERRORS_SHOWN]:
            where = f"{e['file']}:{e['line']}"
            out.append(
                f"  {where}: {e['field']}: {e['message']}" if e["field"] else f"  {where}: {e['message']}"
            )
        if len(errors) > _ERRORS_SHOWN:
            out.append(f"  ... and {len(errors) - _ERRORS_SHOWN} more (--json lists them all)")
    if report["ok"]:
        out.append("result: OK, the trainer would go ahead with this data")
    elif any(e["wholeFile"] for e in errors):
        out.append("result: FAIL, a whole file cannot be used; the trainer would stop before training")
    else:
        out.append(
            f"result: FAIL, {report['invalidRecords']} invalid records, more than maxInvalidRecords="
            f"{report['maxInvalidRecords']}; the trainer would stop before training"
        )
    return "\n".join(out)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        data, seed, max_seq = _settings(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DATA
    missing = [p for p in [*args.files, *(args.eval or [])] if not p.exists()]
    if missing:
        print(f"error: no such file: {', '.join(map(str, missing))}", file=sys.stderr)
        return EXIT_BAD_DATA
    try:
        report = validate_files(args.files, args.eval or None, data, seed=seed)
        if report.ok and args.tokenizer is not None:
            from transformers import (
                AutoTokenizer,  # only with --tokenizer: [cli] installs have no transformers
            )

            tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            report = prepare_data(
                list(args.files), args.eval or None, tokenizer, data, max_seq_length=max_seq, seed=seed
            ).report
    except DataValidationError:  # validate_files said ok: cannot happen, kept for safety
        raise
    except ValueError as exc:  # a wrong call (eval files and evalSplit), or nothing left to train on
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DATA
    result = report.to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_report(result, seed=seed))
    return EXIT_OK if report.ok else EXIT_BAD_DATA


# --- prepare ----------------------------------------------------------------------------------


class _Skip(Exception):
    """One row cannot become a record."""


@dataclass
class PrepareResult:
    """What ``prepare`` wrote and skipped (errors as ``file:line: message``)."""

    written: int = 0
    errors: list[str] = field(default_factory=list)


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _fill(template: str, row: Mapping[str, Any]) -> str:
    missing = [n for n in _fields(template) if n not in row]
    if missing:
        raise _Skip(f"missing column(s) {missing}; the row has {sorted(row)}")
    values = {k: "" if v is None else str(v) for k, v in row.items()}
    return template.format_map(values).strip()


def _csv_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            yield reader.line_num, row


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield n, exc
        return
    value = json.loads(path.read_text(encoding="utf-8-sig"))
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise ValueError(f'{path}: expected a JSON array of rows or {{"data": [...]}}')
    yield from enumerate(value, start=1)


def _db_rows(path: Path, query: str | None) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if not query:
        raise ValueError(
            f"{path}: a database export needs --query (e.g. 'SELECT q AS question, a AS answer FROM faq')"
        )
    # Read-only: preparing data must never change the database.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        for n, row in enumerate(conn.execute(query), start=1):
            yield n, dict(row)
    finally:
        conn.close()


def _doc_sections(path: Path) -> list[tuple[str, str]]:
    """(section title, text) pairs: DOCX split at headings, PDF one section per page."""
    if path.suffix.lower() == ".docx":
        try:
            import docx
        except ImportError:
            raise ValueError("DOCX needs python-docx: pip install python-docx==1.2.0") from None
        sections: list[tuple[str, list[str]]] = [("", [])]
        for para in docx.Document(str(path)).paragraphs:
            text = para.text.strip()
            if not text:
                continue
            if para.style is not None and (para.style.name or "").lower().startswith(("heading", "title")):
                sections.append((text, []))
            else:
                sections[-1][1].append(text)
        return [(title, "\n\n".join(body)) for title, body in sections if body]
    try:
        from pypdf import PdfReader
    except ImportError:
        raise ValueError("PDF needs pypdf: pip install pypdf==7.1.0") from None
    pages = PdfReader(str(path)).pages
    return [(f"page {i}", (p.extract_text() or "").strip()) for i, p in enumerate(pages, start=1)]


def _chunks(text: str, limit: int) -> list[str]:
    """Paragraph-aligned chunks of at most ``limit`` characters (a longer paragraph is cut)."""
    out: list[str] = []
    current = ""
    for para in (p.strip() for p in text.split("\n\n")):
        while len(para) > limit:
            if current:
                out.append(current)
                current = ""
            out.append(para[:limit])
            para = para[limit:].strip()
        if not para:
            continue
        if current and len(current) + 2 + len(para) > limit:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def prepare_files(args: argparse.Namespace) -> tuple[list[dict[str, str]], PrepareResult]:
    """Records from every input, in input order, and what was skipped. Raises ValueError for an
    input that cannot be read at all (unknown type, bad JSON file, missing --query)."""
    records: list[dict[str, str]] = []
    result = PrepareResult()
    for path in args.inputs:
        suffix = path.suffix.lower()
        if suffix in DOC_SUFFIXES:
            title = path.stem
            for section, text in _doc_sections(path):
                for n, chunk in enumerate(_chunks(text, args.chunk_chars), start=1):
                    name = section or title
                    records.append(
                        {
                            "instruction": args.doc_instruction.format(
                                title=title, section=name if n == 1 else f"{name} (part {n})"
                            ),
                            "output": chunk,
                        }
                    )
            continue
        rows: Iterator[tuple[int, Any]]
        if suffix == ".csv":
            rows = _csv_rows(path)
        elif suffix in (".json", ".jsonl", ".ndjson"):
            rows = _json_rows(path)
        elif suffix in DB_SUFFIXES:
            rows = _db_rows(path, args.query)
        else:
            raise ValueError(
                f"{path}: unsupported input type {suffix!r}; expected .csv, .json, .jsonl, "
                f"{', '.join(DB_SUFFIXES)} (with --query), .docx or .pdf"
            )
        for line, row in rows:
            try:
                if isinstance(row, Exception):
                    raise _Skip(f"invalid JSON: {row}")
                if not isinstance(row, Mapping):
                    raise _Skip(f"expected an object, got {type(row).__name__}")
                record = {"instruction": _fill(args.instruction, row)}
                if args.input:
                    extra = _fill(args.input, row)
                    if extra:
                        record["input"] = extra
                record["output"] = _fill(args.output, row)
                if not record["instruction"]:
                    raise _Skip("empty instruction")
                if not record["output"]:
                    raise _Skip("empty output")
            except _Skip as exc:
                result.errors.append(f"{path}:{line}: {exc}")
                continue
            records.append(record)
    return records, result


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        records, result = prepare_files(args)
    except (ValueError, OSError, sqlite3.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_DATA
    if len(result.errors) > args.max_invalid:
        print(
            f"error: {len(result.errors)} rows could not become records (more than --max-invalid "
            f"{args.max_invalid}); nothing written:",
            file=sys.stderr,
        )
        for e in result.errors[:_ERRORS_SHOWN]:
            print(f"  {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output_file.with_name(args.output_file.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(args.output_file)  # never leave a half-written file under the final name
    print(f"wrote {len(records)} instruction records to {args.output_file}")
    for e in result.errors[:_ERRORS_SHOWN]:
        print(f"  skipped {e}")
    print(f"next: kubetune data validate {args.output_file}")
    return EXIT_OK if records else EXIT_BAD_DATA


def add_commands(sub: Any) -> None:
    """Add ``data validate`` and ``data prepare`` to the ``kubetune`` subparsers."""
    data = sub.add_parser("data", help="validate and prepare training data before a run")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    v = data_sub.add_parser("validate", help="print the trainer's data report; exit 3 if it would fail")
    v.add_argument("files", type=Path, nargs="+", help="training data files (JSONL, JSON, CSV, Parquet)")
    v.add_argument("--eval", type=Path, nargs="+", default=None, help="evaluation data files")
    v.add_argument("--job", type=Path, default=None, help="take data settings and seed from this FineTuneJob")
    v.add_argument("--format", choices=["auto", "instruction", "prompt-completion", "chat"], default=None)
    v.add_argument("--max-invalid-records", type=int, default=None, help="override data.maxInvalidRecords")
    v.add_argument("--eval-split", type=float, default=None, help="override data.evalSplit")
    v.add_argument("--seed", type=int, default=None, help="override training.seed (the split)")
    v.add_argument("--tokenizer", type=Path, default=None, help="model dir: also tokenise (token lengths)")
    v.add_argument("--max-seq-length", type=int, default=None, help="override training.maxSeqLength")
    v.add_argument("--json", action="store_true", help="print the report as JSON (data-report.json)")
    v.set_defaults(func=cmd_validate)

    p = data_sub.add_parser("prepare", help="convert CSV/JSON/SQLite/DOCX/PDF exports into instruction JSONL")
    p.add_argument("inputs", type=Path, nargs="+", help="export files")
    p.add_argument("-o", "--output-file", type=Path, required=True, help="instruction JSONL to write")
    p.add_argument("--instruction", default="{instruction}", help="template over the row's columns")
    p.add_argument("--input", default="", help="optional input/context template ('' = none)")
    p.add_argument("--output", default="{output}", help="answer template")
    p.add_argument("--query", default=None, help="SQL for SQLite inputs")
    p.add_argument(
        "--doc-instruction",
        default="Write the section '{section}' of '{title}'.",
        help="DOCX/PDF instruction template ({title}, {section})",
    )
    p.add_argument("--chunk-chars", type=int, default=2000, help="DOCX/PDF: characters per record")
    p.add_argument("--max-invalid", type=int, default=0, help="rows that may be skipped before failing")
    p.set_defaults(func=cmd_prepare)
