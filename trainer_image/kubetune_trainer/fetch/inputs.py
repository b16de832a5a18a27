"""The fetch stage: every input of a run on local disk, and the record of what they are.

Input: the :class:`~kubetune_trainer.context.RunContext`. Output: :class:`Inputs` — the base model
folder, the data files of the job and of each ``spec.stages`` entry, the extra eval sets, the
distillation teacher and the augmentation term dictionaries, with the names reports show for each
file — and its :class:`Identity` (:func:`identify`): the inputs record (base digest, data digests,
config digest, trainer version) and the inputs digest the registry finds a published version by.

It runs in two steps: :func:`fetch_data` (the data, fetched and validated, and the term
dictionaries: small) and then :func:`fetch_models` (the base model and the teacher: large). In
between, :mod:`kubetune_trainer.fetch.fingerprints` may already know the models' digests without
reading them, so a re-run can be reused before any weight is downloaded.

A base that is a GGUF file (or a folder holding one; :mod:`kubetune_trainer.fetch.gguf`) is
dequantised to the training precision (bf16 when ``training.precision`` is bf16, else fp32) into
``inputs/gguf-dequantized``, which the later stages load; the inputs record keeps the GGUF file's
own sha256 under ``base.gguf``, and the log says what was done. ``KUBETUNE_GGUF_CACHE`` names a
folder that keeps conversions across runs; the node cache (below) supersedes it wherever the
GGUF base's digest is known in advance (a listing fingerprint), skipping download and conversion.

With a node cache (``KUBETUNE_CACHE_DIR``; :mod:`kubetune_trainer.fetch.nodecache`), a model whose
content digest the fingerprints knew before the download is linked in from ``models/<digest>``
when the cache holds it, and every downloaded model is inserted there for the next job.

Each node's local rank 0 downloads; the other ranks wait at a barrier and use the same folders.

Raises FetchError (a source cannot be fetched, or holds no data file), GgufError (a GGUF base
transformers cannot load, named by its architecture), UnsafeModelError (pickle
weights or remote code the spec did not allow), BadInputError (a term dictionary prefix that does
not hold exactly one file) and the registry's errors for a ``modelversion://`` base.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.models import AugmentationSpec
from kubetune_api.runconfig import RunConfig
from kubetune_registry.digests import digest_dir, digest_json, sha256_file
from kubetune_registry.storage import bytes_read
from kubetune_registry.versions import ModelRegistry
from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.context import BadInputError, RunContext
from kubetune_trainer.data import DATA_SUFFIXES, validate_files
from kubetune_trainer.data.glossary import GlossaryError, load_glossary
from kubetune_trainer.fetch.gguf import GgufBase, find_gguf, prepare_gguf_base
from kubetune_trainer.fetch.nodecache import describe_hit, model_from_cache, open_node_cache, remember_model
from kubetune_trainer.fetch.sources import FetchError, check_weights_safety, fetch
from kubetune_trainer.fetch.teacher import Teacher, fetch_teacher, teacher_record


@dataclass
class StageFiles:
    """The data files of one ``spec.stages`` entry."""

    name: str
    train_files: list[Path]
    eval_files: list[Path] | None


@dataclass(kw_only=True)
class DataInputs:
    """What :func:`fetch_data` put on local disk: every input but the models (the base and the
    teacher), small enough to fetch and read before deciding whether anything needs training.

    ``term_dictionaries`` holds one augmentation term dictionary per ``spec.stages`` entry, then
    the job's own (None where that data has none): the last one is always this config's own.
    ``parent`` is the exact ``modelversion://<model>/vN`` a modelversion:// base resolved to.
    ``known_models`` maps a model's role (``base``, ``teacher``) to what
    :func:`~kubetune_trainer.fetch.fingerprints.recall_identity` knew of it before any download
    (``{"digest": ..., ["gguf": ...]}``; every rank): :func:`fetch_models` looks that digest up in
    the node cache.
    """

    train_files: list[Path]
    eval_files: list[Path] | None
    extra_files: dict[str, list[Path]]
    display_names: dict[Path, str]
    parent: str | None
    stages: list[StageFiles] = field(default_factory=list)
    term_dictionaries: list[Path | None] = field(default_factory=lambda: [None])
    known_models: dict[str, dict[str, Any]] = field(default_factory=dict)
    glossary: Path | None = None


@dataclass(kw_only=True)
class Inputs(DataInputs):
    """What the fetch stage put on local disk: the data (:class:`DataInputs`) and the models.

    ``base_digest`` is the base folder's content digest when the fetch already took it (the node
    cache verified or inserted it); None leaves it to :func:`inputs_record`."""

    base_dir: Path
    teacher: Teacher | None = None
    base_gguf: dict[str, str] | None = None  # GgufBase.lineage() when the base was a GGUF file
    base_digest: str | None = None

    def for_stage(self, index: int) -> Inputs:
        """The inputs of stage ``index`` seen as a job of its own (see RunConfig.stage_config)."""
        stage = self.stages[index]
        return Inputs(
            base_dir=self.base_dir,
            train_files=stage.train_files,
            eval_files=stage.eval_files,
            extra_files=self.extra_files,
            display_names=self.display_names,
            parent=self.parent,
            stages=self.stages[:index],
            teacher=self.teacher,
            term_dictionaries=self.term_dictionaries[: index + 1],
            known_models=self.known_models,
            glossary=self.glossary,
            base_gguf=self.base_gguf,
            base_digest=self.base_digest,
        )


@dataclass(frozen=True)
class Identity:
    """What decides the trained model: the inputs record (rank 0 only; None on the other ranks)
    and its digest (every rank), the key a published version is found again by."""

    record: dict[str, Any] | None
    digest: str


def fetch_inputs(ctx: RunContext) -> Inputs:
    """Fetch the data, the extra eval sets, each stage's data, the term dictionaries, the base model
    and the teacher into ``workdir/inputs`` (stage ``Fetching``): :func:`fetch_models` after
    :func:`fetch_data`."""
    return fetch_models(ctx, fetch_data(ctx))


def fetch_data(ctx: RunContext) -> DataInputs:
    """Fetch and validate the data, the extra eval sets, each stage's data and the term
    dictionaries into ``workdir/inputs`` (stage ``Fetching``), and resolve a modelversion:// base
    to its exact version (its manifest only). No model byte is read."""
    rc, runtime, workdir = ctx.rc, ctx.runtime, ctx.workdir
    ctx.reporter.stage("Fetching", f"base {rc.model.base.uri}")
    inputs_dir = workdir / "inputs"
    parent: str | None = None
    base_uri = rc.model.base.uri
    if base_uri.startswith("modelversion://"):
        name, ref = base_uri.removeprefix("modelversion://").split("/", 1)
        version = ModelRegistry(rc.output.uri, name, ctx.store).get_version(ref)
        parent = f"modelversion://{name}/{version.name}"
    paths: dict[str, Any] = {}
    if runtime.is_local_main:
        shutil.rmtree(inputs_dir, ignore_errors=True)
        paths["train"] = str(fetch(rc.data.train.uri, inputs_dir / "train", ctx.store).relative_to(workdir))
        if rc.data.eval is not None:
            paths["eval"] = str(fetch(rc.data.eval.uri, inputs_dir / "eval", ctx.store).relative_to(workdir))
        for extra in rc.evaluation.extra_sets:
            paths[f"extra:{extra.name}"] = str(
                fetch(extra.uri, inputs_dir / "extra" / extra.name, ctx.store).relative_to(workdir)
            )
        for stage in rc.stages:
            for role, source in (("train", stage.data.train), ("eval", stage.data.eval)):
                if source is not None:
                    target = inputs_dir / "stages" / stage.name / role
                    paths[f"stage:{stage.name}:{role}"] = str(
                        fetch(source.uri, target, ctx.store).relative_to(workdir)
                    )
        # The data is fetched and validated before the base model: a bad line 3 must not cost a
        # base model download on a GPU node first (prepare_data checks the same again, later).
        _validate_data(rc, workdir, paths)
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

    data = DataInputs(
        train_files=files("train", rc.data.train.uri),
        eval_files=files("eval", rc.data.eval.uri) if rc.data.eval is not None else None,
        extra_files={e.name: files(f"extra:{e.name}", e.uri) for e in rc.evaluation.extra_sets},
        display_names=display,
        parent=parent,
        stages=[
            StageFiles(
                name=st.name,
                train_files=files(f"stage:{st.name}:train", st.data.train.uri),
                eval_files=files(f"stage:{st.name}:eval", st.data.eval.uri)
                if st.data.eval is not None
                else None,
            )
            for st in rc.stages
        ],
    )
    # One term dictionary per stage, then the job's own (None where augmentation has none).
    data.term_dictionaries = [
        _fetch_term_dictionary(ctx, st.data.augmentation, f"augmentation-terms-{st.name}") for st in rc.stages
    ] + [_fetch_term_dictionary(ctx, rc.data.augmentation, "augmentation-terms")]
    if rc.evaluation.glossary is not None:
        data.glossary = _fetch_one_file(
            ctx, rc.evaluation.glossary.uri, "glossary", "spec.evaluation.glossary.uri", "glossary"
        )
        try:  # refused now, before any model byte is downloaded
            load_glossary(data.glossary)
        except GlossaryError as exc:
            raise BadInputError(f"spec.evaluation.glossary.uri: {exc}") from None
    return data


def fetch_models(ctx: RunContext, data: DataInputs) -> Inputs:
    """Fetch the base model (a GGUF base dequantised, every base checked for code it would run)
    and the teacher next to ``data``; each node's local rank 0 downloads.

    With a node cache (``KUBETUNE_CACHE_DIR``, :mod:`kubetune_trainer.fetch.nodecache`) a model
    whose digest ``data.known_models`` holds is linked in from the cache when it is there (nothing
    downloaded, a GGUF base not dequantised again); one downloaded is inserted for the next job."""
    rc, runtime, workdir = ctx.rc, ctx.runtime, ctx.workdir
    inputs_dir = workdir / "inputs"
    paths: dict[str, Any] = {}
    if runtime.is_local_main:
        cache = open_node_cache(ctx)
        read_before = bytes_read()
        # The resolved version, not an alias: an alias moving meanwhile cannot change the base.
        base_uri = data.parent or rc.model.base.uri
        known = data.known_models.get("base") or {}
        # A GGUF base's known digest is that of its dequantised folder, which the cache holds.
        gguf_known = known.get("gguf")
        cached = model_from_cache(
            ctx,
            cache,
            "base",
            known.get("digest"),
            inputs_dir / ("gguf-dequantized" if gguf_known else "base"),
        )
        if cached is not None:
            base_dir = cached.path
            paths["digest"] = cached.digest
            if gguf_known:
                paths["gguf"] = gguf_known
            _say(ctx, describe_hit("base", cached, bytes_read() - read_before))
        else:
            base_dir = fetch(base_uri, inputs_dir / "base", ctx.store, registry_output_uri=rc.output.uri)
            gguf_file = find_gguf(base_dir)
            if gguf_file is not None:
                gguf_base = _dequantize_gguf_base(ctx, gguf_file, inputs_dir)
                base_dir = gguf_base.model_dir
                paths["gguf"] = gguf_base.lineage()
        check_weights_safety(
            base_dir,
            allow_pickle=rc.model.base.allow_pickle,
            trust_remote_code=rc.model.base.trust_remote_code,
        )
        if cached is None and cache is not None:
            digest = remember_model(
                ctx,
                cache,
                "base",
                base_dir,
                source=base_uri,
                meta={"gguf": paths["gguf"]} if "gguf" in paths else {},
            )
            paths["digest"] = digest
            _say(
                ctx,
                f"base: not in the node cache; {bytes_read() - read_before:,} bytes read from object "
                f"storage, cached as models/{str(digest)[:12]}…",
            )
        paths["base"] = str(base_dir.relative_to(workdir))
    runtime.barrier()
    paths = runtime.broadcast(paths)
    inputs = Inputs(
        **{f.name: getattr(data, f.name) for f in dataclasses.fields(DataInputs)},
        base_dir=workdir / paths["base"],
        base_gguf=paths.get("gguf"),
        base_digest=paths.get("digest"),
    )
    inputs.teacher = fetch_teacher(ctx, known=data.known_models.get("teacher"))
    return inputs


def _say(ctx: RunContext, line: str) -> None:
    print(f"[kubetune] {line}", file=ctx.reporter.stream, flush=True)


def _validate_data(rc: RunConfig, workdir: Path, paths: dict[str, Any]) -> None:
    """The job's and each stage's fetched data, validated as prepare_data will (no tokenizer).
    Raises DataValidationError naming file, line and field."""

    def listed(key: str, uri: str) -> tuple[list[Path], dict[Path, str]]:
        root = workdir / paths[key]
        files = _data_files(root)
        names = {
            f: uri.rstrip("/") + ("/" + f.relative_to(root).as_posix() if root.is_dir() else "")
            for f in files
        }
        return files, names

    checks = [(rc.data, "train", "eval")] + [
        (st.data, f"stage:{st.name}:train", f"stage:{st.name}:eval") for st in rc.stages
    ]
    for data, train_key, eval_key in checks:
        train, names = listed(train_key, data.train.uri)
        evals: list[Path] | None = None
        if data.eval is not None:
            evals, eval_names = listed(eval_key, data.eval.uri)
            names |= eval_names
        validate_files(train, evals, data, seed=rc.training.seed, display_names=names).raise_if_failed()


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise FetchError(f"no data files ({', '.join(DATA_SUFFIXES)}) found under {path}")
    return files


def _fetch_term_dictionary(ctx: RunContext, aug: AugmentationSpec | None, folder: str) -> Path | None:
    """An augmentation term dictionary, fetched by each node's local rank 0 (None when unused)."""
    if aug is None or aug.synonyms is None:
        return None
    return _fetch_one_file(
        ctx, aug.synonyms.uri, folder, "spec.data.augmentation.synonyms.uri", "term dictionary"
    )


