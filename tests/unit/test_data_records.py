"""Reading and validating data files: every format x record form, every error with file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_api.models import DataSpec
from kubetune_trainer.data import (
    DataValidationError,
    Message,
    clean_text,
    prepare_data,
    read_file,
    validate_files,
)


def spec(**data: Any) -> DataSpec:
    return DataSpec.model_validate({"train": {"uri": "file:///data/train.jsonl"}, **data})


INSTRUCTION = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
PROMPT_COMPLETION = [
    {"prompt": "Capital of France?", "completion": "Paris"},
    {"prompt": "2+2?", "completion": "4"},
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
    },
    {"messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]},
]
FORMS: dict[str, list[dict[str, Any]]] = {
    "instruction": INSTRUCTION,
    "prompt-completion": PROMPT_COMPLETION,
    "chat": CHAT,
}


def write(path: Path, rows: list[Any]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("form", list(FORMS))
def test_each_format_and_form_is_read_and_detected(tmp_path: Path, suffix: str, form: str) -> None:
    path = write(tmp_path / f"data{suffix}", FORMS[form])
    result = read_file(path, spec())
    assert result.errors == []
    assert result.form == form
    assert len(result.records) == 2
    first = result.records[0]
    assert first.messages[-1].role == "assistant"
    if form == "instruction":
        assert first.messages[-2:] == (Message("user", "Add the numbers.\n\n2 3"), Message("assistant", "5"))
        assert (first.instruction, first.input) == ("Add the numbers.", "2 3")
        assert result.records[1].messages[-2].content == "Say hi."
    elif form == "chat":
        assert [m.role for m in first.messages] == ["system", "user", "assistant", "user", "assistant"]
        assert first.answer == "Goodbye"
    else:
        assert first.messages == (Message("user", "Capital of France?"), Message("assistant", "Paris"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_declared_form_is_used(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"data{suffix}", PROMPT_COMPLETION)
    result = read_file(path, spec(format="instruction"))
    if suffix == ".parquet":
        [err] = result.errors
        assert err.whole_file and "'instruction'" in err.message and "'output'" in err.message
    else:
        assert len(result.errors) == 2
        assert result.errors[0].message.startswith("record is in prompt-completion form")


def test_field_mapping_renames_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"question": "Why?", "response": "Because."}])
    result = read_file(
        path, spec(format="instruction", fields={"instruction": "question", "output": "response"})
    )
    assert result.records[0].messages[-1].content == "Because."


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(
        b"\xef\xbb\xbf" + b'{"prompt": "a", "completion": "b"}\r\n{"prompt": "c", "completion": "d"}\r\n'
    )
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b'\xef\xbb\xbfprompt,completion\r\na,"multi\r\nline"\r\nc,d\r\n')
    js = tmp_path / "d.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps({"data": PROMPT_COMPLETION}).encode())
    for path in (jsonl, csv_path, js):
        result = read_file(path, spec())
        assert result.errors == [], path
        assert len(result.records) == 2
    assert read_file(csv_path, spec()).records[0].answer == "multi\nline"
    assert [r.line for r in read_file(csv_path, spec()).records] == [2, 4]


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    lines = [
        b'{"instruction": "ok", "output": "fine"}',  # 1 valid: fixes the form
        b'{"instruction": "q", "output": ',  # 2 bad JSON
        b'{"instruction": "q", "output": "caf\xe9"}',  # 3 invalid UTF-8 (latin-1 byte)
        b'{"instruction": "q"}',  # 4 missing field
        b'{"instruction": "q", "output": 42}',  # 5 wrong type
        b'{"instruction": "q", "output": "   "}',  # 6 empty answer (after cleaning)
        b'{"instruction": "q", "output": "' + b"x" * 60 + b'"}',  # 7 over-long
        b'{"prompt": "p", "completion": "c"}',  # 8 other form in the same file
        b"[1, 2]",  # 9 not an object
        b"",  # 10 blank: skipped silently
        b'{"instruction": "last", "output": "good"}',  # 11 valid
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_file(path, spec(cleaning={"maxRecordChars": 50}))
    got = {e.line: (e.field, e.message) for e in result.errors}
    assert [r.line for r in result.records] == [1, 11]
    assert got[2][0] is None and got[2][1].startswith("invalid JSON")
    assert got[3] == (None, "invalid UTF-8 at byte 36 of the line")
    assert got[4] == ("output", "missing field")
    assert got[5] == ("output", "expected a string, got number")
    assert got[6] == ("output", "empty answer")
    assert got[7] == (None, "record has 61 characters, more than maxRecordChars=50")
    assert got[8][1].startswith("record is in prompt-completion form but this file holds instruction records")
    assert got[9] == (None, "expected a JSON object, got array")
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert str(result.errors[2]) == f"{path}:4: output: missing field"
    assert result.rows == 10 and result.invalid == 8


def test_chat_errors(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
        {"messages": "hello"},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "t"},
            ]
        },
    ]
    result = read_file(write(tmp_path / "chat.jsonl", rows), spec())
    got = [(e.line, e.field, e.message) for e in result.errors]
    assert got == [
        (1, "messages[1].role", "unknown role 'bot'; expected system, user or assistant"),
        (2, "messages", "chat has no assistant turn"),
        (3, "messages[1].content", "empty answer"),
        (4, "messages[1].content", "missing field"),
        (5, "messages", "expected an array of messages, got string"),
    ]
    # A trailing user turn is never trained on and is left out.
    assert [m.role for m in result.records[0].messages] == ["user", "assistant"]


def test_json_array_errors_use_record_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", [*PROMPT_COMPLETION, {"prompt": "x"}, "text"])
    result = read_file(path, spec())
    assert [(e.line, e.field, e.message) for e in result.errors] == [
        (3, "completion", "missing field"),
        (4, None, "expected a JSON object, got string"),
    ]


def test_broken_json_file_is_a_whole_file_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": \n', encoding="utf-8")
    [err] = read_file(path, spec()).errors
    assert err.whole_file and err.line == 4 and err.message.startswith("invalid JSON")


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\na,b\nc\n\xff\xfe,d\ne,\nf,g\n")
    result = read_file(path, spec())
    assert [(e.line, e.field, e.message) for e in result.errors] == [
        (3, None, "expected 2 columns, got 1"),
        (4, None, "invalid UTF-8 at byte 1 of line 4"),
        (5, "completion", "empty answer"),
    ]
    assert [r.line for r in result.records] == [2, 6]


def test_parquet_missing_columns_is_one_error_naming_them(tmp_path: Path) -> None:
    path = write(tmp_path / "d.parquet", [{"instruction": "q", "answer": "a"}])
    [err] = read_file(path, spec()).errors
    assert err.whole_file and err.line == 0
    assert "['output']" in err.message and "instruction" in err.message


def test_parquet_row_errors_use_row_numbers(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": None},
        {"prompt": "e", "completion": ""},
    ]
    result = read_file(write(tmp_path / "d.parquet", rows), spec())
    assert [(e.line, e.field, e.message) for e in result.errors] == [
        (2, "completion", "missing field"),
        (3, "completion", "empty answer"),
    ]


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    [err] = read_file(path, spec()).errors
    assert err.whole_file and "unsupported file type '.txt'" in err.message


def test_default_cleaning_never_changes_an_answers_meaning() -> None:
    c = spec().cleaning
    code = "def f(x):\n    if x:\n        return  [1,   2]  # aligned\n\n\n\n    return None"
    assert clean_text(code, c) == code  # inner spaces, indentation and blank lines kept
    assert (
        clean_text("  \u201cHi\u201d, it\u2019s  \uff02x\uff02 \n", c)
        == "\u201cHi\u201d, it\u2019s  \uff02x\uff02"
    )
    assert clean_text("a\x00b\x1bc\r\nd\re", c) == "abc\nd\ne"


def test_each_normalisation_is_an_explicit_option() -> None:
    quotes = spec(cleaning={"normalizeQuotes": True}).cleaning
    assert clean_text("\u201cHi\u201d \uff02there\uff02 \u2018x\u2019", quotes) == '"Hi" "there" \'x\''
    spaces = spec(cleaning={"normalizeWhitespace": True}).cleaning
    assert (
        clean_text("  word   and\u3000word  \n\n\n\n    indented\t\tcode  ", spaces)
        == "word and word\n\n    indented code"
    )
    off = spec(cleaning={"stripControlChars": False, "stripWhitespace": False}).cleaning
    assert clean_text(" \u201cx\u201d\x00  ", off) == " \u201cx\u201d\x00  "


def test_dedup_after_cleaning_and_report(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi", "completion": "\u201cyes\u201d"},
        {"prompt": " Hi ", "completion": "\u201cyes\u201d "},  # same after cleaning
        {"prompt": "Other", "completion": "no"},
    ]
    path = write(tmp_path / "d.jsonl", rows)
    report = validate_files([path], None, spec(evalSplit=0.5))
    assert report.ok
    assert report.duplicates_removed == 1
    assert (report.train_records, report.eval_records) == (1, 1)
    off = validate_files([path], None, spec(evalSplit=0.5, cleaning={"deduplicate": False}))
    assert off.duplicates_removed == 0 and off.train_records + off.eval_records == 3


def _bad_file(tmp_path: Path, bad: int) -> Path:
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(10)]
    rows += ['{"prompt": "broken"'] * bad
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_more_invalid_records_than_allowed_fails_before_tokenising(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, 12)

    class NoTokenizer:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError("the tokenizer must not be touched when validation fails")

    with pytest.raises(DataValidationError) as info:
        prepare_data([path], None, NoTokenizer(), spec(maxInvalidRecords=11), max_seq_length=64, seed=0)
    err = info.value
    assert isinstance(err, ValueError)
    assert len(err.errors) == 12
    message = str(err)
    assert message.startswith("12 invalid data records, more than maxInvalidRecords=11; first errors:")
    assert f"{path}:11: invalid JSON" in message and f"{path}:20: invalid JSON" in message
    assert f"{path}:21:" not in message and "... and 2 more" in message


def test_invalid_records_within_the_limit_are_skipped_and_counted(tmp_path: Path) -> None:
    path = _bad_file(tmp_path, 3)
    report = validate_files([path], None, spec(maxInvalidRecords=3))
    assert report.ok
    assert report.invalid_records == 3
    assert report.train_records + report.eval_records == 10
    d = report.to_dict()
    assert d["invalidRecords"] == 3 and d["errors"][0]["line"] == 11 and d["files"][0]["valid"] == 10
    assert not validate_files([path], None, spec(maxInvalidRecords=2)).ok


def test_whole_file_error_fails_whatever_the_limit(tmp_path: Path) -> None:
    good = write(tmp_path / "good.jsonl", PROMPT_COMPLETION)
    bad = write(tmp_path / "bad.parquet", [{"foo": "bar"}])
    report = validate_files([good, bad], None, spec(maxInvalidRecords=1000))
    assert not report.ok
    with pytest.raises(DataValidationError, match=r"1 data file\(s\) cannot be used"):
        report.raise_if_failed()


def test_eval_files_and_split_together_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", PROMPT_COMPLETION)
    with pytest.raises(ValueError, match="not both"):
        validate_files([path], [path], spec(evalSplit=0.1))
