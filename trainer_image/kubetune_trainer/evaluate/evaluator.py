"""Evaluation of a tuned model against its base on the same data: loss, text metrics, latency, memory.

Metric names (the keys of ``spec.evaluation.gates``, alone for the tuned model or as
``<artifact>.<metric>`` for a published artifact), what they mean and their range:

=====================  ==============================================================================
``eval_loss``          token-weighted mean cross-entropy over answer tokens (labels != -100), nats
``perplexity``         ``exp(eval_loss)``
``exact_match``        share of greedy answers equal to the reference after ``str.strip()`` (0..1)
``accuracy``           share equal after normalisation: lowercase, punctuation removed, whitespace
                       collapsed (0..1)
``bleu``               sacrebleu corpus BLEU with its default 13a tokenizer, on sacrebleu's 0..100 scale
``rouge_l``            mean rouge-score ROUGE-L F1 (0..1). rouge-score's default tokenizer lowercases and
                       keeps only ``[a-z0-9]`` tokens: punctuation is ignored, and text in non-Latin
                       scripts scores 0 (use ``bleu``/``exact_match`` for such data)
``terminology_coverage``  share of the reference answer's domain terms (``spec.evaluation.glossary``)
                       that the greedy answer contains, averaged over the examples whose reference
                       has a glossary term (0..1; :mod:`kubetune_trainer.evaluate.terminology`)
``json_validity``      share of greedy answers that parse as JSON and validate against
                       ``spec.evaluation.jsonSchema`` (0..1); needs the schema
``consistency``        each prompt answered ``consistency.samples`` times with temperature sampling;
                       mean ROUGE-L F1 over every unordered pair of answers (identical answers count
                       1.0), averaged over prompts (0..1)
``latency_p50_ms``     median wall time of one greedy ``generate`` call (batch 1, ``maxNewTokens``) over
                       the first ``latencySamples`` prompts
``latency_p95_ms``     95th percentile of the same (linear interpolation, numpy's default)
``peak_memory_ratio``  peak memory of the tuned model / the base model's, both measured the same way
                       in a fresh process (see :func:`measure_peak_memory`)
=====================  ==============================================================================

Greedy answers for the text metrics are generated ``generationBatchSize`` prompts at a time
(:mod:`kubetune_trainer.evaluate.batched`), except the first ``latencySamples`` prompts when latency
is measured: those are answered one at a time and timed. ONNX and GGUF artifacts answer one at a
time.

With ``compareBase``, every requested metric with per-example scores gets a **paired bootstrap
interval** of ``tuned - base`` on the same examples (``EvalReport.paired``,
:mod:`kubetune_trainer.evaluate.paired`, ``spec.evaluation.significance``), which
``significant: true`` gates read.

Determinism: greedy generation is deterministic; sampled generation seeds torch with
``seed + prompt index`` before each call, so a rerun with the same seed gives the same answers
regardless of how many prompts came before.

Loading an artifact, generating token ids from it and measuring its memory live in
:mod:`kubetune_trainer.evaluate.loading` (re-exported here).

Input of :func:`evaluate_model`: loaded models, the tokenizer, eval examples and ``spec.evaluation``.
Output: an :class:`EvalReport`. Raises ValueError (no examples, unknown metric) and RuntimeError (a
memory measurement failed).

:func:`evaluate_artifact` scores a published artifact (the merged model, a quantized format) with
the same functions on the same examples — loss over the whole eval set, generation metrics and
latency on the same first ``maxSamples`` — so ``<artifact>.<metric>`` gates compare like with like.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kubetune_api.metrics import METRIC_NAMES, PAIRED_METRICS
from kubetune_api.models import DEFAULT_METRICS as API_DEFAULT_METRICS
from kubetune_api.rules import split_gate_key
from kubetune_trainer.evaluate.batched import generate_greedy_batched
from kubetune_trainer.evaluate.loading import (
    MemoryMeasurement,
    ModelSource,
    SourceKind,
    TokenGenerator,
    generate_token_ids,
    load_model,
    measure_peak_memory,
    model_device,
)
from kubetune_trainer.evaluate.terminology import TermMatcher, coverage_scores, terminology_coverage

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "ArtifactEvaluation",
    "EvalExample",
    "EvalReport",
    "Generation",
    "MemoryMeasurement",
    "ModelSource",
    "SampleRow",
    "SourceKind",
    "TokenGenerator",
    "artifact_metrics",
    "consistency",
    "evaluate_artifact",
    "evaluate_model",
    "generate",
    "json_validity",
    "latency_percentiles",
    "load_model",
    "loss_and_perplexity",
    "measure_peak_memory",
    "normalize_answer",
    "per_example_losses",
    "text_metrics",
]

# One vocabulary: the API's metric names (gates and spec.evaluation.metrics use the same ones).
ALL_METRICS: tuple[str, ...] = METRIC_NAMES
#: What is computed when ``spec.evaluation.metrics`` is empty (kubetune_api's default list).
DEFAULT_METRICS: tuple[str, ...] = API_DEFAULT_METRICS
_TEXT_METRICS = frozenset({"exact_match", "accuracy", "bleu", "rouge_l"})
_GENERATION_METRICS = _TEXT_METRICS | {
    "terminology_coverage",
    "json_validity",
    "latency_p50_ms",
    "latency_p95_ms",
}


# --------------------------------------------------------------------------------------------------
# Inputs


class EvalExample(Protocol):
    """What evaluation needs from an example (``kubetune_trainer.data.TokenizedExample`` has it)."""

    @property
    def input_ids(self) -> Sequence[int]: ...
    @property
    def labels(self) -> Sequence[int]: ...  # -100 on prompt tokens
    @property
    def prompt_ids(self) -> Sequence[int]: ...  # prompt up to the answer, for generation
    @property
    def prompt_text(self) -> str: ...
    @property
    def answer_text(self) -> str: ...


def _cfg(obj: Any, name: str, default: Any = None) -> Any:
    """Read a spec field from a pydantic model / plain object (snake_case) or a dict (snake or camel)."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        value = obj.get(name, obj.get(camel, default))
    else:
        value = getattr(obj, name, default)
    return default if value is None else value


