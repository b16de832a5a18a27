"""The trainer pipeline: fetch -> prepare data -> train -> evaluate (+gates) -> merge/quantize -> publish.

:func:`run` is what ``python -m kubetune_trainer`` (in a pod, under torchrun) and ``kubetune run``
(on a laptop) both call with a :class:`~kubetune_api.runconfig.RunConfig`. Every rank fetches
(local rank 0 per node), prepares data and trains; rank 0 alone evaluates, quantizes, publishes
and reports the :class:`~kubetune_api.reports.TrainerResult`.

Before any training the inputs digest (base-model digest, data digests, RunConfig digest, trainer
version) is looked up in the registry: a match means this exact run was already published, so the
existing version is reused and nothing trains (a GitOps re-sync is free).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.models import GateResult, GatesStatus, VersionRef
from kubetune_api.reports import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_GATES_FAILED,
    EXIT_OK,
    Reason,
    TrainerResult,
)
from kubetune_api.runconfig import RunConfig
from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.reporting import KubeStatusClient, Reporter, now_rfc3339
from kubetune_trainer.runtime import Runtime, UnsupportedHardwareError, init_runtime

log = logging.getLogger("kubetune.trainer")

EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a shell would report it


class BadInputError(ValueError):
    """Input the run cannot use (data too small to split, no examples left...): fails at once."""


@dataclass
class RunOutcome:
    """What :func:`run` returns: the result (rank 0 only) and the process exit code."""

    exit_code: int
    result: TrainerResult | None = None
    version_uri: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _StageFiles:
    name: str
    train_files: list[Path]
    eval_files: list[Path] | None


@dataclass
class _Inputs:
    base_dir: Path
    train_files: list[Path]
    eval_files: list[Path] | None
    extra_files: dict[str, list[Path]]
    display_names: dict[Path, str]
    parent: str | None
    stages: list[_StageFiles] = field(default_factory=list)
    teacher: Any = None  # distill.Teacher when spec.distillation is set

    def for_stage(self, index: int) -> _Inputs:
        """The inputs of stage ``index`` seen as a job of its own (see RunConfig.stage_config)."""
        stage = self.stages[index]
        return _Inputs(
            base_dir=self.base_dir,
            train_files=stage.train_files,
            eval_files=stage.eval_files,
            extra_files=self.extra_files,
            display_names=self.display_names,
            parent=self.parent,
            stages=self.stages[:index],
            teacher=self.teacher,
        )


def store_settings(rc: RunConfig) -> Any:
    """StoreSettings for the RunConfig's storage section (credentials come from the environment)."""
    from kubetune_registry.storage import StoreSettings

    s = rc.storage
    return StoreSettings(
        endpoint=s.endpoint, region=s.region, addressing_style=s.addressing_style, local_root=s.local_root
    )


def make_reporter(rc: RunConfig, runtime: Runtime) -> Reporter:
    """Rank 0 reports; in a cluster it also patches the FineTuneJob status."""
    kube = KubeStatusClient.from_environment() if rc.reporting.status_patch and runtime.is_main else None
    return Reporter(
        enabled=runtime.is_main,
        kube=kube,
        termination_message_path=rc.reporting.termination_message_path if runtime.is_main else None,
        min_interval_s=rc.reporting.progress_every_seconds,
    )


def run(rc: RunConfig, *, workdir: Path, reporter: Reporter | None = None) -> RunOutcome:
    """Run the whole pipeline for this process's rank. Never raises for expected failures:
    they become a TrainerResult with a reason and the exit code of :mod:`kubetune_api.reports`."""
    from kubetune_trainer.train.adapters import AdapterConfigError
    from kubetune_trainer.data import DataValidationError, TemplateError
    from kubetune_trainer.train.distill import DistillationError
    from kubetune_trainer.fetch.sources import FetchError, UnsafeModelError
    from kubetune_trainer.artifacts.quantize import UnsupportedFormatError
    from kubetune_trainer.train.recipe import PreemptedError, TrainingDivergedError
    from kubetune_registry.storage import UnsafeKeyError

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        runtime = init_runtime(rc.training.precision, rc.distributed.strategy)
    except UnsupportedHardwareError as exc:
        rep = reporter or Reporter(termination_message_path=rc.reporting.termination_message_path)
        return _fail(rep, rc, EXIT_BAD_INPUT, "UnsupportedHardware", str(exc))
    reporter = reporter or make_reporter(rc, runtime)
    try:
        return _run(rc, runtime, workdir, reporter)
    except DataValidationError as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "InvalidData", str(exc))
    except (TemplateError, UnsafeKeyError, BadInputError) as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "InvalidData", str(exc))
    except UnsafeModelError as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "UnsafeModel", str(exc))
    except (AdapterConfigError, DistillationError) as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "InvalidSpec", str(exc))
    except FetchError as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "FetchFailed", str(exc))
    except (UnsupportedHardwareError, UnsupportedFormatError) as exc:
        return _fail(reporter, rc, EXIT_BAD_INPUT, "UnsupportedHardware", str(exc))
    except TrainingDivergedError as exc:
        return _fail(reporter, rc, EXIT_DIVERGED, "Diverged", str(exc))
    except PreemptedError as exc:
        print(f"[kubetune] {exc}", file=sys.stderr, flush=True)
        return RunOutcome(exit_code=EXIT_PREEMPTED)
    except Exception as exc:  # the pod restarts and resumes; the message says what broke
        log.exception("trainer failed")
        return _fail(reporter, rc, EXIT_ERROR, "Error", f"{type(exc).__name__}: {exc}")
    finally:
        runtime.shutdown()


