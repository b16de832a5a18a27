"""The real quickstart's inputs: the installed GGUF model and Q&As, a clean fixed-seed split, a glossary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer import demo_real
from kubetune_trainer.evaluate.terminology import TermMatcher, load_glossary
from kubetune_trainer.fetch.gguf import find_gguf

pytest.importorskip("zaragoza_construction_faq")


def test_near_duplicates_share_a_group() -> None:
    qs = [
        "Can I build without a building permit?",
        "Can I build a veranda without a building permit?",
        "What does a kitchen renovation cost?",
        "What does a bathroom renovation cost?",
    ]
    assert demo_real.near_duplicate_groups(qs) == [[0, 1], [2], [3]]


def test_split_is_fixed_clean_and_100_held_out() -> None:
    english, _ = demo_real.load_faq()
    questions = [q["q"] for q in english]
    split = demo_real.split_heldout(questions)
    assert split == demo_real.split_heldout(questions)  # fixed seed
    assert len(split.held_out) == 100 and len(split.train) == len(questions) - 100
    assert not set(split.train) & set(split.held_out)
    assert split.max_cross_jaccard < demo_real.NEAR_DUPLICATE_JACCARD
    held = {questions[i].strip().lower() for i in split.held_out}
    assert not held & {questions[i].strip().lower() for i in split.train}  # no repeated question across


def test_glossary_is_domain_terms_that_occur_in_the_answers() -> None:
    english, swedish = demo_real.load_faq()
    terms = demo_real.build_glossary(english, swedish)
    assert {"bbr", "pbl", "rot", "startbesked", "f-skatt", "skatteverket", "boverket"} <= set(terms)
    assert not {"zaragoza", "person", "system", "sek"} & set(terms)
    matcher = TermMatcher(terms)
    with_terms = sum(bool(matcher.find(q["a"])) for q in english)
    assert with_terms > len(english) // 2  # most reference answers have something to cover


def test_prepare_lays_out_the_store_once(tmp_path: Path) -> None:
    from kubetune_cli.main import main

    assert main(["demo", "prepare", "--real", "--store-dir", str(tmp_path)]) == 0
    bucket = tmp_path / demo_real.BUCKET
    gguf_file = bucket / "base-models" / demo_real.MODEL_NAME / demo_real.MODEL_FILE
    assert find_gguf(gguf_file.parent) == gguf_file
    assert gguf_file.stat().st_size == demo_real.locate_model_file().stat().st_size
    data = bucket / "datasets" / demo_real.DATA_NAME
    evals = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 100 and set(evals[0]) == {"instruction", "input", "output"}
    assert len((data / "train.jsonl").read_text().splitlines()) == 403
    assert len(load_glossary(data / "glossary.txt")) >= 100
    readme = (data / "README.md").read_text()
    assert "10.5281/zenodo.19630803" in readme and "CC BY 4.0" in readme
    before = (data / "eval.jsonl").stat().st_mtime_ns
    assert (
        demo_real.prepare_real_quickstart(tmp_path)["eval"]
        == "s3://kubetune-demo/datasets/construction-faq/eval.jsonl"
    )
    assert (data / "eval.jsonl").stat().st_mtime_ns == before  # the marker: nothing rewritten
