"""Evaluation metric names: the vocabulary of ``spec.evaluation.metrics`` and of gates."""

from __future__ import annotations

from typing import Literal, get_args

MetricName = Literal[
    "eval_loss",
    "perplexity",
    "exact_match",
    "accuracy",
    "bleu",
    "rouge_l",
    "terminology_coverage",
    "json_validity",
    "consistency",
    "latency_p50_ms",
    "latency_p95_ms",
    "peak_memory_ratio",
]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)

#: Metrics where lower is better (used for the key-metric column and for diffs).
LOWER_IS_BETTER = frozenset(
    {"eval_loss", "perplexity", "latency_p50_ms", "latency_p95_ms", "peak_memory_ratio"}
)

#: Metrics with per-example scores, so a paired bootstrap interval of ``tuned - base`` exists for
#: them (``spec.evaluation.gates.<metric>.significant``): all but those that are properties of the
#: whole run (latency, consistency, memory) and json_validity (no paired scorer yet).
PAIRED_METRICS: tuple[str, ...] = tuple(
    m
    for m in METRIC_NAMES
    if m not in {"json_validity", "consistency", "latency_p50_ms", "latency_p95_ms", "peak_memory_ratio"}
)