def _fetch_one_file(ctx: RunContext, uri: str, folder: str, field_path: str, what: str) -> Path:
    """A one-file input (a term dictionary, the glossary), fetched by each node's local rank 0.
    A prefix URI must hold exactly one file (BadInputError naming ``field_path`` otherwise)."""
    runtime, workdir = ctx.runtime, ctx.workdir
    target = workdir / "inputs" / folder
    if runtime.is_local_main:
        shutil.rmtree(target, ignore_errors=True)
        fetched = fetch(uri, target, ctx.store)
        rel = str(fetched.relative_to(workdir))
    else:
        rel = None
    runtime.barrier()
    rel = runtime.broadcast(rel)
    path = workdir / rel
    if path.is_dir():  # a prefix URI: it must hold exactly one file
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if len(files) != 1:
            raise BadInputError(f"{field_path}: expected one {what} file, found {len(files)}")
        path = files[0]
    return path


def fetch_stage_weights(ctx: RunContext, version_uri: str, name: str) -> Path:
    """A published stage's adapter/ (or merged/ for full fine-tuning), fetched on every node."""
    rc, runtime, workdir = ctx.rc, ctx.runtime, ctx.workdir
    model_name = f"{rc.model.name}-{name}"
    version = version_uri.rstrip("/").rsplit("/", 1)[-1]
    target = workdir / "inputs" / "stages" / name / "weights"
    rel: str | None = None
    if runtime.is_local_main:
        shutil.rmtree(target, ignore_errors=True)
        fetched = fetch(
            f"modelversion://{model_name}/{version}",
            target,
            ctx.store,
            registry_output_uri=rc.output.uri,
            subdir_for_modelversion="merged" if rc.method.type == "full" else "adapter",
        )
        rel = str(fetched.relative_to(workdir))
    runtime.barrier()
    return workdir / runtime.broadcast(rel)


