"""Base models and teachers from the node cache (:mod:`kubetune_trainer.cache`), by content digest.

Input: the :class:`~kubetune_trainer.context.RunContext`, a model's role (``base``, ``teacher``),
what :mod:`~kubetune_trainer.fetch.fingerprints` knew about it before the download (its content
digest from a version manifest or a listing fingerprint, or nothing) and the folder it goes to.
Output: the folder, and its digest — the one :func:`~kubetune_trainer.fetch.inputs.identify` would
take over it, so nothing is hashed twice.

* Digest known and ``models/<digest>`` in the cache: the entry is verified and its files are
  hard-linked (copied across filesystems) into the work dir; **no byte is downloaded**, and a GGUF
  base is not dequantised again (the entry is the dequantised folder the trainer loads).
* Otherwise the caller downloads as before and :func:`remember_model` digests the folder and
  inserts it, so the next job on the node finds it — by digest, which the next job knows in advance
  once the output registry's fingerprint cache has it (filled after this download).

A cached folder is checked for pickle weights and remote code by the caller, every time, against
the job's own ``allowPickle`` / ``trustRemoteCode``. Nothing here fails a run: a cache error is a
warning on the console and a miss.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_registry.digests import digest_entries, dir_entries
from kubetune_trainer.cache import CacheError, NodeCache, link_tree
from kubetune_trainer.context import RunContext


@dataclass(frozen=True)
class CachedModel:
    """A model folder linked in from the node cache."""

    path: Path
    digest: str
    size: int
    files: int
    meta: dict[str, Any]


def _say(ctx: RunContext, line: str) -> None:
    print(f"[kubetune] {line}", file=ctx.reporter.stream, flush=True)


def open_node_cache(ctx: RunContext) -> NodeCache | None:
    """The node cache ``KUBETUNE_CACHE_DIR`` names, or None (unset, or unusable: a warning)."""
    try:
        return NodeCache.from_env(warn=lambda msg: _say(ctx, f"warning: {msg}"))
    except (CacheError, OSError) as exc:
        _say(ctx, f"warning: node cache unusable, running without it: {exc}")
        return None


def model_from_cache(
    ctx: RunContext, cache: NodeCache | None, role: str, digest: str | None, target: Path
) -> CachedModel | None:
    """``models/<digest>`` linked into ``target`` (emptied first) when the cache holds it, else None."""
    if cache is None or digest is None:
        return None
    try:
        with cache.reading("models", digest) as entry:
            if entry is None:
                return None
            if digest_entries(entry.file_entries()) != digest:
                _say(ctx, f"warning: node cache: models/{digest} does not hold that digest; not used")
                return None
            shutil.rmtree(target, ignore_errors=True)
            link_tree(entry.path, target)
            return CachedModel(
                path=target, digest=digest, size=entry.size, files=len(entry.files), meta=entry.meta
            )
    except (CacheError, OSError) as exc:
        _say(ctx, f"warning: node cache: {role} not read from it ({exc}); downloading")
        shutil.rmtree(target, ignore_errors=True)
        return None


def remember_model(
    ctx: RunContext, cache: NodeCache | None, role: str, folder: Path, *, source: str, meta: dict[str, Any]
) -> str | None:
    """Digest ``folder`` (as ``identify`` would) and insert it as ``models/<digest>``; returns the
    digest (None without a cache: the caller leaves the digest to ``identify``). An insert that fails
    is a warning; the digest is still returned."""
    if cache is None:
        return None
    entries = dir_entries(folder)
    digest = digest_entries(entries)
    try:
        cache.put(
            "models",
            digest,
            lambda tmp: link_tree(folder, tmp),
            source=source,
            meta=meta,
            known_files=entries,
        )
    except (CacheError, OSError) as exc:
        _say(ctx, f"warning: node cache: {role} not cached ({exc})")
    return digest


def describe_hit(role: str, cached: CachedModel, bytes_read: int) -> str:
    """The log line of a model found in the node cache."""
    gguf = cached.meta.get("gguf")
    what = (
        f"GGUF base {gguf.get('file')} (sha256 {str(gguf.get('sha256'))[:12]}…) already dequantised to "
        f"{gguf.get('dequantizedTo')}, "
        if role == "base" and isinstance(gguf, dict)
        else ""
    )
    return (
        f"{role}: {what}models/{cached.digest[:12]}… from the node cache ({cached.size:,} bytes in "
        f"{cached.files} files; {bytes_read:,} model bytes read from object storage)"
    )
