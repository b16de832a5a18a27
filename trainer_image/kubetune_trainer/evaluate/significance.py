"""Paired bootstrap confidence intervals of the difference between the tuned model and its base.

Both models answer the same held-out examples, so their scores are paired. :func:`paired_bootstrap`
resamples example indices with replacement (the same indices for both models), recomputes each
model's corpus-level metric on the resample and takes the difference ``tuned - base``; the interval
is the percentile interval of those differences (Efron's percentile bootstrap; for BLEU this is
Koehn's 2004 paired bootstrap resampling). A difference is *significant* at the chosen confidence
when its interval excludes 0.

Per-example scores (:class:`PerExample`) carry what each metric needs to be recomputed on a
resample: a mean of example scores (ROUGE-L, exact match, terminology coverage), a ratio of sums
(eval loss: answer-token loss / answer tokens, so resampled losses stay token-weighted; perplexity
is its exponential), or sacrebleu's sufficient statistics (BLEU).

Quantiles use the inverted-CDF definition (the smallest resampled difference whose empirical CDF
reaches the level), so an interval always consists of differences that some resample produced.
Deterministic for a seed (numpy PCG64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from sacrebleu.metrics import BLEU

from kubetune_api.metrics import LOWER_IS_BETTER

Kind = Literal["mean", "ratio", "exp_ratio", "bleu"]

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class PerExample:
    """One model's per-example contributions to a metric, and how they aggregate.

    ``rows``: shape ``(n,)`` for ``mean``; ``(n, 2)`` (numerator, denominator) for ``ratio`` and
    ``exp_ratio``; ``(n, 2 + 2 * order)`` sacrebleu statistics for ``bleu``.
    """

    kind: Kind
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def value(self, index: np.ndarray | None = None) -> float:
        """The corpus-level metric over ``rows[index]`` (all rows when None)."""
        rows = self.rows if index is None else self.rows[index]
        return float(_aggregate(self.kind, rows[None, ...])[0])


def _aggregate(kind: Kind, rows: np.ndarray) -> np.ndarray:
    """Metric per resample for ``rows`` of shape ``(resamples, n, ...)``."""
    if kind == "mean":
        return rows.mean(axis=1)
    if kind in ("ratio", "exp_ratio"):
        sums = rows.sum(axis=1)
        ratio = sums[:, 0] / sums[:, 1]
        return np.exp(np.minimum(ratio, 700.0)) if kind == "exp_ratio" else ratio
    if kind == "bleu":
        return _bleu_from_stats(rows.sum(axis=1))
    raise ValueError(f"unknown metric kind {kind!r}")


def _bleu_from_stats(stats: np.ndarray) -> np.ndarray:
    """sacrebleu's corpus BLEU (default exp smoothing) from summed statistics, one row per resample."""
    bleu = BLEU()
    return np.array([bleu._compute_score_from_stats(row.astype(int).tolist()).score for row in stats])


def mean_scores(scores: Sequence[float]) -> PerExample:
    """A metric that is the mean of per-example scores (ROUGE-L F1, exact match, coverage)."""
    return PerExample("mean", np.asarray(scores, dtype=float))


def loss_sums(losses: Sequence[float], tokens: Sequence[int], *, exp: bool = False) -> PerExample:
    """Token-weighted loss from per-example summed loss and answer-token counts; ``exp`` for perplexity."""
    rows = np.column_stack([np.asarray(losses, dtype=float), np.asarray(tokens, dtype=float)])
    return PerExample("exp_ratio" if exp else "ratio", rows)


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> PerExample:
    """sacrebleu's per-sentence sufficient statistics, so corpus BLEU can be recomputed on a resample.

    Summed over all sentences they give exactly ``sacrebleu.corpus_bleu(predictions, [references])``.
    """
    # sacrebleu's own paired bootstrap (sacrebleu.significance) resamples these same statistics.
    stats = BLEU()._extract_corpus_statistics(list(predictions), [list(references)])
    return PerExample("bleu", np.asarray(stats, dtype=float))


@dataclass(frozen=True)
class PairedDifference:
    """``tuned - base`` for one metric on the same examples, with its bootstrap interval."""

    metric: str
    base: float
    tuned: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    n: int
    higher_is_better: bool

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def improved(self) -> bool:
        """Significant, and in the direction that is better for this metric."""
        return self.significant and ((self.ci_low > 0) == self.higher_is_better)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None)."""
        out: dict[str, Any] = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }
        out.update(significant=self.significant, improved=self.improved)
        return out

    def summary(self) -> str:
        """``rouge_l +0.123 [0.101, 0.145]`` style text for logs and cards."""
        pct = round(self.confidence * 100)
        mark = "significant" if self.significant else "not significant"
        return (
            f"{self.metric}: base {self.base:.4g} → tuned {self.tuned:.4g}, difference {self.difference:+.4g} "
            f"({pct}% CI [{self.ci_low:+.4g}, {self.ci_high:+.4g}], {mark})"
        )


def paired_bootstrap(
    metric: str,
    base: PerExample,
    tuned: PerExample,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    higher_is_better: bool | None = None,
) -> PairedDifference:
    """Percentile-bootstrap interval of ``tuned - base`` for ``metric`` on paired examples.

    ``difference`` is the observed difference on all examples (not the bootstrap mean).
    ``higher_is_better`` defaults from the metric name (:data:`LOWER_IS_BETTER`). Raises ValueError
    when the two sides differ in length or kind, are empty, or ``confidence``/``resamples`` are out
    of range.
    """
    if len(base) != len(tuned):
        raise ValueError(f"{metric}: {len(base)} base examples but {len(tuned)} tuned ones (must be paired)")
    if base.kind != tuned.kind:
        raise ValueError(f"{metric}: base is {base.kind}, tuned is {tuned.kind}")
    if len(base) == 0:
        raise ValueError(f"{metric}: no examples to resample")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, not {resamples}")
    n = len(base)
    rng = np.random.Generator(np.random.PCG64(seed))
    diffs = np.empty(resamples)
    chunk = max(1, 200_000 // n)  # bounded memory: at most ~200k resampled rows at a time
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(count, n))
        diffs[start : start + count] = _aggregate(tuned.kind, tuned.rows[index]) - _aggregate(
            base.kind, base.rows[index]
        )
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha], method="inverted_cdf")
    base_value, tuned_value = base.value(), tuned.value()
    return PairedDifference(
        metric=metric,
        base=base_value,
        tuned=tuned_value,
        difference=tuned_value - base_value,
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        resamples=resamples,
        n=n,
        higher_is_better=(metric not in LOWER_IS_BETTER) if higher_is_better is None else higher_is_better,
    )
