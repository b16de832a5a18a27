"""The pre-flight plan of one run: will it fit, how many tokens and steps, how long.

:func:`make_plan` joins the model's shape (:mod:`~kubetune_trainer.plan.shape`), the data's size
(:func:`data_stats`), the memory estimate (:mod:`~kubetune_trainer.plan.memory`) and the time
estimate (:mod:`~kubetune_trainer.plan.throughput`) into a :class:`Plan` a user reads
(:meth:`Plan.render`) and the FineTuneJob status shows (:meth:`Plan.status`). Torch-free.

Tokens: counted with the base's ``tokenizer.json`` when one is at hand (the ``tokenizers``
library; content tokens plus a per-message allowance of the chat template), else estimated as one
token per 4 characters of English text — the plan says which.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.runconfig import RunConfig
from kubetune_trainer.data import DataSettings
from kubetune_trainer.data.batching import pack_rows
from kubetune_trainer.data.prepare import read_records
from kubetune_trainer.data.records import Record
from kubetune_trainer.plan.memory import (
    MemoryEstimate,
    Suggestion,
    TrainSettings,
    estimate_memory,
    human_bytes,
    suggest,
)
from kubetune_trainer.plan.shape import ModelShape
from kubetune_trainer.plan.throughput import DeviceThroughput, estimate_seconds

CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS_PER_MESSAGE = 5  # role markers and separators of a typical chat template


@dataclass(frozen=True)
class DataStats:
    """The training data's size in tokens (``exact`` when a tokenizer counted them)."""

    records: int
    tokens: int
    answer_tokens: int
    longest: int
    exact: bool
    lengths: tuple[int, ...] = ()  # per record, for the exact packing of rows

    @property
    def label_fraction(self) -> float:
        return self.answer_tokens / self.tokens if self.tokens else 0.5


def _record_tokens(record: Record, count: Any) -> tuple[int, int]:
    total = sum(count(m.content) + TEMPLATE_TOKENS_PER_MESSAGE for m in record.messages)
    answer = count(record.answer) + 1  # + end of turn
    return total, answer


def data_stats(
    train_files: Sequence[Path],
    eval_files: Sequence[Path] | None,
    data_cfg: DataSettings,
    *,
    seed: int,
    display_names: Mapping[Path, str] | None = None,
    tokenizer_json: Path | None = None,
) -> DataStats:
    """Token counts of the training records (after cleaning, de-duplication and the eval split)."""
    train, _eval = read_records(train_files, eval_files, data_cfg, seed=seed, display_names=display_names)
    exact = False
    count: Any = lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)  # noqa: E731
    if tokenizer_json is not None and tokenizer_json.is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_json))
            count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
            exact = True
        except Exception:
            exact = False
    lengths, answers = [], 0
    for record in train:
        total, answer = _record_tokens(record, count)
        lengths.append(total)
        answers += answer
    return DataStats(
        records=len(train),
        tokens=sum(lengths),
        answer_tokens=answers,
        longest=max(lengths, default=0),
        exact=exact,
        lengths=tuple(lengths),
    )


def settings_from_run_config(
    rc: RunConfig, *, device: str, world_size: int, stats: DataStats | None
) -> TrainSettings:
    """The estimate's settings for ``rc`` on ``world_size`` devices of kind ``device``."""
    t, lora = rc.training, rc.method.lora
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    seq = t.max_seq_length
    if not t.packing and stats is not None and stats.longest:
        seq = min(seq, stats.longest)
    return TrainSettings(
        method=rc.method.type,
        lora_r=lora.r,
        lora_targets=tuple(lora.target_modules),
        lora_dropout=lora.dropout,
        lora_variant=lora.variant,
        lora_layers=tuple(lora.layers) if lora.layers is not None else None,
        device=device,
        precision=precision,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        seq_len=seq,
        packing=t.packing,
        gradient_checkpointing=t.gradient_checkpointing,
        label_fraction=stats.label_fraction if stats is not None else 0.5,
        strategy=rc.distributed.strategy,
        world_size=world_size,
    )