# --------------------------------------------------------------------------------------------------
# Pure text metrics


def normalize_answer(text: str) -> str:
    """Lowercase, drop Unicode punctuation (categories P*), collapse whitespace: the ``accuracy`` form."""
    no_punct = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(no_punct.split())


# rouge-score, sacrebleu and jsonschema are imported by the metrics that use them: together 1.7 s
# measured (rouge-score alone 1.0 s, +44 MB), which the pipeline would otherwise spend before
# training starts, for metrics computed after it ends (and often not requested).


@functools.cache
def _rouge_scorer() -> Any:
    """One scorer per process (it is stateless): built once, not per answer."""
    from rouge_score import rouge_scorer  # deferred: see the comment above

    # Default tokenizer, no stemming: the configuration most published ROUGE-L numbers use.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Compare generated answers with references.

    Returns ``{"exact_match", "accuracy", "bleu", "rouge_l"}`` as defined in the module docstring
    (``bleu`` on sacrebleu's 0..100 scale, the others 0..1).

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    import sacrebleu  # deferred like rouge-score (see the comment above _rouge_scorer)

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("text_metrics needs at least one prediction")
    n = len(predictions)
    scorer = _rouge_scorer()
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n,
        "accuracy": sum(
            normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
        )
        / n,
        "bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score),
        "rouge_l": statistics.fmean(
            scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
        ),
    }


def json_validity(outputs: Sequence[str], schema: Mapping[str, Any] | None) -> float:
    """Share of outputs whose whole text (surrounding whitespace ignored) parses as JSON and validates.

    With ``schema=None`` only parsing is checked. Validation uses the draft the schema's ``$schema``
    names (jsonschema's ``validator_for``; latest draft when absent).

    Raises:
        ValueError: ``outputs`` is empty.
        jsonschema.exceptions.SchemaError: the schema itself is invalid (a spec error, reported as such).
    """
    import jsonschema  # deferred like rouge-score (see the comment above _rouge_scorer)

    if not outputs:
        raise ValueError("json_validity needs at least one output")
    validator = None
    if schema is not None:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
        validator = validator_cls(schema)
    valid = 0
    for text in outputs:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if validator is None or validator.is_valid(value):
            valid += 1
    return valid / len(outputs)


def consistency(samples_per_prompt: Sequence[Sequence[str]]) -> float:
    """Mean pairwise similarity of several answers to the same prompt, averaged over prompts.

    Similarity of two answers is ROUGE-L F1 (rouge-score, default tokenizer), except that answers
    identical after ``strip()`` count 1.0 (rouge-score would give 0 to two identical answers with no
    ``[a-z0-9]`` token). Every unordered pair counts once.

    Raises:
        ValueError: no prompts, or a prompt with fewer than two answers.
    """
    if not samples_per_prompt:
        raise ValueError("consistency needs at least one prompt")
    scorer = _rouge_scorer()
    per_prompt: list[float] = []
    for i, answers in enumerate(samples_per_prompt):
        if len(answers) < 2:
            raise ValueError(
                f"consistency needs at least 2 answers per prompt; prompt {i} has {len(answers)}"
            )
        pairs = [
            1.0 if a.strip() == b.strip() else scorer.score(a, b)["rougeL"].fmeasure
            for a, b in combinations(answers, 2)
        ]
        per_prompt.append(statistics.fmean(pairs))
    return statistics.fmean(per_prompt)