def _fail(reporter: Reporter, rc: RunConfig, code: int, reason: Any, message: str) -> RunOutcome:
    result = TrainerResult(
        outcome="Failed",
        reason=reason,
        message=message[:1500],
        model=rc.model.name,
        base=rc.model.base.uri,
        method=rc.method.type,
    )
    reporter.result(result)
    print(f"[kubetune] FAILED ({reason}): {message}", file=sys.stderr, flush=True)
    return RunOutcome(exit_code=code, result=result)


# --- stages -----------------------------------------------------------------------------------


def _data_files(path: Path) -> list[Path]:
    from kubetune_trainer.data import DATA_SUFFIXES

    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        from kubetune_trainer.fetch.sources import FetchError

        raise FetchError(f"no data files ({', '.join(DATA_SUFFIXES)}) found under {path}")
    return files


def _fetch_inputs(rc: RunConfig, runtime: Runtime, workdir: Path) -> _Inputs:
    from kubetune_trainer.fetch.sources import check_weights_safety, fetch
    from kubetune_registry.versions import ModelRegistry

    settings = store_settings(rc)
    inputs_dir = workdir / "inputs"
    parent: str | None = None
    base_uri = rc.model.base.uri
    if base_uri.startswith("modelversion://"):
        name, ref = base_uri.removeprefix("modelversion://").split("/", 1)
        version = ModelRegistry(rc.output.uri, name, settings).get_version(ref)
        parent = f"modelversion://{name}/{version.name}"
    paths: dict[str, Any] = {}
    if runtime.is_local_main:
        shutil.rmtree(inputs_dir, ignore_errors=True)
        base_dir = fetch(base_uri, inputs_dir / "base", settings, registry_output_uri=rc.output.uri)
        check_weights_safety(
            base_dir,
            allow_pickle=rc.model.base.allow_pickle,
            trust_remote_code=rc.model.base.trust_remote_code,
        )
        paths["base"] = str(base_dir.relative_to(workdir))
        paths["train"] = str(fetch(rc.data.train.uri, inputs_dir / "train", settings).relative_to(workdir))
        if rc.data.eval is not None:
            paths["eval"] = str(fetch(rc.data.eval.uri, inputs_dir / "eval", settings).relative_to(workdir))
        for extra in rc.evaluation.extra_sets:
            paths[f"extra:{extra.name}"] = str(
                fetch(extra.uri, inputs_dir / "extra" / extra.name, settings).relative_to(workdir)
            )
        for stage in rc.stages:
            for role, source in (("train", stage.data.train), ("eval", stage.data.eval)):
                if source is not None:
                    target = inputs_dir / "stages" / stage.name / role
                    paths[f"stage:{stage.name}:{role}"] = str(
                        fetch(source.uri, target, settings).relative_to(workdir)
                    )
    runtime.barrier()
    paths = runtime.broadcast(paths)
    display: dict[Path, str] = {}

    def files(key: str, uri: str) -> list[Path]:
        root = workdir / paths[key]
        out = _data_files(root)
        for f in out:
            rel = f.relative_to(root).as_posix() if root.is_dir() else ""
            display[f] = uri.rstrip("/") + ("/" + rel if rel else "")
        return out

    return _Inputs(
        base_dir=workdir / paths["base"],
        train_files=files("train", rc.data.train.uri),
        eval_files=files("eval", rc.data.eval.uri) if rc.data.eval is not None else None,
        extra_files={e.name: files(f"extra:{e.name}", e.uri) for e in rc.evaluation.extra_sets},
        display_names=display,
        parent=parent,
        stages=[
            _StageFiles(
                name=st.name,
                train_files=files(f"stage:{st.name}:train", st.data.train.uri),
                eval_files=files(f"stage:{st.name}:eval", st.data.eval.uri)
                if st.data.eval is not None
                else None,
            )
            for st in rc.stages
        ],
    )


