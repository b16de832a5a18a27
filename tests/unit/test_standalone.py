"""A version stands alone: no scratch paths, no boilerplate READMEs (issue 17, item 8)."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_trainer.artifacts.standalone import BASE_RECORD, make_standalone


def test_scratch_base_path_is_replaced_and_boilerplate_readmes_are_dropped(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "quantized" / "int8").mkdir(parents=True)
    (staging / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/tmp/work/inputs/base", "r": 16, "peft_type": "LORA"})
    )
    (staging / "adapter" / "README.md").write_text("## Model Details\n[More Information Needed]\n" * 39)
    (staging / "quantized" / "int8" / "README.md").write_text("This model has been pushed to the Hub")
    (staging / "README.md").write_text("# the model card")

    changed = make_standalone(staging, base_uri="s3://bucket/base-models/llama", base_digest="sha256:abc")

    config = json.loads((staging / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "s3://bucket/base-models/llama"
    assert config["r"] == 16  # the rest untouched
    assert json.loads((staging / "adapter" / BASE_RECORD).read_text()) == {
        "uri": "s3://bucket/base-models/llama",
        "digest": "sha256:abc",
    }
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("README.md")) == ["README.md"]
    assert "adapter/README.md" in changed and "quantized/int8/README.md" in changed
    assert "/tmp/" not in "".join(p.read_text() for p in staging.rglob("*.json"))


def test_every_tokenizer_folder_gets_the_training_chat_template_and_its_stop_ids(tmp_path: Path) -> None:
    """A base tokenizer without a chat template, trained with data.template chatml: the version's
    tokenizer renders exactly the prompt training rendered, and generation stops on <|im_end|>."""
    from transformers import AutoTokenizer, GenerationConfig

    from kubetune_trainer.data.records import Message, Record
    from kubetune_trainer.data.templates import render
    from kubetune_trainer.demo import build_demo_tokenizer

    staging = tmp_path / "staging"
    for folder in ("adapter", "merged"):
        build_demo_tokenizer(staging / folder)
        (staging / folder / "chat_template.jinja").unlink()  # a base tokenizer without a template
    (staging / "merged" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 2, "bos_token_id": 1})
    )

    changed = make_standalone(staging, base_uri="s3://b/base", base_digest=None, template="chatml")

    assert {"adapter/chat_template.jinja", "merged/generation_config.json"} <= set(changed)
    record = Record(
        file="train.jsonl",
        line=1,
        form="chat",
        messages=(Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!")),
    )
    for folder in ("adapter", "merged"):
        tokenizer = AutoTokenizer.from_pretrained(staging / folder)
        rendered = render(record, "chatml", tokenizer)
        convo = [{"role": m.role, "content": m.content} for m in record.messages]
        prompt = tokenizer.apply_chat_template(convo[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt == rendered.prompt_text
        assert tokenizer.apply_chat_template(convo, tokenize=False) == rendered.text
        stops = GenerationConfig.from_pretrained(staging / folder).eos_token_id
        assert set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    merged = json.loads((staging / "merged" / "generation_config.json").read_text())
    assert merged["bos_token_id"] == 1 and merged["eos_token_id"][0] == 2  # the rest kept

    # Run again (publishing is at-least-once): nothing left to change.
    assert make_standalone(staging, base_uri="s3://b/base", base_digest=None, template="chatml") == []
