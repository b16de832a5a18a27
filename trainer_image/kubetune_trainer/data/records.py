"""Reading, validating and cleaning SFT records from JSONL, JSON, Parquet and CSV files.

What a caller may rely on:

* Every bad record becomes a :class:`RecordError` naming the file, the line and the field; reading
  goes on with the next record. ``line`` is the 1-based line number for JSONL and CSV (the CSV header
  is line 1), the 1-based record number for JSON arrays and the 1-based row number for Parquet.
* Whole-file problems (unreadable file, unsupported extension, JSON that does not parse, a Parquet
  schema without the needed columns) are one error with ``whole_file=True``; they fail the run
  whatever ``maxInvalidRecords`` says, since a whole file of data would silently go missing.
* A UTF-8 byte-order mark and CRLF line endings are accepted silently.
* Memory stays bounded by the record size: a text field longer than 4 x ``maxRecordChars`` + 64 KiB
  is refused as too long before it is cleaned (cleaning copies text several times).
* Records come out cleaned (see :func:`clean_text`) in one normalised shape, :class:`Record`,
  whatever form the file held: instruction/input/output, prompt/completion or chat messages.

Nothing here imports torch or transformers: ``kubetune data validate`` runs without them.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.data.settings import RECORD_FORMS, CleaningSettings, DataSettings, FieldNames

_BOM = b"\xef\xbb\xbf"
_ROLES = ("system", "user", "assistant")
_ERRORS_IN_MESSAGE = 10
# Fields longer than FACTOR * maxRecordChars + SLACK are refused before cleaning (bounded memory).
_RAW_FIELD_FACTOR = 4
_RAW_FIELD_SLACK = 64 * 1024

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
DATA_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES
"""File name endings the readers understand (case-insensitive)."""


@dataclass(frozen=True)
class RecordError:
    """One bad record (or, with ``whole_file``, one bad file).

    ``str(error)`` is ``file:line: field: message`` (``file:line: message`` without a field), the
    form used in :class:`DataValidationError` messages and in the data report.
    """

    file: str
    line: int
    field: str | None
    message: str
    whole_file: bool = False

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for reports."""
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "message": self.message,
            "wholeFile": self.whole_file,
        }


class DataValidationError(ValueError):
    """The data cannot be trained on: too many invalid records, or a whole file unusable.

    ``errors`` holds every :class:`RecordError` found (not only the first ten shown in the message);
    ``invalid_records`` the number of bad records and ``max_invalid_records`` the limit that was
    exceeded (None when a whole-file error caused the failure).
    """

    def __init__(
        self,
        errors: Sequence[RecordError],
        *,
        invalid_records: int,
        max_invalid_records: int | None,
    ) -> None:
        self.errors = list(errors)
        self.invalid_records = invalid_records
        self.max_invalid_records = max_invalid_records
        whole = [e for e in self.errors if e.whole_file]
        if whole:
            head = f"{len(whole)} data file(s) cannot be used"
            shown = whole + [e for e in self.errors if not e.whole_file]
        else:
            head = (
                f"{invalid_records} invalid data records, more than maxInvalidRecords={max_invalid_records}"
            )
            shown = self.errors
        lines = [str(e) for e in shown[:_ERRORS_IN_MESSAGE]]
        more = len(shown) - len(lines)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{head}; first errors:\n  " + "\n  ".join(lines) + tail)


@dataclass(frozen=True)
class Message:
    """One chat turn; ``role`` is system, user or assistant."""

    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """A valid, cleaned record in normalised form.

    ``messages`` always ends with an assistant turn and holds at most one system turn, first.
    Instruction and prompt/completion records become (user, assistant); the user turn of an
    instruction record is ``instruction`` followed by a blank line and ``input`` when there is one.
    ``instruction``/``input`` keep the two parts apart for the Alpaca template.
    """

    file: str
    line: int
    form: str
    messages: tuple[Message, ...]
    instruction: str | None = None
    input: str | None = None

    @property
    def answer(self) -> str:
        """The final assistant turn (what generation-based evaluation compares against)."""
        return self.messages[-1].content

    def key(self) -> tuple[object, ...]:
        """Identity for exact de-duplication and the seeded split (content only, not file/line)."""
        return (tuple((m.role, m.content) for m in self.messages), self.instruction, self.input)