def inputs_record(rc: RunConfig, inputs: _Inputs) -> dict[str, Any]:
    """What determines the trained model: base digest, data digests, config digest, trainer version."""
    from kubetune_registry.digests import digest_dir, sha256_file

    def data(files: list[Path]) -> dict[str, str]:
        return {inputs.display_names[f]: sha256_file(f) for f in files}

    record: dict[str, Any] = {
        "base": {"uri": rc.model.base.uri, "digest": digest_dir(inputs.base_dir), "parent": inputs.parent},
        "data": {"train": data(inputs.train_files)},
        "configDigest": rc.config_digest(),
        "trainerVersion": TRAINER_VERSION,
    }
    if inputs.eval_files is not None:
        record["data"]["eval"] = data(inputs.eval_files)
    for name, files in inputs.extra_files.items():
        record["data"][f"extra:{name}"] = data(files)
    if inputs.teacher is not None:  # a different teacher trains a different model
        from kubetune_trainer.train.distill import teacher_record

        record["teacher"] = teacher_record(inputs.teacher)
    if inputs.stages:
        # Earlier stages shape the weights too: their data is part of what was trained on.
        record["stages"] = [
            {"name": st.name, "train": data(st.train_files)}
            | ({"eval": data(st.eval_files)} if st.eval_files is not None else {})
            for st in inputs.stages
        ]
    return record


def _fetch_term_dictionary(
    rc: RunConfig, runtime: Runtime, workdir: Path, folder: str = "augmentation-terms"
) -> Path | None:
    """The augmentation term dictionary, fetched by each node's local rank 0 (None when unused)."""
    aug = rc.data.augmentation
    if aug is None or aug.synonyms is None:
        return None
    from kubetune_trainer.fetch.sources import fetch

    target = workdir / "inputs" / folder
    if runtime.is_local_main:
        shutil.rmtree(target, ignore_errors=True)
        fetched = fetch(aug.synonyms.uri, target, store_settings(rc))
        rel = str(fetched.relative_to(workdir))
    else:
        rel = None
    runtime.barrier()
    rel = runtime.broadcast(rel)
    path = workdir / rel
    if path.is_dir():  # a prefix URI: it must hold exactly one file
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if len(files) != 1:
            raise BadInputError(
                f"spec.data.augmentation.synonyms.uri: expected one term dictionary file, found {len(files)}"
            )
        path = files[0]
    return path


def _augmenter(rc: RunConfig, terms_path: Path | None) -> Any:
    """The Augmenter for data.augmentation, or None. Raises BadInputError for a bad dictionary."""
    aug = rc.data.augmentation
    if aug is None:
        return None
    from kubetune_trainer.data.augment import TermDictionaryError, augmenter_from_spec

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
    rc: RunConfig, inputs: _Inputs, train: list[Any]
) -> tuple[list[float] | None, dict[str, Any]]:
    """Curriculum keys per training example (data.curriculum) and the report's summary."""
    from kubetune_trainer.data.curriculum import curriculum_keys, read_difficulties

    cur = rc.data.curriculum
    difficulties = None
    if cur.order == "field" and cur.difficulty_field is not None:
        difficulties = read_difficulties(inputs.train_files, cur.difficulty_field, inputs.display_names)
    keys, summary = curriculum_keys(
        train, cur.order, difficulties=difficulties, difficulty_field=cur.difficulty_field
    )
    summary["firstEpochOnly"] = cur.first_epoch_only
    return keys, summary


def _print_recipe_data_notes(data_report: dict[str, Any], reporter: Reporter) -> None:
    """One line each for augmentation and curriculum, when they are on."""
    aug = data_report.get("augmentation")
    if aug:
        print(
            f"[kubetune] augmentation: {aug['augmentedRecords']} augmented copies of "
            f"{aug['originalRecords']} training records (augmented share {aug['augmentedShare']:.1%})",
            file=reporter.stream,
            flush=True,
        )
    cur = data_report.get("curriculum")
    if cur:
        missing = cur.get("missingDifficulty")
        print(
            f"[kubetune] curriculum: easy-to-hard by {cur['order']}"
            + (" (first epoch only)" if cur.get("firstEpochOnly") else " (every epoch)")
            + (f"; {missing} record(s) lack {cur.get('difficultyField')!r} and go last" if missing else ""),
            file=reporter.stream,
            flush=True,
        )


