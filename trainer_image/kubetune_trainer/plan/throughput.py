"""How long a run will take: FLOPs per token over the throughput the project has measured.

The table (:data:`THROUGHPUT`) is the project's own record of achieved model FLOP/s per device,
counted over the FLOPs kubetune executes (:func:`flops_per_token`: the forward and the input
gradients through frozen weights, 4N, plus 6 per trainable parameter, with the LM head only at
the labelled positions), each entry with where it comes from. A device with no measurement gets
an assumption, and the plan says which one it used.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune_trainer.plan.shape import ModelShape


@dataclass(frozen=True)
class DeviceThroughput:
    """Achieved model FLOP/s of one device (one CPU thread, or one GPU) and its source."""

    device: str
    flops_per_second: float
    seconds_per_micro_batch: float  # fixed cost of a step beyond its FLOPs (small models are bound by it)
    measured: bool
    source: str


THROUGHPUT: dict[str, DeviceThroughput] = {
    "cpu": DeviceThroughput(
        device="cpu",
        # LoRA on the 25M and 100M shapes: 53.6% and 56.2% of a 79-92 GFLOP/s fp32 matmul peak on one
        # thread (BENCHMARKS.md section 1); SmolLM2-135M: 47-98 tokens/s on a loaded box (section 8).
        flops_per_second=40e9,
        # The quickstart's 0.1M-parameter demo: 114 micro-batches in 8.45 s, ~1.3 s of it FLOPs.
        seconds_per_micro_batch=0.06,
        measured=True,
        source="measured: BENCHMARKS.md sections 1 and 8 (one thread of this project's 2-core CI machine, fp32)",
    ),
    "cuda": DeviceThroughput(
        device="cuda",
        flops_per_second=989e12 * 0.35,
        seconds_per_micro_batch=0.02,
        measured=False,
        source="assumption: H100/H200-class GPU, 989 TFLOP/s dense bf16 at 35% MFU (no GPU run measured yet)",
    ),
}


def flops_per_token(shape: ModelShape, trainable: int, label_fraction: float, *, full: bool) -> float:
    """Model FLOPs kubetune executes per training token (see the module docstring)."""
    head = shape.vocab * shape.hidden
    # The embedding is a lookup, not a matmul; the head is a matmul (tied or not), run at labels only.
    body = max(shape.parameters - shape.vocab * shape.hidden - shape.head_parameters(), 0)
    per_param = 6 if full else 4
    head_flops = per_param * head * label_fraction
    return per_param * body + head_flops + (0 if full else 6 * trainable)


def estimate_seconds(
    shape: ModelShape,
    trainable: int,
    label_fraction: float,
    tokens: int,
    *,
    micro_batches: int,
    full: bool,
    device: str,
    devices: int,
    threads: int = 1,
) -> tuple[float, DeviceThroughput]:
    """Seconds to train ``tokens`` on ``devices`` (GPUs, or processes of ``threads`` threads on CPU)."""
    entry = THROUGHPUT.get(device, THROUGHPUT["cpu"])
    rate = entry.flops_per_second * (max(1, threads) if device == "cpu" else 1) * max(1, devices)
    compute = flops_per_token(shape, trainable, label_fraction, full=full) * tokens / rate
    return compute + entry.seconds_per_micro_batch * micro_batches / max(1, devices), entry
