"""Per-example scores reproduce the evaluator's corpus metrics, so paired intervals centre on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.evaluate.evaluator import (
    loss_and_perplexity,
    normalize_answer,
    per_example_losses,
    text_metrics,
)
from kubetune_trainer.evaluate.paired import (
    _normalize,
    paired_differences,
    paired_from_samples,
    text_scores,
)
from kubetune_trainer.evaluate.terminology import TermMatcher

REFS = ["A bygglov is needed under PBL.", "Ask Boverket about BBR.", "It takes ten weeks.", "No."]
BASE = ["I am not sure.", "Ask someone.", "It takes a while.", "Yes."]
TUNED = ["A bygglov is needed under PBL.", "Ask Boverket.", "It takes ten weeks.", "No!"]


def test_text_scores_match_the_evaluator() -> None:
    corpus = text_metrics(TUNED, REFS)
    for metric in ("exact_match", "accuracy", "bleu", "rouge_l"):
        assert text_scores(metric, TUNED, REFS).value() == pytest.approx(corpus[metric]), metric
    for text in ("Hello, World!  «x»", "ÅÄÖ—dash"):
        assert _normalize(text) == normalize_answer(text)


def test_paired_differences_cover_requested_metrics() -> None:
    m = TermMatcher(["bygglov", "pbl", "boverket", "bbr"])
    out = paired_differences(
        ["rouge_l", "bleu", "terminology_coverage", "latency_p50_ms", "eval_loss"],
        REFS,
        BASE,
        TUNED,
        matcher=m,
        resamples=500,
    )
    assert set(out) == {"rouge_l", "bleu", "terminology_coverage"}  # no latency CI, no losses given
    cov = out["terminology_coverage"]
    assert (cov.base, cov.tuned, cov.n) == (0.0, 0.75, 2)  # (1 + 1/2) / 2 over the 2 refs with terms
    assert out["rouge_l"].difference > 0


def test_per_example_losses_sum_to_the_eval_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.data import prepare_data
    from kubetune_trainer.demo import _ToyData, synthetic_records, write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(12, seed=0))
    examples = prepare_data([data], [data], tok, _ToyData(), max_seq_length=64, seed=0).eval
    losses, tokens = per_example_losses(model, examples, batch_size=5)
    loss, _ = loss_and_perplexity(model, examples, batch_size=5)
    assert len(losses) == len(examples) and all(t > 0 for t in tokens)
    assert sum(losses) / sum(tokens) == pytest.approx(loss, rel=1e-5)


def test_paired_from_a_samples_file(tmp_path: Path) -> None:
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"set": "eval", "prompt": "q", "reference": r, "tuned": t, "base": b}
        for r, t, b in zip(REFS, TUNED, BASE, strict=True)
    ]
    rows.append({"set": "other", "prompt": "q", "reference": "x", "tuned": "y", "base": "z"})
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = paired_from_samples(samples, ("rouge_l", "exact_match"), resamples=200)
    assert out["exact_match"].n == 4 and out["exact_match"].tuned == 0.5


def test_significance_verdicts() -> None:
    from kubetune_trainer.evaluate.gates import significance_verdict
    from kubetune_trainer.evaluate.significance import loss_sums, mean_scores, paired_bootstrap

    better = paired_bootstrap(
        "eval_loss", loss_sums([2.0, 4.0], [1, 3]), loss_sums([1.0, 2.0], [1, 3])
    ).to_dict()
    flat = paired_bootstrap("rouge_l", mean_scores([0.0, 0.0]), mean_scores([-1.0, 1.0])).to_dict()
    worse = paired_bootstrap("rouge_l", mean_scores([0.5, 0.6]), mean_scores([0.1, 0.2])).to_dict()
    paired = {"eval_loss": better, "rouge_l": flat}
    ok, msg = significance_verdict("eval_loss", paired)
    assert ok and msg.startswith("eval_loss improved on the base by -0.75 (95% CI [")
    ok, msg = significance_verdict("rouge_l", paired)
    assert not ok and "is not significant" in msg and "includes 0" in msg
    ok, msg = significance_verdict("rouge_l", {"rouge_l": worse})
    assert not ok and "significantly worse" in msg
    ok, msg = significance_verdict("bleu", paired)
    assert not ok and "no paired confidence interval" in msg
