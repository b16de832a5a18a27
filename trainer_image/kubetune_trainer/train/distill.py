"""Knowledge distillation: the student also learns the teacher's token distributions.

The training loss at the trained (labelled) tokens of a batch is

    loss = weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - weight) * CE(student, labels)

with the KL averaged over those tokens (Hinton et al.; the T^2 keeps the gradient scale of the soft
term independent of T). Evaluation loss stays plain cross-entropy, so distilled and plain runs
compare on the same measure.

Teacher logits come from one of two sources (``spec.distillation.teacherLogits``):

* ``onTheFly`` — the teacher sits next to the student (eval mode, no gradients, same device and
  dtype policy) and runs on every micro-batch, its LM head restricted to the labelled positions
  like the student's (:class:`~kubetune_trainer.train.label_head.LabelPositionHead`). Exact, but two
  models in memory and a teacher forward per step.
* ``cached`` — before training the teacher runs once over the training examples (each example on
  its own, so the cache does not depend on packing, batch order, resume or the rank), keeps the
  ``topK`` largest logits per trained token (ids int32, values fp16) and is freed. Training holds
  one model; the KL is the standard sparse one: the teacher's softmax over its top-k logits against
  the student's full-vocabulary log-softmax gathered at those ids (equal to the full KL when
  k = vocabulary). Batch positions are matched to cached examples by content (token ids and
  trained-position mask): identical examples have identical teacher outputs, so the match needs
  no bookkeeping in the batches and survives any order.

Student and teacher must share the tokenizer (same vocabulary). Model vocabulary sizes may differ
by padding rows only (both at least ``len(tokenizer)``); logits are then compared on the common
size. Anything else is a :class:`DistillationError` (exit code 3, reason InvalidSpec).

The teacher itself is fetched by the fetch stage (:mod:`kubetune_trainer.fetch.teacher`);
:func:`build_distiller` is what the train stage calls with it.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kubetune_api.models import DistillationSpec
from kubetune_api.runconfig import RunConfig
from kubetune_trainer.data import TokenizedExample, iter_batches
from kubetune_trainer.data.batching import Example, model_inputs
from kubetune_trainer.data.templates import IGNORE_INDEX
from kubetune_trainer.fetch.teacher import TEACHER_FIELD, Teacher
from kubetune_trainer.runtime import Runtime
from kubetune_trainer.train.label_head import LabelledLogits, LabelPositionHead

log = logging.getLogger("kubetune.trainer")


class DistillationError(ValueError):
    """The teacher cannot distil into this student (different tokenizer...); names the spec field."""


# --- loss math ----------------------------------------------------------------------------------


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_n KL(softmax(teacher/T) || softmax(student/T))`` over full vocabularies.

    Both inputs are ``[n, vocab]`` with the same vocabulary; computed in fp32. With ``n == 0`` the
    result is 0 with the student's graph intact (a batch without trained tokens).
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    # batchmean: the sum over the vocabulary, averaged over positions = the per-token KL's mean.
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def kd_loss_topk(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """The sparse (top-k) KD term: ``T^2 * mean_n sum_k p_t,k (log p_t,k - log p_s[id_k])``.

    ``teacher_ids``/``teacher_values`` are ``[n, k]`` (the teacher's k largest logits per position);
    the teacher distribution is the softmax over those k values at T, the student's is its full
    vocabulary log-softmax at T gathered at the ids. Equals :func:`kd_loss` when k = vocabulary.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_ids.long())
    log_teacher = F.log_softmax(teacher_values.float() / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return kl.mean() * (t * t)


def mix_losses(kd: torch.Tensor, sft: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * kd + (1 - weight) * sft`` (the KD term already carries its T^2)."""
    return weight * kd + (1.0 - weight) * sft


# --- vocabulary ---------------------------------------------------------------------------------


def common_vocab_size(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    student_vocab_size: int,
    teacher_vocab_size: int,
    teacher_uri: str,
) -> int:
    """The number of logits student and teacher are compared on.

    Raises DistillationError, naming spec.distillation.teacher.uri and both sizes, when the
    tokenizers' vocabularies differ or a model's output layer is smaller than the tokenizer.
    """
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        differing = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:3]
        raise DistillationError(
            f"{TEACHER_FIELD}: the teacher {teacher_uri} has a different tokenizer than the student "
            f"(teacher vocabulary {len(t_vocab)} tokens, student {len(s_vocab)}; e.g. "
            f"{', '.join(repr(tok) + '->' + str(i) for tok, i in differing)}). "
            "Distillation compares token distributions, so both must use the same tokenizer."
        )
    n = len(student_tokenizer)
    if student_vocab_size == teacher_vocab_size:
        return student_vocab_size
    if student_vocab_size >= n and teacher_vocab_size >= n:
        # Extra output rows beyond the tokenizer are padding (e.g. rounded up to a multiple of 64).
        return min(student_vocab_size, teacher_vocab_size)
    raise DistillationError(
        f"{TEACHER_FIELD}: the teacher {teacher_uri} has a vocabulary of {teacher_vocab_size} logits and "
        f"the student {student_vocab_size}, but the tokenizer has {n} tokens: the sizes may differ only "
        "by padding rows beyond the tokenizer"
    )


# --- the cached teacher -------------------------------------------------------------------------


def example_key(input_ids: torch.Tensor, trained: torch.Tensor) -> bytes:
    """Content key of one example: its token ids and which positions are trained (1-D tensors).

    ``trained[j]`` says whether position ``j`` has a target (``labels[j + 1] != -100``). Two
    examples with the same key get the same teacher logits, wherever they sit in a batch.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(input_ids.detach().to("cpu", torch.int32).contiguous().numpy().tobytes())
    h.update(trained.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.digest()


def _segments(inputs: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every example in a batch: packed rows restart ``position_ids`` at 0
    for each example; padded rows hold one example each, as long as its attention mask."""
    input_ids = inputs["input_ids"]
    rows, width = int(input_ids.shape[0]), int(input_ids.shape[1])
    out: list[tuple[int, int, int]] = []
    if inputs.get("position_ids") is not None:
        starts_all = (inputs["position_ids"] == 0).cpu()
        for r in range(rows):
            starts = [int(s) for s in starts_all[r].nonzero().flatten().tolist()] or [0]
            bounds = [*starts, width]
            out.extend((r, bounds[i], bounds[i + 1]) for i in range(len(starts)))
        return out
    mask = inputs.get("attention_mask")
    lengths = mask.sum(dim=1).cpu().tolist() if mask is not None else [width] * rows
    return [(r, 0, int(n)) for r, n in enumerate(lengths)]


class TeacherLogitCache:
    """The teacher's top-k logits per trained token of every training example, on the CPU.

    Filled by :func:`cache_teacher_logits`; :meth:`lookup` returns the ``[n, k]`` ids and values
    for a batch's trained positions in the order :class:`LabelPositionHead` returns them.
    """

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self._entries: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def add(self, key: bytes, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Store one example's ``[m, k]`` ids and values (m = its trained positions)."""
        self._entries[key] = (ids, values)

    @property
    def nbytes(self) -> int:
        """Memory the cached tensors hold."""
        return sum(
            i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in self._entries.values()
        )

    def lookup(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``[n, k]`` (int64) and values ``[n, k]`` for every trained position of the batch.

        Raises KeyError when an example of the batch was not cached (the training set changed).
        """
        labels, input_ids = inputs["labels"], inputs["input_ids"]
        ids: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        # Row-major, segments left to right: the order of LabelPositionHead's (rows, cols).
        for r, start, end in _segments(inputs):
            trained = labels[r, start + 1 : end] != IGNORE_INDEX
            if not bool(trained.any()):
                continue
            key = example_key(input_ids[r, start:end], trained)
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(
                    f"no cached teacher logits for the example at row {r}, tokens {start}-{end} "
                    "(was the training set changed after the teacher pre-pass?)"
                )
            ids.append(entry[0])
            values.append(entry[1])
        if not ids:
            return torch.zeros((0, self.top_k), dtype=torch.long), torch.zeros((0, self.top_k))
        return torch.cat(ids).long(), torch.cat(values)


def estimate_cache_bytes(examples: Sequence[Example], top_k: int, value_bytes: int = 2) -> int:
    """Upper bound of :class:`TeacherLogitCache` memory for these examples (int32 ids + values)."""
    positions = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)
    return positions * top_k * (4 + value_bytes)


def cache_teacher_logits(
    model: Any,
    examples: Sequence[Example],
    *,
    top_k: int,
    vocab_size: int,
    batch_size: int,
    device: Any,
    value_dtype: torch.dtype | None = None,
) -> TeacherLogitCache:
    """Run ``model`` once over ``examples`` and keep its top-k logits per trained token.

    Examples go through in right-padded batches of ``batch_size`` (sorted by length, to pad little);
    each example's logits depend only on its own tokens, so the cache matches any later packing or
    order. ``vocab_size`` limits the logits considered (padding rows beyond it are ignored);
    ``value_dtype`` defaults to fp16 (values), ids are int32. Duplicate examples are stored once.
    """
    value_dtype = value_dtype or torch.float16
    k = min(top_k, vocab_size)
    cache = TeacherLogitCache(k)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    ordered = [examples[i] for i in order]
    if not ordered:
        return cache
    head = LabelPositionHead(model)
    try:
        with torch.no_grad():
            batches = iter_batches(
                ordered,
                batch_size=batch_size,
                max_seq_length=max(len(e.input_ids) for e in ordered),
                packing=False,
                pad_token_id=0,  # right padding under an attention mask and -100 labels: never seen
                seed=0,
                epoch=0,
                shuffle=False,
            )
            for batch in batches:
                inputs = {
                    k_: v.to(device) if hasattr(v, "to") else v for k_, v in model_inputs(batch).items()
                }
                out = head.forward(model, inputs)
                top_values, top_ids = out.logits[:, :vocab_size].float().topk(k, dim=-1)
                top_ids, top_values = top_ids.to("cpu", torch.int32), top_values.to("cpu", value_dtype)
                rows = out.rows.cpu()
                labels = batch["labels"]
                for r, _start, end in _segments(batch):
                    trained = labels[r, 1:end] != IGNORE_INDEX
                    if not bool(trained.any()):
                        continue
                    key = example_key(batch["input_ids"][r, :end], trained)
                    if key not in cache:
                        sel = rows == r
                        cache.add(key, top_ids[sel].clone(), top_values[sel].clone())
    finally:
        head.remove()
    return cache


# --- the distiller ------------------------------------------------------------------------------


class Distiller:
    """Turns the student's labelled logits into the distillation training loss.

    Create with :meth:`on_the_fly` (teacher model held) or :meth:`from_cache` (top-k cache held);
    the recipe calls :meth:`loss` for every training micro-batch and :meth:`pop_metrics` when it
    logs. Not used for evaluation loss.
    """

    def __init__(
        self,
        *,
        temperature: float,
        weight: float,
        vocab_size: int,
        teacher: Any = None,
        cache: TeacherLogitCache | None = None,
    ) -> None:
        if (teacher is None) == (cache is None):
            raise ValueError("a Distiller needs exactly one of a teacher model or a logit cache")
        self.temperature = temperature
        self.weight = weight
        self.vocab_size = vocab_size
        self.teacher = teacher
        self.cache = cache
        self._head: Any = None
        if teacher is not None:
            self._head = LabelPositionHead(teacher)
        self._sums = [0.0, 0.0, 0.0]  # kd, sft, micro-batches since the last pop_metrics

    @classmethod
    def on_the_fly(cls, spec: DistillationSpec, teacher: Any, vocab_size: int) -> Distiller:
        """A distiller running ``teacher`` (already on the device, eval mode) every step."""
        return cls(temperature=spec.temperature, weight=spec.weight, vocab_size=vocab_size, teacher=teacher)

    @classmethod
    def from_cache(cls, spec: DistillationSpec, cache: TeacherLogitCache, vocab_size: int) -> Distiller:
        """A distiller reading the teacher's top-k logits from ``cache``."""
        return cls(temperature=spec.temperature, weight=spec.weight, vocab_size=vocab_size, cache=cache)

    def kd_term(self, out: LabelledLogits, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``T^2 * KL(teacher || student)`` averaged over the batch's trained tokens."""
        student = out.logits[:, : self.vocab_size]
        if self.cache is not None:
            ids, values = self.cache.lookup(inputs)
            if ids.shape[0] != student.shape[0]:
                raise RuntimeError(
                    f"teacher cache gave {ids.shape[0]} positions for {student.shape[0]} trained tokens"
                )
            dev = student.device
            return kd_loss_topk(student, ids.to(dev), values.to(dev), self.temperature)
        with torch.no_grad():
            teacher = self._head.forward(self.teacher, dict(inputs)).logits[:, : self.vocab_size]
        return kd_loss(student, teacher, self.temperature)

    def loss(self, out: LabelledLogits, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The training loss for one micro-batch: the KD term mixed with the SFT cross-entropy.

        ``out`` is the student's :class:`LabelledLogits` for ``inputs`` (the model inputs on the
        device, with ``labels``).
        """
        sft = out.cross_entropy()
        kd = self.kd_term(out, inputs)
        self._sums[0] += float(kd.detach())
        self._sums[1] += float(sft.detach())
        self._sums[2] += 1
        return mix_losses(kd, sft, self.weight)

    def pop_metrics(self, reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
        """Mean ``kd_loss`` and ``sft_loss`` since the last call ({} when none), then reset.

        ``reduce`` sums the running totals over ranks (``Runtime.all_reduce_sum``); every rank must
        call it at the same point.
        """
        sums = reduce(list(self._sums)) if reduce is not None else list(self._sums)
        self._sums = [0.0, 0.0, 0.0]
        if sums[2] == 0:
            return {}
        return {"kd_loss": sums[0] / sums[2], "sft_loss": sums[1] / sums[2]}


# --- the train stage's wiring: teacher model, distiller, manifest and model-card lines --------


def _load_teacher(rc: RunConfig, runtime: Runtime, teacher: Teacher) -> Any:
    spec = rc.distillation
    assert spec is not None
    # The student's dtype policy: compute dtype on GPUs, fp32 on CPU (bf16 is slow on most CPUs).
    dtype = runtime.dtype if runtime.device.type == "cuda" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(teacher.path),
        dtype=dtype,
        trust_remote_code=spec.teacher.trust_remote_code,
        use_safetensors=None if spec.teacher.allow_pickle else True,
    )
    model.config.use_cache = False
    model.to(runtime.device)
    model.eval()
    model.requires_grad_(False)
    return model


def build_distiller(
    rc: RunConfig,
    runtime: Runtime,
    teacher: Teacher | None,
    tokenizer: Any,
    train_examples: Sequence[TokenizedExample],
    *,
    student_dir: Path,
    stream: TextIO | None = None,
) -> Distiller | None:
    """The Distiller for ``rc.distillation`` (None without it): loads the teacher, checks the
    vocabulary against the student's (``tokenizer``, the model config in ``student_dir``) and, for
    ``cached``, runs the teacher pre-pass over ``train_examples`` and frees the teacher.

    Every rank builds its own (under DDP each rank caches the whole training set: the examples a
    rank sees change every epoch). ``stream`` gets one line about the cache on the main rank.
    Raises DistillationError for an incompatible teacher.
    """
    spec = rc.distillation
    if spec is None or teacher is None:
        return None
    teacher_tokenizer = AutoTokenizer.from_pretrained(
        str(teacher.path), trust_remote_code=spec.teacher.trust_remote_code
    )
    student_config = AutoConfig.from_pretrained(
        str(student_dir), trust_remote_code=rc.model.base.trust_remote_code
    )
    model = _load_teacher(rc, runtime, teacher)
    vocab = common_vocab_size(
        tokenizer,
        teacher_tokenizer,
        student_vocab_size=int(student_config.get_text_config().vocab_size),
        teacher_vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        teacher_uri=teacher.uri,
    )
    if spec.teacher_logits == "onTheFly":
        return Distiller.on_the_fly(spec, model, vocab)

    k = min(spec.top_k, vocab)
    estimate = estimate_cache_bytes(train_examples, k)
    log.info(
        "distillation: caching the teacher's top-%d logits for %d training examples (about %.1f MiB)",
        k,
        len(train_examples),
        estimate / 2**20,
    )
    cache = cache_teacher_logits(
        model,
        train_examples,
        top_k=k,
        vocab_size=vocab,
        batch_size=rc.training.batch_size,
        device=runtime.device,
    )
    del model
    gc.collect()
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    if runtime.is_main and stream is not None:
        print(
            f"[kubetune] distillation: cached the teacher's top-{k} logits for {len(cache)} distinct "
            f"training examples ({cache.nbytes / 2**20:.1f} MiB in memory); the teacher is freed",
            file=stream,
            flush=True,
        )
    return Distiller.from_cache(spec, cache, vocab)


def distillation_manifest_extra(rc: RunConfig, record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"distillation": {...}}`` for the version manifest's extra (``{}`` without distillation)."""
    spec = rc.distillation
    if spec is None:
        return {}
    teacher = record.get("teacher") or {}
    return {
        "distillation": {
            "teacher": spec.teacher.uri,
            "teacherVersion": teacher.get("resolved"),
            "teacherDigest": teacher.get("digest"),
            "temperature": spec.temperature,
            "weight": spec.weight,
            "teacherLogits": spec.teacher_logits,
            "topK": spec.top_k if spec.teacher_logits == "cached" else None,
        }
    }


def describe_distillation(rc: RunConfig, record: Mapping[str, Any]) -> dict[str, Any]:
    """Model-card hyperparameter lines (``{}`` without distillation)."""
    spec = rc.distillation
    if spec is None:
        return {}
    teacher = record.get("teacher") or {}
    name = teacher.get("resolved") or spec.teacher.uri
    digest = teacher.get("digest")
    logits = spec.teacher_logits if spec.teacher_logits == "onTheFly" else f"cached (top {spec.top_k})"
    return {
        "distillation teacher": f"{name}" + (f" (sha256 {digest[:16]}…)" if digest else ""),
        "distillation loss": (
            f"{spec.weight:g} x T^2 x KL(teacher || student) + {1 - spec.weight:g} x SFT, "
            f"T = {spec.temperature:g}"
        ),
        "teacher logits": logits,
    }
