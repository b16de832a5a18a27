"""Templates render exactly the documented text, and only answer tokens carry labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.models import DataSpec
from kubetune_trainer.data import (
    IGNORE_INDEX,
    Message,
    Record,
    TemplateError,
    encode,
    prepare_data,
    render,
    resolve_template,
)


def spec(**data: Any) -> DataSpec:
    return DataSpec.model_validate({"train": {"uri": "file:///data/train.jsonl"}, **data})


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


SINGLE = Record(
    "f.jsonl",
    1,
    "instruction",
    (Message("system", "Be terse."), Message("user", "Add.\n\n2 3"), Message("assistant", "5")),
    instruction="Add.",
    input="2 3",
)
CHAT = Record(
    "f.jsonl",
    2,
    "chat",
    (
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Bye"),
        Message("assistant", "Ciao"),
    ),
)

GOLDEN = {
    ("inst", "single"): "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nAdd.\n\n2 3 [/INST] 5 </s>",
    ("inst", "chat"): "<s>[INST] Hi [/INST] Hello </s><s>[INST] Bye [/INST] Ciao </s>",
    ("chatml", "single"): (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nAdd.\n\n2 3<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    ),
    ("chatml", "chat"): (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n"
    ),
    ("alpaca", "single"): "<s>Be terse.\n\n### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n5</s>",
    ("alpaca", "chat"): (
        "<s>### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nBye\n\n### Response:\nCiao</s>"
    ),
    # The demo tokenizer's own template is ChatML, so it renders identically.
    ("tokenizer", "chat"): (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n"
    ),
}
TRAINED = {
    ("inst", "single"): [" 5 </s>"],
    ("inst", "chat"): [" Hello </s>", " Ciao </s>"],
    ("chatml", "single"): ["5<|im_end|>"],
    ("chatml", "chat"): ["Hello<|im_end|>", "Ciao<|im_end|>"],
    ("alpaca", "single"): ["5</s>"],
    ("alpaca", "chat"): ["Hello</s>", "Ciao</s>"],
    ("tokenizer", "chat"): ["Hello<|im_end|>\n", "Ciao<|im_end|>\n"],
}


def _trained_spans(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = trained
    return [tokenizer.decode(s) for s in spans]


@pytest.mark.parametrize(("template", "which"), list(GOLDEN))
def test_template_text_and_answer_only_labels(tokenizer: Any, template: str, which: str) -> None:
    record = SINGLE if which == "single" else CHAT
    rendered = render(record, template, tokenizer)
    assert rendered.text == GOLDEN[template, which]
    [(ids, labels, answer_at)] = encode([rendered], tokenizer)
    assert tokenizer.decode(ids) == GOLDEN[template, which]
    assert _trained_spans(tokenizer, ids, labels) == TRAINED[template, which]
    # The generation prompt is everything before the final answer.
    assert tokenizer.decode(ids[:answer_at]) == rendered.prompt_text
    assert GOLDEN[template, which].startswith(rendered.prompt_text)


def test_auto_template_and_missing_chat_template(tokenizer: Any) -> None:
    assert resolve_template("auto", tokenizer) == "tokenizer"

    class Plain:
        chat_template = None
        bos_token = "<s>"
        eos_token = "</s>"

    assert resolve_template("auto", Plain()) == "chatml"  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match="no chat template"):
        resolve_template("tokenizer", Plain())  # type: ignore[arg-type]


def test_data_cannot_inject_special_tokens(tokenizer: Any) -> None:
    evil = Record("f", 1, "chat", (Message("user", "x<|im_end|>"), Message("assistant", "ok")))
    [(ids, _, _)] = encode([render(evil, "chatml", tokenizer)], tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 2  # only the two the template wrote


def test_prepare_data_truncates_and_drops_over_long_examples(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        {"prompt": "short", "completion": "answer " * 40},  # prompt fits, answer is cut
        {"prompt": "word " * 60, "completion": "lost"},  # prompt alone is too long: dropped
        {"prompt": "ok", "completion": "fine"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    eval_path = tmp_path / "e.jsonl"
    eval_path.write_text(json.dumps({"prompt": "ok?", "completion": "yes"}) + "\n", encoding="utf-8")
    prepared = prepare_data(
        [path], [eval_path], tokenizer, spec(template="chatml"), max_seq_length=32, seed=0
    )
    report = prepared.report
    assert (report.truncated, report.dropped_too_long) == (1, 1)
    assert [e.line for e in prepared.train] == [1, 3]
    cut = prepared.train[0]
    assert cut.truncated and len(cut.input_ids) == 32 and cut.num_label_tokens > 0
    assert cut.prompt_ids == cut.input_ids[: len(cut.prompt_ids)]
    assert (
        tokenizer.decode(cut.prompt_ids)
        == cut.prompt_text
        == "<|im_start|>user\nshort<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prepared.eval[0].answer_text == "yes"
    d = report.to_dict()
    assert d["truncated"] == 1 and d["droppedTooLong"] == 1 and d["template"] == "chatml"
    assert d["trainExamples"] == 2 and d["evalExamples"] == 1 and d["evalSource"] == "files"
    assert sum(d["tokenLengthHistogram"].values()) == 4 and d["tokenLengthHistogram"][">32"] == 2
    assert d["totalTokens"] == sum(len(e.input_ids) for e in prepared.train + prepared.eval)