def _gates_status(report: Any) -> GatesStatus:
    results = [
        GateResult(
            metric=r.metric,
            value=r.value if r.value is not None and math.isfinite(r.value) else None,
            min=r.min,
            max=r.max,
            passed=r.passed,
            message=r.message,
        )
        for r in report.results
    ]
    failed = sum(not r.passed for r in results)
    summary = "none" if not results else ("passed" if not failed else f"failed {failed}/{len(results)}")
    return GatesStatus(passed=report.passed, summary=summary, results=results)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def _reused_result(rc: RunConfig, version: Any, inputs_digest: str, parent: str | None) -> TrainerResult:
    manifest = version.manifest
    gates = manifest.get("gates") or {}
    gate_results = [GateResult.model_validate(r) for r in gates.get("results", [])] if gates else []
    failed = sum(not r.passed for r in gate_results)
    return TrainerResult(
        outcome="Succeeded",
        reason="Reused",
        message=f"inputs digest matches published version {version.name}: nothing was trained",
        model=rc.model.name,
        base=rc.model.base.uri,
        parent=parent,
        method=rc.method.type,
        version=VersionRef(
            name=version.name, uri=version.uri, manifest_digest=version.manifest_digest, reused=True
        ),
        inputs_digest=inputs_digest,
        metrics=_finite(manifest.get("metrics", {})),
        gates=GatesStatus(
            passed=bool(gates.get("passed", True)),
            summary="none"
            if not gate_results
            else ("passed" if not failed else f"failed {failed}/{len(gate_results)}"),
            results=gate_results,
        ),
        quantized=list((manifest.get("extra") or {}).get("quantized", [])),
        created=manifest.get("created"),
    )


def _run(rc: RunConfig, runtime: Runtime, workdir: Path, reporter: Reporter) -> RunOutcome:
    from kubetune_registry.digests import digest_json
    from kubetune_registry.versions import ModelRegistry

    settings = store_settings(rc)
    registry = ModelRegistry(rc.output.uri, rc.model.name, settings)

    reporter.stage("Fetching", f"base {rc.model.base.uri}")
    inputs = _fetch_inputs(rc, runtime, workdir)
    from kubetune_trainer.train.distill import fetch_teacher

    inputs.teacher = fetch_teacher(rc, runtime, workdir)
    # One term dictionary per stage, then the job's own (None where augmentation has none).
    terms = [
        _fetch_term_dictionary(rc.stage_config(i), runtime, workdir, f"augmentation-terms-{st.name}")
        for i, st in enumerate(rc.stages)
    ] + [_fetch_term_dictionary(rc, runtime, workdir)]
    record = _full_record(rc, inputs, terms) if runtime.is_main else None
    inputs_digest = runtime.broadcast(digest_json(record) if record is not None else None)
    existing = runtime.broadcast(registry.find_by_inputs_digest(inputs_digest) if runtime.is_main else None)
    if existing is not None:
        result = _reused_result(rc, existing, inputs_digest, inputs.parent)
        if rc.output.promote and runtime.is_main:
            # Promotion is a commit: a changed promote rule on the same inputs moves the alias
            # without retraining (moving it to where it already points records nothing).
            gates_passed = result.gates.passed if result.gates is not None else True
            moved = registry.promote(
                rc.output.promote.alias, existing.name, gates_passed, rc.output.promote.when
            )
            if moved is not None:
                result = result.model_copy(update={"promoted_alias": rc.output.promote.alias})
        reporter.result(result)
        return RunOutcome(exit_code=EXIT_OK, result=result, version_uri=existing.uri)

    reporter.stage("PreparingData")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(inputs.base_dir), trust_remote_code=rc.model.base.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # spec.stages first (each continues from the previous one's weights), then the job's own data.
    carried = _Carry()
    lineage: list[dict[str, Any]] = []
    spent_prefixes: list[str] = []
    total = len(rc.stages) + 1
    for index, stage in enumerate(rc.stages):
        src = rc.stage_config(index)
        s_inputs = inputs.for_stage(index)
        s_record = _full_record(src, s_inputs, terms[: index + 1]) if runtime.is_main else None
        s_digest = runtime.broadcast(digest_json(s_record) if s_record is not None else None)
        label = f"stage {index + 1}/{total}: {stage.name}"
        s_registry = ModelRegistry(rc.output.uri, src.model.name, settings)
        if stage.publish:
            found = runtime.broadcast(s_registry.find_by_inputs_digest(s_digest) if runtime.is_main else None)
            if found is not None:
                # Published before with the same inputs: continue from its weights, train nothing.
                carried = _Carry(weights=_fetch_stage_weights(rc, runtime, workdir, found.uri, stage.name))
                lineage.append(_lineage_entry(stage.name, s_digest, found, None, reused=True))
                spent_prefixes.append(_checkpoint_prefix(src, s_digest))  # left by an interrupted run
                if runtime.is_main:
                    print(
                        f"[kubetune] {label}: reusing {found.uri} (same inputs)",
                        file=reporter.stream,
                        flush=True,
                    )
                continue
        stage_dir = workdir / "stages" / f"{index + 1}-{stage.name}"
        trained = _train(
            src, runtime, stage_dir, reporter, s_inputs, s_digest, tokenizer, terms[index], carried, label
        )
        spent_prefixes.append(trained.ckpt_prefix)
        version = None
        if stage.publish and runtime.is_main:
            s_result, _ = _evaluate_and_publish(
                src,
                runtime,
                stage_dir,
                reporter,
                s_registry,
                s_inputs,
                s_record or {},
                s_digest,
                trained.prepared,
                tokenizer,
                trained.outcome,
                runtime.precision,
                stages=list(lineage),
            )
            version = s_result.version
            print(f"[kubetune] {label}: {s_result.message}", file=reporter.stream, flush=True)
        runtime.barrier()  # the other ranks wait while rank 0 evaluates and publishes the stage
        lineage.append(_lineage_entry(stage.name, s_digest, version, trained.outcome))
        carried = _Carry(model=trained.model)

    label = f"stage {total}/{total}: final" if rc.stages else ""
    trained = _train(
        rc, runtime, workdir, reporter, inputs, inputs_digest, tokenizer, terms[-1], carried, label
    )
    spent_prefixes.append(trained.ckpt_prefix)
    carried, trained.model = _Carry(), None  # free the weights before evaluation loads its own
    if not runtime.is_main:
        return RunOutcome(exit_code=EXIT_OK)

    result, version_uri = _evaluate_and_publish(
        rc,
        runtime,
        workdir,
        reporter,
        registry,
        inputs,
        record or {},
        inputs_digest,
        trained.prepared,
        tokenizer,
        trained.outcome,
        runtime.precision,
        stages=lineage,
    )
    from kubetune_registry.storage import open_uri

    out_store, _ = open_uri(rc.output.uri, settings)
    for prefix in spent_prefixes:  # the version is published: its checkpoints are spent
        out_store.delete_prefix(prefix + "/")
    reporter.result(result)
    code = EXIT_GATES_FAILED if result.reason == "GateFailed" else EXIT_OK
    return RunOutcome(exit_code=code, result=result, version_uri=version_uri)


