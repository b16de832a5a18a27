"""The DEMO builders: tokenizer reload, tiny model, toy task, quickstart layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer import demo
from tests.fixtures.models import TaskFiles


def test_demo_tokenizer_reloads_with_its_special_tokens(demo_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len(tok) <= 512
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    # The toy words are single tokens, and any text round-trips (byte-level).
    assert len(tok("red cat zar", add_special_tokens=False)["input_ids"]) == 3
    text = "Ünïcode — 数据 ok"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_llama_loads_from_safetensors_and_says_it_is_a_demo(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert "DEMO MODEL, NOT A REAL LLM" in (tiny_model_dir / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    out = model(input_ids=torch.tensor([tok("red cat", add_special_tokens=False)["input_ids"]]))
    assert out.logits.shape[-1] == len(tok)


def test_synthetic_records_are_deterministic_and_correct() -> None:
    a = demo.synthetic_records(50, seed=3)
    assert a == demo.synthetic_records(50, seed=3)
    assert a != demo.synthetic_records(50, seed=4)
    for r in a:
        assert r["output"].split() == [demo.TO_ZORBISH[w] for w in r["input"].split()]
    rev = demo.synthetic_records(5, seed=0, task="reverse")
    assert all(r["output"].split() == r["input"].split()[::-1] for r in rev)
    with pytest.raises(ValueError, match="unknown demo task"):
        demo.synthetic_records(1, seed=0, task="poetry")


def test_task_jsonl_fixture_feeds_the_data_layer(task_jsonl: TaskFiles, demo_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from kubetune_api.models import DataSpec
    from kubetune_trainer.data import prepare_data

    files = task_jsonl
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    prepared = prepare_data(
        [files.train],
        [files.eval],
        tok,
        DataSpec.model_validate({"train": {"uri": "file:///x.jsonl"}}),
        max_seq_length=64,
        seed=0,
    )
    assert prepared.report.ok and prepared.report.template == "tokenizer"
    assert prepared.report.eval_examples == len(prepared.eval) > 0


def test_prepare_quickstart_is_idempotent(tmp_path: Path) -> None:
    uris = demo.prepare_quickstart(tmp_path, seconds_budget=1)
    assert uris == {
        "base_model": "s3://kubetune-demo/base-models/tiny-llama-demo/",
        "train": "s3://kubetune-demo/datasets/quickstart/train.jsonl",
        "eval": "s3://kubetune-demo/datasets/quickstart/eval.jsonl",
    }
    bucket = tmp_path / "kubetune-demo"
    model = bucket / "base-models" / "tiny-llama-demo"
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    assert "DEMO" in (model / "README.md").read_text()
    assert json.loads((model / "demo-training.json").read_text())["demo"] is True
    train = (bucket / "datasets" / "quickstart" / "train.jsonl").read_text().splitlines()
    evals = (bucket / "datasets" / "quickstart" / "eval.jsonl").read_text().splitlines()
    assert len(train) == 800 and 0 < len(evals) <= 100
    assert not {json.loads(x)["input"] for x in evals} & {json.loads(x)["input"] for x in train}
    assert not any(p.name.startswith(".demo-base-") for p in bucket.iterdir())  # staging cleaned up
    before = (model / "model.safetensors").stat().st_mtime_ns
    assert demo.prepare_quickstart(tmp_path) == uris
    assert (model / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_lora_on_the_demo_base_clearly_lowers_eval_loss(demo_base_dir: Path, task_jsonl: TaskFiles) -> None:
    """The demo's promise: a short LoRA fine-tune beats the base on held-out toy data by >= 20%."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_api.models import DataSpec
    from kubetune_trainer.data import iter_batches, model_inputs, prepare_data

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(demo_base_dir)
    files = task_jsonl
    prepared = prepare_data(
        [files.train],
        [files.eval],
        tok,
        DataSpec.model_validate({"train": {"uri": "file:///x.jsonl"}}),
        max_seq_length=64,
        seed=0,
    )
    model: Any = AutoModelForCausalLM.from_pretrained(demo_base_dir, dtype=torch.float32)

    def eval_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b in iter_batches(
                prepared.eval,
                batch_size=64,
                max_seq_length=64,
                packing=False,
                pad_token_id=0,
                seed=0,
                epoch=0,
            ):
                n = int(b["num_label_tokens"])
                total += float(model(**model_inputs(b)).loss) * n
                count += n
        return total / count

    base = eval_loss()
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    steps = 0
    for epoch in range(10):
        for b in iter_batches(
            prepared.train,
            batch_size=8,
            max_seq_length=64,
            packing=False,
            pad_token_id=0,
            seed=0,
            epoch=epoch,
        ):
            model(**model_inputs(b)).loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            if steps == 100:
                break
        if steps == 100:
            break
    tuned = eval_loss()
    assert tuned <= 0.8 * base, (base, tuned)
