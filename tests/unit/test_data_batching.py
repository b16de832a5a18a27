"""Seeded split, resumable batch order, and packing that is exactly equivalent to unpacked."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_api.models import DataSpec
from kubetune_trainer.data import (
    IGNORE_INDEX,
    MODEL_INPUT_KEYS,
    Message,
    Record,
    count_batches,
    iter_batches,
    model_inputs,
    pack_rows,
    split_records,
    validate_files,
)


def spec(**data: Any) -> DataSpec:
    return DataSpec.model_validate({"train": {"uri": "file:///data/train.jsonl"}, **data})


def record(i: int, file: str = "a.jsonl") -> Record:
    return Record(file, i + 1, "prompt-completion", (Message("user", f"q{i}"), Message("assistant", f"a{i}")))


def test_split_is_seeded_and_independent_of_order() -> None:
    records = [record(i) for i in range(200)]
    train, evals = split_records(records, 0.1, seed=7)
    assert len(evals) == 20 and len(train) == 180
    again = split_records(list(reversed(records)), 0.1, seed=7)[1]
    assert {r.answer for r in again} == {r.answer for r in evals}
    other = split_records(records, 0.1, seed=8)[1]
    assert {r.answer for r in other} != {r.answer for r in evals}
    assert [r.line for r in train] == sorted(r.line for r in train)  # input order kept


def test_split_does_not_depend_on_file_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a{i}", "completion": "x"}) + "\n" for i in range(30)))
    b.write_text("".join(json.dumps({"prompt": f"b{i}", "completion": "y"}) + "\n" for i in range(30)))
    one = validate_files([a, b], None, spec(evalSplit=0.2), seed=3)
    two = validate_files([b, a], None, spec(evalSplit=0.2), seed=3)
    assert one.eval_records == two.eval_records == 12
    with pytest.raises(ValueError, match="at least 2"):
        split_records([record(0)], 0.1, seed=0)


@dataclass
class Ex:
    input_ids: list[int]
    labels: list[int]


def examples(n: int, seed: int = 0) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(10, 60, (length,), generator=g).tolist()
        prompt = length // 2
        out.append(Ex(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


ARGS: dict[str, Any] = {"batch_size": 3, "max_seq_length": 32, "pad_token_id": 0, "seed": 5}


@pytest.mark.parametrize("packing", [False, True])
def test_batches_are_deterministic_and_resumable(packing: bool) -> None:
    data = examples(40)
    full = list(iter_batches(data, packing=packing, epoch=2, **ARGS))
    assert len(full) == count_batches(data, packing=packing, **ARGS)
    again = list(iter_batches(data, packing=packing, epoch=2, **ARGS))
    resumed = list(iter_batches(data, packing=packing, epoch=2, start_batch=4, **ARGS))
    for a, b in zip(full, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_epoch = list(iter_batches(data, packing=packing, epoch=3, **ARGS))
    assert len(other_epoch) == len(full)
    assert not torch.equal(other_epoch[0]["input_ids"], full[0]["input_ids"])


def test_padded_batches_cover_every_example_once_with_exact_labels() -> None:
    data = examples(10)
    seen = []
    for batch in iter_batches(data, packing=False, epoch=0, **ARGS):
        assert set(batch) - set(MODEL_INPUT_KEYS) == {"num_tokens", "num_label_tokens"}
        mask = batch["attention_mask"].bool()
        assert int(batch["num_tokens"]) == int(mask.sum())
        assert (batch["labels"][~mask] == IGNORE_INDEX).all() and (batch["input_ids"][~mask] == 0).all()
        for row, m, lab in zip(batch["input_ids"], mask, batch["labels"], strict=True):
            seen.append((row[m].tolist(), lab[m].tolist()))
    assert sorted(seen) == sorted((e.input_ids, e.labels) for e in data)


def test_ranks_split_the_data_evenly() -> None:
    data = examples(11)
    per_rank = [
        list(iter_batches(data, packing=False, epoch=0, rank=r, world_size=2, **ARGS)) for r in range(2)
    ]
    assert (
        len(per_rank[0]) == len(per_rank[1]) == count_batches(data, packing=False, world_size=2, **ARGS) == 2
    )
    sizes = [sum(b["input_ids"].shape[0] for b in batches) for batches in per_rank]
    assert sizes == [6, 6]  # 11 examples padded by wrap-around to 12


def test_pack_rows_fits_everything() -> None:
    lengths = [int(x) for x in torch.randint(1, 33, (200,), generator=torch.Generator().manual_seed(1))]
    rows = pack_rows(lengths, 32)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert len(rows) <= sum(lengths) // 32 + 10  # near-optimal, not one row per example
    with pytest.raises(ValueError, match="more than max_seq_length=32"):
        pack_rows([33], 32)


def test_packed_rows_restart_positions_and_mask_first_labels() -> None:
    data = examples(12)
    for batch in iter_batches(data, packing=True, epoch=0, **ARGS):
        assert "attention_mask" not in batch  # the model must infer packing from position_ids
        pos, labels = batch["position_ids"], batch["labels"]
        starts = pos == 0
        assert (labels[starts] == IGNORE_INDEX).all()
        assert int(batch["num_tokens"]) <= pos.numel()
        assert int(batch["num_label_tokens"]) == int((labels[:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_is_exact_on_a_tiny_llama(tiny_model_dir: Path, attn: str) -> None:
    """Per-token logits and losses of packed examples equal those of each example run alone."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=attn
    )
    model.eval()
    data = examples(9, seed=3)
    [batch] = list(
        iter_batches(data, batch_size=8, max_seq_length=64, packing=True, pad_token_id=0, seed=0, epoch=0)
    )
    assert batch["input_ids"].shape[0] < len(data)  # really packed: several examples share rows
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        matched = 0
        for r in range(batch["input_ids"].shape[0]):
            width = batch["input_ids"].shape[1]
            starts = [*(batch["position_ids"][r] == 0).nonzero().flatten().tolist(), width]
            for s, e in itertools.pairwise(starts):
                ids = batch["input_ids"][r, s:e]
                source = next((x for x in data if x.input_ids == ids.tolist()), None)
                if source is None:
                    continue  # the padding block at the end of a row
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(packed[r, s:e], alone, atol=1e-4, rtol=0)
                labels = torch.tensor(source.labels)
                loss_alone = torch.nn.functional.cross_entropy(alone[:-1], labels[1:], reduction="none")
                loss_packed = torch.nn.functional.cross_entropy(
                    packed[r, s : e - 1], labels[1:], reduction="none"
                )
                torch.testing.assert_close(loss_packed, loss_alone, atol=1e-4, rtol=0)
                matched += 1
    assert matched == len(data)