@dataclass
class _Carry:
    """What the next stage starts from: a trained model in memory, fetched weights, or the base."""

    model: Any = None
    weights: Path | None = None  # a published stage's adapter/ (peft) or merged/ (full) folder


@dataclass
class _Trained:
    prepared: Any
    outcome: Any
    model: Any
    ckpt_prefix: str


def _full_record(rc: RunConfig, inputs: _Inputs, terms: list[Path | None]) -> dict[str, Any]:
    """inputs_record plus the augmentation term dictionaries (``terms[i]`` for stage i, the last
    for the config's own data): a dictionary changes what is trained, so its content is an input."""
    from kubetune_registry.digests import sha256_file

    record = inputs_record(rc, inputs)
    datas = [*(st.data for st in rc.stages), rc.data]
    targets = [*record.get("stages", []), record["data"]]
    for data, target, path in zip(datas, targets, terms, strict=True):
        if path is not None and data.augmentation is not None and data.augmentation.synonyms is not None:
            target["augmentationTerms"] = {data.augmentation.synonyms.uri: sha256_file(path)}
    return record


def _lineage_entry(
    name: str, digest: str, version: Any, outcome: Any, *, reused: bool = False
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "inputsDigest": digest,
        "version": version.uri if version else None,
    }
    if outcome is not None:
        entry.update(
            {"steps": outcome.steps, "finalLoss": outcome.final_loss, "evalLoss": outcome.final_eval_loss}
        )
    if reused:
        entry["reused"] = True
    return entry


def _checkpoint_prefix(rc: RunConfig, inputs_digest: str) -> str:
    """Where the run with these inputs keeps its checkpoints (one prefix per stage)."""
    from kubetune_registry.storage import join_key, open_uri

    _, out_prefix = open_uri(rc.output.uri, store_settings(rc))
    return join_key(*([out_prefix] if out_prefix else []), rc.model.name, "checkpoints", inputs_digest[:16])