def latency_percentiles(latencies_ms: Sequence[float]) -> dict[str, float]:
    """``{"latency_p50_ms", "latency_p95_ms"}`` with numpy's default (linear) percentile interpolation.

    Raises:
        ValueError: no latencies.
    """
    if not latencies_ms:
        raise ValueError("latency_percentiles needs at least one latency")
    arr = np.asarray(latencies_ms, dtype=float)
    return {"latency_p50_ms": float(np.percentile(arr, 50)), "latency_p95_ms": float(np.percentile(arr, 95))}


# --------------------------------------------------------------------------------------------------
# Model-based metrics


def per_example_losses(
    model: Any, examples: Sequence[EvalExample], *, batch_size: int = 8
) -> tuple[list[float], list[int]]:
    """Summed answer-token cross-entropy and answer-token count of every example, in order.

    Labels are shifted as in causal LM training: the logits at position t predict the label at
    t+1. ``sum(losses) / sum(tokens)`` is :func:`loss_and_perplexity`'s token-weighted loss; the
    per-example pairs are what the paired bootstrap of ``eval_loss`` resamples.

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("per_example_losses needs at least one example")
    losses: list[float] = []
    tokens: list[int] = []
    if isinstance(model, TokenGenerator):  # an ONNX/GGUF artifact: logits of one sequence at a time
        for ex in examples:
            logits = torch.from_numpy(np.asarray(model.logits(list(ex.input_ids)), dtype=np.float32))
            labels = torch.tensor(list(ex.labels), dtype=torch.long)
            losses.append(float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")))
            tokens.append(int((labels[1:] != -100).sum()))
        return losses, tokens
    device = model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                width = max(len(ex.input_ids) for ex in batch)
                # Right padding with id 0: padded positions are masked out and labelled -100.
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ex in enumerate(batch):
                    n = len(ex.input_ids)
                    ids[row, :n] = torch.tensor(list(ex.input_ids), dtype=torch.long)
                    labels[row, :n] = torch.tensor(list(ex.labels), dtype=torch.long)
                    mask[row, :n] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                shift_labels = labels[:, 1:].to(device)
                per_token = F.cross_entropy(
                    logits[:, :-1, :].transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
                )
                losses.extend(float(v) for v in per_token.sum(dim=1))
                tokens.extend(int(v) for v in (shift_labels != -100).sum(dim=1))
    finally:
        model.train(was_training)
    return losses, tokens


def _loss_of(losses: Sequence[float], tokens: Sequence[int]) -> tuple[float, float]:
    """Token-weighted loss and perplexity from per-example sums. ValueError without answer tokens."""
    total_tokens = sum(tokens)
    if total_tokens == 0:
        raise ValueError("no answer tokens to score: every label is -100")
    loss = math.fsum(losses) / total_tokens
    return loss, math.exp(loss) if loss < 700 else math.inf


def loss_and_perplexity(
    model: Any, examples: Sequence[EvalExample], *, batch_size: int = 8
) -> tuple[float, float]:
    """Token-weighted mean cross-entropy over answer tokens, and its exponential (perplexity).

    Every answer token of every example weighs the same (long answers count more than short ones),
    which is what ``exp`` of the result needs to be a perplexity.

    Raises:
        ValueError: no examples, or no example has an answer token (all labels are -100).
    """
    if not examples:
        raise ValueError("loss_and_perplexity needs at least one example")
    return _loss_of(*per_example_losses(model, examples, batch_size=batch_size))


@dataclass(frozen=True)
class Generation:
    """One generated answer: decoded text (special tokens skipped), wall time and tokens produced."""

    text: str
    latency_ms: float
    new_tokens: int


#: End-of-turn tokens of the chat templates the data layer writes (ChatML's <|im_end|>, Llama 3's
#: <|eot_id|>): a tuned chat model ends its answer with these, not with the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, the model's generation_config EOS ids,
    and the end-of-turn token of a chat template when the vocabulary has one."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v >= 0 and v not in ids:
                ids.append(v)

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            add(vocab[token])
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids_list: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[Generation]:
    """Answer each prompt on its own (batch 1, so latency is what one request sees).

    Prompt ``i`` is generated after ``torch.manual_seed(seed + i)``: deterministic under a seed.
    Latency is the wall time of the whole generate call including the prompt's prefill.
    """
    eos = stop_token_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    results: list[Generation] = []
    for i, prompt in enumerate(prompt_ids_list):
        start = time.perf_counter()
        new_ids = generate_token_ids(
            model,
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed + i,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        results.append(Generation(text=text, latency_ms=elapsed_ms, new_tokens=len(new_ids)))
    return results


# --------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass(frozen=True)
class SampleRow:
    """One row of the samples table (``eval/samples.jsonl``)."""

    set: str
    prompt: str
    reference: str
    tuned: str
    base: str | None
    #: "tuned"/"base" -> this example's own scores: ``eval_loss`` (nats per answer token),
    #: ``rouge_l`` and, with a glossary, ``terminology_coverage`` (None: no glossary term in the
    #: reference). Empty when nothing was generated.
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``scores`` only when there are some; NaN/inf become None)."""
        data = asdict(self)
        if not self.scores:
            data.pop("scores")
        else:
            data["scores"] = {
                side: {k: (v if v is None or math.isfinite(v) else None) for k, v in values.items()}
                for side, values in self.scores.items()
            }
        return data