def test_packing_leaks_across_examples_with_a_kv_cache(tiny_model_dir: Path) -> None:
    """Why model_inputs() sets use_cache=False: with the default cache the packed rows are not exact."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    data = examples(9, seed=3)
    [batch] = list(
        iter_batches(data, batch_size=8, max_seq_length=64, packing=True, pad_token_id=0, seed=0, epoch=0)
    )
    with torch.no_grad():
        exact = model(**model_inputs(batch)).logits
        cached = model(**{**model_inputs(batch), "use_cache": True}).logits
    assert not torch.allclose(exact, cached, atol=1e-4)


def test_packed_batch_loss_equals_unpacked_loss(tiny_model_dir: Path) -> None:
    """The model's own loss over a packed batch equals the token-mean loss of the examples run padded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    data = examples(9, seed=4)
    common: dict[str, Any] = {"max_seq_length": 64, "pad_token_id": 0, "seed": 0, "epoch": 0}
    [packed] = list(iter_batches(data, batch_size=9, packing=True, **common))
    [padded] = list(iter_batches(data, batch_size=9, packing=False, **common))
    with torch.no_grad():
        loss_packed = model(**model_inputs(packed)).loss
        loss_padded = model(**model_inputs(padded)).loss
    assert int(packed["num_label_tokens"]) == int(padded["num_label_tokens"])
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=0)
