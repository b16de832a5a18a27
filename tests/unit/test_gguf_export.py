"""GGUF export (issue 20 item 1) without llama.cpp: the Ollama Modelfile and its chat template, the
converter's GPT-2 pre-tokenizer fallback rule, the API accepting gguf-* formats and gates on them,
and a gguf-* format refused before any work when llama.cpp or its converter is missing.

The real conversion, quantization and loading are in tests/integration/test_gguf_export.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.loader import parse_finetunejob
from kubetune_api.models import FineTuneJob
from kubetune_trainer.artifacts import gguf_export
from kubetune_trainer.artifacts.gguf_convert import _gpt2_byte_level
from kubetune_trainer.artifacts.gguf_export import ollama_modelfile, ollama_template
from kubetune_trainer.artifacts.quantize import FORMATS, UnsupportedFormatError, check_formats_supported
from kubetune_trainer.demo import build_demo_tokenizer

CHATML_PROBE = (
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_demo_tokenizer(tmp_path_factory.mktemp("tok"))


def test_every_gguf_format_is_a_quantization_format() -> None:
    assert {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m"} <= set(FORMATS)


def test_chatml_modelfile_names_the_file_template_and_every_stop_token() -> None:
    text = ollama_modelfile(
        template=ollama_template("chatml", None), stop_tokens=["</s>", "<|im_end|>"], source="test"
    )
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'PARAMETER stop "</s>"' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # What the model saw in training (data/templates.py _render_chatml): each turn framed by
    # <|im_start|>role\n ... <|im_end|>\n, then the generation prompt.
    assert template == (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )


def test_the_demo_tokenizers_own_chat_template_is_recognised_as_chatml(demo_tokenizer: Any) -> None:
    # data.template auto -> tokenizer for the demo; its Jinja template renders ChatML exactly.
    rendered = demo_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "V"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == CHATML_PROBE
    assert ollama_template("tokenizer", demo_tokenizer) == ollama_template("chatml", None)


def test_an_unknown_chat_template_gets_no_template_and_says_so(demo_tokenizer: Any) -> None:
    other = copy.copy(demo_tokenizer)
    other.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    assert ollama_template("tokenizer", other) is None
    text = ollama_modelfile(template=None, stop_tokens=["</s>"], source="test")
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "FROM ./model.gguf" in text
    assert ollama_template(None, None) is None


@pytest.mark.parametrize("name", ["inst", "alpaca"])
def test_inst_and_alpaca_have_templates(name: str) -> None:
    template = ollama_template(name, None)
    assert template is not None and ("[INST]" in template if name == "inst" else "### Response:" in template)


def test_gpt2_fallback_only_for_a_gpt2_byte_level_bpe(tmp_path: Path, demo_tokenizer: Any) -> None:
    demo_tokenizer.save_pretrained(tmp_path / "demo")
    assert _gpt2_byte_level(tmp_path / "demo")
    spec = json.loads((tmp_path / "demo" / "tokenizer.json").read_text())
    for change in ({"pre_tokenizer": {"type": "Whitespace"}}, {"normalizer": {"type": "NFC"}}):
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "tokenizer.json").write_text(json.dumps({**spec, **change}))
        assert not _gpt2_byte_level(tmp_path / "other")
    assert not _gpt2_byte_level(tmp_path / "missing")


def test_gguf_format_refused_before_work_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_export, "llama_cpp_available", lambda: False)
    with pytest.raises(
        UnsupportedFormatError, match=r"llama-cpp-python 0\.3\.36.*scripts/build-llama-cpp\.sh"
    ):
        check_formats_supported(["int8", "gguf-q8_0"])
    check_formats_supported(["int8", "onnx-int8"])  # the others are unaffected


def test_gguf_format_refused_without_the_converter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gguf_export, "llama_cpp_available", lambda: True)
    monkeypatch.setenv(gguf_export.CONVERTER_ENV, str(tmp_path))
    with pytest.raises(UnsupportedFormatError, match=r"convert_hf_to_gguf\.py"):
        check_formats_supported(["gguf-f16"])


def test_api_accepts_gguf_formats_and_gates_on_them() -> None:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "g"},
        "spec": {
            "model": {"name": "m", "base": {"uri": "s3://bucket/base/"}},
            "data": {"train": {"uri": "s3://bucket/train.jsonl"}, "evalSplit": 0.1},
            "output": {"uri": "s3://bucket/models"},
            "quantization": {"formats": ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]},
            "evaluation": {"gates": {"gguf-q4_k_m.eval_loss": {"max": 5}}},
        },
    }
    job = parse_finetunejob(json.dumps(doc))
    assert isinstance(job, FineTuneJob)
    assert job.spec.quantization.formats == ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