GGUF_CACHE_ENV = "KUBETUNE_GGUF_CACHE"
"""A folder where dequantised GGUF bases are kept across runs (keyed on the file's sha256, the
precision and the transformers version); unset, each run dequantises into its own work dir."""


def _dequantize_gguf_base(ctx: RunContext, gguf_file: Path, inputs_dir: Path) -> GgufBase:
    """Dequantise a GGUF base to the training precision into ``inputs_dir/gguf-dequantized``."""
    precision = "bf16" if ctx.rc.training.precision == "bf16" else "fp32"
    cache = os.environ.get(GGUF_CACHE_ENV)
    base = prepare_gguf_base(
        gguf_file, inputs_dir, precision=precision, cache_dir=Path(cache) if cache else None
    )
    local = inputs_dir / "gguf-dequantized"  # where prepare_gguf_base writes without a cache
    if base.model_dir != local:  # a cached folder: hard-linked in (read-only use), like a file:// base
        fetch(f"file://{base.model_dir}", local, ctx.store)
    print(
        f"[kubetune] base: {base.describe()}{' (cached conversion)' if base.cached else ''}",
        file=ctx.reporter.stream,
        flush=True,
    )
    return dataclasses.replace(base, model_dir=local)


# --- what the inputs are ----------------------------------------------------------------------


