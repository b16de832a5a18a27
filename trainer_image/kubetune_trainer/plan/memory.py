"""Peak memory per device of a training run, from the model's shape and the spec alone.

:func:`estimate_memory` adds up, per GPU (or per process on CPU), what the trainer keeps resident
at its peak, each term named so a user sees where the memory goes:

=================  ===================================================================================
weights            the base's parameters in their training dtype: fp32 on CPU (the recipe keeps fp32
                   master weights there), the compute dtype on a GPU; QLoRA: the blocks' linear layers
                   in NF4 with double quantisation (~4.13 bits), the rest in fp32
                   (``prepare_model_for_kbit_training`` upcasts it); ZeRO-3: 1/world of them plus
                   the layers being gathered
trainable          LoRA/DoRA/(IA)^3 parameters (fp32: peft keeps adapters in fp32), or all of them
gradients          one per trainable parameter; DDP keeps a second copy in its buckets; ZeRO-2/3 keep
                   1/world of them in fp32 after the reduction
optimizer          AdamW's two moments; DeepSpeed with bf16/fp16: fp32 master weights and moments,
                   1/world each under ZeRO
activations        what autograd saves for backward, per token and layer (below), times the tokens
                   of the largest micro-batch; with gradient checkpointing only each layer's input
                   plus one layer recomputed
lm head            logits, their fp32 log-softmax and its gradient at the labelled positions only
                   (the recipe's labelled-positions head), plus the final hidden states
runtime            a CUDA context and cuBLAS workspace on a GPU (an assumption: ~0.6 GiB), NCCL
                   buffers when distributed; 0 on CPU, where the measurement starts above the
                   process's imported baseline
cpuHeap            CPU only: glibc's malloc keeps the buffers a step frees in its fragmented heap,
                   so the resident set holds the activations about twice (measured 1.6-2.1x the
                   live bytes; docs/plan.md)
=================  ===================================================================================

The peak is the larger of training (all of the above) and loading: on CPU, ``from_pretrained``
maps the safetensors file and copies it, so loading briefly holds the weights twice.

Activations per token per layer, as saved by transformers 5's Llama-family decoder layer under
autograd (measured with ``torch.autograd.graph.saved_tensors_hooks`` on CPU for fp32 and bf16
autocast, LoRA and full, several widths; the derivation is in docs/plan.md):
``hidden x (24.4 + 5.1 p) + intermediate x 4.5 p + seq x 2.7`` bytes, ``p`` the activation dtype's
size (4 fp32, 2 bf16/fp16); LoRA dropout adds each adapted module's input and its mask,
``in_features x (p + 1)``. The ``seq`` term is the block-causal mask a packed batch carries.
These are the kernels transformers picks on CPU (SDPA); FlashAttention on a GPU saves less for the
attention itself, so the GPU figure errs high there.

Pure and torch-free: the CLI's ``kubetune plan`` and the trainer's pre-flight step both call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kubetune_trainer.plan.shape import ModelShape

GIB = 1024**3

# Activation bytes per token and layer (see the module docstring): fp32-only parts and parts in
# the activation dtype, per hidden and per intermediate unit.
_ACT_HIDDEN_FP32 = 24.4
_ACT_HIDDEN_PER_BYTE = 5.1
_ACT_MLP_PER_BYTE = 4.5
_ACT_MASK_PER_SEQ = 2.7
# Layer input kept per layer under gradient checkpointing (bytes per token per hidden unit / p).
_CKPT_HIDDEN = 1.3
# On CPU, glibc's malloc keeps the activation buffers a step frees in its heap (fragmented between
# the ones still saved), so the resident set holds them about twice: measured 1.6-2.1x the live
# activation bytes over the first three steps (4M and 20M Llama shapes, torch 2.13, glibc 2.36;
# with MALLOC_MMAP_THRESHOLD_=65536 the RSS fell to the live bytes, at a 65% slower step).
_CPU_HEAP_RETENTION = 2.0
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
# Gradient checkpointing recomputes one layer's activations in backward, then its gradients.
_CKPT_TRANSIENT_LAYERS = 2
_NF4_BYTES = 4.127 / 8  # NF4 with double quantisation: 4 bits + ~0.127 bits of constants
_CUDA_RUNTIME = int(0.6 * GIB)
_NCCL_BUFFERS = int(0.25 * GIB)


@dataclass(frozen=True)
class TrainSettings:
    """What the estimate depends on besides the shape (:func:`settings_from_run_config` fills it)."""

    method: str = "lora"  # lora | qlora | full | ia3
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.1
    lora_variant: str = "lora"
    lora_layers: tuple[int, ...] | None = None
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16
    batch_size: int = 8
    gradient_accumulation_steps: int = 2
    seq_len: int = 512  # tokens per row of the largest micro-batch
    packing: bool = True
    gradient_checkpointing: bool = False
    label_fraction: float = 0.5  # share of a micro-batch's tokens that are trained on
    strategy: str = "none"  # none | ddp | deepspeed-zero2 | deepspeed-zero3
    world_size: int = 1

    def describe(self) -> str:
        parts = [self.method]
        if self.method in ("lora", "qlora"):
            parts.append(f"r={self.lora_r}")
        parts += [
            self.precision,
            f"batch {self.batch_size}x{self.seq_len} tokens",
            "grad-ckpt" if self.gradient_checkpointing else "no grad-ckpt",
        ]
        if self.strategy != "none":
            parts.append(f"{self.strategy} x{self.world_size}")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per device and the terms it is made of (``terms`` sums to ``train_peak``)."""

    terms: dict[str, int]
    load_peak: int
    trainable_parameters: int
    settings: TrainSettings
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak(self) -> int:
        return sum(self.terms.values())

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peakBytes": self.peak,
            "trainPeakBytes": self.train_peak,
            "loadPeakBytes": self.load_peak,
            "terms": dict(self.terms),
            "trainableParameters": self.trainable_parameters,
            "settings": self.settings.describe(),
            "notes": list(self.notes),
        }


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def trainable_parameters(shape: ModelShape, s: TrainSettings) -> int:
    """Parameters the optimizer updates: the adapter's, or every parameter for ``full``."""
    if s.method == "full":
        return shape.parameters
    layers = len(s.lora_layers) if s.lora_layers is not None else shape.layers
    linears = shape.block_linears()
    if s.method == "ia3":  # peft's defaults for Llama: k, v and down_proj's input
        return layers * (2 * shape.kv_dim + shape.intermediate)
    targets = set(linears) if "all-linear" in s.lora_targets else set(s.lora_targets) & set(linears)
    per_layer = 0
    for name in targets:
        fan_in, fan_out = linears[name]
        per_layer += s.lora_r * (fan_in + fan_out) + (fan_out if s.lora_variant == "dora" else 0)
    return layers * per_layer


