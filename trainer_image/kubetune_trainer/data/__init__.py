"""The trainer's data layer: read, validate, clean, split, template, tokenise and batch SFT data.

Public entry points (import them from here):

* :func:`prepare_data` — files + tokenizer -> :class:`PreparedData` (train/eval examples + report);
  raises :class:`DataValidationError` before any tokenising when the data is not good enough.
* :func:`validate_files` — the same checks and report without a tokenizer (``kubetune data validate``).
* :func:`iter_batches` / :func:`count_batches` — deterministic, resumable, padded or packed batches.

Also here, imported by the trainer only: :mod:`~kubetune_trainer.data.augment` and
:mod:`~kubetune_trainer.data.curriculum` (``spec.data.augmentation`` / ``curriculum``), and
:mod:`~kubetune_trainer.data.stage`, stage 2 of a run (fetched files + tokenizer -> ``StageData``).

Importing this package does not import torch or transformers (``kubetune data validate`` imports
it in a torch-free ``[cli]`` install); ``data.stage`` does, and this file never imports it.
"""

from kubetune_trainer.data.batching import (
    MODEL_INPUT_KEYS,
    count_batches,
    iter_batches,
    model_inputs,
    pack_rows,
)
from kubetune_trainer.data.prepare import (
    DataReport,
    FileReport,
    PreparedData,
    TokenizedExample,
    prepare_data,
    split_records,
    validate_files,
)
from kubetune_trainer.data.records import (
    DATA_SUFFIXES,
    DataValidationError,
    Message,
    Record,
    RecordError,
    clean_text,
    read_file,
)
from kubetune_trainer.data.settings import (
    DEFAULT_EVAL_SPLIT,
    CleaningSettings,
    DataSettings,
    FieldNames,
)
from kubetune_trainer.data.templates import (
    IGNORE_INDEX,
    RenderedExample,
    Segment,
    TemplateError,
    encode,
    render,
    resolve_template,
)

__all__ = [
    "DATA_SUFFIXES",
    "DEFAULT_EVAL_SPLIT",
    "IGNORE_INDEX",
    "MODEL_INPUT_KEYS",
    "CleaningSettings",
    "DataReport",
    "DataSettings",
    "DataValidationError",
    "FieldNames",
    "FileReport",
    "Message",
    "PreparedData",
    "Record",
    "RecordError",
    "RenderedExample",
    "Segment",
    "TemplateError",
    "TokenizedExample",
    "clean_text",
    "count_batches",
    "encode",
    "iter_batches",
    "model_inputs",
    "pack_rows",
    "prepare_data",
    "read_file",
    "render",
    "resolve_template",
    "split_records",
    "validate_files",
]
