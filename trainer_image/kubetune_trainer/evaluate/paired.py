"""Base vs tuned on the same held-out examples: per-example scores and paired bootstrap intervals.

Input: the reference answers, both models' greedy answers (and, for ``eval_loss``/``perplexity``,
both models' per-example answer-token losses from
:func:`kubetune_trainer.evaluate.evaluator.per_example_losses`), the requested metrics and an
optional glossary.
Output: metric name -> :class:`~kubetune_trainer.evaluate.significance.PairedDifference`.

Metrics with a paired interval: ``eval_loss``, ``perplexity``, ``exact_match``, ``accuracy``,
``bleu``, ``rouge_l`` and ``terminology_coverage`` (the latter over the examples whose reference
has a glossary term). Each is computed exactly as the evaluator computes it for the whole set, so
the interval's point estimate is the reported metric.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rouge_score import rouge_scorer

from kubetune_api.metrics import PAIRED_METRICS
from kubetune_trainer.evaluate.significance import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    PairedDifference,
    PerExample,
    bleu_statistics,
    loss_sums,
    mean_scores,
    paired_bootstrap,
)
from kubetune_trainer.evaluate.terminology import TermMatcher, coverage_scores

#: The paired metrics scored from the answers' text (the loss metrics need per-example losses).
TEXT_PAIRED_METRICS = frozenset(PAIRED_METRICS) - {"eval_loss", "perplexity"}


def _normalize(text: str) -> str:
    """The ``accuracy`` form, as the evaluator's normalize_answer: lowercase, no punctuation, one space.

    Not imported from the evaluator: the evaluator imports this module (a test checks they agree).
    """
    no_punct = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(no_punct.split())


def text_scores(
    metric: str, answers: Sequence[str], references: Sequence[str], matcher: TermMatcher | None = None
) -> PerExample:
    """Per-example scores of one model for a text metric (see the module docstring).

    ``terminology_coverage`` keeps only the examples whose reference has a glossary term (the same
    ones for both models, since they depend on the reference only). Raises ValueError for an unknown
    metric, unequal lengths, or ``terminology_coverage`` without a matcher.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if metric == "exact_match":
        return mean_scores([float(a.strip() == r.strip()) for a, r in zip(answers, references, strict=True)])
    if metric == "accuracy":
        return mean_scores(
            [float(_normalize(a) == _normalize(r)) for a, r in zip(answers, references, strict=True)]
        )
    if metric == "rouge_l":
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        return mean_scores(
            [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references, strict=True)]
        )
    if metric == "bleu":
        return bleu_statistics(answers, references)
    if metric == "terminology_coverage":
        if matcher is None:
            raise ValueError("terminology_coverage needs a glossary (spec.evaluation.glossary.uri)")
        return mean_scores([s for s in coverage_scores(answers, references, matcher) if s is not None])
    raise ValueError(f"no paired per-example scores for metric {metric!r}")


def paired_differences(
    metrics: Sequence[str],
    references: Sequence[str],
    base_answers: Sequence[str],
    tuned_answers: Sequence[str],
    *,
    base_losses: tuple[Sequence[float], Sequence[int]] | None = None,
    tuned_losses: tuple[Sequence[float], Sequence[int]] | None = None,
    matcher: TermMatcher | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, PairedDifference]:
    """Paired bootstrap interval of ``tuned - base`` for each requested metric that has one.

    Metrics without per-example scores (latency, consistency, ...) are skipped; loss metrics need
    both ``*_losses``; ``terminology_coverage`` needs ``matcher`` and is skipped when no reference
    has a glossary term. Every metric uses the same resampled indices for a given seed.
    """
    out: dict[str, PairedDifference] = {}
    for metric in metrics:
        if metric in ("eval_loss", "perplexity"):
            if base_losses is None or tuned_losses is None:
                continue
            exp = metric == "perplexity"
            base, tuned = loss_sums(*base_losses, exp=exp), loss_sums(*tuned_losses, exp=exp)
        elif metric in TEXT_PAIRED_METRICS:
            if metric == "terminology_coverage" and matcher is None:
                continue
            base = text_scores(metric, base_answers, references, matcher)
            tuned = text_scores(metric, tuned_answers, references, matcher)
            if len(base) == 0:
                continue
        else:
            continue
        out[metric] = paired_bootstrap(
            metric, base, tuned, resamples=resamples, confidence=confidence, seed=seed
        )
    return out


def paired_from_samples(
    samples_file: Path,
    metrics: Sequence[str] = ("exact_match", "bleu", "rouge_l", "terminology_coverage"),
    *,
    matcher: TermMatcher | None = None,
    set_name: str = "eval",
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, PairedDifference]:
    """Paired intervals of the text metrics from a published version's ``eval/samples.jsonl``.

    Raises ValueError when the file has no rows of ``set_name`` with a base answer.
    """
    rows: list[Mapping[str, Any]] = []
    with open(samples_file, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if row.get("set") == set_name and row.get("base") is not None:
                    rows.append(row)
    if not rows:
        raise ValueError(f"{samples_file}: no {set_name!r} rows with a base answer")
    return paired_differences(
        [m for m in metrics if m in TEXT_PAIRED_METRICS],
        [r["reference"] for r in rows],
        [r["base"] for r in rows],
        [r["tuned"] for r in rows],
        matcher=matcher,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )


def paired_table(paired: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of ``PairedDifference.to_dict()`` rows (model card, README).

    ``n`` is per metric: the loss over the whole eval set, the generation metrics over
    ``maxSamples``, terminology coverage over the examples whose reference has a glossary term."""
    if not paired:
        return ""
    first = next(iter(paired.values()))
    pct = round(float(first["confidence"]) * 100)
    lines = [
        f"| metric | n | base | tuned | tuned - base | {pct}% CI (paired bootstrap) | significant |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, d in paired.items():
        verdict = ("yes, better" if d["improved"] else "yes, worse") if d["significant"] else "no"
        lines.append(
            f"| {name} | {d['n']} | {d['base']:.4g} | {d['tuned']:.4g} | {d['difference']:+.4g} | "
            f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}] | {verdict} |"
        )
    note = f"{first['resamples']} resamples of the held-out examples, the same ones for both models"
    if "terminology_coverage" in paired:
        note += "; terminology_coverage over the examples whose reference has a glossary term"
    lines += ["", note + "."]
    return "\n".join(lines)
