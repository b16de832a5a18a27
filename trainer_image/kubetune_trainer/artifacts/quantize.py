"""Quantized artifacts of the merged model, each reloaded from disk and smoke-tested.

Formats (``spec.quantization.formats``), written to ``out_root/<format>/``:

``int8``       optimum-quanto int8 weights (``QuantizedModelForCausalLM``; ``lm_head`` kept full
               precision). Load with ``QuantizedModelForCausalLM.from_pretrained(dir)``. CPU or GPU.
``int4``       optimum-quanto int4 weights, same layout. The first use compiles a C++ extension
               (~30-50 s on a small CPU box), later loads reuse torch's extension cache.
``onnx-int8``  ``model.onnx``: the merged model exported with ``torch.onnx.export(dynamo=True)``
               (inputs ``input_ids``, ``attention_mask``; output ``logits``; no KV cache, so each
               generated token recomputes the whole sequence), then onnxruntime's dynamic int8
               quantization of the weights. For CPU serving with onnxruntime.
``nf4``        bitsandbytes 4-bit NF4 (double quantization, bf16 compute) saved with
               ``save_pretrained``; needs a CUDA GPU and the bitsandbytes package.
``gguf-f16``, ``gguf-q8_0``, ``gguf-q4_k_m``
               ``model.gguf`` for llama.cpp / Ollama / LM Studio, written by llama.cpp's own
               converter and quantizer, with an Ollama ``Modelfile`` beside it
               (:mod:`kubetune_trainer.artifacts.gguf_export`); needs llama-cpp-python, built by
               ``scripts/build-llama-cpp.sh``.

Every artifact directory also holds the tokenizer, so it is self-contained. After writing, each
artifact is loaded again from disk and must generate on the sample prompts with finite logits; its
size, logit drift against the full-precision merged model, smoke-test latency and (optionally) peak
memory go into an :class:`ArtifactReport`. Its quality on the eval set, which gates read, is measured
afterwards by the artifacts stage (:func:`kubetune_trainer.evaluate.evaluator.evaluate_artifact`).

All formats are checked against the hardware before any work starts: a format that cannot run here
raises :class:`UnsupportedFormatError` with a message saying what to change.

Artifacts are loaded and measured with :mod:`kubetune_trainer.evaluate.loading` (the ONNX runner,
:class:`~kubetune_trainer.evaluate.loading.OnnxCausalLM`, lives there): this module imports
evaluation, never the other way round.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from kubetune_trainer.artifacts.gguf_export import GGUF_FORMATS, gguf_unavailable_reason, write_gguf
from kubetune_trainer.evaluate.evaluator import generate, latency_percentiles, stop_token_ids
from kubetune_trainer.evaluate.loading import (
    ModelSource,
    SourceKind,
    TokenGenerator,
    load_model,
    measure_peak_memory,
)

__all__ = [
    "FORMATS",
    "ArtifactReport",
    "ArtifactSmokeTestError",
    "UnsupportedFormatError",
    "check_formats_supported",
    "quantize_artifacts",
    "source_kind",
]

FORMATS: tuple[str, ...] = ("int8", "int4", "onnx-int8", "nf4", *GGUF_FORMATS)
_SOURCE_KIND: dict[str, SourceKind] = {"int8": "quanto", "int4": "quanto", "onnx-int8": "onnx", "nf4": "bnb"}
_SOURCE_KIND.update(dict.fromkeys(GGUF_FORMATS, "gguf"))  # gguf-*: artifacts/gguf_export.py
# Above this the fp32 ONNX graph must keep its weights in external data (protobuf's 2 GiB limit).
_ONNX_EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024


def source_kind(fmt: str) -> SourceKind:
    """How :func:`~kubetune_trainer.evaluate.loading.load_model` loads a format's directory.

    Raises:
        UnsupportedFormatError: an unknown format.
    """
    if fmt not in _SOURCE_KIND:
        raise UnsupportedFormatError(f"unknown quantization format {fmt!r}; supported: {', '.join(FORMATS)}")
    return _SOURCE_KIND[fmt]


class UnsupportedFormatError(ValueError):
    """A requested quantization format is unknown or cannot run on this node; the message says why."""


class ArtifactSmokeTestError(RuntimeError):
    """A quantized artifact reloaded from disk did not produce finite logits or any token."""


@dataclass(frozen=True)
class ArtifactReport:
    """What a user needs to choose an artifact: size, fidelity, speed, memory, and proof it ran.

    ``size_ratio`` is the artifact directory's size / the merged full-precision directory's.
    ``logit_drift_*`` compare the artifact's logits with the merged model's on the sample prompts
    (all positions, all vocabulary entries). Latency is per greedy ``generate`` call (batch 1) of
    the smoke test (a few sample prompts, ``max_new_tokens`` 16); the artifact's latency on the eval
    set, which ``<format>.latency_p95_ms`` gates read, is in its ``ArtifactEvaluation``.
    ``peak_memory_ratio`` is against the merged full-precision model (same architecture and size as
    the base) measured the same way; None when memory was not measured.
    """

    format: str
    path: str
    files: list[str]
    size_bytes: int
    reference_size_bytes: int
    size_ratio: float
    logit_drift_max_abs: float
    logit_drift_mean_abs: float
    latency_p50_ms: float
    latency_p95_ms: float
    new_tokens: int
    smoke_text: str
    device: str
    peak_memory_bytes: int | None = None
    peak_memory_ratio: float | None = None
    memory_method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return asdict(self)


def check_formats_supported(formats: Sequence[str], *, device: str = "cpu") -> None:
    """Fail fast, before any export, if a format is unknown or cannot run on this node.

    Raises:
        UnsupportedFormatError: with a message naming the format and what to change.
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise UnsupportedFormatError(
                f"unknown quantization format {fmt!r} in spec.quantization.formats; supported: {', '.join(FORMATS)}"
            )
        if fmt == "nf4":
            if not (device.startswith("cuda") and torch.cuda.is_available()):
                raise UnsupportedFormatError(
                    "nf4 needs a CUDA GPU (bitsandbytes); this node has none — remove nf4 from "
                    "spec.quantization.formats or run on a GPU node"
                )
            try:  # a probe: the CPU trainer image has no bitsandbytes
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UnsupportedFormatError(
                    "nf4 needs the bitsandbytes package, which this trainer image lacks — use the CUDA "
                    "trainer image or remove nf4 from spec.quantization.formats"
                ) from None
        if fmt in GGUF_FORMATS and (why := gguf_unavailable_reason()) is not None:
            raise UnsupportedFormatError(why)


