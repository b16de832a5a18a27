"""Knowledge distillation: the loss math, the vocabulary check, cached vs on-the-fly teacher logits,
and the spec fields."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kubetune_api.loader import SpecError, parse_finetunejob
from kubetune_api.models import DistillationSpec
from kubetune_api.runconfig import resolve_run_config
from kubetune_trainer.data import iter_batches, model_inputs
from kubetune_trainer.train.distill import (
    DistillationError,
    Distiller,
    cache_teacher_logits,
    common_vocab_size,
    describe_distillation,
    distillation_manifest_extra,
    kd_loss,
    kd_loss_topk,
    mix_losses,
)
from kubetune_trainer.train.label_head import LabelPositionHead
from tests.unit.test_data_batching import examples

REPO = Path(__file__).resolve().parents[2]

# --- loss math --------------------------------------------------------------------------------

# Teacher (ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2).
HAND_KL = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


def test_kd_loss_is_the_kl_of_the_softened_distributions_times_t_squared() -> None:
    student = torch.zeros(1, 2)
    assert kd_loss(student, torch.tensor([[math.log(3), 0.0]]), 1.0).item() == pytest.approx(HAND_KL)
    # At T = 2 the teacher (2 ln 3, 0) softens to the same (3/4, 1/4): the same KL, scaled by T^2 = 4.
    t2 = kd_loss(student, torch.tensor([[2 * math.log(3), 0.0]]), 2.0).item()
    assert t2 == pytest.approx(4 * HAND_KL)


def test_kd_loss_is_the_mean_over_positions_and_zero_for_equal_models() -> None:
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])  # KL = HAND_KL, then 0
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(HAND_KL / 2)
    logits = torch.randn(5, 11)
    assert kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    values, ids = logits.topk(11, dim=-1)
    assert kd_loss_topk(logits, ids, values, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_sparse_kd_equals_the_full_kl_when_k_is_the_vocabulary_and_is_hand_computable() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g) * 3
    values, ids = teacher.topk(13, dim=-1)
    full = kd_loss(student, teacher, 2.0)
    assert kd_loss_topk(student, ids, values, 2.0).item() == pytest.approx(full.item(), rel=1e-5)
    # k = 1: the teacher puts all mass on its top token, so the term is -log p_s(top) * T^2.
    s = torch.zeros(1, 3)
    one = kd_loss_topk(s, torch.tensor([[2]]), torch.tensor([[5.0]]), 2.0)
    assert one.item() == pytest.approx(math.log(3) * 4)


def test_mixing_by_weight_and_an_empty_batch_keeps_the_graph() -> None:
    kd, sft = torch.tensor(2.0), torch.tensor(4.0)
    assert mix_losses(kd, sft, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert mix_losses(kd, sft, 1.0).item() == pytest.approx(2.0)
    assert mix_losses(kd, sft, 0.0).item() == pytest.approx(4.0)
    empty = torch.zeros(0, 7, requires_grad=True)
    loss = kd_loss(empty, torch.zeros(0, 7), 2.0)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None


# --- vocabulary -------------------------------------------------------------------------------


class _Tok:
    def __init__(self, vocab: dict[str, int]) -> None:
        self._vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)


VOCAB = {f"t{i}": i for i in range(100)}


def test_padding_rows_are_sliced_to_the_common_size() -> None:
    args: dict[str, Any] = {"teacher_uri": "s3://bucket/teacher"}
    assert (
        common_vocab_size(_Tok(VOCAB), _Tok(VOCAB), student_vocab_size=100, teacher_vocab_size=100, **args)
        == 100
    )
    assert (
        common_vocab_size(_Tok(VOCAB), _Tok(VOCAB), student_vocab_size=128, teacher_vocab_size=112, **args)
        == 112
    )


def test_a_different_tokenizer_or_a_short_output_layer_is_refused_naming_the_field_and_sizes() -> None:
    other = dict(VOCAB) | {"extra": 100}
    with pytest.raises(DistillationError) as err:
        common_vocab_size(
            _Tok(VOCAB),
            _Tok(other),
            student_vocab_size=100,
            teacher_vocab_size=101,
            teacher_uri="s3://bucket/teacher",
        )
    msg = str(err.value)
    assert (
        "spec.distillation.teacher.uri" in msg
        and "s3://bucket/teacher" in msg
        and "101" in msg
        and "100" in msg
    )
    with pytest.raises(DistillationError, match=r"spec\.distillation\.teacher\.uri.*96 logits.*student 128"):
        common_vocab_size(
            _Tok(VOCAB),
            _Tok(VOCAB),
            student_vocab_size=128,
            teacher_vocab_size=96,
            teacher_uri="s3://bucket/teacher",
        )


# --- cached vs on the fly, on a tiny model ----------------------------------------------------


def _models(tiny_model_dir: Path, tmp_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.demo import build_tiny_llama

    student_dir = build_tiny_llama(tmp_path / "student", tiny_model_dir, seed=7)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    return student, teacher


@pytest.mark.parametrize("packing", [True, False])
def test_cached_top_vocab_logits_give_the_on_the_fly_loss(
    tiny_model_dir: Path, tmp_path: Path, packing: bool
) -> None:
    torch.set_num_threads(1)
    student, teacher = _models(tiny_model_dir, tmp_path)
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    data = examples(12, seed=4)
    spec = DistillationSpec.model_validate(
        {"teacher": {"uri": "file:///t"}, "temperature": 2.0, "weight": 0.7}
    )
    on_the_fly = Distiller.on_the_fly(spec, teacher, vocab)
    exact = Distiller.from_cache(
        spec,
        cache_teacher_logits(
            teacher,
            data,
            top_k=vocab,
            vocab_size=vocab,
            batch_size=5,
            device="cpu",
            value_dtype=torch.float32,
        ),
        vocab,
    )
    compact = Distiller.from_cache(
        spec,
        cache_teacher_logits(teacher, data, top_k=vocab, vocab_size=vocab, batch_size=3, device="cpu"),
        vocab,
    )
    sparse = Distiller.from_cache(
        spec,
        cache_teacher_logits(teacher, data, top_k=4, vocab_size=vocab, batch_size=3, device="cpu"),
        vocab,
    )
    head = LabelPositionHead(student)
    batches = list(
        iter_batches(data, batch_size=2, max_seq_length=40, packing=packing, pad_token_id=0, seed=1, epoch=3)
    )
    assert len(batches) >= 2
    for batch in batches:
        inputs = model_inputs(batch)
        out = head.forward(student, inputs)
        reference = on_the_fly.loss(out, inputs)
        assert exact.loss(out, inputs).item() == pytest.approx(reference.item(), rel=1e-5)
        assert compact.loss(out, inputs).item() == pytest.approx(reference.item(), rel=1e-3)  # fp16 values
        assert sparse.loss(out, inputs).item() != pytest.approx(reference.item(), rel=1e-3)
        # The loss trains the student: gradients reach its weights.
        student.zero_grad()
        exact.loss(out, inputs).backward()
        assert student.get_output_embeddings().weight.grad is not None
    metrics = on_the_fly.pop_metrics()
    assert set(metrics) == {"kd_loss", "sft_loss"} and metrics["kd_loss"] > 0
    assert on_the_fly.pop_metrics() == {}  # reset after each pop


def test_the_cache_refuses_an_example_it_never_saw(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, teacher = _models(tiny_model_dir, tmp_path)
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    cache = cache_teacher_logits(
        teacher, examples(4, seed=1), top_k=8, vocab_size=vocab, batch_size=2, device="cpu"
    )
    assert len(cache) == 4 and cache.nbytes > 0
    [batch] = list(
        iter_batches(
            examples(2, seed=2),
            batch_size=2,
            max_seq_length=48,
            packing=True,
            pad_token_id=0,
            seed=0,
            epoch=0,
        )
    )
    with pytest.raises(KeyError, match="no cached teacher logits"):
        cache.lookup(model_inputs(batch))


# --- the API ----------------------------------------------------------------------------------


def _job(distillation: dict[str, Any]) -> str:
    doc = yaml.safe_load((REPO / "examples" / "quickstart" / "finetunejob.yaml").read_text())
    doc["spec"]["distillation"] = distillation
    return yaml.safe_dump(doc, sort_keys=False)


def test_the_spec_parses_and_serialises_camel_case() -> None:
    job = parse_finetunejob(
        _job(
            {
                "teacher": {"uri": "modelversion://big/v2"},
                "teacherLogits": "cached",
                "topK": 16,
                "weight": 1.0,
            }
        )
    )
    d = job.spec.distillation
    assert d is not None and d.teacher_logits == "cached" and d.top_k == 16 and d.temperature == 2.0
    api = job.spec.to_api()["distillation"]
    assert (
        api["teacherLogits"] == "cached"
        and api["topK"] == 16
        and api["teacher"]["uri"] == "modelversion://big/v2"
    )
    rc = resolve_run_config(job)
    assert rc.distillation == d
    default = parse_finetunejob(_job({"teacher": {"uri": "s3://bucket/teacher"}})).spec.distillation
    assert default is not None and default.teacher_logits == "onTheFly" and default.top_k == 64


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"temperature": 0}, "spec.distillation.temperature"),
        ({"weight": 1.5}, "spec.distillation.weight"),
        ({"teacherLogits": "sometimes"}, "spec.distillation.teacherLogits"),
        ({"topK": 0}, "spec.distillation.topK"),
        ({"teacher": {"uri": "ftp://x/y"}}, "spec.distillation.teacher.uri"),
        ({"techer": 1}, "spec.distillation.techer"),
    ],
)
def test_bad_values_name_the_field_and_line(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_finetunejob(_job({"teacher": {"uri": "s3://bucket/teacher"}} | bad), "job.yaml")
    assert any(p.startswith("job.yaml:") and field in p for p in err.value.problems), err.value.problems


def test_the_config_digest_ignores_the_teacher_uri_but_not_the_loss_settings() -> None:
    def digest(d: dict[str, Any]) -> str:
        return resolve_run_config(parse_finetunejob(_job(d))).config_digest()

    base = digest({"teacher": {"uri": "s3://bucket/teacher"}})
    assert digest({"teacher": {"uri": "s3://other/t"}}) == base  # the teacher's content digest decides
    assert digest({"teacher": {"uri": "s3://bucket/teacher"}, "temperature": 3}) != base
    assert digest({"teacher": {"uri": "s3://bucket/teacher"}, "teacherLogits": "cached"}) != base


def test_manifest_and_model_card_describe_the_teacher() -> None:
    rc = resolve_run_config(
        parse_finetunejob(
            _job({"teacher": {"uri": "modelversion://big/prod"}, "teacherLogits": "cached", "topK": 8})
        )
    )
    record = {
        "teacher": {
            "uri": "modelversion://big/prod",
            "digest": "ab" * 32,
            "resolved": "modelversion://big/v3",
        }
    }
    extra = distillation_manifest_extra(rc, record)["distillation"]
    assert extra == {
        "teacher": "modelversion://big/prod",
        "teacherVersion": "modelversion://big/v3",
        "teacherDigest": "ab" * 32,
        "temperature": 2.0,
        "weight": 0.5,
        "teacherLogits": "cached",
        "topK": 8,
    }
    card = describe_distillation(rc, record)
    assert (
        "modelversion://big/v3" in card["distillation teacher"] and card["teacher logits"] == "cached (top 8)"
    )
    plain = resolve_run_config(
        parse_finetunejob(_job({"teacher": {"uri": "s3://bucket/teacher"}})).model_copy()
    )
    assert distillation_manifest_extra(plain.model_copy(update={"distillation": None}), {}) == {}