@dataclass
class EvalReport:
    """Tuned and base metrics side by side on the same data, plus the samples table.

    ``tuned``/``base``: metric name -> value (``base`` is None when ``compareBase`` is false).
    ``extra_sets``: set name -> {"tuned": metrics, "base": metrics | None}; not gated.
    ``skipped``: requested metric -> why it was not computed (a gate on it will fail with that).
    ``memory``: "tuned"/"base" -> :class:`MemoryMeasurement` dict, when measured.
    ``paired``: metric -> ``PairedDifference.to_dict()`` (tuned - base with its bootstrap interval),
    for the requested metrics with per-example scores, when the base was compared.
    """

    tuned: dict[str, float]
    base: dict[str, float] | None
    samples: list[SampleRow]
    num_examples: int
    settings: dict[str, Any]
    extra_sets: dict[str, dict[str, dict[str, float] | None]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)

    def gate_metrics(self) -> dict[str, float]:
        """The metrics gates are checked against: the tuned model's on the main eval set."""
        return dict(self.tuned)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (samples excluded: they go to samples.jsonl). NaN/inf become None."""

        def clean(metrics: dict[str, float] | None) -> dict[str, float | None] | None:
            if metrics is None:
                return None
            return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}

        return {
            "num_examples": self.num_examples,
            "settings": self.settings,
            "tuned": clean(self.tuned),
            "base": clean(self.base),
            "extra_sets": {
                name: {which: clean(m) for which, m in sides.items()}
                for name, sides in self.extra_sets.items()
            },
            "skipped": self.skipped,
            "memory": self.memory,
            "paired": self.paired,
        }


@contextmanager
def _as_base(tuned: Any, base: Any | None) -> Iterator[Any]:
    """The base model to score: ``base`` itself, or the peft ``tuned`` model with its adapter disabled."""
    if base is not None:
        yield base
        return
    with tuned.disable_adapter():
        yield tuned


def _requested_metrics(eval_cfg: Any) -> list[str]:
    requested = list(_cfg(eval_cfg, "metrics", None) or DEFAULT_METRICS)
    # A gated metric is computed even if the metrics list forgot it: gates fail only when a metric
    # truly cannot be computed (e.g. json_validity without a schema). A gate on an artifact
    # (int8.rouge_l) needs the metric of the tuned model too: the artifact is compared with it.
    for key in _cfg(eval_cfg, "gates", None) or {}:
        name = split_gate_key(key)[1]
        if name not in requested:
            requested.append(name)
    unknown = [m for m in requested if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown evaluation metric(s) {unknown}; known: {list(ALL_METRICS)}")
    return requested


def artifact_metrics(eval_cfg: Any, artifact: str) -> list[str]:
    """What :func:`evaluate_artifact` computes for ``artifact``: the tuned model's metrics, except
    ``consistency`` (5 sampled answers per prompt) unless a gate on this artifact names it, and
    ``peak_memory_ratio`` (measured in a fresh process by whoever wrote the artifact)."""
    gated = {
        metric
        for key in _cfg(eval_cfg, "gates", None) or {}
        for a, metric in [split_gate_key(key)]
        if a == artifact
    }
    return [
        m
        for m in _requested_metrics(eval_cfg)
        if m != "peak_memory_ratio" and (m != "consistency" or m in gated)
    ]


@dataclass
class _Scored:
    """One model on one set: its metrics, greedy answers (empty when none were needed), the
    per-example losses behind eval_loss (None when the loss was not requested) and why a metric
    could not be computed."""

    metrics: dict[str, float]
    answers: list[str]
    losses: tuple[list[float], list[int]] | None
    skipped: dict[str, str] = field(default_factory=dict)


def _greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    timed: int,
) -> tuple[list[str], list[Generation]]:
    """Greedy answers to every prompt, and the batch-1 :class:`Generation` of the first ``timed``.

    The timed prompts are answered one at a time (their latency is what one request sees); the rest
    in left-padded batches of ``batch_size`` through ``model.generate``. A :class:`TokenGenerator`
    (ONNX, GGUF) or ``batch_size`` 1 answers every prompt one at a time."""
    if isinstance(model, TokenGenerator) or batch_size <= 1:
        gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
        return [g.text for g in gens], gens[:timed]
    timed_gens = generate(model, tokenizer, prompts[:timed], max_new_tokens=max_new_tokens, seed=seed)
    rest = generate_greedy_batched(
        model,
        prompts[timed:],
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        batch_size=batch_size,
    )
    texts = [g.text for g in timed_gens] + [tokenizer.decode(ids, skip_special_tokens=True) for ids in rest]
    return texts, timed_gens


def _score_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    requested: Sequence[str],
    *,
    max_new_tokens: int,
    json_schema: Mapping[str, Any] | None,
    consistency_samples: int,
    consistency_temperature: float,
    consistency_prompts: int,
    seed: int,
    batch_size: int,
    generation_batch_size: int = 8,
    latency_samples: int = 16,
    max_samples: int | None = None,
    matcher: TermMatcher | None = None,
) -> _Scored:
    """Metrics for one model on one set (see :class:`_Scored`).

    Loss and perplexity are taken over every example (one eval_loss per version, the one the
    training loop reports too); generation metrics over the first ``max_samples`` only."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    losses: tuple[list[float], list[int]] | None = None
    if {"eval_loss", "perplexity"} & set(requested):
        losses = per_example_losses(model, examples, batch_size=batch_size)
        loss, ppl = _loss_of(*losses)
        metrics.update(eval_loss=loss, perplexity=ppl)
    examples = list(examples)[:max_samples] if max_samples is not None else examples
    answers: list[str] = []
    if _GENERATION_METRICS & set(requested):
        wants_latency = bool({"latency_p50_ms", "latency_p95_ms"} & set(requested))
        answers, timed = _greedy_answers(
            model,
            tokenizer,
            [ex.prompt_ids for ex in examples],
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=generation_batch_size,
            timed=min(latency_samples, len(examples)) if wants_latency else 0,
        )
        references = [ex.answer_text for ex in examples]
        scored, why = answer_metrics(answers, references, requested, matcher=matcher, json_schema=json_schema)
        metrics.update(scored)
        skipped.update(why)
        if wants_latency:
            metrics.update(latency_percentiles([g.latency_ms for g in timed]))
    if "consistency" in requested:
        prompts = [ex.prompt_ids for ex in examples[:consistency_prompts]]
        per_prompt: list[list[str]] = [[] for _ in prompts]
        for k in range(consistency_samples):
            # Distinct seeds per round so the samples differ; fixed so reruns agree.
            gens = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=consistency_temperature,
                seed=seed + 1_000_003 * (k + 1),
            )
            for i, g in enumerate(gens):
                per_prompt[i].append(g.text)
        metrics["consistency"] = consistency(per_prompt)
    return _Scored(metrics=metrics, answers=answers, losses=losses, skipped=skipped)


