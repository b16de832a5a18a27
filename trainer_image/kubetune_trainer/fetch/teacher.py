"""The distillation teacher, fetched like the base model (``spec.distillation.teacher``).

Input: the :class:`~kubetune_trainer.context.RunContext`. Output: a :class:`Teacher` (None without
distillation) that :func:`kubetune_trainer.train.distill.build_distiller` loads, and its entry in
the inputs record (:func:`teacher_record`). Raises FetchError and UnsafeModelError.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_registry.digests import digest_dir
from kubetune_registry.storage import bytes_read
from kubetune_registry.versions import ModelRegistry, VersionNotFound
from kubetune_trainer.context import RunContext
from kubetune_trainer.fetch.nodecache import describe_hit, model_from_cache, open_node_cache, remember_model
from kubetune_trainer.fetch.sources import FetchError, check_weights_safety, fetch

TEACHER_FIELD = "spec.distillation.teacher.uri"


@dataclass(frozen=True)
class Teacher:
    """A fetched teacher: its URI, the local folder, and the exact version when it is a ModelVersion."""

    uri: str
    path: Path
    resolved: str | None  # modelversion://<model>/vN for a modelversion:// teacher (an alias resolved)
    digest: str | None = None  # its folder digest when the node cache already took it


def fetch_teacher(ctx: RunContext, known: dict[str, Any] | None = None) -> Teacher | None:
    """Fetch ``spec.distillation.teacher`` like the base model (None without distillation).

    Each node's local rank 0 downloads into ``workdir/inputs/teacher`` and checks it for pickle
    weights and remote code; the other ranks wait and use the same folder. A modelversion://
    alias is resolved once and that exact version is fetched. With a node cache and ``known``
    (``{"digest": ...}`` from the fingerprints), ``models/<digest>`` is linked in instead of
    downloaded when the cache holds it; a downloaded teacher is inserted. Raises FetchError,
    UnsafeModelError.
    """
    rc, runtime, workdir = ctx.rc, ctx.runtime, ctx.workdir
    spec = rc.distillation
    if spec is None:
        return None
    uri = spec.teacher.uri
    found: dict[str, str | None] | None = None
    if runtime.is_main:
        resolved: str | None = None
        if uri.startswith("modelversion://"):
            name, _, ref = uri.removeprefix("modelversion://").partition("/")
            try:
                version = ModelRegistry(rc.output.uri, name, ctx.store).get_version(ref)
            except (VersionNotFound, ValueError) as exc:
                raise FetchError(f"{TEACHER_FIELD}: {uri}: {exc}") from None
            resolved = f"modelversion://{name}/{version.name}"
        found = {"resolved": resolved}
    found = runtime.broadcast(found)
    assert found is not None
    resolved = found["resolved"]
    target = workdir / "inputs" / "teacher"
    got: dict[str, str | None] | None = None
    if runtime.is_local_main:
        shutil.rmtree(target, ignore_errors=True)
        cache = open_node_cache(ctx)
        read_before = bytes_read()
        cached = model_from_cache(ctx, cache, "teacher", (known or {}).get("digest"), target)
        if cached is not None:
            path = cached.path
            print(
                f"[kubetune] {describe_hit('teacher', cached, bytes_read() - read_before)}",
                file=ctx.reporter.stream,
                flush=True,
            )
        else:
            # The resolved version, not the alias: an alias moving meanwhile cannot mix two versions.
            path = fetch(resolved or uri, target, ctx.store, registry_output_uri=rc.output.uri)
        check_weights_safety(
            path, allow_pickle=spec.teacher.allow_pickle, trust_remote_code=spec.teacher.trust_remote_code
        )
        digest = (
            cached.digest
            if cached is not None
            else remember_model(ctx, cache, "teacher", path, source=resolved or uri, meta={})
        )
        got = {"rel": str(path.relative_to(workdir)), "digest": digest}
    runtime.barrier()
    got = runtime.broadcast(got)
    assert got is not None and got["rel"] is not None
    return Teacher(uri=uri, path=workdir / got["rel"], resolved=resolved, digest=got["digest"])


def teacher_record(teacher: Teacher) -> dict[str, Any]:
    """The inputs-record entry: the teacher's content digest decides reuse, not its URI."""
    return {
        "uri": teacher.uri,
        "digest": teacher.digest or digest_dir(teacher.path),
        "resolved": teacher.resolved,
    }
