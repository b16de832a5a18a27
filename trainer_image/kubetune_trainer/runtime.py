"""Process-level runtime: ranks, device, precision, seeding, collective helpers.

torchrun (or the Indexed Job's pods) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; a plain
``python -m kubetune_trainer`` or ``kubetune run`` is a world of one. Every collective helper here
is a no-op in a world of one, so the recipe reads the same either way.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class UnsupportedHardwareError(RuntimeError):
    """The spec asks for something this node cannot do (fp16 or QLoRA without a GPU...)."""


@dataclass
class Runtime:
    """Where this process sits in the job and what it computes with."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str  # resolved: bf16 | fp16 | fp32
    strategy: str

    @property
    def is_main(self) -> bool:
        """Rank 0 reports progress, evaluates and publishes."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0 fetches inputs onto its node's disk."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on CPU: exact enough for token counts and losses)."""
        if not self.distributed:
            return values
        t = torch.tensor(
            values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        dist.all_reduce(t)
        return [float(x) for x in t.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_precision(requested: str, cuda: bool) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    Explicit bf16 on CPU is honoured (it works, but was 8-9x slower than fp32 on AVX2 CPUs);
    fp16 on CPU is refused: PyTorch has no fp16 GradScaler path there.
    """
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and not cuda:
        raise UnsupportedHardwareError(
            "spec.training.precision: fp16 needs a GPU; use fp32 (or auto) on CPU nodes"
        )
    return requested


def init_runtime(precision: str, strategy: str) -> Runtime:
    """Join the process group when launched by torchrun and pick device and precision."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world_size > 1 or strategy.startswith("deepspeed")) and not dist.is_initialized():
        if strategy.startswith("deepspeed"):
            # deepspeed-* runs only: importing it takes 0.6 s and 25 MB (measured) and probes for
            # an accelerator (logging which), nothing a DDP or one-process run needs.
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        else:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        precision=resolve_precision(precision, cuda),
        strategy=strategy if world_size > 1 or strategy.startswith("deepspeed") else "none",
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of this process, for checkpoints."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
