"""Paired bootstrap intervals and terminology coverage, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from kubetune_trainer.evaluate.significance import (
    bleu_statistics,
    loss_sums,
    mean_scores,
    paired_bootstrap,
)
from kubetune_trainer.evaluate.terminology import (
    GlossaryError,
    TermMatcher,
    coverage_scores,
    parse_glossary,
    terminology_coverage,
)


def test_constant_difference_has_a_zero_width_interval() -> None:
    d = paired_bootstrap("rouge_l", mean_scores([0.1, 0.4, 0.2]), mean_scores([0.3, 0.6, 0.4]), resamples=500)
    assert d.difference == pytest.approx(0.2)
    assert d.ci_low == pytest.approx(0.2) and d.ci_high == pytest.approx(0.2)
    assert d.significant and d.improved and d.n == 3


def test_two_examples_interval_is_the_two_differences() -> None:
    # Differences 1 and 3: a resample's mean difference is 1 (p=1/4), 2 (1/2) or 3 (1/4), so the
    # 2.5% and 97.5% quantiles are 1 and 3.
    d = paired_bootstrap("rouge_l", mean_scores([0.0, 0.0]), mean_scores([1.0, 3.0]), resamples=4000, seed=1)
    assert (d.difference, d.ci_low, d.ci_high) == (2.0, 1.0, 3.0)


def test_three_examples_exact_bootstrap_distribution() -> None:
    # Differences (0, 0, 3): of the 27 equally likely resamples the mean difference is 0 in 8, 1 in 12,
    # 2 in 6 and 3 in 1, so P(<=0) = .296, P(<=2) = .963: the 95% interval is [0, 3], the 90% one [0, 2].
    base, tuned = mean_scores([5.0, 5.0, 5.0]), mean_scores([5.0, 5.0, 8.0])
    d95 = paired_bootstrap("rouge_l", base, tuned, resamples=20_000, seed=3)
    d90 = paired_bootstrap("rouge_l", base, tuned, resamples=20_000, seed=3, confidence=0.90)
    assert d95.difference == pytest.approx(1.0)
    assert (d95.ci_low, d95.ci_high) == (0.0, 3.0)
    assert (d90.ci_low, d90.ci_high) == (0.0, 2.0)
    assert not d95.significant  # the interval touches 0


def test_token_weighted_loss_and_direction() -> None:
    # Base: (2 + 4) / (1 + 3) = 1.5 nats; tuned: (1 + 2) / (1 + 3) = 0.75. Lower is better.
    base, tuned = loss_sums([2.0, 4.0], [1, 3]), loss_sums([1.0, 2.0], [1, 3])
    assert base.value() == 1.5 and tuned.value() == 0.75
    d = paired_bootstrap("eval_loss", base, tuned, resamples=2000)
    assert d.difference == -0.75 and not d.higher_is_better
    assert d.ci_high < 0 and d.improved  # every resample: ratio 1 -> 0.5 or 2/1.333 -> 0.667, etc.
    ppl = paired_bootstrap(
        "perplexity", loss_sums([2.0, 4.0], [1, 3], exp=True), loss_sums([1.0, 2.0], [1, 3], exp=True)
    )
    assert ppl.base == pytest.approx(math.exp(1.5)) and ppl.improved
    assert "eval_loss: base 1.5 → tuned 0.75, difference -0.75 (95% CI [" in d.summary()


def test_bleu_statistics_reproduce_sacrebleu_and_the_seed_fixes_the_interval() -> None:
    refs = ["the cat sat on the mat", "a permit is needed for the extension", "it takes ten weeks"]
    base = ["a dog", "you need nothing", "it depends"]
    tuned = ["the cat sat on a mat", "a permit is needed for an extension", "it takes ten weeks"]
    stats = bleu_statistics(tuned, refs)
    assert stats.value() == pytest.approx(sacrebleu.corpus_bleu(tuned, [refs]).score)
    a = paired_bootstrap("bleu", bleu_statistics(base, refs), stats, resamples=300, seed=7)
    b = paired_bootstrap("bleu", bleu_statistics(base, refs), stats, resamples=300, seed=7)
    assert a == b and a.ci_low <= a.difference <= a.ci_high
    assert a.to_dict()["significant"] == a.significant


def test_unpaired_or_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="must be paired"):
        paired_bootstrap("rouge_l", mean_scores([1.0]), mean_scores([1.0, 2.0]))
    with pytest.raises(ValueError, match="no examples"):
        paired_bootstrap("rouge_l", mean_scores([]), mean_scores([]))


def test_glossary_parsing_and_whole_word_matching() -> None:
    terms = parse_glossary("# comment\n\nBygglov\nF-skatt\n  ABS \nbygglov\nstart  besked\n")
    assert terms == ["bygglov", "f-skatt", "abs", "start besked"]
    m = TermMatcher(terms)
    assert m.find("A BYGGLOV and F-skatt under ABS 18; start\nbesked.") == {
        "bygglov",
        "f-skatt",
        "abs",
        "start besked",
    }
    assert m.find("bygglovet, f-skattsedel, absolute, tabs") == set()  # only whole words
    with pytest.raises(GlossaryError):
        TermMatcher(parse_glossary("# only comments\n"))


def test_coverage_by_hand() -> None:
    m = TermMatcher(["bygglov", "pbl", "boverket"])
    refs = ["A bygglov under PBL.", "Ask Boverket.", "No terms here."]
    preds = ["You need a bygglov.", "Ask the council.", "Anything."]
    # 1 of 2 terms, 0 of 1, not scored: mean (0.5 + 0) / 2.
    assert coverage_scores(preds, refs, m) == [0.5, 0.0, None]
    assert terminology_coverage(preds, refs, m) == 0.25
    with pytest.raises(ValueError, match="glossary does not fit"):
        terminology_coverage(["x"], ["nothing"], m)