def _fetch_stage_weights(rc: RunConfig, runtime: Runtime, workdir: Path, version_uri: str, name: str) -> Path:
    """A published stage's adapter/ (or merged/ for full fine-tuning), fetched on every node."""
    from kubetune_trainer.fetch.sources import fetch

    model_name = f"{rc.model.name}-{name}"
    version = version_uri.rstrip("/").rsplit("/", 1)[-1]
    target = workdir / "inputs" / "stages" / name / "weights"
    rel: str | None = None
    if runtime.is_local_main:
        shutil.rmtree(target, ignore_errors=True)
        fetched = fetch(
            f"modelversion://{model_name}/{version}",
            target,
            store_settings(rc),
            registry_output_uri=rc.output.uri,
            subdir_for_modelversion="merged" if rc.method.type == "full" else "adapter",
        )
        rel = str(fetched.relative_to(workdir))
    runtime.barrier()
    return workdir / runtime.broadcast(rel)


def _train(
    rc: RunConfig,
    runtime: Runtime,
    workdir: Path,
    reporter: Reporter,
    inputs: _Inputs,
    inputs_digest: str,
    tokenizer: Any,
    terms_path: Path | None,
    carried: _Carry,
    label: str,
) -> _Trained:
    """Prepare ``rc.data`` and train one stage in ``workdir`` (its staging/ holds the result)."""
    from kubetune_trainer.train.checkpoint import CheckpointManager
    from kubetune_trainer.data import DataValidationError, TemplateError, prepare_data
    from kubetune_trainer.train.recipe import SFTRecipe
    from kubetune_registry.storage import open_uri

    reporter.stage("PreparingData", label)
    try:
        augmenter = _augmenter(rc, terms_path)
        prepared = prepare_data(
            inputs.train_files,
            inputs.eval_files,
            tokenizer,
            rc.data,
            max_seq_length=rc.training.max_seq_length,
            seed=rc.training.seed,
            display_names=inputs.display_names,
            augmenter=augmenter,
        )
    except (TemplateError, DataValidationError):
        raise
    except ValueError as exc:  # too few records to split, no example left after cleaning...
        raise BadInputError(str(exc)) from None
    order_keys, curriculum_summary = _curriculum(rc, inputs, prepared.train)
    staging = workdir / "staging"
    if runtime.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "training").mkdir(parents=True)
        data_report = prepared.report.to_dict()
        if rc.data.curriculum.order != "none":
            data_report["curriculum"] = curriculum_summary
        (staging / "training" / "data-report.json").write_text(json.dumps(data_report, indent=2))
        _print_recipe_data_notes(data_report, reporter)
        invalid = data_report.get("invalid")
        print(
            f"[kubetune] {label + ' ' if label else ''}data: {len(prepared.train)} train / "
            f"{len(prepared.eval)} eval examples"
            + (f", {invalid} invalid records skipped" if invalid else ""),
            file=reporter.stream,
            flush=True,
        )

    reporter.stage("Training", label)
    out_store, _ = open_uri(rc.output.uri, store_settings(rc))
    ckpt_prefix = _checkpoint_prefix(rc, inputs_digest)
    # Per-rank scratch: ranks on one machine share the workdir and must not upload each other's
    # half-written files (each rank uploads only what it wrote; the keys merge in the store).
    checkpoints = CheckpointManager(
        out_store,
        ckpt_prefix,
        keep=rc.training.checkpoint.keep,
        runtime=runtime,
        scratch=workdir / "checkpoints" / f"rank-{runtime.rank}",
    )
    weights = carried.weights
    from kubetune_trainer.train.distill import build_distiller

    distiller = build_distiller(
        rc,
        runtime,
        inputs.teacher,
        tokenizer,
        prepared.train,
        student_dir=inputs.base_dir,
        stream=reporter.stream,
    )
    recipe = SFTRecipe(
        rc,
        runtime,
        base_dir=weights if weights is not None and rc.method.type == "full" else inputs.base_dir,
        train_examples=prepared.train,
        eval_examples=prepared.eval,
        pad_token_id=int(tokenizer.pad_token_id),
        checkpoints=checkpoints,
        reporter=reporter,
        workdir=workdir,
        train_order_keys=order_keys,
        model=carried.model,
        init_adapter_dir=weights if weights is not None and rc.method.type != "full" else None,
        distiller=distiller,
    )
    carried.model = None  # the recipe owns it now
    recipe.setup()
    outcome = recipe.train()
    model = recipe.release_model()
    del recipe
    if runtime.is_main:
        tokenizer.save_pretrained(str(outcome.saved_dir))
    return _Trained(prepared=prepared, outcome=outcome, model=model, ckpt_prefix=ckpt_prefix)


