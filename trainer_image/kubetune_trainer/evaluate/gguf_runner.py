"""A GGUF file run with llama.cpp (through llama-cpp-python), evaluated like every other artifact.

Input: a directory holding ``model.gguf`` (a ``gguf-*`` quantized artifact, see
:mod:`kubetune_trainer.artifacts.gguf_export`). Output: :class:`GgufCausalLM`, a
:class:`~kubetune_trainer.evaluate.loading.TokenGenerator`, so the evaluator scores it on the same
token ids as the other artifacts (the Hugging Face tokenizer beside it encodes; llama.cpp only runs
the forward passes), with the same decoding rule as the ONNX runner (greedy argmax, or temperature
sampling from a numpy RNG seeded per prompt). Raises :class:`GgufRuntimeMissingError` when
llama-cpp-python is not installed, ValueError when llama.cpp cannot load the file.

llama-cpp-python is imported by :class:`GgufCausalLM` only: it is an optional, locally built
package (``scripts/build-llama-cpp.sh``), and the memory probe imports the loading module.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubetune_trainer.evaluate.decoding import next_token, stop_ids

__all__ = ["GGUF_FILE", "GgufCausalLM", "GgufRuntimeMissingError", "llama_cpp_available"]

GGUF_FILE = "model.gguf"
"""The file name of the model inside a ``gguf-*`` artifact directory (what the Modelfile names)."""

_MISSING = (
    "the gguf-* formats need llama-cpp-python 0.3.36 (llama.cpp) in the trainer's environment; "
    "build and install it once with scripts/build-llama-cpp.sh (make setup does), or remove the "
    "gguf-* entries from spec.quantization.formats"
)


class GgufRuntimeMissingError(ImportError):
    """llama-cpp-python (llama.cpp) is not installed; the message says how to get it."""


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python can be imported here (it loads llama.cpp's shared library)."""
    try:
        import llama_cpp  # noqa: F401  (a probe)
    except (ImportError, OSError):
        return False
    return True


def _threads() -> int:
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return int(threads) if threads.isdigit() and int(threads) > 0 else max(1, os.cpu_count() or 1)


class GgufCausalLM:
    """``model.gguf`` run by llama.cpp: last-token logits with a KV cache for generation, and
    all-position logits (a second context, created on first use) for the eval loss.

    ``n_ctx`` bounds prompt + generated tokens (and a loss sequence). On ``cuda`` devices all layers
    are offloaded when llama.cpp was built with a GPU backend (the CPU build ignores it).
    """

    def __init__(self, model_dir: Path, *, device: str = "cpu", n_ctx: int = 2048) -> None:
        try:
            import llama_cpp
        except (ImportError, OSError) as exc:
            raise GgufRuntimeMissingError(f"{_MISSING} ({exc})") from exc
        self._llama_cpp = llama_cpp
        self.path = Path(model_dir) / GGUF_FILE
        self._settings: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": n_ctx,
            "n_threads": _threads(),
            "n_gpu_layers": -1 if device.startswith("cuda") else 0,
            "verbose": False,
        }
        self._gen = llama_cpp.Llama(**self._settings, logits_all=False)
        self._all: Any = None
        self.n_vocab = int(self._gen.n_vocab())

    def _last_logits(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self._gen.ctx, -1)
        row = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
        )
        return np.array(row, dtype=np.float64)

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[seq, vocab]`` (float32) for one sequence."""
        if self._all is None:
            self._all = self._llama_cpp.Llama(**self._settings, logits_all=True)
        self._all.reset()
        self._all.eval(list(input_ids))
        return np.array(self._all.scores[: len(input_ids)], dtype=np.float32)

    def generate_token_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        seed: int,
        eos_token_id: int | list[int] | None,
    ) -> list[int]:
        """Greedy (or temperature-sampled, numpy RNG seeded with ``seed``) decoding, stopping at any EOS id."""
        rng = np.random.default_rng(seed)
        stops = stop_ids(eos_token_id)
        self._gen.reset()
        self._gen.eval(list(prompt_ids))
        new: list[int] = []
        for _ in range(max_new_tokens):
            last = self._last_logits()
            token = next_token(last, do_sample=do_sample, temperature=temperature, rng=rng)
            new.append(token)
            if token in stops or len(new) == max_new_tokens:
                break
            self._gen.eval([token])
        return new

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (special tokens parsed, no BOS added): what a
        llama.cpp or Ollama user's prompt becomes."""
        return [int(t) for t in self._gen.tokenize(text.encode("utf-8"), add_bos=False, special=True)]

    def metadata(self) -> dict[str, str]:
        """The GGUF file's key/value metadata as llama.cpp read it."""
        return dict(self._gen.metadata)
