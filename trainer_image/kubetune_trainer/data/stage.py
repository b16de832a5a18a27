"""The data stage of a run: the fetched files of one stage -> tokenised examples in curriculum order.

Input: the :class:`~kubetune_trainer.context.RunContext`, the stage's :class:`DataFiles` (fetch's
``Inputs`` is one) and the tokenizer (:func:`load_tokenizer`). Output: :class:`StageData` — the
:class:`~kubetune_trainer.data.PreparedData` (train/eval examples and the data report) and the
curriculum order keys. Rank 0 also starts the stage's ``staging/`` folder with
``training/data-report.json`` and prints the data line.

With a node cache (``KUBETUNE_CACHE_DIR``), the prepared data is looked up under a key of every
input that decides it (:mod:`~kubetune_trainer.data.cached`): a hit skips reading and tokenising
(the log says so, and the data report's ``cache`` is ``{"hit": true, "key": ...}``); a miss
tokenises and inserts it.

Raises DataValidationError and TemplateError (from :func:`~kubetune_trainer.data.prepare_data`),
and BadInputError for data the run cannot use (too few records to split, no example left, an
unusable term dictionary).

Unlike the library modules of this package, this module imports transformers (for the tokenizer);
``kubetune_trainer.data`` itself does not import it, so ``kubetune data validate`` stays torch-free.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from transformers import AutoTokenizer

from kubetune_api.runconfig import RunConfig
from kubetune_trainer.cache import CacheError, NodeCache
from kubetune_trainer.context import BadInputError, RunContext
from kubetune_trainer.data import (
    DataValidationError,
    PreparedData,
    TemplateError,
    TokenizedExample,
    prepare_data,
)
from kubetune_trainer.data.augment import Augmenter, TermDictionaryError, augmenter_from_spec
from kubetune_trainer.data.cached import PREPARED_FILE, dump_prepared, load_prepared, tokenized_key
from kubetune_trainer.data.curriculum import curriculum_keys, read_difficulties


class DataFiles(Protocol):
    """The fetched files of one stage (``kubetune_trainer.fetch.inputs.Inputs`` has them)."""

    @property
    def train_files(self) -> list[Path]: ...
    @property
    def eval_files(self) -> list[Path] | None: ...
    @property
    def display_names(self) -> dict[Path, str]: ...
    @property
    def term_dictionaries(self) -> list[Path | None]: ...  # the last one is this stage's own


@dataclass
class StageData:
    """What training gets from the data stage: prepared examples and their curriculum keys."""

    prepared: PreparedData
    order_keys: list[float] | None  # one per training example, lower = easier; None = shuffle


def load_tokenizer(ctx: RunContext, base_dir: Path) -> Any:
    """The base model's tokenizer, with a pad token (EOS when it has none). Stage ``PreparingData``."""
    ctx.reporter.stage("PreparingData")
    tokenizer = AutoTokenizer.from_pretrained(
        str(base_dir), trust_remote_code=ctx.rc.model.base.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_stage_data(ctx: RunContext, files: DataFiles, tokenizer: Any, *, label: str = "") -> StageData:
    """Augment, clean, split and tokenise ``ctx.rc.data`` (stage ``PreparingData``); rank 0 writes
    ``staging/training/data-report.json`` into a fresh staging folder."""
    rc, reporter = ctx.rc, ctx.reporter
    reporter.stage("PreparingData", label)
    cache = _node_cache(ctx)
    key = _cache_key(ctx, cache, files, tokenizer)
    prepared = _from_cache(ctx, cache, key)
    hit = prepared is not None
    if prepared is None:
        try:
            augmenter = _augmenter(rc, files.term_dictionaries[-1])
            prepared = prepare_data(
                files.train_files,
                files.eval_files,
                tokenizer,
                rc.data,
                max_seq_length=rc.training.max_seq_length,
                seed=rc.training.seed,
                display_names=files.display_names,
                augmenter=augmenter,
            )
        except (TemplateError, DataValidationError):
            raise
        except ValueError as exc:  # too few records to split, no example left after cleaning...
            raise BadInputError(str(exc)) from None
        _into_cache(ctx, cache, key, prepared)
    order_keys, curriculum_summary = _curriculum(rc, files, prepared.train)
    if ctx.runtime.is_main:
        shutil.rmtree(ctx.staging, ignore_errors=True)
        (ctx.staging / "training").mkdir(parents=True)
        data_report = prepared.report.to_dict()
        if rc.data.curriculum.order != "none":
            data_report["curriculum"] = curriculum_summary
        if cache is not None:
            data_report["cache"] = {"hit": hit, "key": key}
            if hit:
                print(
                    f"[kubetune] {label + ' ' if label else ''}data: tokenized examples from the cache "
                    f"(key {str(key)[:16]}…), tokenization skipped",
                    file=reporter.stream,
                    flush=True,
                )
        (ctx.staging / "training" / "data-report.json").write_text(json.dumps(data_report, indent=2))
        _print_recipe_data_notes(data_report, reporter.stream)
        invalid = data_report.get("invalid")
        print(
            f"[kubetune] {label + ' ' if label else ''}data: {len(prepared.train)} train / "
            f"{len(prepared.eval)} eval examples"
            + (f", {invalid} invalid records skipped" if invalid else ""),
            file=reporter.stream,
            flush=True,
        )
    return StageData(prepared=prepared, order_keys=order_keys)


def _say(ctx: RunContext, line: str) -> None:
    if ctx.runtime.is_main:
        print(f"[kubetune] {line}", file=ctx.reporter.stream, flush=True)


def _node_cache(ctx: RunContext) -> NodeCache | None:
    """The node cache (``KUBETUNE_CACHE_DIR``), or None: unset, or unusable (a warning)."""
    try:
        return NodeCache.from_env(warn=lambda msg: _say(ctx, f"warning: {msg}"))
    except (CacheError, OSError) as exc:
        _say(ctx, f"warning: node cache unusable, tokenizing without it: {exc}")
        return None


def _cache_key(ctx: RunContext, cache: NodeCache | None, files: DataFiles, tokenizer: Any) -> str | None:
    if cache is None:
        return None
    try:
        return tokenized_key(
            ctx.rc,
            files.train_files,
            files.eval_files,
            files.display_names,
            tokenizer,
            files.term_dictionaries[-1],
        )
    except OSError as exc:
        _say(ctx, f"warning: node cache: no key for the tokenized data ({exc})")
        return None


def _from_cache(ctx: RunContext, cache: NodeCache | None, key: str | None) -> PreparedData | None:
    """The prepared data under ``tokenized/<key>``, or None (a miss, or an unreadable entry: a warning)."""
    if cache is None or key is None:
        return None
    try:
        with cache.reading("tokenized", key) as entry:
            if entry is None:
                return None
            return load_prepared((entry.path / PREPARED_FILE).read_text(encoding="utf-8"))
    except (CacheError, OSError, ValueError, KeyError, TypeError) as exc:
        _say(ctx, f"warning: node cache: tokenized data not read from it ({exc}); tokenizing")
        return None


def _into_cache(ctx: RunContext, cache: NodeCache | None, key: str | None, prepared: PreparedData) -> None:
    if cache is None or key is None:
        return
    text = dump_prepared(prepared)

    def fill(folder: Path) -> None:
        (folder / PREPARED_FILE).write_text(text, encoding="utf-8")

    try:
        cache.put(
            "tokenized",
            key,
            fill,
            source=f"{ctx.rc.job.name} ({len(prepared.train)} train / {len(prepared.eval)} eval examples)",
        )
    except (CacheError, OSError) as exc:
        _say(ctx, f"warning: node cache: tokenized data not cached ({exc})")


def _augmenter(rc: RunConfig, terms_path: Path | None) -> Augmenter | None:
    """The Augmenter for data.augmentation, or None. Raises BadInputError for a bad dictionary."""
    aug = rc.data.augmentation
    if aug is None:
        return None
    try:
        return augmenter_from_spec(
            aug,
            default_seed=rc.training.seed,
            terms_path=terms_path,
            terms_name=aug.synonyms.uri if aug.synonyms is not None else None,
        )
    except TermDictionaryError as exc:
        raise BadInputError(str(exc)) from None


def _curriculum(
    rc: RunConfig, files: DataFiles, train: Sequence[TokenizedExample]
) -> tuple[list[float] | None, dict[str, Any]]:
    """Curriculum keys per training example (data.curriculum) and the report's summary."""
    cur = rc.data.curriculum
    difficulties = None
    if cur.order == "field" and cur.difficulty_field is not None:
        difficulties = read_difficulties(files.train_files, cur.difficulty_field, files.display_names)
    keys, summary = curriculum_keys(
        train, cur.order, difficulties=difficulties, difficulty_field=cur.difficulty_field
    )
    summary["firstEpochOnly"] = cur.first_epoch_only
    return keys, summary


def _print_recipe_data_notes(data_report: dict[str, Any], stream: TextIO) -> None:
    """One line each for augmentation and curriculum, when they are on."""
    aug = data_report.get("augmentation")
    if aug:
        print(
            f"[kubetune] augmentation: {aug['augmentedRecords']} augmented copies of "
            f"{aug['originalRecords']} training records (augmented share {aug['augmentedShare']:.1%})",
            file=stream,
            flush=True,
        )
    cur = data_report.get("curriculum")
    if cur:
        missing = cur.get("missingDifficulty")
        print(
            f"[kubetune] curriculum: easy-to-hard by {cur['order']}"
            + (" (first epoch only)" if cur.get("firstEpochOnly") else " (every epoch)")
            + (f"; {missing} record(s) lack {cur.get('difficultyField')!r} and go last" if missing else ""),
            file=stream,
            flush=True,
        )