def _evaluate_and_publish(
    rc: RunConfig,
    runtime: Runtime,
    workdir: Path,
    reporter: Reporter,
    registry: Any,
    inputs: _Inputs,
    record: dict[str, Any],
    inputs_digest: str,
    prepared: Any,
    tokenizer: Any,
    outcome: Any,
    precision: str,
    *,
    stages: list[dict[str, Any]] | None = None,
) -> tuple[TrainerResult, str]:
    """Rank 0: evaluate, gate, merge, quantize and publish ``workdir/staging`` as a version.

    ``stages`` is the lineage of the stages trained before this one (recorded in the manifest's
    ``extra.stages`` and the model card)."""
    from kubetune_trainer.train.adapters import adapter_record
    from kubetune_trainer.train.distill import distillation_manifest_extra
    from kubetune_trainer.evaluate.evaluator import ModelSource, evaluate_model, load_model
    from kubetune_trainer.evaluate.gates import check_gates
    from kubetune_trainer.artifacts.merge import merge_adapter
    from kubetune_trainer.artifacts.quantize import quantize_artifacts

    staging = workdir / "staging"
    device = "cuda" if runtime.device.type == "cuda" else "cpu"

    reporter.stage("Evaluating")
    if rc.method.type == "full":
        tuned_source = ModelSource("transformers", outcome.saved_dir)
    else:
        tuned_source = ModelSource("peft", outcome.saved_dir, base_path=inputs.base_dir)
    base_source = ModelSource("transformers", inputs.base_dir)
    tuned = load_model(tuned_source, device=device)
    base = (
        load_model(base_source, device=device)
        if rc.method.type == "full" and rc.evaluation.compare_base
        else None
    )
    extra_sets = {}
    if inputs.extra_files:
        from kubetune_trainer.data import prepare_data

        no_split = rc.data.model_copy(update={"eval_split": None})
        for name, files in inputs.extra_files.items():
            extra_sets[name] = prepare_data(
                files,
                files,
                tokenizer,
                no_split,
                max_seq_length=rc.training.max_seq_length,
                seed=rc.training.seed,
                display_names=inputs.display_names,
            ).eval
    measure = "peak_memory_ratio" in rc.evaluation.metrics
    report = evaluate_model(
        tuned,
        base,
        tokenizer,
        prepared.eval,
        rc.evaluation,
        extra_sets=extra_sets or None,
        device=device,
        seed=rc.training.seed,
        batch_size=rc.training.batch_size,
        tuned_source=tuned_source if measure else None,
        base_source=base_source if measure else None,
    )
    del tuned, base
    gate_specs: dict[str, Any] = dict(rc.evaluation.gates.items())
    gates = check_gates(report.gate_metrics(), gate_specs, not_computed=report.skipped)
    print(
        "[kubetune] eval: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.tuned.items())),
        file=reporter.stream,
    )
    if report.base:
        print(
            "[kubetune] base: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.base.items())),
            file=reporter.stream,
        )
    print(f"[kubetune] gates: {gates.summary()}", file=reporter.stream, flush=True)

    merged_dir: Path | None = None
    if rc.method.type == "full":
        merged_dir = outcome.saved_dir
    elif rc.output.merge or rc.quantization.formats:
        reporter.stage("Quantizing", "merging the adapter into the base")
        target = staging / "merged" if rc.output.merge else workdir / "merged-unpublished"
        merged_dir = merge_adapter(inputs.base_dir, outcome.saved_dir, target)
    artifacts: list[Any] = []
    if rc.quantization.formats and merged_dir is not None:
        reporter.stage("Quantizing", ", ".join(rc.quantization.formats))
        artifacts = quantize_artifacts(
            merged_dir,
            list(rc.quantization.formats),
            staging / "quantized",
            sample_prompt_ids=[list(e.prompt_ids) for e in prepared.eval[:4]],
            device=device,
        )

    reporter.stage("Publishing")
    version = registry.publish(
        staging,
        inputs=record,
        inputs_digest=inputs_digest,
        metrics=_finite(report.tuned),
        gates=gates.to_dict(),
        parent=inputs.parent,
        extra={
            "model": rc.model.name,
            "method": rc.method.type,
            "base": rc.model.base.uri,
            "quantized": [a.format for a in artifacts],
            "job": rc.job.to_api(),
            "trainerVersion": TRAINER_VERSION,
            "steps": outcome.steps,
            "resumedFromStep": outcome.resumed_from_step,
            "precision": precision,
            "adapter": adapter_record(rc.method),
            **distillation_manifest_extra(rc, record),
        }
        | ({"stages": stages} if stages else {}),
        # The card names its own version, which the registry allocates: write it once claimed.
        before_upload=lambda name, _uri: _write_reports(
            rc, staging, outcome, report, gates, artifacts, record, precision, name, stages or []
        ),
    )
    gates_status = _gates_status(gates)
    promoted: str | None = None
    if rc.output.promote and not version.reused:
        moved = registry.promote(rc.output.promote.alias, version.name, gates.passed, rc.output.promote.when)
        promoted = rc.output.promote.alias if moved is not None else None
    reason: Reason = "GateFailed" if not gates.passed else ("Reused" if version.reused else "Published")
    message = f"published {version.uri}" if not version.reused else f"reused {version.uri}"
    if not gates.passed:
        message = f"published {version.uri} but it is not promotable: {gates.summary()}"
    result = TrainerResult(
        outcome="Failed" if not gates.passed else "Succeeded",
        reason=reason,
        message=message,
        model=rc.model.name,
        base=rc.model.base.uri,
        parent=inputs.parent,
        method=rc.method.type,
        version=VersionRef(
            name=version.name, uri=version.uri, manifest_digest=version.manifest_digest, reused=version.reused
        ),
        inputs_digest=inputs_digest,
        metrics=_finite(report.tuned),
        gates=gates_status,
        quantized=[a.format for a in artifacts],
        promoted_alias=promoted,
        resumed_from_step=outcome.resumed_from_step,
        created=now_rfc3339(),
    )
    return result, version.uri


