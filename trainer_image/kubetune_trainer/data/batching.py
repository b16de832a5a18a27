"""Deterministic, resumable batches, padded or packed without cross-example attention.

Order: for each epoch the units (examples, or packed rows) are permuted with a generator seeded
by (seed, epoch) — plain Python ``random.Random`` on a string seed, identical on every machine and
process. The permutation is padded by wrap-around to a multiple of ``world_size`` (as PyTorch's
DistributedSampler does) so every rank gets the same number of batches and DDP never waits on a
rank that ran out; rank ``r`` takes every ``world_size``-th unit starting at ``r``. A resumed run
asks for the same (seed, epoch) with ``start_batch=k`` and gets exactly batches k, k+1, ...

Curriculum (``order_keys``, one number per example, lower = easier): instead of the shuffle, units
go easy-to-hard by their key (a packed row's key is the mean of its examples' keys), ties broken by
unit index — deterministic, so ``start_batch`` resumes exactly as with shuffling. Padding to a
multiple of ``world_size`` repeats the hardest unit instead of wrapping around, so after the rank
striding every rank also goes easy-to-hard.

Padded batches (``packing=False``): ``input_ids``, ``attention_mask``, ``labels`` right-padded to
the longest example in the batch; labels are -100 on padding.

Packed batches (``packing=True``): examples are packed into rows of at most ``max_seq_length``
tokens by best-fit decreasing (done once per call, independent of the epoch, so the number of
batches is the same every epoch); rows are shuffled per epoch. Each row carries ``position_ids``
restarting at 0 for every example and **no attention_mask**: transformers' masking utilities
(``find_packed_sequence_indices`` in ``transformers/masking_utils.py``, 5.x) then build a
block-causal mask for eager/sdpa/flex attention, and flash-attention uses the same position_ids
for varlen kernels — no token attends to another example. Padding at the end of a row is its own
block (positions restart at 0, labels -100). The first label of every example is -100 as well:
after the causal shift it would be the target of the previous example's last token.
Packing is exact only for models whose attention goes through those utilities (the Llama, Qwen2,
Mistral, ... families in transformers 5); the trainer should use padded batches otherwise.
It also needs the model called with ``use_cache=False``: with a KV cache (the default of most
configs, even in training mode) transformers skips packed-sequence detection and the examples
of a row attend to each other. :func:`model_inputs` adds it; tests prove the equivalence.

Both kinds carry ``num_tokens`` (real, non-pad tokens: throughput is measured in these) and
``num_label_tokens`` (tokens that contribute to the loss after the causal shift) as 0-d tensors.
Only the keys in :data:`MODEL_INPUT_KEYS` go to the model; :func:`model_inputs` picks them.

torch is imported by the two collate functions, when a batch is built: ``kubetune data validate``
imports this package in a torch-free ``[cli]`` install.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kubetune_trainer.data.templates import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")
"""Batch keys that are model inputs; the others (``num_tokens``, ...) are bookkeeping."""


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments for ``model(**...)`` from a batch: model inputs only, ``use_cache=False``.

    ``use_cache=False`` is what makes packed rows exact (see the module docstring); training never
    needs the KV cache anyway.
    """
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch} | {"use_cache": False}


class Example(Protocol):
    """What batching needs from an example (TokenizedExample has it)."""

    @property
    def input_ids(self) -> Sequence[int]: ...
    @property
    def labels(self) -> Sequence[int]: ...


def pack_rows(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Group example indices into rows of total length <= max_seq_length (best-fit decreasing).

    Deterministic for the same lengths; every index appears in exactly one row. Raises ValueError
    for an example longer than max_seq_length.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: bisect finds the tightest fit
    for i in order:
        size = lengths[i]
        if size > max_seq_length:
            raise ValueError(f"example {i} has {size} tokens, more than max_seq_length={max_seq_length}")
        pos = bisect.bisect_left(free, (size, -1))
        if pos == len(free):
            rows.append([i])
            left, row = max_seq_length - size, len(rows) - 1
        else:
            space, row = free.pop(pos)
            rows[row].append(i)
            left = space - size
        if left > 0:
            bisect.insort(free, (left, row))
    return rows


def _units(examples: Sequence[Example], max_seq_length: int, packing: bool) -> list[list[int]]:
    lengths = [len(e.input_ids) for e in examples]
    if packing:
        return pack_rows(lengths, max_seq_length)
    for i, n in enumerate(lengths):
        if n > max_seq_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_length={max_seq_length}")
    return [[i] for i in range(len(examples))]


def _rank_order(
    n_units: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    unit_keys: Sequence[float] | None = None,
) -> list[int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    order = list(range(n_units))
    if unit_keys is not None:
        order.sort(key=lambda u: (unit_keys[u], u))
    elif shuffle:
        random.Random(f"kubetune-batches:{seed}:{epoch}").shuffle(order)
    if n_units and n_units % world_size:
        pad = world_size - n_units % world_size
        if unit_keys is not None:
            order += order[-1:] * pad  # repeat the hardest unit: every rank stays easy-to-hard
        else:
            order += (order * (pad // n_units + 1))[:pad]
    return order[rank::world_size]


def count_batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_seq_length: int,
    packing: bool,
    pad_token_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> int:
    """Batches :func:`iter_batches` yields on this rank in any epoch (the same on every rank)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    units = len(_units(examples, max_seq_length, packing))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    per_rank = -(-units // world_size)
    return -(-per_rank // batch_size)


def iter_batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_seq_length: int,
    packing: bool,
    pad_token_id: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    start_batch: int = 0,
    order_keys: Sequence[float] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's batches of one epoch, from batch ``start_batch`` on (see the module docstring).

    ``batch_size`` counts examples (padded) or packed rows (packing). Deterministic for
    (examples, seed, epoch, rank, world_size, order_keys). ``order_keys`` (one per example) orders
    the epoch easy-to-hard instead of shuffling; the number of batches is unchanged. Raises
    ValueError for an example longer than max_seq_length, a rank outside the world, or
    ``order_keys`` of the wrong length.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    units = _units(examples, max_seq_length, packing)
    unit_keys = None
    if order_keys is not None:
        if len(order_keys) != len(examples):
            raise ValueError(f"order_keys has {len(order_keys)} keys for {len(examples)} examples")
        unit_keys = [sum(order_keys[i] for i in unit) / len(unit) for unit in units]
    order = _rank_order(
        len(units),
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        unit_keys=unit_keys,
    )
    for b, start in enumerate(range(0, len(order), batch_size)):
        if b < start_batch:
            continue
        chosen = [units[u] for u in order[start : start + batch_size]]
        if packing:
            yield _collate_packed(examples, chosen, pad_token_id)
        else:
            yield _collate_padded([examples[row[0]] for row in chosen], pad_token_id)


def _collate_padded(batch: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    import torch  # not at the top: this package must import without torch (see the docstring)

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(list(e.input_ids), dtype=torch.long)
        labels[i, :n] = torch.tensor(list(e.labels), dtype=torch.long)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_tokens": attention_mask.sum(),
        "num_label_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
    }


def _collate_packed(
    examples: Sequence[Example], rows: Sequence[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    import torch  # not at the top: this package must import without torch (see the docstring)

    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e.input_ids)
            input_ids[r, at : at + n] = torch.tensor(list(e.input_ids), dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(list(e.labels)[1:], dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        real += at
        # Padding restarts its positions too, so it forms a block of its own that no real token sees.
        position_ids[r, at:] = torch.arange(width - at)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "num_tokens": torch.tensor(real),
        "num_label_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
    }