@dataclass
class FileReadResult:
    """What one file yielded: valid records, errors and the detected (or declared) form."""

    file: str
    form: str | None
    rows: int = 0
    records: list[Record] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)

    @property
    def invalid(self) -> int:
        return sum(1 for e in self.errors if not e.whole_file)


# --- cleaning -------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_HSPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_QUOTES = str.maketrans(
    {
        "\u201c": '"',  # left double quotation mark
        "\u201d": '"',  # right double quotation mark
        "\u201e": '"',  # double low-9
        "\u201f": '"',  # double high-reversed-9
        "\u00ab": '"',  # «
        "\u00bb": '"',  # »
        "\uff02": '"',  # full-width quotation mark
        "\u2018": "'",  # left single quotation mark
        "\u2019": "'",  # right single quotation mark
        "\u201a": "'",  # single low-9
        "\u201b": "'",  # single high-reversed-9
        "\uff07": "'",  # full-width apostrophe
        "\uff40": "`",  # full-width grave accent
    }
)


def clean_text(text: str, cleaning: CleaningSettings) -> str:
    """Apply ``data.cleaning`` to one text field.

    The defaults never change what the text means (issue 17): inner spaces, indentation, blank
    lines and quotes are kept as written; each rewriting normalisation is an opt-in option.

    * stripControlChars (default on): CR and CRLF become LF, then C0/C1 control characters other
      than LF and TAB are removed.
    * stripWhitespace (default on): whitespace before and after the whole field is removed.
    * normalizeWhitespace (opt-in): runs of spaces (any Unicode space, TAB) inside a line become
      one space, trailing spaces go, three or more line breaks become two, and the text is
      stripped. Leading indentation of lines after the first is kept.
    * normalizeQuotes (opt-in): curly, angle and full-width quotes become ASCII ``"`` and ``'``.
    """
    if cleaning.strip_control_chars:
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if cleaning.normalize_quotes:
        text = text.translate(_QUOTES)
    if cleaning.normalize_whitespace:
        lines = []
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            body = line.lstrip(" \t")
            lines.append(line[: len(line) - len(body)] + _HSPACE.sub(" ", body).rstrip())
        text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    # Settings objects written before stripWhitespace existed (the demo's) strip, as before.
    if getattr(cleaning, "strip_whitespace", True):
        text = text.strip()
    return text


# --- raw rows per file type -----------------------------------------------------------------------

# A reader yields (line, row) pairs; row is a mapping of column -> value, or a RecordError.
_Row = tuple[int, "Mapping[str, Any] | RecordError"]