def _adapted_inputs(shape: ModelShape, s: TrainSettings) -> int:
    """Sum of in_features over the adapted modules of one layer (LoRA dropout copies each input)."""
    if s.method not in ("lora", "qlora") or s.lora_dropout <= 0:
        return 0
    linears = shape.block_linears()
    targets = set(linears) if "all-linear" in s.lora_targets else set(s.lora_targets) & set(linears)
    return sum(linears[name][0] for name in targets)


def _layer_activation_bytes_per_token(shape: ModelShape, s: TrainSettings) -> float:
    p = _bytes(s.precision)
    per = (
        shape.hidden * (_ACT_HIDDEN_FP32 + _ACT_HIDDEN_PER_BYTE * p)
        + shape.intermediate * _ACT_MLP_PER_BYTE * p
        + s.seq_len * _ACT_MASK_PER_SEQ
    )
    return per + _adapted_inputs(shape, s) * (p + 1)


def estimate_memory(shape: ModelShape, s: TrainSettings) -> MemoryEstimate:
    """Peak memory per device of training ``shape`` with ``s`` (see the module docstring)."""
    notes: list[str] = []
    on_gpu = s.device == "cuda"
    world = max(1, s.world_size)
    zero = 3 if s.strategy == "deepspeed-zero3" else 2 if s.strategy == "deepspeed-zero2" else 0
    # Weights: fp32 master weights on CPU, the compute dtype on a GPU.
    wbytes = _bytes(s.precision) if on_gpu else 4
    block_linear = shape.layers * sum(i * o for i, o in shape.block_linears().values())
    if s.method == "qlora":
        weights = block_linear * _NF4_BYTES + (shape.parameters - block_linear) * 4
    else:
        weights = shape.parameters * wbytes
    if zero == 3:
        largest_layer = sum(i * o for i, o in shape.block_linears().values()) * wbytes
        embed = shape.vocab * shape.hidden * wbytes
        weights = weights / world + 2 * largest_layer + embed  # prefetch + the gathered embeddings
        notes.append("ZeRO-3: weights sharded; two layers and the embeddings gathered at a time")
    n_train = trainable_parameters(shape, s)
    tbytes = wbytes if s.method == "full" else 4  # peft keeps adapters in fp32
    if s.method == "full" and zero == 3:
        trainable_extra = 0.0  # counted in the sharded weights
    else:
        trainable_extra = 0.0 if s.method == "full" else n_train * tbytes
    # Gradients and optimizer states.
    if zero:
        grads = n_train * tbytes + n_train * 4 / world
        master = 4 if tbytes != 4 else 0
        optimizer = n_train * (8 + master) / world
    else:
        grads = n_train * tbytes * (2 if s.strategy == "ddp" and world > 1 else 1)
        optimizer = n_train * tbytes * 2
    # Activations of the largest micro-batch.
    tokens = s.batch_size * s.seq_len
    p = _bytes(s.precision)
    per_layer_token = _layer_activation_bytes_per_token(shape, s)
    if s.gradient_checkpointing:
        activations = tokens * (
            shape.layers * shape.hidden * _CKPT_HIDDEN * p + _CKPT_TRANSIENT_LAYERS * per_layer_token
        )
    else:
        activations = tokens * shape.layers * per_layer_token
    labelled = tokens * min(1.0, max(0.0, s.label_fraction))
    head = labelled * shape.vocab * (p + 4 + 4) + tokens * shape.hidden * p * 2
    runtime = (_CUDA_RUNTIME + (_NCCL_BUFFERS if world > 1 else 0)) if on_gpu else 0
    # CPU: the heap's retained copy of what a step allocates and frees (see _CPU_HEAP_RETENTION).
    # Buffers over glibc's largest mmap threshold (32 MiB) are mapped and unmapped on their own,
    # never kept: the head's [labelled, vocab] logits usually are.
    logits_buffer = labelled * shape.vocab * 4
    heap_head = head if logits_buffer < _MMAP_THRESHOLD_MAX else tokens * shape.hidden * p * 2
    heap = 0.0 if on_gpu else (activations + heap_head) * (_CPU_HEAP_RETENTION - 1)
    terms = {
        "weights": int(weights),
        "trainable": int(trainable_extra),
        "gradients": int(grads),
        "optimizer": int(optimizer),
        "activations": int(activations),
        "lmHead": int(head),
        "runtime": int(runtime),
        "cpuHeap": int(heap),
    }
    load_peak = int(weights * 2) if not on_gpu else int(weights + runtime)
    if on_gpu:
        notes.append("GPU runtime (CUDA context, workspaces) assumed ~0.6 GiB")
    return MemoryEstimate(
        terms=terms, load_peak=load_peak, trainable_parameters=n_train, settings=s, notes=notes
    )


