"""Evaluation metrics against hand-computed values, and evaluate_model end to end on tiny models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.evaluate.evaluator import (
    ModelSource,
    consistency,
    evaluate_model,
    generate,
    json_validity,
    latency_percentiles,
    loss_and_perplexity,
    measure_peak_memory,
    text_metrics,
)

CORPUS = [
    "question: what is the capital of france? answer: paris",
    "question: add two and two. answer: four",
    "the quick brown fox jumps over the lazy dog",
    '{"name": "alice", "age": 42}',
] * 20


def build_tiny_tokenizer(out_dir: Path) -> Any:
    """A byte-level BPE tokenizer trained locally (no downloads), saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, vocab_size: int, *, seed: int = 0) -> Any:
    """A 2-layer, 32-wide Llama with random weights, saved (fp32 safetensors) to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return model


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    prompt_text: str
    answer_text: str


def make_examples(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[Example]:
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt).input_ids
        a = [*tokenizer(answer).input_ids, tokenizer.eos_token_id]
        out.append(Example(p + a, [-100] * len(p) + a, p, prompt, answer))
    return out


PAIRS = [
    ("question: what is the capital of france? answer: ", "paris"),
    ("question: add two and two. answer: ", "four"),
    ("the quick brown ", "fox jumps"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tiny_tokenizer(root / "base")
    base = build_tiny_llama(root / "base", len(tokenizer), seed=0)
    tokenizer.save_pretrained(root / "tuned")
    tuned = build_tiny_llama(root / "tuned", len(tokenizer), seed=1)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "base": base,
        "tuned": tuned,
        "examples": make_examples(tokenizer, PAIRS),
    }


# ---------------------------------------------------------------------------------------- text metrics


def test_text_metrics_hand_computed() -> None:
    preds = ["Paris", " the cat sat ", "Hello, World!", "no"]
    refs = ["Paris", "the cat sat", "hello world", "yes"]
    m = text_metrics(preds, refs)
    assert m["exact_match"] == 0.5  # "Paris", "the cat sat" after strip
    assert m["accuracy"] == 0.75  # + "hello world" after lowercase / punctuation removal
    # ROUGE-L F1 per pair: 1, 1, 1 (rouge tokenizer drops case and punctuation), 0.
    assert m["rouge_l"] == pytest.approx(0.75)


def test_bleu_brevity_penalty_by_hand() -> None:
    # All n-gram precisions are 1; only the brevity penalty exp(1 - 5/4) applies.
    assert text_metrics(["a b c d"], ["a b c d e"])["bleu"] == pytest.approx(100 * math.exp(-0.25), abs=1e-6)
    assert text_metrics(["x y z w"], ["a b c d"])["bleu"] == pytest.approx(0.0)


def test_rouge_l_partial_by_hand() -> None:
    # LCS = 2: precision 2/2, recall 2/4, F1 = 2/3.
    assert text_metrics(["the cat"], ["the cat sat on"])["rouge_l"] == pytest.approx(2 / 3)


def test_text_metrics_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])


def test_json_validity_with_and_without_schema() -> None:
    import jsonschema

    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    outputs = ['{"a": 1}', '{"a": "x"}', "not json", ' {"a": 2} ']
    assert json_validity(outputs, schema) == 0.5
    assert json_validity(outputs, None) == 0.75
    with pytest.raises(jsonschema.exceptions.SchemaError):
        json_validity(outputs, {"type": "no-such-type"})


def test_consistency_hand_computed() -> None:
    assert consistency([["a b", "a b", "a b"]]) == 1.0
    assert consistency([["the cat", "the cat sat on"]]) == pytest.approx(2 / 3)
    # Identical answers with no [a-z0-9] token still count as identical.
    assert consistency([["!!", "!!"]]) == 1.0
    # Three answers: pairs (x,x)=1, (x,y)=2/3, (x,y)=2/3 -> 7/9; averaged with a perfect prompt.
    three = consistency([["the cat", "the cat", "the cat sat on"]])
    assert three == pytest.approx(7 / 9)
    assert consistency([["q", "q"], ["the cat", "the cat", "the cat sat on"]]) == pytest.approx(
        (1 + 7 / 9) / 2
    )
    with pytest.raises(ValueError, match="prompt 0 has 1"):
        consistency([["only one"]])


def test_latency_percentiles_linear() -> None:
    assert latency_percentiles([10, 20, 30, 40, 50]) == {"latency_p50_ms": 30.0, "latency_p95_ms": 48.0}


# ---------------------------------------------------------------------------------------- model metrics


def test_loss_is_token_weighted_over_answer_tokens(tiny: dict[str, Any]) -> None:
    import torch
    import torch.nn.functional as F

    model, examples = tiny["base"], tiny["examples"]
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            for t in range(1, len(ex.input_ids)):
                if ex.labels[t] != -100:
                    total += float(F.cross_entropy(logits[t - 1 : t], torch.tensor([ex.labels[t]])))
                    count += 1
    loss, ppl = loss_and_perplexity(model, examples, batch_size=2)  # padding in the batch of 2
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert loss_and_perplexity(model, examples, batch_size=1)[0] == pytest.approx(loss, rel=1e-5)


def test_loss_without_answer_tokens_is_an_error(tiny: dict[str, Any]) -> None:
    ex = Example([5, 6, 7], [-100, -100, -100], [5, 6, 7], "p", "")
    with pytest.raises(ValueError, match="every label is -100"):
        loss_and_perplexity(tiny["base"], [ex], batch_size=1)


def test_generate_is_deterministic_under_a_seed(tiny: dict[str, Any]) -> None:
    prompts = [ex.prompt_ids for ex in tiny["examples"]]
    greedy = generate(tiny["base"], tiny["tokenizer"], prompts, max_new_tokens=6)
    assert [g.text for g in greedy] == [
        g.text for g in generate(tiny["base"], tiny["tokenizer"], prompts, max_new_tokens=6)
    ]
    assert all(1 <= g.new_tokens <= 6 and g.latency_ms > 0 for g in greedy)
    sampled = [
        generate(tiny["base"], tiny["tokenizer"], prompts, max_new_tokens=6, do_sample=True, seed=7)
        for _ in range(2)
    ]
    assert [g.text for g in sampled[0]] == [g.text for g in sampled[1]]
    other = generate(tiny["base"], tiny["tokenizer"], prompts, max_new_tokens=6, do_sample=True, seed=8)
    assert [g.text for g in other] != [g.text for g in sampled[0]]


class Oracle:
    """A TokenGenerator that answers every prompt with the reference (or a fixed wrong answer)."""

    def __init__(self, tokenizer: Any, answers: dict[tuple[int, ...], str]) -> None:
        self.tokenizer = tokenizer
        self.answers = answers

    def generate_token_ids(self, prompt_ids: Any, **_: Any) -> list[int]:
        return list(self.tokenizer(self.answers[tuple(prompt_ids)]).input_ids)

    def logits(self, input_ids: Any) -> Any:
        raise NotImplementedError


def test_evaluate_model_side_by_side_with_hand_known_answers(tiny: dict[str, Any]) -> None:
    tok, examples = tiny["tokenizer"], tiny["examples"]
    right = Oracle(tok, {tuple(ex.prompt_ids): ex.answer_text for ex in examples})
    wrong = Oracle(tok, {tuple(ex.prompt_ids): "Paris!" if i == 0 else "no" for i, ex in enumerate(examples)})
    cfg = {
        "metrics": ["exact_match", "accuracy", "json_validity", "consistency", "latency_p95_ms"],
        "maxNewTokens": 8,
        "consistency": {"samples": 3, "temperature": 0.7},
        "gates": {"rouge_l": {"min": 0.5}},  # gated but not listed: computed anyway
    }
    report = evaluate_model(right, wrong, tok, examples, cfg)
    assert report.tuned["exact_match"] == 1.0 and report.tuned["accuracy"] == 1.0
    assert report.tuned["rouge_l"] == 1.0 and report.tuned["consistency"] == 1.0
    assert report.base is not None
    assert report.base["exact_match"] == 0.0
    assert report.base["accuracy"] == pytest.approx(1 / 3)  # "Paris!" ~ "paris"
    assert "json_validity" not in report.tuned
    assert report.skipped == {"json_validity": "spec.evaluation.jsonSchema is not set"}
    first = report.samples[0]
    assert (first.prompt, first.base, first.tuned, first.reference) == (
        PAIRS[0][0],
        "Paris!",
        "paris",
        "paris",
    )
    assert report.settings["max_new_tokens"] == 8


def test_evaluate_model_real_models_deterministic_with_extra_set(tiny: dict[str, Any]) -> None:
    tok, examples = tiny["tokenizer"], tiny["examples"]
    cfg = {
        "metrics": ["eval_loss", "perplexity", "exact_match", "bleu", "consistency", "latency_p50_ms"],
        "max_new_tokens": 4,
        "consistency": {"samples": 2, "temperature": 0.7},
        "json_schema": {"type": "object"},
        "gates": {"json_validity": {"min": 0.9}},
    }
    extra = {"held-out": examples[:1]}
    runs = [
        evaluate_model(
            tiny["tuned"], tiny["base"], tok, examples, cfg, extra_sets=extra, consistency_prompts=2
        )
        for _ in range(2)
    ]
    a, b = runs
    assert [s.tuned for s in a.samples] == [s.tuned for s in b.samples]
    assert {k: v for k, v in a.tuned.items() if not k.startswith("latency")} == {
        k: v for k, v in b.tuned.items() if not k.startswith("latency")
    }
    assert a.tuned["eval_loss"] != a.base["eval_loss"]  # type: ignore[index]
    assert a.tuned["eval_loss"] == pytest.approx(loss_and_perplexity(tiny["tuned"], examples)[0])
    assert 0.0 <= a.tuned["json_validity"] <= 1.0
    assert set(a.extra_sets["held-out"]["tuned"] or {}) >= {"eval_loss", "exact_match", "bleu"}
    assert [s.set for s in a.samples] == ["eval"] * 3 + ["held-out"]
    assert a.to_dict()["tuned"]["perplexity"] == pytest.approx(a.tuned["perplexity"])


def test_peft_base_is_the_adapter_disabled(tiny: dict[str, Any]) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(tiny["base"]),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    report = evaluate_model(peft_model, None, tiny["tokenizer"], tiny["examples"], {"metrics": ["eval_loss"]})
    assert report.base is not None
    assert report.base["eval_loss"] == pytest.approx(
        loss_and_perplexity(tiny["base"], tiny["examples"])[0], rel=1e-5
    )
    assert report.tuned["eval_loss"] != pytest.approx(report.base["eval_loss"])


@pytest.mark.slow  # three fresh interpreters importing torch: ~10 s each on a busy 2-core box
def test_peak_memory_measured_in_a_fresh_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    root, examples = tiny["root"], tiny["examples"]
    report = evaluate_model(
        tiny["tuned"],
        tiny["base"],
        tiny["tokenizer"],
        examples,
        {"metrics": ["peak_memory_ratio"], "max_new_tokens": 2},
        tuned_source=ModelSource("transformers", root / "tuned"),
        base_source=ModelSource("transformers", root / "base"),
    )
    base_mem = report.memory["base"]
    assert base_mem["method"] == "process_peak_rss"
    # A high-water mark that includes the interpreter and torch; tiny models add little on top.
    assert base_mem["peak_bytes"] >= base_mem["baseline_bytes"] > 100 * 2**20
    # Same architecture and size: the ratio is close to 1.
    assert 0.8 < report.tuned["peak_memory_ratio"] < 1.25

    with pytest.raises(RuntimeError, match=str(tmp_path / "missing")):
        measure_peak_memory(ModelSource("transformers", tmp_path / "missing"), [[1, 2]], max_new_tokens=1)