def answer_metrics(
    answers: Sequence[str],
    references: Sequence[str],
    requested: Sequence[str] | set[str],
    *,
    matcher: TermMatcher | None,
    json_schema: Mapping[str, Any] | None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The ``requested`` metrics that the answers alone decide (exact_match, bleu, rouge_l,
    accuracy, terminology_coverage, json_validity), and why one could not be computed. The one
    scorer of every model's answers, and of the tuned model's recorded answers when an artifact
    was judged on fewer examples (:func:`evaluate_artifact`)."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    text = text_metrics(answers, references)
    metrics.update({k: v for k, v in text.items() if k in requested})
    if "terminology_coverage" in requested:
        if matcher is None:
            skipped["terminology_coverage"] = "spec.evaluation.glossary is not set"
        else:
            try:
                metrics["terminology_coverage"] = terminology_coverage(answers, references, matcher)
            except ValueError as exc:
                skipped["terminology_coverage"] = str(exc)
    if "json_validity" in requested and json_schema is not None:
        metrics["json_validity"] = json_validity(answers, json_schema)
    return metrics, skipped


def _row_scores(
    answer: str, reference: str, loss: tuple[float, int] | None, matcher: TermMatcher | None
) -> dict[str, float | None]:
    """One sample's own scores for the samples table (see :class:`SampleRow`)."""
    out: dict[str, float | None] = {}
    if loss is not None:
        out["eval_loss"] = loss[0] / loss[1] if loss[1] else None
    out["rouge_l"] = float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)
    if matcher is not None:
        out["terminology_coverage"] = coverage_scores([answer], [reference], matcher)[0]
    return out


