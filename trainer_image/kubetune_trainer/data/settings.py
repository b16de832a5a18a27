"""The data settings the data layer reads, as structural types.

``kubetune_api.models.DataSpec`` satisfies :class:`DataSettings`; so does any object with the same
attributes (a dataclass in a test, a future ``kubetune data validate`` command line). Typing against
these protocols keeps the data layer free of the API package's validation rules: those run once,
when the FineTuneJob is resolved into a RunConfig.
"""

from __future__ import annotations

from typing import Protocol

RECORD_FORMS: tuple[str, ...] = ("instruction", "prompt-completion", "chat")
"""Record forms a file may hold; ``format: auto`` detects one of these per file."""

TEMPLATE_NAMES: tuple[str, ...] = ("auto", "inst", "chatml", "alpaca", "tokenizer")

DEFAULT_EVAL_SPLIT = 0.1
"""Share held out for evaluation when neither eval files nor evalSplit are given."""


class FieldNames(Protocol):
    """Column names in the data files (``data.fields``)."""

    @property
    def instruction(self) -> str: ...
    @property
    def input(self) -> str: ...
    @property
    def output(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def completion(self) -> str: ...
    @property
    def messages(self) -> str: ...


class CleaningSettings(Protocol):
    """``data.cleaning``."""

    @property
    def strip_control_chars(self) -> bool: ...
    @property
    def normalize_whitespace(self) -> bool: ...
    @property
    def normalize_quotes(self) -> bool: ...
    @property
    def deduplicate(self) -> bool: ...
    @property
    def min_answer_chars(self) -> int: ...
    @property
    def max_record_chars(self) -> int: ...


class DataSettings(Protocol):
    """``data`` of a FineTuneJob spec, minus the URIs (the files are fetched before this layer runs)."""

    @property
    def eval_split(self) -> float | None: ...
    @property
    def format(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def fields(self) -> FieldNames: ...
    @property
    def system_prompt(self) -> str | None: ...
    @property
    def cleaning(self) -> CleaningSettings: ...
    @property
    def max_invalid_records(self) -> int: ...
