"""Issue #8: malformed training data, end to end through validate_files / prepare_data and `kubetune run`.

Every fault is a real file on disk. Expected: each bad record is reported with its file and line
(row for Parquet); beyond ``maxInvalidRecords`` the run fails before any tokenising or training;
within it the bad records are skipped AND reported (counted in the report, listed with file:line) —
never dropped silently. A 50 MB single line neither hangs nor blows memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_api.models import DataSpec
from kubetune_trainer.data import DataValidationError, prepare_data, validate_files
from tests.fixtures.trainer import small_job, write_job

GOOD = [{"instruction": f"translate {i}", "output": f"zorb {i}"} for i in range(12)]


def spec(**data: Any) -> DataSpec:
    return DataSpec.model_validate({"train": {"uri": "file:///data/train.jsonl"}, **data})


def jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def malformed_jsonl(path: Path) -> tuple[Path, dict[int, str]]:
    """Good records interleaved with one of each fault; returns the bad line numbers and their words."""
    rows: list[Any] = [
        GOOD[0],
        b'{"instruction": "x", "output": ',  # 2: truncated JSON
        GOOD[1],
        b'{"instruction": "caf\xe9", "output": "latin-1 bytes"}',  # 4: invalid UTF-8
        {"instruction": "count", "output": 5},  # 5: wrong type
        {"instruction": "say nothing", "output": "   "},  # 6: empty answer (after cleaning)
        [1, 2, 3],  # 7: not an object
        {"instruction": ["a", "list"], "output": "x"},  # 8: wrong type of the question
        {"instruction": "no answer"},  # 9: no answer field at all
        GOOD[2],
    ]
    path.write_bytes(jsonl(rows))
    bad = {
        2: "invalid JSON",
        4: "invalid UTF-8",
        5: "output: expected a string, got number",
        6: "output: empty answer",
        7: "expected a JSON object, got array",
        8: "instruction: expected a string, got array",
        9: "output: missing field",
    }
    return path, bad


def test_each_bad_record_is_named_by_file_line_and_field_and_fails_the_run(tmp_path: Path) -> None:
    path, bad = malformed_jsonl(tmp_path / "train.jsonl")
    report = validate_files([path], None, spec(maxInvalidRecords=0))
    assert not report.ok and report.invalid_records == len(bad)
    shown = {e.line: str(e) for e in report.errors}
    assert sorted(shown) == sorted(bad)
    for line, words in bad.items():
        assert shown[line].startswith(f"{path}:{line}: ") and words in shown[line], shown[line]
    with pytest.raises(DataValidationError) as err:
        report.raise_if_failed()
    assert f"{len(bad)} invalid data records, more than maxInvalidRecords=0" in str(err.value)
    assert all(f"{path}:{line}:" in str(err.value) for line in bad)


def test_within_max_invalid_records_bad_ones_are_skipped_and_still_reported(tmp_path: Path) -> None:
    path, bad = malformed_jsonl(tmp_path / "train.jsonl")
    report = validate_files([path], None, spec(maxInvalidRecords=len(bad)))
    assert report.ok
    assert report.train_records + report.eval_records == 3  # the three good records, nothing else
    as_dict = report.to_dict()
    assert as_dict["invalidRecords"] == len(bad)
    assert sorted(e["line"] for e in as_dict["errors"]) == sorted(bad)
    # One more bad record than allowed fails.
    assert not validate_files([path], None, spec(maxInvalidRecords=len(bad) - 1)).ok


def test_bom_and_crlf_are_accepted_without_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(GOOD[:4]).replace(b"\n", b"\r\n"))
    report = validate_files([path], None, spec())
    assert report.ok and report.errors == [] and report.train_records + report.eval_records == 4
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfinstruction,output\r\nq1,a1\r\nq2,a2\r\n")
    report = validate_files([csv_path], None, spec())
    assert report.ok and report.errors == [] and report.train_records + report.eval_records == 2


def test_a_whole_broken_json_file_fails_whatever_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c",\n')
    report = validate_files([path], None, spec(maxInvalidRecords=1000))
    assert not report.ok
    assert str(report.errors[0]).startswith(f"{path}:3: invalid JSON")


def test_parquet_with_a_wrong_schema_is_refused_naming_the_columns(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q"], "reply": ["a"]}), wrong)
    report = validate_files([wrong], None, spec(maxInvalidRecords=1000))
    assert not report.ok
    (err,) = report.errors
    assert err.whole_file and err.file == str(wrong)
    assert "question" in err.message and "reply" in err.message and "'output'" in err.message

    typed = tmp_path / "typed.parquet"  # right column names, a wrong type in row 2 and an empty answer in 3
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "output": ['"x"', None, ""]}), typed)
    report = validate_files([typed], None, spec(maxInvalidRecords=0))
    assert sorted(e.line for e in report.errors) == [2, 3]
    assert all(str(e).startswith(f"{typed}:") for e in report.errors)


def test_a_50_mb_single_line_is_rejected_quickly_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(jsonl(GOOD[:3]))
        f.write(b'{"instruction": "summarise", "output": "')
        chunk = b"lorem ipsum " * 1024
        for _ in range(50 * 1024 * 1024 // len(chunk) + 1):
            f.write(chunk)
        f.write(b'"}\n')
        f.write(jsonl(GOOD[3:5]))
    assert path.stat().st_size > 50 * 1024 * 1024
    # A child process, so its peak RSS is this read alone. VmHWM, not ru_maxrss: ru_maxrss survives
    # exec, so a child forked from a big pytest process would report the parent's high-water mark.
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from kubetune_api.models import DataSpec
        from kubetune_trainer.data import validate_files
        spec = DataSpec.model_validate({{"train": {{"uri": "file:///x.jsonl"}}, "maxInvalidRecords": 1}})
        t = time.monotonic()
        r = validate_files([__import__("pathlib").Path({str(path)!r})], None, spec)
        print(json.dumps({{"seconds": time.monotonic() - t, "ok": r.ok,
                          "errors": [str(e)[:200] for e in r.errors],
                          "records": r.train_records + r.eval_records,
                          "peak_mb": int(next(line.split()[1] for line in open("/proc/self/status")
                                              if line.startswith("VmHWM:"))) / 1024}}))
        """
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    wall = time.monotonic() - started
    result = json.loads(proc.stdout)
    print(
        f"50 MB line: {result['seconds']:.2f} s to validate, peak RSS {result['peak_mb']:.0f} MB, wall {wall:.1f} s"
    )
    assert result["ok"] and result["records"] == 5
    (error,) = result["errors"]
    assert error.startswith(f"{path}:4: output: ") and "maxRecordChars=20000" in error
    assert result["seconds"] < 30
    # The line is 50 MB: the bytes, the decoded text and the parsed string are alive at once; no more.
    assert result["peak_mb"] < 400, result