def _score_settings(
    eval_cfg: Any, *, seed: int, batch_size: int, consistency_prompts: int | None = None
) -> dict[str, Any]:
    """The keyword arguments of :func:`_score_model` that ``spec.evaluation`` decides: one place,
    so the tuned model and every artifact are scored the same way."""
    cons_cfg = _cfg(eval_cfg, "consistency", None)
    return {
        "max_new_tokens": int(_cfg(eval_cfg, "max_new_tokens", 64)),
        "json_schema": _cfg(eval_cfg, "json_schema", None),
        "consistency_samples": int(_cfg(cons_cfg, "samples", 5)),
        "consistency_temperature": float(_cfg(cons_cfg, "temperature", 0.7)),
        "consistency_prompts": int(consistency_prompts or _cfg(cons_cfg, "prompts", 20)),
        "seed": seed,
        "batch_size": batch_size,
        "generation_batch_size": int(_cfg(eval_cfg, "generation_batch_size", 8)),
        "latency_samples": int(_cfg(eval_cfg, "latency_samples", 16)),
        "max_samples": int(_cfg(eval_cfg, "max_samples", 200)),
    }


def evaluate_model(
    tuned: Any,
    base: Any | None,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    eval_cfg: Any,
    *,
    extra_sets: Mapping[str, Sequence[EvalExample]] | None = None,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    consistency_prompts: int | None = None,
    tuned_source: ModelSource | None = None,
    base_source: ModelSource | None = None,
    glossary: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate the tuned model (and the base, with ``compareBase``) on the same examples.

    Args:
        tuned, base: loaded models (transformers/peft/quanto or a :class:`TokenGenerator`), already on
            ``device``. With ``base=None`` and a peft ``tuned`` model, the base is the same model
            inside ``tuned.disable_adapter()`` (no second copy in memory); with ``base=None``
            otherwise, or ``compareBase: false``, no base metrics are computed.
        eval_cfg: ``spec.evaluation`` (pydantic model, object or dict): metrics, maxSamples,
            maxNewTokens, jsonSchema, consistency {samples, temperature}, compareBase, gates.
        extra_sets: name -> examples of the optional extra eval sets (metrics reported, not gated).
        consistency_prompts: consistency samples only the first N prompts (N x samples generations);
            default ``consistency.prompts`` from the spec, else 20.
        tuned_source, base_source: where the two models live on disk; when both are given the
            peak memory of each is measured in a fresh process and ``peak_memory_ratio`` computed.
        glossary: the domain terms of ``spec.evaluation.glossary`` (terminology_coverage).
        progress: called with ``"tuned"``/``"base"`` as each model's scoring starts (log lines).

    Raises:
        ValueError: no examples, or an unknown metric name.
        RuntimeError: a memory measurement failed.
    """
    if not examples:
        raise ValueError("evaluation needs at least one eval example")
    requested = _requested_metrics(eval_cfg)
    score_kwargs = _score_settings(
        eval_cfg, seed=seed, batch_size=batch_size, consistency_prompts=consistency_prompts
    )
    max_samples = int(score_kwargs["max_samples"])
    max_new_tokens = int(score_kwargs["max_new_tokens"])
    json_schema = score_kwargs["json_schema"]
    cons_samples = int(score_kwargs["consistency_samples"])
    cons_temperature = float(score_kwargs["consistency_temperature"])
    cons_prompts = int(score_kwargs["consistency_prompts"])
    adapter_disabled_base = base is None and hasattr(tuned, "disable_adapter")
    compare_base = bool(_cfg(eval_cfg, "compare_base", True)) and (base is not None or adapter_disabled_base)
    examples = list(examples)
    generation_examples = examples[:max_samples]  # maxSamples bounds generation, never the loss

    skipped: dict[str, str] = {}
    if "json_validity" in requested and json_schema is None:
        skipped["json_validity"] = "spec.evaluation.jsonSchema is not set"
    if "peak_memory_ratio" in requested and (tuned_source is None or base_source is None):
        skipped["peak_memory_ratio"] = "the tuned and base models' locations on disk were not given"

    matcher = TermMatcher(glossary) if glossary else None
    if progress is not None:
        progress("tuned")
    tuned_scored = _score_model(tuned, tokenizer, examples, requested, matcher=matcher, **score_kwargs)
    tuned_metrics, tuned_answers = tuned_scored.metrics, tuned_scored.answers
    skipped.update(tuned_scored.skipped)
    base_metrics: dict[str, float] | None = None
    base_answers: list[str] = []
    base_scored: _Scored | None = None
    if compare_base:
        if progress is not None:
            progress("base")
        with _as_base(tuned, base) as base_model:
            base_scored = _score_model(
                base_model, tokenizer, examples, requested, matcher=matcher, **score_kwargs
            )
        base_metrics, base_answers = base_scored.metrics, base_scored.answers
    significance = _cfg(eval_cfg, "significance", None)
    resamples = int(_cfg(significance, "resamples", 2000))
    confidence = float(_cfg(significance, "confidence", 0.95))
    paired: dict[str, dict[str, Any]] = {}
    if base_scored is not None and set(PAIRED_METRICS) & set(requested):
        from kubetune_trainer.evaluate.paired import paired_differences  # deferred: rouge-score, sacrebleu

        references = [ex.answer_text for ex in generation_examples]
        diffs = paired_differences(
            [m for m in requested if m in PAIRED_METRICS and m not in skipped],
            references,
            base_answers,
            tuned_answers,
            base_losses=base_scored.losses,
            tuned_losses=tuned_scored.losses,
            matcher=matcher,
            resamples=resamples,
            confidence=confidence,
            seed=seed,
        )
        paired = {name: d.to_dict() for name, d in diffs.items()}

    memory: dict[str, dict[str, Any]] = {}
    if "peak_memory_ratio" in requested and tuned_source is not None and base_source is not None:
        probe_prompts = [list(ex.prompt_ids) for ex in examples[:4]]
        tuned_mem = measure_peak_memory(
            tuned_source, probe_prompts, max_new_tokens=max_new_tokens, device=device
        )
        base_mem = measure_peak_memory(
            base_source, probe_prompts, max_new_tokens=max_new_tokens, device=device
        )
        memory = {"tuned": tuned_mem.to_dict(), "base": base_mem.to_dict()}
        tuned_metrics["peak_memory_ratio"] = tuned_mem.peak_bytes / base_mem.peak_bytes
        if base_metrics is not None:
            base_metrics["peak_memory_ratio"] = 1.0

    def loss_at(scored: _Scored | None, i: int) -> tuple[float, int] | None:
        return None if scored is None or scored.losses is None else (scored.losses[0][i], scored.losses[1][i])

    samples = [
        SampleRow(
            set="eval",
            prompt=ex.prompt_text,
            reference=ex.answer_text,
            tuned=tuned_answers[i] if tuned_answers else "",
            base=base_answers[i] if base_answers else None,
            scores=(
                {"tuned": _row_scores(tuned_answers[i], ex.answer_text, loss_at(tuned_scored, i), matcher)}
                | (
                    {"base": _row_scores(base_answers[i], ex.answer_text, loss_at(base_scored, i), matcher)}
                    if base_answers
                    else {}
                )
                if tuned_answers
                else {}
            ),
        )
        for i, ex in enumerate(generation_examples)
    ]

    extra: dict[str, dict[str, dict[str, float] | None]] = {}
    # Extra sets: quality metrics only; latency and consistency are properties of the model, not the set.
    extra_requested = [m for m in requested if m not in {"consistency", "peak_memory_ratio"}]
    for name, set_examples in (extra_sets or {}).items():
        subset = list(set_examples)
        if not subset:
            raise ValueError(f"extra eval set {name!r} has no examples")
        t_scored = _score_model(tuned, tokenizer, subset, extra_requested, matcher=matcher, **score_kwargs)
        t_metrics, t_answers = t_scored.metrics, t_scored.answers
        b_metrics: dict[str, float] | None = None
        b_answers: list[str] = []
        if compare_base:
            with _as_base(tuned, base) as base_model:
                b_scored = _score_model(
                    base_model, tokenizer, subset, extra_requested, matcher=matcher, **score_kwargs
                )
            b_metrics, b_answers = b_scored.metrics, b_scored.answers
        extra[name] = {"tuned": t_metrics, "base": b_metrics}
        samples.extend(
            SampleRow(
                set=name,
                prompt=ex.prompt_text,
                reference=ex.answer_text,
                tuned=t_answers[i] if t_answers else "",
                base=b_answers[i] if b_answers else None,
            )
            for i, ex in enumerate(subset[:max_samples])
        )

    return EvalReport(
        tuned=tuned_metrics,
        base=base_metrics,
        samples=samples,
        num_examples=len(examples),
        settings={
            "metrics": requested,
            "max_samples": max_samples,
            "generation_examples": len(generation_examples),
            "max_new_tokens": max_new_tokens,
            "generation_batch_size": int(score_kwargs["generation_batch_size"]),
            "latency_samples": int(score_kwargs["latency_samples"]),
            "significance": {
                "resamples": resamples,
                "confidence": confidence,
                "method": "paired percentile bootstrap",
            },
            "glossary_terms": len(glossary or ()),
            "consistency": {
                "samples": cons_samples,
                "temperature": cons_temperature,
                "prompts": cons_prompts,
            },
            "compare_base": compare_base,
            "seed": seed,
            "device": device,
        },
        extra_sets=extra,
        skipped=skipped,
        memory=memory,
        paired=paired,
    )


@dataclass
class ArtifactEvaluation:
    """A published artifact scored on the eval set, as the tuned model was.

    ``artifact``: ``merged`` or a quantization format; ``path``: its folder inside the version;
    ``metrics``: metric name -> value (what ``<artifact>.<metric>`` gates read); ``skipped``:
    metric -> why it was not computed; ``settings``: examples scored and generation length.
    ``tuned_on_same``: when the artifact answered fewer examples than the tuned model
    (``spec.evaluation.artifactMaxSamples``), the tuned model's answer metrics on those same
    examples, scored from its recorded answers: what ``maxDropVsTuned`` and the model card compare
    with. Empty when the examples are the tuned model's own.
    """

    artifact: str
    path: str
    metrics: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    tuned_on_same: dict[str, float] = field(default_factory=dict)

    def tuned_reference(self, tuned: Mapping[str, float]) -> dict[str, float]:
        """The tuned model's metrics this artifact is compared with: ``tuned`` (its evaluation on
        the whole sample) with the answer metrics re-scored on this artifact's examples."""
        return {**tuned, **self.tuned_on_same}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN/inf become None."""
        data = asdict(self)
        data["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}
        data["tuned_on_same"] = {k: (v if math.isfinite(v) else None) for k, v in self.tuned_on_same.items()}
        if not self.tuned_on_same:
            data.pop("tuned_on_same")
        return data


def evaluate_artifact(
    artifact: str,
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    eval_cfg: Any,
    *,
    path: str,
    seed: int = 0,
    batch_size: int = 8,
    extra_metrics: Mapping[str, float | None] | None = None,
    glossary: Sequence[str] | None = None,
    tuned_answers: Sequence[str] | None = None,
) -> ArtifactEvaluation:
    """Score a loaded artifact on the eval examples exactly as :func:`evaluate_model` scores the
    tuned model: :func:`artifact_metrics` of ``eval_cfg``, eval_loss/perplexity over every example,
    generation metrics and latency (batch 1) on the first ``maxSamples`` — or the first
    ``artifactMaxSamples`` of them when that is set — with the same seed.

    ``extra_metrics``: values measured elsewhere (``peak_memory_ratio`` of the quantization step);
    a None value is recorded as skipped. ``tuned_answers``: the tuned model's greedy answers in
    example order (its samples table); with fewer artifact examples than the tuned model answered,
    its answer metrics on the same examples become ``tuned_on_same``.

    Raises:
        ValueError: no examples, or an unknown metric name.
    """
    if not examples:
        raise ValueError(f"evaluating artifact {artifact} needs at least one eval example")
    requested = artifact_metrics(eval_cfg, artifact)
    score_kwargs = _score_settings(eval_cfg, seed=seed, batch_size=batch_size)
    tuned_examples = min(len(examples), int(score_kwargs["max_samples"]))
    subset = _cfg(eval_cfg, "artifact_max_samples", None)
    if subset is not None:
        score_kwargs["max_samples"] = min(int(score_kwargs["max_samples"]), int(subset))
    generation_examples = min(len(examples), int(score_kwargs["max_samples"]))
    scored = _score_model(
        model,
        tokenizer,
        list(examples),
        requested,
        matcher=TermMatcher(glossary) if glossary else None,
        **score_kwargs,
    )
    metrics = scored.metrics
    skipped: dict[str, str] = dict(scored.skipped)
    if "json_validity" in requested and score_kwargs["json_schema"] is None:
        skipped["json_validity"] = "spec.evaluation.jsonSchema is not set"
    for name, value in (extra_metrics or {}).items():
        if value is None:
            skipped[name] = f"{name} was not measured for {artifact}"
        else:
            metrics[name] = float(value)
    tuned_on_same: dict[str, float] = {}
    settings: dict[str, Any] = {
        "metrics": requested,
        "num_examples": len(examples),
        "generation_examples": generation_examples,
        "max_new_tokens": score_kwargs["max_new_tokens"],
        "seed": seed,
    }
    if generation_examples < tuned_examples and _GENERATION_METRICS & set(requested):
        settings["tuned_generation_examples"] = tuned_examples
        if tuned_answers is not None and len(tuned_answers) >= generation_examples:
            tuned_on_same, _ = answer_metrics(
                list(tuned_answers[:generation_examples]),
                [ex.answer_text for ex in list(examples)[:generation_examples]],
                requested,
                matcher=TermMatcher(glossary) if glossary else None,
                json_schema=score_kwargs["json_schema"],
            )
    return ArtifactEvaluation(
        artifact=artifact,
        path=path,
        metrics=metrics,
        skipped=skipped,
        settings=settings,
        tuned_on_same=tuned_on_same,
    )