@dataclass
class Plan:
    """What a run will need and whether it fits (``fits`` None: no bound to check against)."""

    shape: ModelShape
    memory: MemoryEstimate
    capacity: int | None
    capacity_source: str
    data: DataStats | None
    steps: int | None
    tokens_per_epoch: int | None
    seconds: float | None
    throughput: DeviceThroughput | None
    suggestions: list[Suggestion] = field(default_factory=list)
    devices: int = 1
    price_per_device_hour: float | None = None

    @property
    def device_hours(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.devices / 3600

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.memory.peak <= self.capacity

    def verdict(self) -> str:
        if self.fits is None:
            return "not checked (no memory bound)"
        return "fits" if self.fits else "WILL NOT FIT"

    def summary(self) -> str:
        """One line for the status and the Fits condition."""
        est = f"estimated peak {human_bytes(self.memory.peak)} per device"
        if self.capacity is None:
            line = f"{est}; no memory bound to check it against ({self.capacity_source})"
        else:
            line = f"{est} of {human_bytes(self.capacity)} ({self.capacity_source}): {self.verdict()}"
        if self.fits is False:
            line += (
                "; would fit with: " + " | ".join(s.change for s in self.suggestions[:3])
                if self.suggestions
                else "; no single change found that fits"
            )
        return line[:1000]

    def render(self) -> list[str]:
        """The lines ``kubetune plan`` prints and a run logs."""
        m, sh = self.memory, self.shape
        lines = [
            f"model: {sh.architecture}, {sh.parameters / 1e6:,.1f}M parameters"
            f"{'' if sh.exact_count else ' (from its layout)'}, {sh.layers} layers, hidden {sh.hidden}, "
            f"vocab {sh.vocab:,} (from its {sh.source})",
            f"settings: {m.settings.describe()}; {m.trainable_parameters:,} trainable parameters",
            "memory per device: "
            + ", ".join(f"{k} {human_bytes(v)}" for k, v in m.terms.items() if v)
            + f" = {human_bytes(m.train_peak)} training"
            + (f"; loading {human_bytes(m.load_peak)}" if m.load_peak > m.train_peak else ""),
            f"peak {human_bytes(m.peak)} per device; {self.verdict()}"
            + (f" against {human_bytes(self.capacity)} ({self.capacity_source})" if self.capacity else ""),
        ]
        if self.data is not None and self.tokens_per_epoch is not None:
            how = (
                "counted with its tokenizer"
                if self.data.exact
                else f"estimated at {CHARS_PER_TOKEN:g} chars/token"
            )
            lines.append(
                f"data: {self.data.records:,} training records, {self.tokens_per_epoch:,} tokens per epoch ({how}); "
                f"{self.steps:,} optimizer steps"
            )
        if self.seconds is not None and self.throughput is not None and self.device_hours is not None:
            cost = (
                f", ~{self.device_hours * self.price_per_device_hour:,.2f} at {self.price_per_device_hour:g} "
                "per device-hour"
                if self.price_per_device_hour is not None
                else ""
            )
            lines.append(
                f"time: ~{_duration(self.seconds)} of training on {self.devices} device(s), "
                f"{self.device_hours:,.3g} device-hours{cost} ({self.throughput.source})"
            )
        for note in m.notes:
            lines.append(f"note: {note}")
        if self.fits is False:
            if self.suggestions:
                lines.append("changes that would fit (each re-estimated):")
                lines += [f"  - {s.change}: peak {human_bytes(s.estimate.peak)}" for s in self.suggestions]
            else:
                lines.append("no single change found that fits: more memory per device or more devices")
        return lines

    def status(self, generation: int | None) -> dict[str, Any]:
        """``status.plan`` (:class:`~kubetune_api.models.PlanStatus` as JSON)."""
        out: dict[str, Any] = {
            "generation": generation,
            "fits": self.fits,
            "peakBytesPerDevice": self.memory.peak,
            "capacityBytes": self.capacity,
            "totalSteps": self.steps,
            "tokensPerEpoch": self.tokens_per_epoch,
            "estimatedSeconds": round(self.seconds, 1) if self.seconds is not None else None,
            "summary": self.summary(),
        }
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """Everything, for ``training/plan.json`` and ``kubetune plan --json``."""
        return {
            "shape": self.shape.to_dict(),
            "memory": self.memory.to_dict(),
            "capacityBytes": self.capacity,
            "capacitySource": self.capacity_source,
            "fits": self.fits,
            "data": None
            if self.data is None
            else {
                "records": self.data.records,
                "tokens": self.data.tokens,
                "answerTokens": self.data.answer_tokens,
                "longest": self.data.longest,
                "exact": self.data.exact,
            },
            "tokensPerEpoch": self.tokens_per_epoch,
            "steps": self.steps,
            "estimatedSeconds": self.seconds,
            "deviceHours": self.device_hours,
            "estimatedCost": None
            if self.device_hours is None or self.price_per_device_hour is None
            else self.device_hours * self.price_per_device_hour,
            "throughputSource": self.throughput.source if self.throughput is not None else None,
            "suggestions": [s.to_dict() for s in self.suggestions],
        }


def available_memory() -> int | None:
    """This machine's available memory (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _steps(rc: RunConfig, settings: TrainSettings, stats: DataStats) -> tuple[int, int]:
    """(optimizer steps, training tokens) the recipe will run, from the data's size."""
    t = rc.training
    if t.packing:  # the recipe's own best-fit-decreasing packing, over the (truncated) lengths
        units = len(pack_rows([min(n, t.max_seq_length) for n in stats.lengths], t.max_seq_length))
    else:
        units = stats.records
    world = max(1, settings.world_size)
    micro_batches = math.ceil(units / world / t.batch_size) if units else 0
    steps_per_epoch = max(1, math.ceil(micro_batches / t.gradient_accumulation_steps))
    steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    tokens = round(stats.tokens * steps / steps_per_epoch)
    return steps, tokens


def make_plan(
    rc: RunConfig,
    shape: ModelShape,
    stats: DataStats | None,
    *,
    device: str,
    world_size: int,
    capacity: int | None,
    capacity_source: str,
    threads: int = 1,
    price_per_device_hour: float | None = None,
) -> Plan:
    """The :class:`Plan` of ``rc`` on ``world_size`` devices of kind ``device``, checked against
    ``capacity`` bytes per device (None: not checked)."""
    settings = settings_from_run_config(rc, device=device, world_size=world_size, stats=stats)
    memory = estimate_memory(shape, settings)
    steps = tokens = seconds = None
    throughput = None
    tokens_per_epoch = None
    if stats is not None:
        steps, tokens = _steps(rc, settings, stats)
        tokens_per_epoch = stats.tokens
        seconds, throughput = estimate_seconds(
            shape,
            memory.trainable_parameters,
            settings.label_fraction,
            tokens,
            micro_batches=steps * settings.gradient_accumulation_steps,
            full=settings.method == "full",
            device=device,
            devices=world_size,
            threads=threads,
        )
    plan = Plan(
        shape=shape,
        memory=memory,
        capacity=capacity,
        capacity_source=capacity_source,
        data=stats,
        steps=steps,
        tokens_per_epoch=tokens_per_epoch,
        seconds=seconds,
        throughput=throughput,
        devices=world_size,
        price_per_device_hour=price_per_device_hour,
    )
    if plan.fits is False and capacity is not None:
        plan.suggestions = suggest(shape, settings, capacity)
    return plan


__all__ = [
    "DataStats",
    "Plan",
    "available_memory",
    "data_stats",
    "make_plan",
    "settings_from_run_config",
]
