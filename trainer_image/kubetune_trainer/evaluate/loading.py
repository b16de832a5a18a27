"""What evaluation runs: an artifact on disk loaded as a model, token generation from any of them,
and an artifact's peak memory measured in a fresh process.

Input: a :class:`ModelSource` (where an artifact lives and how to load it). Output: a model ready
for :func:`generate_token_ids` (transformers, peft, optimum-quanto or bitsandbytes on torch, or an
:class:`OnnxCausalLM` on onnxruntime), or a :class:`MemoryMeasurement`. Raises ValueError for an
unknown kind, OSError for missing files (from the loading library) and RuntimeError when a memory
measurement fails.

The peak-memory probe (:func:`measure_peak_memory`) spawns a process that imports this module, so
its top-level imports are part of every measurement: torch and transformers (every kind's
baseline), nothing else. peft, optimum-quanto and onnxruntime are imported for the kinds that use
them (see :func:`load_model`).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kubetune_trainer.evaluate.decoding import next_token, stop_ids

__all__ = [
    "MemoryMeasurement",
    "ModelSource",
    "OnnxCausalLM",
    "SourceKind",
    "TokenGenerator",
    "generate_token_ids",
    "load_model",
    "measure_peak_memory",
    "model_device",
]


@runtime_checkable
class TokenGenerator(Protocol):
    """A non-torch model that can still be evaluated (:class:`OnnxCausalLM`)."""

    def generate_token_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        seed: int,
        eos_token_id: int | list[int] | None,
    ) -> list[int]: ...

    def logits(self, input_ids: Sequence[int]) -> Any: ...  # numpy array [seq, vocab]


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def generate_token_ids(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> list[int]:
    """New token ids for one prompt from a transformers/peft/quanto model or a :class:`TokenGenerator`.

    Sampling is pure temperature sampling (top_k and top_p disabled), whatever the model's own
    ``generation_config`` suggests, so results are comparable between base and tuned.
    """
    if isinstance(model, TokenGenerator):
        return model.generate_token_ids(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed,
            eos_token_id=eos_token_id,
        )
    device = model_device(model)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    sampling: dict[str, Any] = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
    torch.manual_seed(seed)
    # no_grad, not inference_mode: optimum-quanto's int4 tensors fail under inference_mode
    # ("Cannot set version_counter for inference tensor").
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id if pad_token_id is not None else _first(eos_token_id),
            **sampling,
        )
    return [int(t) for t in out[0, ids.shape[1] :].tolist()]


def _first(ids: int | list[int] | None) -> int | None:
    if isinstance(ids, list):
        return ids[0] if ids else None
    return ids


# --------------------------------------------------------------------------------------------------
# ONNX Runtime runner


class OnnxCausalLM:
    """Runs an exported ``model.onnx`` (logits only, no KV cache) with onnxruntime.

    Implements :class:`TokenGenerator`, so it can be evaluated like a torch model (and quantized
    ``onnx-int8`` artifacts are). Threads: ``OMP_NUM_THREADS`` when set (onnxruntime ignores it otherwise).
    """

    def __init__(self, model_dir: Path, *, device: str = "cpu") -> None:
        # Only ONNX artifacts need it (+20 MB measured), and the memory probe imports this module.
        import onnxruntime as ort

        options = ort.SessionOptions()
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit():
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), options, providers=providers)

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[seq, vocab]`` (float32) for one sequence."""
        ids = np.asarray([list(input_ids)], dtype=np.int64)
        (out,) = self.session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        return np.asarray(out[0], dtype=np.float32)

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
        sequence = list(prompt_ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            last = self.logits(sequence)[-1].astype(np.float64)
            token = next_token(last, do_sample=do_sample, temperature=temperature, rng=rng)
            new.append(token)
            sequence.append(token)
            if token in stops:
                break
        return new


# --------------------------------------------------------------------------------------------------
# Loading artifacts and measuring their memory


SourceKind = Literal["transformers", "peft", "quanto", "onnx", "bnb", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    """An artifact on disk and how to load it.

    kind: ``transformers`` (a full model dir: base or merged), ``peft`` (adapter at ``path`` on the
    base at ``base_path``), ``quanto`` (optimum-quanto int8/int4 dir), ``onnx`` (dir with
    ``model.onnx``), ``bnb`` (bitsandbytes-quantized dir, CUDA only), ``gguf`` (dir with
    ``model.gguf``, run by llama.cpp: :class:`~kubetune_trainer.evaluate.gguf_runner.GgufCausalLM`).
    """

    kind: SourceKind
    path: Path
    base_path: Path | None = None


def load_model(source: ModelSource, *, device: str = "cpu") -> Any:
    """Load an artifact from disk, in eval mode, ready for :func:`generate_token_ids`.

    peft and optimum-quanto are imported here, for their kinds only: both pull in torchao (3-4 s,
    110-120 MB measured), which would otherwise land in every memory probe's peak, the ONNX one's too.

    Raises:
        ValueError: ``peft`` without ``base_path``, or an unknown kind.
        OSError: the files are missing or unreadable (from the loading library).
    """
    if source.kind == "onnx":
        return OnnxCausalLM(source.path, device=device)
    if source.kind == "gguf":  # llama.cpp via llama-cpp-python, imported there (see gguf_runner)
        from kubetune_trainer.evaluate.gguf_runner import GgufCausalLM

        return GgufCausalLM(source.path, device=device)
    model: Any
    if source.kind == "transformers":
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype="auto")
        model.to(device)
    elif source.kind == "peft":
        from peft import PeftModel  # this kind only (see the docstring)

        if source.base_path is None:
            raise ValueError(f"a peft ModelSource needs base_path (adapter at {source.path})")
        base: Any = AutoModelForCausalLM.from_pretrained(source.base_path, dtype="auto")
        base.to(device)
        model = PeftModel.from_pretrained(base, source.path)
    elif source.kind == "quanto":
        from optimum.quanto import QuantizedModelForCausalLM  # this kind only (see the docstring)

        model = QuantizedModelForCausalLM.from_pretrained(source.path).to(device)
    elif source.kind == "bnb":
        # The quantization_config saved in config.json makes transformers load the 4-bit weights.
        model = AutoModelForCausalLM.from_pretrained(
            source.path, device_map={"": device}, dtype=torch.bfloat16
        )
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    model.eval()
    return model


def _peak_rss_bytes() -> int:
    """This process's peak RSS since its exec.

    VmHWM (Linux) rather than ``ru_maxrss``: ru_maxrss survives exec, so a child started from a
    trainer holding a model would report the trainer's high-water mark and bias every ratio to 1.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Not Linux: the best there is (KiB on Linux, bytes on macOS).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class MemoryMeasurement:
    """Peak memory of loading an artifact and generating with it, in a fresh process.

    method ``process_peak_rss``: the child's peak RSS since exec (VmHWM; CPU). It includes the
    interpreter and the imported frameworks (``baseline_bytes``, measured after the imports and
    before loading), which dominate for tiny models; ``peak_bytes - baseline_bytes`` is what the
    model itself added. method ``cuda_max_memory_allocated``: torch's peak CUDA allocation
    (baseline 0); it does not see CUDA context or allocator-cached memory.
    """

    peak_bytes: int
    baseline_bytes: int
    method: Literal["process_peak_rss", "cuda_max_memory_allocated"]

    @property
    def model_bytes(self) -> int:
        """Memory attributable to loading and running the artifact."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including ``model_bytes``."""
        return {**asdict(self), "model_bytes": self.model_bytes}


def _peak_memory_child(
    source: ModelSource, prompt_ids_list: list[list[int]], max_new_tokens: int, device: str, conn: Any
) -> None:
    """Runs in a spawned process: load, generate, report the high-water mark through ``conn``."""
    try:
        # Import what loading needs before the baseline, so the baseline holds the frameworks
        # (torch and transformers came with this module).
        if source.kind == "peft":
            import peft  # noqa: F401
        elif source.kind == "quanto":
            import optimum.quanto  # noqa: F401
        elif source.kind == "onnx":
            import onnxruntime  # noqa: F401
        elif source.kind == "gguf":
            import llama_cpp  # noqa: F401
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        # A high-water mark: for tiny models the imports' transient peak can exceed what the model
        # adds, and then peak == baseline.
        baseline = _peak_rss_bytes()
        model = load_model(source, device=device)
        for i, prompt in enumerate(prompt_ids_list):
            generate_token_ids(model, prompt, max_new_tokens=max_new_tokens, seed=i)
        if device.startswith("cuda"):
            result = (int(torch.cuda.max_memory_allocated()), 0, "cuda_max_memory_allocated")
        else:
            result = (_peak_rss_bytes(), baseline, "process_peak_rss")
        conn.send(("ok", result))
    except BaseException as exc:  # reported to the parent, which raises with the message
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_peak_memory(
    source: ModelSource,
    prompt_ids_list: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    device: str = "cpu",
    timeout_s: float = 900.0,
) -> MemoryMeasurement:
    """Peak memory of loading ``source`` and greedily answering the prompts, in a fresh process.

    A fresh (spawned) process because a high-water mark cannot be reset within a process, and
    tracemalloc does not see torch's allocations. Ratios between two measurements made the same way
    are what the ``peak_memory_ratio`` gate compares.

    Raises:
        RuntimeError: the child failed (its exception type and message are included) or timed out.
    """
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_peak_memory_child,
        args=(source, [list(p) for p in prompt_ids_list], max_new_tokens, device, child_conn),
        daemon=True,
    )
    proc.start()
    child_conn.close()
    try:
        if not parent_conn.poll(timeout_s):
            raise RuntimeError(f"memory measurement of {source.path} timed out after {timeout_s:.0f} s")
        status, payload = parent_conn.recv()
    except EOFError:
        raise RuntimeError(f"memory measurement of {source.path} died (exit code {proc.exitcode})") from None
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {source.path} failed: {payload}")
    peak, baseline, method = payload
    return MemoryMeasurement(peak_bytes=peak, baseline_bytes=baseline, method=method)