def inputs_record(rc: RunConfig, inputs: Inputs) -> dict[str, Any]:
    """What determines the trained model: base digest, data digests, config digest, trainer version."""
    return data_record(
        rc,
        inputs,
        base_record(rc, inputs.parent, inputs.base_digest or digest_dir(inputs.base_dir), inputs.base_gguf),
        teacher_record(inputs.teacher) if inputs.teacher is not None else None,
    )


def base_record(
    rc: RunConfig, parent: str | None, digest: str, gguf: dict[str, str] | None
) -> dict[str, Any]:
    """The inputs record's ``base`` entry: ``digest`` is that of the folder the trainer loads."""
    # A GGUF base: the file's own sha256, and what it was dequantised to (the digest is of the
    # dequantised folder the trainer loaded).
    return {"uri": rc.model.base.uri, "digest": digest, "parent": parent} | ({"gguf": gguf} if gguf else {})


def data_record(
    rc: RunConfig, data: DataInputs, base: dict[str, Any], teacher: dict[str, Any] | None
) -> dict[str, Any]:
    """:func:`inputs_record` of ``data`` with the models' entries already known (``base`` from
    :func:`base_record`, ``teacher`` from ``teacher_record`` or None without distillation)."""

    def digests(files: list[Path]) -> dict[str, str]:
        return {data.display_names[f]: sha256_file(f) for f in files}

    record: dict[str, Any] = {
        "base": base,
        "data": {"train": digests(data.train_files)},
        "configDigest": rc.config_digest(),
        "trainerVersion": TRAINER_VERSION,
    }
    if data.eval_files is not None:
        record["data"]["eval"] = digests(data.eval_files)
    for name, files in data.extra_files.items():
        record["data"][f"extra:{name}"] = digests(files)
    if teacher is not None:  # a different teacher trains a different model
        record["teacher"] = teacher
    if data.stages:
        # Earlier stages shape the weights too: their data is part of what was trained on.
        record["stages"] = [
            {"name": st.name, "train": digests(st.train_files)}
            | ({"eval": digests(st.eval_files)} if st.eval_files is not None else {})
            for st in data.stages
        ]
    return record