def _copy_health(source: Path, training: Path) -> None:
    """grad-norms.jsonl + its heat map and health.json (training health), when the run wrote them."""
    from kubetune_trainer.train.health import plot_grad_norms

    grad_norms = source / "grad-norms.jsonl"
    if grad_norms.exists() and grad_norms.read_text().strip():
        shutil.copyfile(grad_norms, training / "grad-norms.jsonl")
        plot_grad_norms(training / "grad-norms.jsonl", training / "grad-norms.png")
    if (source / "health.json").exists():
        shutil.copyfile(source / "health.json", training / "health.json")


def _write_reports(
    rc: RunConfig,
    staging: Path,
    outcome: Any,
    report: Any,
    gates: Any,
    artifacts: list[Any],
    record: dict[str, Any],
    precision: str,
    version_name: str,
    stages: list[dict[str, Any]],
) -> None:
    """eval/, training/ and the model card, into the staging folder that becomes the version."""
    from kubetune_trainer.artifacts import report as reports

    training = staging / "training"
    training.mkdir(parents=True, exist_ok=True)
    run_config = json.loads(rc.to_json())
    run_config["resolved"] = {"precision": precision, "trainerVersion": TRAINER_VERSION}
    (training / "run-config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
    shutil.copyfile(outcome.metrics_path, training / "metrics.jsonl")
    reports.plot_loss(training / "metrics.jsonl", training / "loss.png")
    _copy_health(outcome.metrics_path.parent, training)
    reports.write_eval_report(staging / "eval", report, gates, artifacts)
    data_digests = {
        f"{role} {name}": digest
        for role, files in record.get("data", {}).items()
        for name, digest in files.items()
    }
    t = rc.training
    hyper = {
        "method": rc.method.type,
        "learning rate": rc.learning_rate,
        "scheduler": f"{t.scheduler} (warm-up {t.warmup_ratio:g})",
        "epochs" if t.max_steps is None else "max steps": t.epochs if t.max_steps is None else t.max_steps,
        "steps run": outcome.steps,
        "batch size x grad accumulation": f"{t.batch_size} x {t.gradient_accumulation_steps}",
        "max sequence length": t.max_seq_length,
        "packing": t.packing,
        "precision": precision,
        "seed": t.seed,
        "distributed": f"{rc.distributed.nodes} node(s) x {rc.distributed.gpus_per_node} GPU(s), {rc.distributed.strategy}",
    }
    from kubetune_trainer.train.adapters import describe

    hyper.update(describe(rc.method))  # LoRA / DoRA / rsLoRA / (IA)^3 and the adapted layers
    from kubetune_trainer.train.distill import describe_distillation

    hyper.update(describe_distillation(rc, record))  # teacher, loss mix, temperature
    if stages:
        hyper["trained after stages"] = " -> ".join(
            f"{st['name']} ({'reused ' + st['version'] if st.get('reused') else str(st.get('steps')) + ' steps'})"
            for st in stages
        )
    (staging / "README.md").write_text(
        reports.render_model_card(
            model_name=rc.model.name,
            version=version_name,
            base_model=rc.model.base.uri,
            data_digests=data_digests,
            hyperparameters=hyper,
            report=report,
            gates=gates,
            artifacts=artifacts,
            base_model_digest=record.get("base", {}).get("digest"),
            lora_rank=rc.method.lora.r if rc.method.type != "full" else None,
            vllm_lora=rc.method.type in ("lora", "qlora") and rc.method.lora.variant in ("lora", "rslora"),
        )
    )
