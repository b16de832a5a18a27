"""GGUF artifacts of the merged model for llama.cpp, Ollama and LM Studio (formats ``gguf-*``).

Input: the merged full-precision model directory (safetensors + tokenizer). Output, in
``out_root/<format>/`` (:func:`write_gguf`):

``model.gguf``         written by llama.cpp's own converter (``convert_hf_to_gguf.py``, from the
                       llama-cpp-python 0.3.36 sdist): ``gguf-f16`` directly (``--outtype f16``);
                       ``gguf-q8_0`` and ``gguf-q4_k_m`` converted to f32 first, then quantized by
                       llama.cpp's ``llama_model_quantize``. llama.cpp keeps norms in f32 and falls
                       back to another type for tensors whose rows k-quants cannot hold (rows not a
                       multiple of 256, as in the tiny demo model): ``kubetune-gguf.json`` lists the
                       tensor types actually written.
``Modelfile``          for Ollama: ``FROM ./model.gguf``, the chat template the model was trained with
                       as an Ollama ``TEMPLATE``, and one ``PARAMETER stop`` per stop token.
``kubetune-gguf.json`` format, llama.cpp version, tensor types, the GGUF's pre-tokenizer (and whether
                       the converter needed kubetune's GPT-2 fallback, see ``gguf_convert.py``), stop
                       tokens, and whether llama.cpp tokenizes sample texts as the Hugging Face
                       tokenizer does.

The converter and the quantizer run in a subprocess (``gguf_convert.py``). Where llama-cpp-python or
the converter is missing, :func:`gguf_unavailable_reason` says so, and the quantize stage refuses the
format before training (``UnsupportedFormatError``).

Raises :class:`GgufExportError` when the converter or quantizer fails (with the tail of its output).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import AutoTokenizer, GenerationConfig

from kubetune_trainer.evaluate.evaluator import stop_token_ids
from kubetune_trainer.evaluate.gguf_runner import GGUF_FILE, GgufCausalLM, llama_cpp_available

__all__ = [
    "GGUF_FORMATS",
    "LLAMA_CPP_PYTHON_VERSION",
    "GgufExportError",
    "converter_dir",
    "gguf_unavailable_reason",
    "ollama_modelfile",
    "ollama_template",
    "write_gguf",
]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python release whose llama.cpp (library, converter, gguf-py) kubetune uses."""

# format -> (converter --outtype, llama_ftype to quantize to or None); ftype values from llama.h.
GGUF_FORMATS: dict[str, tuple[str, int | None]] = {
    "gguf-f16": ("f16", None),
    "gguf-q8_0": ("f32", 7),  # LLAMA_FTYPE_MOSTLY_Q8_0
    "gguf-q4_k_m": ("f32", 15),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
}

CONVERTER_ENV = "KUBETUNE_LLAMA_CPP_CONVERTER"
_DRIVER = Path(__file__).with_name("gguf_convert.py")


class GgufExportError(RuntimeError):
    """llama.cpp's converter or quantizer failed; the message carries the end of its output."""


def converter_dir() -> Path:
    """Where llama.cpp's converter is: ``$KUBETUNE_LLAMA_CPP_CONVERTER``, else what
    ``scripts/build-llama-cpp.sh`` installs beside the environment
    (``<sys.prefix>/share/kubetune/llama-cpp-converter``)."""
    configured = os.environ.get(CONVERTER_ENV)
    if configured:
        return Path(configured)
    return Path(sys.prefix) / "share" / "kubetune" / "llama-cpp-converter"


def gguf_unavailable_reason() -> str | None:
    """Why ``gguf-*`` formats cannot be written here, or None when they can."""
    fix = (
        "build it once with scripts/build-llama-cpp.sh (make setup does), or remove the gguf-* "
        "entries from spec.quantization.formats"
    )
    if not llama_cpp_available():
        return f"gguf-* formats need llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (llama.cpp), which is not installed: {fix}"
    conv = converter_dir()
    if not (conv / "convert_hf_to_gguf.py").is_file() or not (conv / "gguf-py").is_dir():
        return f"gguf-* formats need llama.cpp's converter (convert_hf_to_gguf.py + gguf-py) at {conv}, which is missing: {fix}"
    return None


# --------------------------------------------------------------------------------------------------
# Ollama Modelfile

# Ollama's Go templates for kubetune's prompt templates (data/templates.py), rendering what the model
# saw in training: the same markup around each turn, the generation prompt at the end.
_OLLAMA_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "inst": (
        '{{- $system := "" }}{{- range $i, $m := .Messages }}'
        '{{- if eq $m.Role "system" }}{{ $system = $m.Content }}'
        '{{- else if eq $m.Role "user" }}{{ $.BOS }}[INST] '
        '{{- if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ $system = "" }}{{ end }}'
        "{{ $m.Content }} [/INST]"
        "{{- else }} {{ $m.Content }} {{ $.EOS }}{{ end }}{{- end }}"
    ),
    "alpaca": (
        "{{- if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n"
    ),
}

# A chat used to recognise which of the above a tokenizer's own chat template is.
_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "V"},
]


def _chatml_rendering(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
        "<|im_start|>assistant\n"
    )