# --------------------------------------------------------------------------------------------------
# Writers, one per format


def _write_quanto(merged_dir: Path, out_dir: Path, fmt: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    # lm_head stays full precision: it decides every token, and is small next to the blocks.
    qmodel = QuantizedModelForCausalLM.quantize(
        model, weights=qint8 if fmt == "int8" else qint4, exclude="lm_head"
    )
    qmodel.save_pretrained(out_dir)


def _write_onnx_int8(merged_dir: Path, out_dir: Path) -> None:
    # Only onnx-int8 needs onnxruntime's quantizer: 1.9 s and 46 MB to import, measured.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()

    class LogitsOnly(torch.nn.Module):
        """No KV cache in or out: one graph, two inputs, one output — simple to serve and to check."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapper = LogitsOnly(model).eval()
    example = torch.ones((1, 8), dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix=".onnx-fp32.", dir=out_dir.parent) as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapper,
            (example, torch.ones_like(example)),
            str(fp32_path),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            external_data=fp32_bytes > _ONNX_EXTERNAL_DATA_BYTES,
        )
        quantize_dynamic(
            str(fp32_path),
            str(out_dir / "model.onnx"),
            weight_type=QuantType.QInt8,
            use_external_data_format=fp32_bytes // 4 > _ONNX_EXTERNAL_DATA_BYTES,
        )
    # Serving needs to know the contract of the graph, and where an answer ends (a chat model ends
    # it with the template's end-of-turn token, e.g. <|im_end|>, not only EOS): write both next to it.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    stop_ids = stop_token_ids(model, tokenizer)
    (out_dir / "kubetune-onnx.json").write_text(
        json.dumps(
            {
                "inputs": {
                    "input_ids": "int64 [batch, sequence]",
                    "attention_mask": "int64 [batch, sequence]",
                },
                "outputs": {"logits": "float32 [batch, sequence, vocab]"},
                "kv_cache": False,
                "weights": "int8 (onnxruntime quantize_dynamic, QInt8)",
                "stop_token_ids": stop_ids,
                "stop_tokens": tokenizer.convert_ids_to_tokens(stop_ids),
            },
            indent=2,
        )
        + "\n"
    )
    model.config.save_pretrained(out_dir)


def _write_nf4(merged_dir: Path, out_dir: Path, device: str) -> None:
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, quantization_config=config, device_map={"": device}
    )
    model.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------------
# Measurements


def _dir_size(directory: Path) -> tuple[int, list[str]]:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files), [str(p.relative_to(directory)) for p in files]


def _logits(model: Any, input_ids: Sequence[int]) -> np.ndarray:
    """[seq, vocab] float32 logits of one sequence from a torch model or a :class:`TokenGenerator`."""
    if isinstance(model, TokenGenerator):  # ONNX or GGUF
        return np.asarray(model.logits(input_ids), dtype=np.float32)
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    with torch.no_grad():
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
        return model(input_ids=ids).logits[0].float().cpu().numpy()


def quantize_artifacts(
    merged_dir: Path,
    formats: Sequence[str],
    out_root: Path,
    *,
    sample_prompt_ids: Sequence[Sequence[int]],
    device: str = "cpu",
    max_new_tokens: int = 16,
    measure_memory: bool = True,
    template: str | None = None,
) -> list[ArtifactReport]:
    """Write each format to ``out_root/<format>/``, reload it from disk, smoke-test and measure it.

    Args:
        merged_dir: the merged full-precision model (see :func:`kubetune_trainer.artifacts.merge.merge_adapter`).
        formats: values of ``spec.quantization.formats``; order is kept, duplicates are ignored.
        sample_prompt_ids: token ids of a few eval prompts (drift, latency, smoke generation).
        device: ``cpu`` or ``cuda[:n]``; ONNX always runs on onnxruntime's CPU provider unless
            onnxruntime-gpu is installed.
        max_new_tokens: tokens generated per sample prompt for the smoke test and latency.
        measure_memory: measure each artifact's peak memory (and the merged model's, as the
            reference) in a fresh process — a few seconds each for small models.
        template: the run's resolved ``data.template``, for the gguf-* formats' Ollama Modelfile.

    Returns:
        One :class:`ArtifactReport` per format, in order.

    Raises:
        UnsupportedFormatError: a format is unknown or cannot run on this node (raised before any work).
        FileExistsError: ``out_root/<format>`` exists and is not empty.
        ArtifactSmokeTestError: a reloaded artifact produced non-finite logits or no tokens.
        ValueError: no sample prompts.
    """
    merged_dir, out_root = Path(merged_dir), Path(out_root)
    formats = list(dict.fromkeys(formats))
    check_formats_supported(formats, device=device)
    if not sample_prompt_ids:
        raise ValueError("quantize_artifacts needs at least one sample prompt")
    for fmt in formats:
        target = out_root / fmt
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f"quantized artifact directory {target} already exists and is not empty")

    # Reference logits once, then free the full-precision model before loading artifacts.
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference_logits = [_logits(reference, p) for p in sample_prompt_ids]
    del reference
    reference_size, _ = _dir_size(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    reference_memory = (
        measure_peak_memory(
            ModelSource("transformers", merged_dir),
            sample_prompt_ids,
            max_new_tokens=max_new_tokens,
            device=device,
        )
        if measure_memory
        else None
    )

    reports: list[ArtifactReport] = []
    for fmt in formats:
        out_dir = out_root / fmt
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if fmt in ("int8", "int4"):
                _write_quanto(merged_dir, out_dir, fmt)
            elif fmt == "onnx-int8":
                _write_onnx_int8(merged_dir, out_dir)
            elif fmt in GGUF_FORMATS:
                write_gguf(merged_dir, out_dir, fmt, template=template)
            else:
                _write_nf4(merged_dir, out_dir, device)
            tokenizer.save_pretrained(out_dir)
        except BaseException:
            # A half-written artifact must not look like one that can be published.
            shutil.rmtree(out_dir, ignore_errors=True)
            raise

        # Smoke test on what is on disk, with the tokenizer from the artifact's own directory.
        source = ModelSource(_SOURCE_KIND[fmt], out_dir)
        model = load_model(source, device=device)
        artifact_tokenizer = AutoTokenizer.from_pretrained(out_dir)
        drifts = []
        for ref, prompt in zip(reference_logits, sample_prompt_ids, strict=True):
            logits = _logits(model, prompt)
            if not np.isfinite(logits).all():
                raise ArtifactSmokeTestError(f"{fmt} artifact at {out_dir} produced non-finite logits")
            drifts.append(np.abs(logits - ref))
        gens = generate(model, artifact_tokenizer, sample_prompt_ids, max_new_tokens=max_new_tokens)
        new_tokens = sum(g.new_tokens for g in gens)
        if new_tokens == 0:
            raise ArtifactSmokeTestError(f"{fmt} artifact at {out_dir} generated no tokens")
        del model

        memory = (
            measure_peak_memory(source, sample_prompt_ids, max_new_tokens=max_new_tokens, device=device)
            if reference_memory is not None
            else None
        )
        size, files = _dir_size(out_dir)
        latency = latency_percentiles([g.latency_ms for g in gens])
        reports.append(
            ArtifactReport(
                format=fmt,
                path=fmt,
                files=files,
                size_bytes=size,
                reference_size_bytes=reference_size,
                size_ratio=size / reference_size,
                logit_drift_max_abs=float(max(d.max() for d in drifts)),
                logit_drift_mean_abs=float(sum(d.sum() for d in drifts) / sum(d.size for d in drifts)),
                latency_p50_ms=latency["latency_p50_ms"],
                latency_p95_ms=latency["latency_p95_ms"],
                new_tokens=new_tokens,
                smoke_text=gens[0].text,
                device=device,
                peak_memory_bytes=memory.peak_bytes if memory else None,
                peak_memory_ratio=(
                    memory.peak_bytes / reference_memory.peak_bytes if memory and reference_memory else None
                ),
                memory_method=memory.method if memory else None,
            )
        )
    return reports
