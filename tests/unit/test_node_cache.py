"""The node cache (issue 21, part 2): atomic, verified, LRU-bounded, safe under concurrent writers,
and a tokenized-data key that changes whenever anything that decides the examples changes."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.models import FineTuneJob
from kubetune_api.runconfig import RunConfig, resolve_run_config
from kubetune_registry.digests import digest_json
from kubetune_trainer.cache import CacheError, NodeCache
from kubetune_trainer.data.cached import dump_prepared, load_prepared, tokenized_key
from tests.fixtures.models import TaskFiles
from tests.fixtures.trainer import quickstart_job

KEY_A, KEY_B, KEY_C, KEY_D = (digest_json(n) for n in "abcd")


def _fill_slowly(root: str, key: str, payload: str, start: Any, out: Any) -> None:
    """One writer process: wait for the other, then fill the same entry slowly."""
    cache = NodeCache(Path(root))

    def fill(folder: Path) -> None:
        start.wait(timeout=60)  # both writers are inside put() with their own temporary copy
        (folder / "weights.bin").write_text(payload * 10_000)
        time.sleep(0.5)
        (folder / "config.json").write_text('{"ok": true}')

    entry = cache.put("models", key, fill, source=payload)
    assert entry is not None
    out.put(((entry.path / "weights.bin").read_text(), entry.source, entry.size))


def test_two_processes_filling_the_same_entry_at_once_get_one_whole_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_fill_slowly, args=(str(tmp_path), KEY_A, payload, start, out))
        for payload in ("x", "y")
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Both got the same (the winner's) entry, whole, and nothing else is left behind.
    assert results[0] == results[1]
    content, source, size = results[0]
    assert content == source * 10_000 and size == 10_000 + len('{"ok": true}')
    assert [p.name for p in (tmp_path / "models").iterdir()] == [KEY_A]
    assert not list((tmp_path / "tmp").iterdir())
    entry = NodeCache(tmp_path).get("models", KEY_A)
    assert entry is not None and set(entry.files) == {"weights.bin", "config.json"}


def _put(cache: NodeCache, key: str, data: bytes, kind: str = "models") -> None:
    assert cache.put(kind, key, lambda d: (d / "blob").write_bytes(data)) is not None


def test_a_corrupted_entry_is_detected_deleted_and_filled_again(tmp_path: Path) -> None:
    warnings: list[str] = []
    cache = NodeCache(tmp_path, warn=warnings.append)
    _put(cache, KEY_A, b"good bytes")
    blob = tmp_path / "models" / KEY_A / "blob"
    blob.write_bytes(b"evil bytes")  # same size: only the sha256 can tell
    assert cache.get("models", KEY_A) is None
    assert not (tmp_path / "models" / KEY_A).exists()
    assert warnings and "corrupted" in warnings[0] and "sha256" in warnings[0]
    _put(cache, KEY_A, b"good bytes")  # the caller fetches again and re-inserts
    entry = cache.get("models", KEY_A)
    assert entry is not None and (entry.path / "blob").read_bytes() == b"good bytes"
    # A missing file, an extra file and a torn entry.json are corruption too.
    (entry.path / "blob").unlink()
    assert cache.get("models", KEY_A) is None
    _put(cache, KEY_A, b"good bytes")
    (tmp_path / "models" / KEY_A / "planted.py").write_text("import os")
    assert cache.get("models", KEY_A) is None
    _put(cache, KEY_A, b"good bytes")
    (tmp_path / "models" / KEY_A / "entry.json").write_text("{")
    assert cache.get("models", KEY_A) is None and not (tmp_path / "models" / KEY_A).exists()


def test_eviction_keeps_the_bound_in_lru_order_and_spares_an_entry_in_use(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, max_bytes=250)
    for age, key in enumerate((KEY_A, KEY_B)):
        _put(cache, key, b"1" * 100)
        os.utime(tmp_path / "models" / key / "entry.json", (1000 + age, 1000 + age))
    assert cache.get("models", KEY_A) is not None  # A used now: B is the least recently used
    _put(cache, KEY_C, b"3" * 100, kind="tokenized")
    assert cache.get("models", KEY_B) is None and not (tmp_path / "models" / KEY_B).exists()
    assert cache.get("models", KEY_A) is not None and cache.get("tokenized", KEY_C) is not None
    assert cache.total_bytes() == 200

    # A is now the oldest, but a job is reading it: C goes instead, A stays under the reader.
    os.utime(tmp_path / "models" / KEY_A / "entry.json", (1, 1))
    with cache.reading("models", KEY_A) as in_use:
        assert in_use is not None
        _put(cache, KEY_D, b"4" * 100)
        assert (in_use.path / "blob").read_bytes() == b"1" * 100
    assert cache.get("models", KEY_A) is not None and cache.get("models", KEY_D) is not None
    assert cache.get("tokenized", KEY_C) is None

    # Larger than the bound: not cached at all.
    assert cache.put("models", digest_json("big"), lambda d: (d / "blob").write_bytes(b"x" * 300)) is None


def test_keys_and_kinds_are_checked_before_any_path_is_built(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    for kind, key in (("models", "../../etc"), ("models", KEY_A.upper()), ("other", KEY_A)):
        with pytest.raises(CacheError):
            cache.get(kind, key)
    with pytest.raises(CacheError):
        NodeCache.from_env({"KUBETUNE_CACHE_DIR": str(tmp_path), "KUBETUNE_CACHE_MAX_BYTES": "lots"})
    assert NodeCache.from_env({"KUBETUNE_CACHE_DIR": ""}) is None
    configured = NodeCache.from_env({"KUBETUNE_CACHE_DIR": str(tmp_path), "KUBETUNE_CACHE_MAX_BYTES": "1234"})
    assert configured is not None and configured.max_bytes == 1234


# --- tokenized data ------------------------------------------------------------------------------


def _rc(**spec_changes: Any) -> RunConfig:
    return resolve_run_config(FineTuneJob.model_validate(quickstart_job(**spec_changes)))


class _Tokenizer:
    def __init__(self, folder: Path, pad: str = "<pad>") -> None:
        self.name_or_path, self.pad_token = str(folder), pad


def test_the_tokenized_key_changes_with_every_input_that_decides_the_examples(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"v": 1}')
    (tok_dir / "model.safetensors").write_bytes(b"weights do not matter")
    train, evals, terms = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "terms.json"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    evals.write_text('{"prompt": "c", "completion": "d"}\n')
    terms.write_text('{"x": ["y"]}')
    names = {train: "s3://b/train.jsonl", evals: "s3://b/eval.jsonl"}

    def key(rc: RunConfig | None = None, tokenizer: Any = None, **kw: Any) -> str | None:
        args: dict[str, Any] = {"train_files": [train], "eval_files": [evals], "terms_path": None} | kw
        return tokenized_key(
            rc or _rc(), display_names=names, tokenizer=tokenizer or _Tokenizer(tok_dir), **args
        )

    base = key()
    assert base is not None and base == key()  # deterministic
    # Changing the learning rate or the epochs trains differently on the same examples: same key.
    assert key(_rc(**{"training.learningRate": 0.001, "training.epochs": 7})) == base
    (tok_dir / "model.safetensors").write_bytes(b"other weights")
    assert key() == base

    changed = {
        "template": key(_rc(**{"data.template": "alpaca"})),
        "system prompt": key(_rc(**{"data.systemPrompt": "Be brief."})),
        "fields": key(_rc(**{"data.fields": {"prompt": "question"}})),
        "max length": key(_rc(**{"training.maxSeqLength": 77})),
        "packing": key(_rc(**{"training.packing": not _rc().training.packing})),
        "cleaning": key(_rc(**{"data.cleaning": {"deduplicate": False}})),
        "seed": key(_rc(**{"training.seed": 1234})),
        "format": key(_rc(**{"data.format": "prompt-completion"})),
        "augmentation": key(_rc(**{"data.augmentation": {"share": 0.3, "sentenceTransforms": True}})),
        "term dictionary": key(terms_path=terms),
        "no eval files": key(eval_files=None),
        "file order": key(train_files=[evals, train]),
        "pad token": key(tokenizer=_Tokenizer(tok_dir, pad="</s>")),
    }
    (tok_dir / "tokenizer.json").write_text('{"v": 2}')
    changed["tokenizer file"] = key()
    (tok_dir / "tokenizer.json").write_text('{"v": 1}')
    train.write_text('{"prompt": "a", "completion": "B"}\n')
    changed["data content"] = key()
    assert key(tokenizer=_Tokenizer(tmp_path / "nowhere")) is None  # not from a folder: no caching
    assert all(v is not None for v in changed.values()), changed
    assert base not in changed.values(), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed)


def test_prepared_data_from_the_cache_equals_a_fresh_tokenization(
    task_jsonl: TaskFiles, demo_tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer

    from kubetune_api.models import DataSpec
    from kubetune_trainer.data import prepare_data

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    spec = DataSpec.model_validate({"train": {"uri": "file:///x.jsonl"}, "maxInvalidRecords": 5})
    task_jsonl.train.write_text(task_jsonl.train.read_text() + "not json\n")  # an error in the report
    fresh = prepare_data([task_jsonl.train], None, tok, spec, max_seq_length=48, seed=3)
    assert fresh.report.errors and fresh.report.eval_split  # the round trip covers them
    again = load_prepared(dump_prepared(fresh))
    assert again.train == fresh.train and again.eval == fresh.eval
    assert again.report == fresh.report and again.report.to_dict() == fresh.report.to_dict()
    assert [type(e) for e in again.report.errors] == [type(e) for e in fresh.report.errors]


def test_kubetune_run_takes_a_cache_dir_and_an_empty_one_turns_the_cache_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune_cli.main import DEFAULT_CACHE, build_parser

    monkeypatch.delenv("KUBETUNE_CACHE_DIR", raising=False)
    assert build_parser().parse_args(["run", "job.yaml"]).cache_dir == DEFAULT_CACHE == ".kubetune/cache"
    assert build_parser().parse_args(["run", "job.yaml", "--cache-dir", ""]).cache_dir == ""
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", "/mnt/cache")
    assert build_parser().parse_args(["run", "job.yaml"]).cache_dir == "/mnt/cache"
