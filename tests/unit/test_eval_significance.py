"""Base vs tuned, honestly: the evaluator's paired intervals, terminology coverage, per-example
scores in the samples table, ``significant: true`` gates, batched greedy answers, and the spec
rules that guard them (their rejections, in Python and CEL, are in test_recipes_parts.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.models import FineTuneJob
from kubetune_trainer.evaluate.evaluator import evaluate_model, per_example_losses
from kubetune_trainer.evaluate.gates import check_gates
from kubetune_trainer.evaluate.significance import loss_sums, paired_bootstrap
from tests.support.crd_schema import validate
from tests.unit.test_evaluate import Oracle, build_tiny_llama, build_tiny_tokenizer, make_examples
from tests.unit.test_recipes_parts import _job as recipe_job

QUESTIONS = [
    ("Who issues a bygglov? ", "The building committee issues the bygglov under PBL."),
    ("What does BBR regulate? ", "BBR regulates fire safety and accessibility."),
    ("Do I need a permit for a fence? ", "A fence over one metre may need a bygglov."),
    ("Who checks the kontrollplan? ", "The byggnadsnämnd approves the kontrollplan."),
    ("What is a startbesked? ", "A startbesked lets building work begin."),
    ("Can I build an attefall house? ", "An attefallshus needs an anmälan, not a bygglov."),
    ("Who is the kontrollansvarig? ", "The kontrollansvarig follows the kontrollplan on site."),
    ("What does Boverket do? ", "Boverket writes BBR and guidance on PBL."),
    ("When is a slutbesked given? ", "A slutbesked is given when the kontrollplan is met."),
    ("What is the weather like? ", "It is often rainy."),
]
GLOSSARY = [
    "bygglov",
    "pbl",
    "bbr",
    "byggnadsnämnd",
    "kontrollplan",
    "startbesked",
    "attefallshus",
    "anmälan",
    "kontrollansvarig",
    "boverket",
    "slutbesked",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny-sig")
    tokenizer = build_tiny_tokenizer(root / "base")
    base = build_tiny_llama(root / "base", len(tokenizer), seed=0)
    tuned = build_tiny_llama(root / "tuned", len(tokenizer), seed=1)
    return {
        "tokenizer": tokenizer,
        "base": base,
        "tuned": tuned,
        "examples": make_examples(tokenizer, QUESTIONS),
    }


def _oracles(tiny: dict[str, Any]) -> tuple[Oracle, Oracle]:
    tok, examples = tiny["tokenizer"], tiny["examples"]
    right = Oracle(tok, {tuple(ex.prompt_ids): ex.answer_text for ex in examples})
    # The base answers every question with the same vague sentence (no domain term).
    vague = Oracle(tok, {tuple(ex.prompt_ids): "You should ask someone about it." for ex in examples})
    return right, vague


def test_paired_intervals_terminology_and_per_example_scores(tiny: dict[str, Any]) -> None:
    right, vague = _oracles(tiny)
    cfg = {
        "metrics": ["exact_match", "rouge_l", "bleu", "terminology_coverage", "latency_p50_ms"],
        "significance": {"resamples": 500, "confidence": 0.9},
        "gates": {
            "rouge_l": {"significant": True},
            "terminology_coverage": {"min": 0.5, "significant": True},
        },
    }
    report = evaluate_model(right, vague, tiny["tokenizer"], tiny["examples"], cfg, glossary=GLOSSARY)
    # Nine of ten references name a glossary term; the right answers cover all of them, the vague none.
    assert report.tuned["terminology_coverage"] == 1.0 and report.base is not None
    assert report.base["terminology_coverage"] == 0.0
    assert set(report.paired) == {"exact_match", "rouge_l", "bleu", "terminology_coverage"}
    cov = report.paired["terminology_coverage"]
    assert (cov["n"], cov["difference"], cov["ci_low"], cov["ci_high"]) == (9, 1.0, 1.0, 1.0)
    assert cov["improved"] and cov["confidence"] == 0.9 and cov["resamples"] == 500
    assert report.paired["rouge_l"]["n"] == 10 and report.paired["rouge_l"]["improved"]
    assert report.paired["rouge_l"]["tuned"] == pytest.approx(report.tuned["rouge_l"])
    assert report.settings["significance"]["resamples"] == 500 and report.settings["glossary_terms"] == 11
    # Latency: batch 1 on latencySamples prompts (16 by default, here all 10).
    assert report.settings["latency_samples"] == 16 and "latency_p50_ms" in report.tuned
    # The samples table carries each example's own scores for both models.
    first, last = report.samples[0].to_dict(), report.samples[-1].to_dict()
    assert first["scores"]["tuned"] == {"rouge_l": 1.0, "terminology_coverage": 1.0}
    assert first["scores"]["base"]["terminology_coverage"] == 0.0
    assert last["scores"]["tuned"]["terminology_coverage"] is None  # no term in "It is often rainy."
    assert json.loads(json.dumps(report.to_dict()))["paired"]["rouge_l"]["significant"] is True

    gates = check_gates(report.gate_metrics(), cfg["gates"], paired=report.paired)
    assert gates.passed, gates.summary()
    assert gates.results[0].message.startswith("rouge_l improved on the base by +")
    assert "terminology_coverage = 1 meets >= 0.5; terminology_coverage improved" in gates.results[1].message


def test_a_gain_that_is_noise_fails_a_significant_gate(tiny: dict[str, Any]) -> None:
    right, _ = _oracles(tiny)
    cfg = {"metrics": ["rouge_l"], "gates": {"rouge_l": {"significant": True}}}
    report = evaluate_model(right, right, tiny["tokenizer"], tiny["examples"], cfg)
    d = report.paired["rouge_l"]
    assert (d["difference"], d["ci_low"], d["ci_high"], d["significant"]) == (0.0, 0.0, 0.0, False)
    gates = check_gates(report.gate_metrics(), cfg["gates"], paired=report.paired)
    assert not gates.passed
    assert (
        "rouge_l difference from the base +0 is not significant (95% CI [+0, +0] includes 0)"
        in gates.summary()
    )
    # No base comparison: no interval, and the gate says why instead of passing.
    alone = evaluate_model(right, None, tiny["tokenizer"], tiny["examples"], cfg)
    assert alone.paired == {}
    failed = check_gates(alone.gate_metrics(), cfg["gates"], paired=alone.paired)
    assert not failed.passed and "no paired confidence interval" in failed.summary()


def test_without_a_glossary_terminology_is_skipped_and_its_gate_fails(tiny: dict[str, Any]) -> None:
    right, vague = _oracles(tiny)
    cfg = {"metrics": ["terminology_coverage"], "gates": {"terminology_coverage": {"min": 0.1}}}
    report = evaluate_model(right, vague, tiny["tokenizer"], tiny["examples"], cfg)
    assert report.skipped == {"terminology_coverage": "spec.evaluation.glossary is not set"}
    gates = check_gates(report.gate_metrics(), cfg["gates"], not_computed=report.skipped)
    assert not gates.passed and "spec.evaluation.glossary is not set" in gates.summary()


def test_eval_loss_interval_from_per_example_losses_of_real_models(tiny: dict[str, Any]) -> None:
    examples = tiny["examples"]
    cfg = {"metrics": ["eval_loss", "perplexity", "rouge_l"], "maxNewTokens": 4}
    report = evaluate_model(tiny["tuned"], tiny["base"], tiny["tokenizer"], examples, cfg)
    losses_t = per_example_losses(tiny["tuned"], examples, batch_size=3)
    losses_b = per_example_losses(tiny["base"], examples, batch_size=7)
    expected = paired_bootstrap("eval_loss", loss_sums(*losses_b), loss_sums(*losses_t), seed=0)
    got = report.paired["eval_loss"]
    assert got["difference"] == pytest.approx(expected.difference, rel=1e-5)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high), rel=1e-5)
    assert got["tuned"] == pytest.approx(report.tuned["eval_loss"])
    assert report.paired["perplexity"]["base"] == pytest.approx(report.base["perplexity"])  # type: ignore[index]
    row = report.samples[2].scores["tuned"]
    assert row["eval_loss"] == pytest.approx(losses_t[0][2] / losses_t[1][2], rel=1e-5)


def test_batched_greedy_answers_equal_one_at_a_time(tiny: dict[str, Any]) -> None:
    cfg = {"metrics": ["rouge_l", "latency_p50_ms"], "maxNewTokens": 6, "latencySamples": 3}
    one = evaluate_model(
        tiny["tuned"], None, tiny["tokenizer"], tiny["examples"], {**cfg, "generationBatchSize": 1}
    )
    batched = evaluate_model(
        tiny["tuned"], None, tiny["tokenizer"], tiny["examples"], {**cfg, "generationBatchSize": 4}
    )
    assert [s.tuned for s in batched.samples] == [s.tuned for s in one.samples]
    assert any(s.tuned for s in one.samples)  # the random model does say something
    assert batched.settings["generation_batch_size"] == 4 and batched.settings["latency_samples"] == 3


# --- the spec (its rejections are RULE_CASES in tests/unit/test_recipes_parts.py) ----------------


def _job(evaluation: dict[str, Any]) -> dict[str, Any]:
    return recipe_job(evaluation=evaluation)


def test_a_significance_only_gate_and_a_glossary_are_accepted() -> None:
    job = _job(
        {
            "metrics": ["eval_loss", "rouge_l", "terminology_coverage"],
            "glossary": {"uri": "s3://bucket/glossary.txt"},
            "significance": {"resamples": 1000},
            "gates": {"eval_loss": {"significant": True}, "rouge_l": {"min": 0.1, "significant": True}},
        }
    )
    spec = FineTuneJob.model_validate(job).spec
    assert spec.evaluation.gates["eval_loss"].significant and spec.evaluation.significance.confidence == 0.95
    assert validate(job) == []


def test_the_glossary_content_is_an_input_and_its_uri_is_not(tmp_path: Path) -> None:
    from kubetune_api.runconfig import resolve_run_config
    from kubetune_trainer.fetch.inputs import DataInputs, with_term_dictionaries

    def digest_record(uri: str, text: str) -> tuple[dict[str, Any], str]:
        path = tmp_path / f"g{abs(hash((uri, text)))}.txt"
        path.write_text(text, encoding="utf-8")
        job = _job({"metrics": ["terminology_coverage"], "glossary": {"uri": uri}})
        rc = resolve_run_config(FineTuneJob.model_validate(job))
        data = DataInputs(train_files=[], eval_files=None, extra_files={}, display_names={}, parent=None)
        data.glossary = path
        record = with_term_dictionaries(rc, data, {"data": {}})
        return record["data"]["evaluationGlossary"], rc.config_digest()

    a, config_a = digest_record("s3://bucket/glossary.txt", "bygglov\n")
    b, config_b = digest_record("s3://other/place.txt", "bygglov\n")
    c, _ = digest_record("s3://bucket/glossary.txt", "bygglov\nbbr\n")
    assert list(a.values()) == list(b.values()) != list(c.values())
    assert config_a == config_b  # a moved glossary with the same terms is the same job
