"""The inputs digest before any model is downloaded, when the stores can say what the models are.

Input: the :class:`~kubetune_trainer.context.RunContext` and the fetched, validated
:class:`~kubetune_trainer.fetch.inputs.DataInputs`. Output: a :class:`Recall` — the inputs digest
(every rank) when the content digest of every model input (the base, and the teacher under
distillation) is known without reading it, else None — and what it knew, so that
:func:`remember_models` can fill the gaps after the download.

Where a model's content digest comes from, without its bytes:

* ``modelversion://`` — the version's manifest lists every ``merged/`` file with its size and
  sha256: the folder digest follows from it exactly (``digest_entries``), on the first run too.
* ``s3://`` and ``file://`` — the listing fingerprint (:mod:`kubetune_registry.fingerprints`: one
  LIST, no object bytes) looked up in the output registry's fingerprint cache, which
  :func:`remember_models` fills after every download. A GGUF base's entry is keyed on the
  precision, transformers and trainer versions too (its digest is of the dequantised folder).
* ``hf://`` and anything the store cannot list: unknown, so the run downloads as before.

Nothing here fails a run: a store error while listing or reading the cache is an unknown model
(the download that follows reports the real problem); one while writing the cache is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import transformers

from kubetune_registry.digests import digest_entries, digest_json
from kubetune_registry.fingerprints import Fingerprint, FingerprintCache, source_fingerprint
from kubetune_registry.storage import StorageError, UnsafeKeyError, relative_key
from kubetune_registry.versions import ModelRegistry, RegistryError, VersionNotFound
from kubetune_trainer import __version__ as TRAINER_VERSION
from kubetune_trainer.context import RunContext
from kubetune_trainer.fetch.inputs import (
    DataInputs,
    Identity,
    Inputs,
    base_record,
    content_identity,
    data_record,
    with_term_dictionaries,
)

log = logging.getLogger("kubetune.trainer")


@dataclass(frozen=True)
class KnownModel:
    """One model input as seen before its download: ``value`` is ``{"digest": ..., ["gguf": ...]}``
    when known (from ``how``: ``"manifest"`` or ``"fingerprint"``), else None."""

    role: str  # "base" or "teacher"
    uri: str  # what is fetched (a modelversion:// alias resolved)
    size: int | None  # bytes it holds, when the listing or manifest said
    objects: int | None
    fingerprint: Fingerprint | None = None
    context: dict[str, Any] | None = None
    value: dict[str, Any] | None = None
    how: str = ""
    resolved: str | None = None  # the teacher's modelversion://<model>/vN


@dataclass
class Recall:
    """What :func:`recall_identity` found. ``digest`` is on every rank; ``models`` on rank 0 only."""

    digest: str | None
    models: list[KnownModel] = field(default_factory=list)

    def describe(self, bytes_read: int) -> str:
        """One line for the log: the reuse was decided from listings/manifests, and what it read."""
        parts = []
        for m in self.models:
            held = f"{m.size:,} bytes in {m.objects} objects" if m.size is not None else "its size unknown"
            parts.append(f"{m.role} {m.uri} ({held}, known from its {m.how}; not downloaded)")
        return (
            f"reuse decided before any model download: {bytes_read:,} bytes read from object storage in all; "
            + "; ".join(parts)
        )


def gguf_context(ctx: RunContext) -> dict[str, Any]:
    """What a GGUF base's content digest (of its dequantised folder) depends on besides its bytes."""
    return {
        "dequantizedTo": "bf16" if ctx.rc.training.precision == "bf16" else "fp32",
        "transformers": transformers.__version__,
        "trainer": TRAINER_VERSION,
    }


def _from_manifest(ctx: RunContext, role: str, uri: str) -> KnownModel:
    """A modelversion:// model: its merged/ folder digest, from the version's manifest."""
    unknown = KnownModel(role=role, uri=uri, size=None, objects=None)
    name, _, ref = uri.removeprefix("modelversion://").partition("/")
    try:
        version = ModelRegistry(ctx.rc.output.uri, name, ctx.store).get_version(ref)
    except (VersionNotFound, RegistryError, StorageError, ValueError):
        return unknown  # the fetch reports it
    try:
        entries = [
            (relative_key(f["path"], "merged"), int(f["size"]), str(f["sha256"]))
            for f in version.files
            if str(f.get("path", "")).startswith("merged/")
        ]
    except (KeyError, TypeError, ValueError):
        return unknown
    names = {rel for rel, _size, _sha in entries}
    if not entries or ("config.json" not in names and any(n.lower().endswith(".gguf") for n in names)):
        return unknown  # nothing merged, or it may be a GGUF base (dequantised: not this digest)
    resolved = f"modelversion://{name}/{version.name}"
    return KnownModel(
        role=role,
        uri=uri,
        size=sum(size for _rel, size, _sha in entries),
        objects=len(entries),
        value={"digest": digest_entries(entries)},
        how="version manifest",
        resolved=resolved,
    )