def test_prepare_data_fails_before_tokenising(tmp_path: Path) -> None:
    path, bad = malformed_jsonl(tmp_path / "train.jsonl")

    class ExplodingTokenizer:
        """Any use proves tokenising started."""

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"tokenizer.{name} used before the data was validated")

    with pytest.raises(DataValidationError) as err:
        prepare_data([path], None, ExplodingTokenizer(), spec(), max_seq_length=64, seed=0)
    assert err.value.invalid_records == len(bad)


@pytest.mark.integration
def test_kubetune_run_fails_before_training_naming_every_bad_line(
    demo_store: Path, tmp_path: Path, run_kubetune: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    data = demo_store / "kubetune-demo" / "datasets" / "malformed" / "train.jsonl"
    data.parent.mkdir(parents=True)
    _, bad = malformed_jsonl(data)
    job = small_job(**{"data.train": {"uri": "s3://kubetune-demo/datasets/malformed/train.jsonl"}})
    proc = run_kubetune(
        "run",
        str(write_job(tmp_path / "job.yaml", job)),
        "--store-dir",
        str(demo_store),
        "--workdir",
        str(tmp_path / "w"),
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "FAILED (InvalidData)" in proc.stderr and "Traceback" not in proc.stderr
    for line in bad:
        assert f"s3://kubetune-demo/datasets/malformed/train.jsonl:{line}:" in proc.stderr
    assert "stage Training" not in proc.stderr
    assert not (demo_store / "kubetune-demo" / "models").exists()