# --- what would fit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """A change to the spec that brings the peak under the bound, re-estimated."""

    change: str  # what to set, in spec terms
    patch: dict[str, Any]  # the same as spec paths (``training.batchSize``) and their new values
    settings: TrainSettings
    estimate: MemoryEstimate

    def to_dict(self) -> dict[str, Any]:
        return {"change": self.change, "patch": dict(self.patch), "peakBytes": self.estimate.peak}


def suggest(shape: ModelShape, s: TrainSettings, capacity: int) -> list[Suggestion]:
    """Changes that fit ``capacity`` bytes per device, cheapest first, each re-estimated: gradient
    checkpointing, the largest smaller micro-batch that fits (the effective batch kept through
    accumulation), both, ZeRO-3 (more than one device), QLoRA (a LoRA job on a GPU), LoRA (a full
    fine-tune). Only changes whose new estimate fits are returned."""
    ckpt = {"training.gradientCheckpointing": True}
    candidates: list[tuple[str, dict[str, Any], TrainSettings]] = []
    starts: list[tuple[dict[str, Any], TrainSettings]] = [({}, s)]
    if not s.gradient_checkpointing:
        with_ckpt = replace(s, gradient_checkpointing=True)
        candidates.append(("spec.training.gradientCheckpointing: true", ckpt, with_ckpt))
        starts.append((ckpt, with_ckpt))
    for prefix, start in starts:
        batch = start.batch_size // 2
        while batch >= 1:
            accum = start.gradient_accumulation_steps * (start.batch_size // batch)
            trial = replace(start, batch_size=batch, gradient_accumulation_steps=accum)
            if estimate_memory(shape, trial).peak <= capacity:
                patch = {**prefix, "training.batchSize": batch, "training.gradientAccumulationSteps": accum}
                change = (
                    ("spec.training.gradientCheckpointing: true; " if prefix else "")
                    + f"spec.training.batchSize: {batch}, gradientAccumulationSteps: {accum}"
                    + (
                        " (same effective batch)"
                        if batch * accum == s.batch_size * s.gradient_accumulation_steps
                        else ""
                    )
                )
                candidates.append((change, patch, trial))
                break
            batch //= 2
    if s.world_size > 1 and s.strategy != "deepspeed-zero3":
        candidates.append(
            (
                "spec.distributed.strategy: deepspeed-zero3",
                {"distributed.strategy": "deepspeed-zero3"},
                replace(s, strategy="deepspeed-zero3"),
            )
        )
    if s.method == "lora" and s.device == "cuda":
        candidates.append(("spec.method.type: qlora", {"method.type": "qlora"}, replace(s, method="qlora")))
    if s.method == "full":
        candidates.append(("spec.method.type: lora", {"method.type": "lora"}, replace(s, method="lora")))
    out: list[Suggestion] = []
    for change, patch, trial in candidates:
        est = estimate_memory(shape, trial)
        if est.peak <= capacity and all(o.change != change for o in out):
            out.append(Suggestion(change=change, patch=patch, settings=trial, estimate=est))
    return out


def human_bytes(n: float) -> str:
    """``1.23 GiB``, ``456 MiB``, ``12 KiB``."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 0}f} {unit}"
    return f"{int(n)} B"


__all__ = [
    "MemoryEstimate",
    "Suggestion",
    "TrainSettings",
    "estimate_memory",
    "human_bytes",
    "suggest",
    "trainable_parameters",
]