def _from_fingerprint(ctx: RunContext, role: str, uri: str, cache: FingerprintCache) -> KnownModel:
    """An s3:// or file:// model: its listing fingerprint, looked up in the output registry."""
    try:
        fingerprint = source_fingerprint(uri, ctx.store)
    except StorageError as exc:
        log.info("no fingerprint for %s: %s", uri, exc)
        fingerprint = None
    if fingerprint is None:
        return KnownModel(role=role, uri=uri, size=None, objects=None)
    context = gguf_context(ctx) if role == "base" and fingerprint.may_be_gguf() else None
    try:
        value = cache.get(fingerprint, context)
    except StorageError as exc:
        log.info("fingerprint cache unreadable: %s", exc)
        value = None
    if value is not None and not isinstance(value.get("digest"), str):
        value = None
    return KnownModel(
        role=role,
        uri=uri,
        size=fingerprint.size,
        objects=fingerprint.objects,
        fingerprint=fingerprint,
        context=context,
        value=value,
        how="listing fingerprint",
    )


def _cache(ctx: RunContext) -> FingerprintCache | None:
    try:
        return FingerprintCache(ctx.rc.output.uri, ctx.store)
    except (ValueError, StorageError):  # InvalidURI/UnsafeKeyError are ValueErrors
        return None


def _known(ctx: RunContext, role: str, uri: str, cache: FingerprintCache | None) -> KnownModel:
    if uri.startswith("modelversion://"):
        return _from_manifest(ctx, role, uri)
    if cache is not None and (uri.startswith("s3://") or uri.startswith("file://")):
        return _from_fingerprint(ctx, role, uri, cache)
    return KnownModel(role=role, uri=uri, size=None, objects=None)


def recall_identity(ctx: RunContext, data: DataInputs) -> Recall:
    """The inputs digest of ``ctx.rc`` trained on ``data`` and the models it names, when every
    model's content digest is known without downloading it (rank 0 decides, every rank gets the
    same digest or None), and records what it knew of each model in ``data.known_models`` (every
    rank) for the node cache. Equal to :func:`~kubetune_trainer.fetch.inputs.identify`'s digest after
    the download whenever the stores' ETags are honest (see :mod:`kubetune_registry.fingerprints`)."""
    rc, runtime = ctx.rc, ctx.runtime
    models: list[KnownModel] = []
    digest: str | None = None
    if runtime.is_main:
        cache = _cache(ctx)
        base = _known(ctx, "base", data.parent or rc.model.base.uri, cache)
        models.append(base)
        if rc.distillation is not None:
            models.append(_known(ctx, "teacher", rc.distillation.teacher.uri, cache))
        if all(m.value is not None for m in models):
            digest = _digest(ctx, data, models)
    # What is known of each model goes with the data to fetch_models: the node cache is keyed on it.
    known = {m.role: m.value for m in models if m.value is not None} if runtime.is_main else None
    data.known_models = runtime.broadcast(known) or {}
    return Recall(digest=runtime.broadcast(digest), models=models)


def _digest(ctx: RunContext, data: DataInputs, models: list[KnownModel]) -> str:
    rc = ctx.rc
    base, teacher = models[0], (models[1] if len(models) > 1 else None)
    assert base.value is not None
    teacher_part = None
    if teacher is not None:
        assert teacher.value is not None
        teacher_part = {"uri": teacher.uri, "digest": teacher.value["digest"], "resolved": teacher.resolved}
    record = data_record(
        rc, data, base_record(rc, data.parent, base.value["digest"], base.value.get("gguf")), teacher_part
    )
    return digest_json(content_identity(with_term_dictionaries(rc, data, record)))


def remember_models(ctx: RunContext, recall: Recall, inputs: Inputs, identity: Identity) -> None:
    """After the download (rank 0): remember each fingerprinted model's content digest in the
    output registry, so the next run with the same listings decides before downloading. A source
    whose listing changed during the download is not remembered (its bytes may be either)."""
    if not ctx.runtime.is_main or identity.record is None:
        return
    record = identity.record
    cache = _cache(ctx)
    if cache is None:
        return
    for model in recall.models:
        if model.fingerprint is None:
            continue
        if model.role == "base":
            value: dict[str, Any] = {"digest": record["base"]["digest"]}
            if inputs.base_gguf:
                value["gguf"] = inputs.base_gguf
        elif "teacher" in record:
            value = {"digest": record["teacher"]["digest"]}
        else:
            continue
        try:
            if source_fingerprint(model.uri, ctx.store) != model.fingerprint:
                log.info("%s changed while it was downloaded: not remembered", model.uri)
                continue
            if not cache.put(model.fingerprint, value, context=model.context, source=model.uri):
                print(
                    f"[kubetune] warning: the fingerprint cache held another digest for {model.uri}'s listing "
                    "(the store's ETags did not change with its content); replaced by the downloaded one",
                    file=ctx.reporter.stream,
                    flush=True,
                )
        except (StorageError, UnsafeKeyError) as exc:  # an optimisation: never fails the run
            log.warning("could not remember the fingerprint of %s: %s", model.uri, exc)
