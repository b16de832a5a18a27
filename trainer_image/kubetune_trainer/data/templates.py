"""Prompt templates and tokenisation with answer-only labels.

A template renders a :class:`~kubetune_trainer.data.records.Record` into :class:`Segment` s: pieces of
text that are either trained on (the assistant's answers and the end-of-turn marker after each)
or masked out of the loss (system and user turns, role headers). Each segment is tokenised on
its own, so the boundary between masked and trained tokens is exact; the price is that a token
never spans a segment boundary, which is also how generation sees the prompt.

Templates (``data.template``):

* ``inst``: ``<bos>[INST] question [/INST] answer <eos>`` per exchange (Llama-2 / Mistral); a system
  prompt goes into the first exchange as ``<<SYS>>\\n...\\n<</SYS>>\\n\\n``.
* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn; the answer and its ``<|im_end|>``
  are trained.
* ``alpaca``: ``<bos>[system\\n\\n]### Instruction:\\n...\\n\\n[### Input:\\n...\\n\\n]### Response:\\n
  answer<eos>``; further exchanges of a chat follow after a blank line.
* ``tokenizer``: the tokenizer's own chat template (``apply_chat_template``); the trained part of
  each assistant turn is what the template adds for that turn beyond its generation prompt.
* ``auto``: ``tokenizer`` when the tokenizer has a chat template, else ``chatml``.

User text is tokenised with special tokens split into plain text, so data cannot inject control
tokens such as ``<|im_end|>``; template markup is tokenised with special tokens recognised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubetune_trainer.data.records import Message, Record
from kubetune_trainer.data.settings import TEMPLATE_NAMES

IGNORE_INDEX = -100
"""Label value ignored by the loss (PyTorch's cross-entropy default)."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the data layer uses."""

    bos_token: Any
    eos_token: Any
    chat_template: Any

    def __call__(self, text: Any, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class TemplateError(ValueError):
    """The template cannot be used with this tokenizer (no chat template, not prefix-stable, ...)."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text.

    ``train``: its tokens are labelled (loss) or masked (-100). ``user_text``: the text came from
    the data, so special-token strings in it are tokenised as plain text.
    """

    text: str
    train: bool
    user_text: bool = False


@dataclass(frozen=True)
class RenderedExample:
    """Segments of one record; ``answer_start`` is the index of the final answer's first segment."""

    segments: tuple[Segment, ...]
    answer_start: int

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def prompt_text(self) -> str:
        """Everything before the final answer: what generation is given."""
        return "".join(s.text for s in self.segments[: self.answer_start])


def resolve_template(name: str, tokenizer: Tokenizer) -> str:
    """The concrete template for ``data.template`` with this tokenizer (``auto`` resolved).

    Raises TemplateError for ``tokenizer`` when the tokenizer has no chat template.
    """
    name = str(name)
    if name not in TEMPLATE_NAMES:
        raise TemplateError(f"unknown template {name!r}; expected one of {TEMPLATE_NAMES}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        return "tokenizer" if has_template else "chatml"
    if name == "tokenizer" and not has_template:
        raise TemplateError(
            "data.template is 'tokenizer' but the base model's tokenizer has no chat template"
        )
    return name


def _special(tokenizer: Tokenizer, attr: str) -> str:
    value = getattr(tokenizer, attr, None)
    return str(value) if value else ""


def _exchanges(messages: Sequence[Message]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system, [(user text, answer)]) — consecutive user turns joined by a blank line."""
    system = messages[0].content if messages and messages[0].role == "system" else None
    pending: list[str] = []
    pairs: list[tuple[str, str]] = []
    for m in messages[1:] if system is not None else messages:
        if m.role == "assistant":
            pairs.append(("\n\n".join(pending), m.content))
            pending = []
        else:
            pending.append(m.content)
    return system, pairs


def _render_inst(record: Record, tokenizer: Tokenizer) -> list[Segment]:
    bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
    system, pairs = _exchanges(record.messages)
    out: list[Segment] = []
    for i, (user, answer) in enumerate(pairs):
        out.append(Segment(f"{bos}[INST] ", False))
        if i == 0 and system:
            out += [
                Segment("<<SYS>>\n", False),
                Segment(system, False, True),
                Segment("\n<</SYS>>\n\n", False),
            ]
        out += [Segment(user, False, True), Segment(" [/INST]", False)]
        out += [Segment(" " + answer, True, True), Segment(f" {eos}", True)]
    return out


def _render_chatml(record: Record, tokenizer: Tokenizer) -> list[Segment]:
    out: list[Segment] = []
    for m in record.messages:
        train = m.role == "assistant"
        out += [Segment(f"<|im_start|>{m.role}\n", False), Segment(m.content, train, True)]
        out += [Segment("<|im_end|>", train), Segment("\n", False)]
    return out


def _render_alpaca(record: Record, tokenizer: Tokenizer) -> list[Segment]:
    bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
    system, pairs = _exchanges(record.messages)
    out: list[Segment] = [Segment(bos, False)] if bos else []
    if system:
        out += [Segment(system, False, True), Segment("\n\n", False)]
    for i, (user, answer) in enumerate(pairs):
        if i:
            out.append(Segment("\n\n", False))
        # An instruction record keeps instruction and input apart; other forms have no input.
        instruction, extra = (
            (record.instruction, record.input) if record.instruction is not None else (user, "")
        )
        out += [Segment("### Instruction:\n", False), Segment(instruction or "", False, True)]
        if extra:
            out += [Segment("\n\n### Input:\n", False), Segment(extra, False, True)]
        out += [Segment("\n\n### Response:\n", False), Segment(answer, True, True), Segment(eos, True)]
    return out


def _render_tokenizer(record: Record, tokenizer: Tokenizer) -> list[Segment]:
    convo = [{"role": m.role, "content": m.content} for m in record.messages]
    out: list[Segment] = []
    done = ""
    for i, m in enumerate(record.messages):
        if m.role != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(convo[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(convo[: i + 1], tokenize=False)
        if not (isinstance(prompt, str) and isinstance(full, str)):
            raise TemplateError("apply_chat_template(tokenize=False) did not return text")
        # Answer-only labels need each rendering to extend the previous one; templates that
        # rewrite earlier turns (e.g. dropping reasoning) do not, and are refused rather than
        # trained with wrong labels.
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TemplateError(
                "the tokenizer's chat template is not prefix-stable (rendering a longer chat changes "
                "earlier text), so answer tokens cannot be located; use template chatml, inst or alpaca"
            )
        out += [Segment(prompt[len(done) :], False), Segment(full[len(prompt) :], True)]
        done = full
    return out


_RENDERERS = {
    "inst": _render_inst,
    "chatml": _render_chatml,
    "alpaca": _render_alpaca,
    "tokenizer": _render_tokenizer,
}


def render(record: Record, template: str, tokenizer: Tokenizer) -> RenderedExample:
    """Render a record with a concrete template (see :func:`resolve_template`)."""
    if template not in _RENDERERS:
        raise TemplateError(f"template {template!r} is not concrete; resolve it first")
    segments = [s for s in _RENDERERS[template](record, tokenizer) if s.text]
    trained = [i for i, s in enumerate(segments) if s.train]
    if not trained:
        raise TemplateError(f"template {template!r} rendered no answer for {record.file}:{record.line}")
    # The final answer is the last run of trained segments.
    start = trained[-1]
    while start > 0 and segments[start - 1].train:
        start -= 1
    return RenderedExample(tuple(segments), start)


def encode(
    rendered: Sequence[RenderedExample], tokenizer: Tokenizer
) -> list[tuple[list[int], list[int], int]]:
    """Per example: token ids, labels (-100 outside trained segments), and the index of the first
    token of the final answer. No special tokens are added beyond those the template wrote.

    Segments of all examples are tokenised in two batched calls (user text, markup) for speed.
    """
    where: list[tuple[int, int]] = []
    texts: dict[bool, list[str]] = {True: [], False: []}
    slots: list[tuple[bool, int]] = []
    for e, example in enumerate(rendered):
        for s, seg in enumerate(example.segments):
            where.append((e, s))
            slots.append((seg.user_text, len(texts[seg.user_text])))
            texts[seg.user_text].append(seg.text)
    tokens: dict[bool, list[list[int]]] = {}
    for split, batch in texts.items():
        tokens[split] = (
            tokenizer(batch, add_special_tokens=False, split_special_tokens=split)["input_ids"]
            if batch
            else []
        )
    out: list[tuple[list[int], list[int], int]] = [([], [], 0) for _ in rendered]
    for (e, s), (split, k) in zip(where, slots, strict=True):
        ids, labels, answer_at = out[e]
        seg = rendered[e].segments[s]
        if s == rendered[e].answer_start:
            answer_at = len(ids)
        piece = list(tokens[split][k])
        ids += piece
        labels += piece if seg.train else [IGNORE_INDEX] * len(piece)
        out[e] = (ids, labels, answer_at)
    return out