def _iter_jsonl(path: Path, name: str) -> Iterator[_Row]:
    # Bytes, decoded line by line: one line of bad UTF-8 is one bad record, not a lost file.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    lineno,
                    RecordError(name, lineno, None, f"invalid UTF-8 at byte {e.start + 1} of the line"),
                )
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, RecordError(name, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(value, dict):
                yield (
                    lineno,
                    RecordError(name, lineno, None, f"expected a JSON object, got {_json_type(value)}"),
                )
                continue
            yield lineno, value


def _iter_json(path: Path, name: str) -> Iterator[_Row]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield line, RecordError(name, line, None, "invalid UTF-8; the whole JSON file is unusable", True)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        yield (
            e.lineno,
            RecordError(
                name, e.lineno, None, f"invalid JSON: {e.msg} (line {e.lineno} column {e.colno})", True
            ),
        )
        return
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        yield (
            0,
            RecordError(name, 0, None, 'expected a JSON array of records or an object {"data": [...]}', True),
        )
        return
    for index, item in enumerate(value, start=1):
        if isinstance(item, dict):
            yield index, item
        else:
            yield index, RecordError(name, index, None, f"expected a JSON object, got {_json_type(item)}")


def _iter_csv(path: Path, name: str) -> Iterator[_Row]:
    bad_lines: dict[int, int] = {}
    physical = 0

    def lines() -> Iterator[str]:
        # Decode each physical line on its own so a bad byte only spoils the record around it.
        nonlocal physical
        with path.open("rb") as f:
            for raw in f:
                physical += 1
                if physical == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad_lines[physical] = e.start + 1
                    yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield 1, RecordError(name, 1, None, f"unreadable CSV header: {e}", True)
        return
    if 1 in bad_lines:
        yield 1, RecordError(name, 1, None, "invalid UTF-8 in the CSV header", True)
        return
    ended = physical
    while True:
        start = ended + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # The csv module cannot resynchronise after a malformed row: the rest of the file is lost.
            yield start, RecordError(name, start, None, f"malformed CSV: {e}", True)
            return
        ended = physical
        if not row or all(not cell.strip() for cell in row):
            continue
        bad = [n for n in range(start, ended + 1) if n in bad_lines]
        if bad:
            yield (
                start,
                RecordError(name, start, None, f"invalid UTF-8 at byte {bad_lines[bad[0]]} of line {bad[0]}"),
            )
            continue
        if len(row) != len(header):
            yield start, RecordError(name, start, None, f"expected {len(header)} columns, got {len(row)}")
            continue
        yield start, dict(zip(header, row, strict=True))


def _iter_parquet(path: Path, name: str, columns: list[str]) -> Iterator[_Row]:
    import pyarrow.parquet as pq  # Parquet only: not in the [cli] extra, and 0.5 s / 53 MB (measured)

    # Streamed by row group / batch: a Parquet file may be far larger than memory.
    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        for item in batch.to_pylist():
            row += 1
            yield row, item


def _parquet_columns(path: Path, name: str, form: str | None, fields: FieldNames) -> list[str] | RecordError:
    import pyarrow.parquet as pq  # Parquet only: not in the [cli] extra, and 0.5 s / 53 MB (measured)

    try:
        names = set(pq.ParquetFile(path).schema_arrow.names)
    except Exception as e:  # pyarrow raises several types for corrupt files; all mean the same here
        return RecordError(name, 0, None, f"unreadable Parquet file: {e}", True)
    if form is None:
        form = _form_from_keys(names, fields)
        if form is None:
            return RecordError(
                name,
                0,
                None,
                "Parquet schema has none of the record columns: expected "
                f"{fields.instruction!r}+{fields.output!r}, {fields.prompt!r}+{fields.completion!r} "
                f"or {fields.messages!r}; found {sorted(names)}",
                True,
            )
    needed = _required_keys(form, fields)
    missing = [c for c in needed if c not in names]
    if missing:
        return RecordError(
            name,
            0,
            None,
            f"Parquet schema lacks column(s) {missing} needed for {form} records; found {sorted(names)}",
            True,
        )
    optional = [fields.input] if form == "instruction" and fields.input in names else []
    return needed + optional


# --- record parsing ---------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _form_from_keys(keys: Iterable[str], fields: FieldNames) -> str | None:
    # Detection goes by the form's leading column, so a record that has it but lacks a partner
    # column gets "missing field 'output'" rather than a vague "unknown form".
    keys = set(keys)
    if fields.messages in keys:
        return "chat"
    if fields.instruction in keys:
        return "instruction"
    if fields.prompt in keys:
        return "prompt-completion"
    return None


def _required_keys(form: str, fields: FieldNames) -> list[str]:
    if form == "chat":
        return [fields.messages]
    if form == "instruction":
        return [fields.instruction, fields.output]
    return [fields.prompt, fields.completion]


class _Invalid(Exception):
    """Internal: one record is invalid (carries the field and message)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _RecordParser:
    """Turns raw rows of one file into Records, tracking the file's record form."""

    def __init__(self, name: str, settings: DataSettings, *, form: str | None, json_strings: bool) -> None:
        self.name = name
        self.settings = settings
        self.fields = settings.fields
        self.cleaning = settings.cleaning
        self.form = form
        self.form_line: int | None = None
        # CSV cells are strings: a messages column there holds JSON text.
        self.json_strings = json_strings

    def parse(self, line: int, row: Mapping[str, Any]) -> Record | RecordError:
        try:
            return self._parse(line, row)
        except _Invalid as e:
            return RecordError(self.name, line, e.field, e.message)

    def _parse(self, line: int, row: Mapping[str, Any]) -> Record:
        form = _form_from_keys((k for k, v in row.items() if v is not None), self.fields)
        if self.form is None:
            if form is None:
                raise _Invalid(
                    None,
                    f"no record fields: expected {self.fields.instruction!r}+{self.fields.output!r}, "
                    f"{self.fields.prompt!r}+{self.fields.completion!r} or {self.fields.messages!r}",
                )
            self.form, self.form_line = form, line
        elif form is not None and form != self.form:
            origin = f"detected at line {self.form_line}" if self.form_line else "declared in data.format"
            raise _Invalid(
                None, f"record is in {form} form but this file holds {self.form} records ({origin})"
            )
        if self.form == "chat":
            record = self._chat(line, row)
        elif self.form == "instruction":
            record = self._instruction(line, row)
        else:
            record = self._prompt_completion(line, row)
        size = sum(len(m.content) for m in record.messages)
        limit = self.cleaning.max_record_chars
        if size > limit:
            raise _Invalid(None, f"record has {size} characters, more than maxRecordChars={limit}")
        return record

    def _text(self, row: Mapping[str, Any], key: str, *, required: bool = True) -> str:
        if key not in row or row[key] is None:
            if required:
                raise _Invalid(key, "missing field")
            return ""
        value = row[key]
        if not isinstance(value, str):
            raise _Invalid(key, f"expected a string, got {_json_type(value)}")
        limit = self.cleaning.max_record_chars
        if len(value) > _RAW_FIELD_FACTOR * limit + _RAW_FIELD_SLACK:
            # Cleaning copies the text several times (a 50 MB field peaked near 1 GB); a field this far
            # over the limit cannot shrink below it by whitespace collapsing in any realistic record.
            raise _Invalid(key, f"field has {len(value)} characters, more than maxRecordChars={limit}")
        return clean_text(value, self.cleaning)

    def _check_answer(self, key: str, answer: str) -> None:
        minimum = self.cleaning.min_answer_chars
        if not answer and minimum > 0:
            raise _Invalid(key, "empty answer")
        if len(answer) < minimum:
            raise _Invalid(key, f"answer has {len(answer)} characters, fewer than minAnswerChars={minimum}")

    def _system(self) -> tuple[Message, ...]:
        prompt = self.settings.system_prompt
        return (Message("system", clean_text(prompt, self.cleaning)),) if prompt else ()

    def _instruction(self, line: int, row: Mapping[str, Any]) -> Record:
        f = self.fields
        instruction = self._text(row, f.instruction)
        extra = self._text(row, f.input, required=False)
        output = self._text(row, f.output)
        if not instruction:
            raise _Invalid(f.instruction, "empty instruction")
        self._check_answer(f.output, output)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = (*self._system(), Message("user", user), Message("assistant", output))
        return Record(self.name, line, "instruction", messages, instruction=instruction, input=extra)

    def _prompt_completion(self, line: int, row: Mapping[str, Any]) -> Record:
        f = self.fields
        prompt = self._text(row, f.prompt)
        completion = self._text(row, f.completion)
        if not prompt:
            raise _Invalid(f.prompt, "empty prompt")
        self._check_answer(f.completion, completion)
        messages = (*self._system(), Message("user", prompt), Message("assistant", completion))
        return Record(self.name, line, "prompt-completion", messages)

    def _chat(self, line: int, row: Mapping[str, Any]) -> Record:
        key = self.fields.messages
        raw = row.get(key)
        if raw is None:
            raise _Invalid(key, "missing field")
        if self.json_strings and isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _Invalid(key, f"invalid JSON in the messages column: {e.msg}") from None
        if not isinstance(raw, list):
            raise _Invalid(key, f"expected an array of messages, got {_json_type(raw)}")
        if not raw:
            raise _Invalid(key, "empty chat")
        turns: list[Message] = []
        for i, item in enumerate(raw):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise _Invalid(where, f"expected an object with role and content, got {_json_type(item)}")
            role = item.get("role")
            if role is None:
                raise _Invalid(f"{where}.role", "missing field")
            if not isinstance(role, str):
                raise _Invalid(f"{where}.role", f"expected a string, got {_json_type(role)}")
            if role not in _ROLES:
                raise _Invalid(f"{where}.role", f"unknown role {role!r}; expected system, user or assistant")
            if role == "system" and i != 0:
                raise _Invalid(f"{where}.role", "a system message must come first")
            try:
                content = self._text(item, "content")
                if role == "assistant":
                    self._check_answer("content", content)
            except _Invalid as e:
                raise _Invalid(f"{where}.content", e.message) from None
            turns.append(Message(role, content))
        last = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=None)
        if last is None:
            raise _Invalid(key, "chat has no assistant turn")
        # Turns after the last answer would never be trained on; they are left out.
        turns = turns[: last + 1]
        if turns[0].role != "system":
            turns = [*self._system(), *turns]
        return Record(self.name, line, "chat", tuple(turns))