def ollama_template(template: str | None, tokenizer: Any) -> str | None:
    """The Ollama ``TEMPLATE`` for a resolved ``data.template`` (``chatml``, ``inst``, ``alpaca``, or
    ``tokenizer``), or None when there is none to give.

    ``tokenizer`` (the model's own chat template): recognised as ChatML when it renders a probe chat
    exactly as ChatML does; otherwise None (Ollama then falls back to the chat template embedded in
    the GGUF file, ``tokenizer.chat_template``).
    """
    if template in _OLLAMA_TEMPLATES:
        return _OLLAMA_TEMPLATES[template]
    if template == "tokenizer" and getattr(tokenizer, "chat_template", None):
        try:
            rendered = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that rejects the probe (e.g. no system role) is just not ChatML
            return None
        if rendered == _chatml_rendering(_PROBE):
            return _OLLAMA_TEMPLATES["chatml"]
    return None


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def ollama_modelfile(*, template: str | None, stop_tokens: list[str], source: str) -> str:
    """An Ollama Modelfile for ``./model.gguf``: the template (when known) and one stop per token.

    ``source`` is a one-line note of where the file came from, written as a comment.
    """
    lines = [
        f"# Ollama Modelfile: {source}",
        "# Use: ollama create <name> -f Modelfile   (in this directory)",
        f"FROM ./{GGUF_FILE}",
    ]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append(
            "# No TEMPLATE: the chat template is not one kubetune can translate; Ollama uses the GGUF's own."
        )
    lines += [f"PARAMETER stop {_quoted(token)}" for token in stop_tokens]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Writing


def _tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (llama.cpp's gguf-py reader)."""
    from gguf import GGUFReader  # PyPI gguf, llama.cpp's GGUF library; only needed here

    reader = GGUFReader(str(path))
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _run_driver(args: list[str], fmt: str) -> None:
    env = dict(os.environ)
    # The converter's own gguf-py first (driver sets sys.path), not the environment's gguf.
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(_DRIVER), *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise GgufExportError(
            f"{fmt}: llama.cpp's converter/quantizer failed (exit {proc.returncode}):\n{tail}"
        )


def _parity_texts(tokenizer: Any) -> list[str]:
    """Texts a llama.cpp user sends: a chat in the model's template (when it has one) and plain text."""
    texts = ["Hello world! 3.14 and 'quoted' words, twice:  two spaces\nnew line."]
    if getattr(tokenizer, "chat_template", None):
        # A template that rejects the probe chat: plain text and ChatML only.
        with contextlib.suppress(Exception):
            texts.append(tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True))
    texts.append(_chatml_rendering(_PROBE))
    return texts


def write_gguf(merged_dir: Path, out_dir: Path, fmt: str, *, template: str | None) -> dict[str, Any]:
    """Write ``model.gguf``, ``Modelfile`` and ``kubetune-gguf.json`` for one ``gguf-*`` format.

    ``template`` is the run's resolved ``data.template`` (``chatml``, ``inst``, ``alpaca`` or
    ``tokenizer``; None when unknown), from which the Modelfile's TEMPLATE is made. Returns what
    ``kubetune-gguf.json`` holds.

    Raises:
        KeyError: ``fmt`` is not a gguf format.
        GgufExportError: conversion or quantization failed.
    """
    outtype, ftype = GGUF_FORMATS[fmt]
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / GGUF_FILE
    driver_report = out_dir / ".gguf-convert.json"
    args = [str(converter_dir()), str(merged_dir), str(model_path), "--outtype", outtype]
    args += ["--report", str(driver_report)]
    if ftype is not None:
        args += ["--ftype", str(ftype)]
    _run_driver(args, fmt)
    converted = json.loads(driver_report.read_text(encoding="utf-8"))
    driver_report.unlink()

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    generation = SimpleNamespace(generation_config=_generation_config(merged_dir))
    stop_tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(stop_token_ids(generation, tokenizer))]
    ollama = ollama_template(template, tokenizer)
    (out_dir / "Modelfile").write_text(
        ollama_modelfile(
            template=ollama, stop_tokens=stop_tokens, source=f"kubetune {fmt} of {merged_dir.name}/"
        ),
        encoding="utf-8",
    )

    runner = GgufCausalLM(out_dir)
    metadata = runner.metadata()
    texts = _parity_texts(tokenizer)
    identical = sum(
        runner.tokenize(t) == list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts
    )
    del runner
    info: dict[str, Any] = {
        "format": fmt,
        "file": GGUF_FILE,
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "written_by": f"convert_hf_to_gguf.py --outtype {outtype}"
        + ("" if ftype is None else f", then llama_model_quantize (llama_ftype {ftype})"),
        "general.file_type": metadata.get("general.file_type"),
        "tensor_types": _tensor_types(model_path),
        "tokenizer.ggml.model": metadata.get("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": metadata.get("tokenizer.ggml.pre"),
        "pre_tokenizer_fallback": converted.get("pre_tokenizer_fallback"),
        "stop_tokens": stop_tokens,
        "data_template": template,
        "modelfile_template": ollama is not None,
        "tokenizer_parity": {
            "texts": len(texts),
            "identical": identical,
            "method": "llama.cpp tokenize(special=True, add_bos=False) vs the Hugging Face tokenizer "
            "(add_special_tokens=False); evaluation feeds the Hugging Face token ids to llama.cpp",
        },
    }
    (out_dir / "kubetune-gguf.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _generation_config(model_dir: Path) -> Any:
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's EOS and end-of-turn tokens only
        return None