def full_record(rc: RunConfig, inputs: Inputs) -> dict[str, Any]:
    """:func:`inputs_record` plus the augmentation term dictionaries (``inputs.term_dictionaries[i]``
    for stage i, the last for the config's own data): a dictionary changes what is trained, so its
    content is an input."""
    return with_term_dictionaries(rc, inputs, inputs_record(rc, inputs))


def with_term_dictionaries(rc: RunConfig, data: DataInputs, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (of ``data``) with each data's augmentation term dictionary digest added, and the
    evaluation glossary's."""
    datas = [*(st.data for st in rc.stages), rc.data]
    targets = [*record.get("stages", []), record["data"]]
    for spec, target, path in zip(datas, targets, data.term_dictionaries, strict=True):
        if path is not None and spec.augmentation is not None and spec.augmentation.synonyms is not None:
            target["augmentationTerms"] = {spec.augmentation.synonyms.uri: sha256_file(path)}
    if data.glossary is not None and rc.evaluation.glossary is not None:
        # The glossary decides terminology_coverage (and a gate on it): its content is an input.
        record["data"]["evaluationGlossary"] = {rc.evaluation.glossary.uri: sha256_file(data.glossary)}
    return record


def content_identity(record: dict[str, Any]) -> dict[str, Any]:
    """What the inputs digest is taken over: the record's content digests, in reading order, without
    the URIs they were read from. Moving the data or the base model to another place (or a
    ``modelversion://`` base to a plain copy) therefore reuses the version; any change of content,
    file order, config or trainer version does not."""

    def digests(part: dict[str, Any]) -> dict[str, Any]:
        # Each role (train, eval, extra:<name>, augmentationTerms) maps names to digests: keep the digests.
        return {role: list(files.values()) for role, files in part.items() if isinstance(files, dict)}

    out: dict[str, Any] = {
        "base": record["base"]["digest"],
        "data": digests(record["data"]),
        "configDigest": record["configDigest"],
        "trainerVersion": record["trainerVersion"],
    }
    if "teacher" in record:
        out["teacher"] = record["teacher"]["digest"]
    if "stages" in record:
        out["stages"] = [{"name": st["name"], **digests(st)} for st in record["stages"]]
    return out


def identify(ctx: RunContext, inputs: Inputs) -> Identity:
    """The :class:`Identity` of ``ctx.rc`` trained on ``inputs`` (rank 0 records, every rank gets the
    digest, taken over :func:`content_identity` of the record)."""
    record = full_record(ctx.rc, inputs) if ctx.runtime.is_main else None
    digest = digest_json(content_identity(record)) if record is not None else None
    return Identity(record=record, digest=ctx.runtime.broadcast(digest))