def read_file(path: Path, settings: DataSettings, *, name: str | None = None) -> FileReadResult:
    """Read, clean and validate one data file.

    ``name`` is how the file is called in errors (default: the path as given). The file type comes
    from the extension (see ``DATA_SUFFIXES``); the record form from ``settings.format`` or, for
    ``auto``, from the first record that has one of the forms' leading fields. Never raises for bad
    data: every problem is in the result's ``errors``.
    """
    name = name or str(path)
    declared = str(settings.format)
    if declared != "auto" and declared not in RECORD_FORMS:
        raise ValueError(f"data.format must be auto or one of {RECORD_FORMS}, got {declared!r}")
    form = None if declared == "auto" else declared
    result = FileReadResult(file=name, form=form)
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            rows: Iterator[_Row] = _iter_jsonl(path, name)
        elif suffix in JSON_SUFFIXES:
            rows = _iter_json(path, name)
        elif suffix in CSV_SUFFIXES:
            rows = _iter_csv(path, name)
        elif suffix in PARQUET_SUFFIXES:
            columns = _parquet_columns(path, name, form, settings.fields)
            if isinstance(columns, RecordError):
                result.errors.append(columns)
                return result
            rows = _iter_parquet(path, name, columns)
            # The schema fixes the form for every row; this keeps "detected at" messages sensible.
            form = form or _form_from_keys(columns, settings.fields)
        else:
            result.errors.append(
                RecordError(
                    name, 0, None, f"unsupported file type {suffix!r}; expected one of {DATA_SUFFIXES}", True
                )
            )
            return result
        parser = _RecordParser(
            name, settings, form=form, json_strings=suffix in CSV_SUFFIXES + PARQUET_SUFFIXES
        )
        for line, row in rows:
            if isinstance(row, RecordError):
                if not row.whole_file:
                    result.rows += 1
                result.errors.append(row)
                continue
            result.rows += 1
            parsed = parser.parse(line, row)
            if isinstance(parsed, RecordError):
                result.errors.append(parsed)
            else:
                result.records.append(parsed)
        result.form = parser.form
    except OSError as e:
        result.errors.append(RecordError(name, 0, None, f"cannot read file: {e.strerror or e}", True))
    return result
