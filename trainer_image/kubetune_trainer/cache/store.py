"""A content-addressed folder cache shared by every job on a node; the standard library only.

Layout under the root (``KUBETUNE_CACHE_DIR``)::

    <root>/<kind>/<key>/...            one entry: its files, then entry.json, written last
    <root>/<kind>/<key>/entry.json     {"kind", "key", "size", "files": {path: {size, sha256}},
                                        "created", "source", "meta"}; its mtime = the last use
    <root>/locks/<kind>/<key>.lock     the entry's lock: shared while a job reads it, exclusive to delete
    <root>/tmp/                        entries being written (renamed into place when complete)
    <root>/trash/                      entries being deleted (renamed out first: never half-visible)

What a caller may rely on:

* **Atomic writes.** :meth:`NodeCache.put` fills a temporary folder in the same root, writes
  ``entry.json`` last and renames the folder into place. A reader sees a whole entry or none.
* **Safe races.** Two jobs filling the same entry at once both write their own temporary copy;
  the first rename wins, the loser discards its copy and is handed the winner's entry.
* **Verified reads.** :meth:`NodeCache.get` checks every file's size and sha256 against
  ``entry.json``; an entry that does not match (a torn disk, a hand edit, a hard-linked copy
  written to in place) is deleted and reported as a miss, so the caller fetches and re-inserts it.
* **LRU eviction by size.** After each insert, entries are deleted least recently used first until
  the total is at most ``max_bytes``. An entry a job is reading holds a shared ``flock`` and is
  skipped; the locks are the kernel's, so a job that dies releases them.
* **Keys** are lowercase sha256 hex strings (a content digest, or a digest of what the entry was
  derived from); anything else raises :class:`CacheError` before a path is built from it.

Locks are ``fcntl.flock`` rather than the ``filelock`` package: a reader must hold a *shared* lock
that an evictor's *exclusive* try can see, and ``filelock.FileLock`` is exclusive only (its
read/write lock uses SQLite, which hostPath and NFS volumes serve badly). ``flock`` is Linux/macOS,
where the trainer runs. Nothing here knows models or datasets: ``fetch/`` and ``data/`` say what an
entry holds. Errors are :class:`CacheError` (or ``OSError``); callers treat both as "no cache".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_registry.digests import sha256_file

log = logging.getLogger("kubetune.trainer")

CACHE_DIR_ENV = "KUBETUNE_CACHE_DIR"
"""The node cache's root folder; unset or empty, no cache is used."""
CACHE_MAX_BYTES_ENV = "KUBETUNE_CACHE_MAX_BYTES"
"""The bound on the cache's total size in bytes (LRU eviction); unset, :data:`DEFAULT_MAX_BYTES`."""
DEFAULT_MAX_BYTES = 100 * 1024**3

ENTRY_FILE = "entry.json"
KINDS = ("models", "tokenized")
_KEY = re.compile(r"[0-9a-f]{64}")
_STALE_TMP_S = 24 * 3600  # a temporary folder this old belongs to a writer that died


class CacheError(Exception):
    """The cache cannot be used as asked (a bad key or kind, an unreadable root)."""


@dataclass(frozen=True)
class Entry:
    """A verified entry: its folder and what ``entry.json`` says about it."""

    kind: str
    key: str
    path: Path
    size: int
    files: dict[str, dict[str, Any]]  # relative posix path -> {"size": int, "sha256": str}
    source: str
    meta: dict[str, Any]

    def file_entries(self) -> list[tuple[str, int, str]]:
        """``(path, size, sha256)`` per file, as ``kubetune_registry.digests.dir_entries`` gives them."""
        return sorted(
            ((rel, int(f["size"]), str(f["sha256"])) for rel, f in self.files.items()),
            key=lambda e: e[0].encode("utf-8"),
        )


class NodeCache:
    """The cache at ``root``, bounded to ``max_bytes`` (see the module docstring)."""

    def __init__(
        self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES, *, warn: Callable[[str], None] | None = None
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.warn = warn or log.warning  # told about a corrupted entry (it is deleted, then a miss)
        for sub in (*KINDS, "tmp", "trash", *(f"locks/{k}" for k in KINDS)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(
        cls, environ: dict[str, str] | None = None, *, warn: Callable[[str], None] | None = None
    ) -> NodeCache | None:
        """The cache ``KUBETUNE_CACHE_DIR`` names (None when unset). Raises CacheError for a bad
        ``KUBETUNE_CACHE_MAX_BYTES`` and OSError for a root that cannot be created."""
        env = os.environ if environ is None else environ
        root = env.get(CACHE_DIR_ENV, "").strip()
        if not root:
            return None
        raw = env.get(CACHE_MAX_BYTES_ENV, "").strip()
        try:
            max_bytes = int(raw) if raw else DEFAULT_MAX_BYTES
        except ValueError:
            raise CacheError(f"{CACHE_MAX_BYTES_ENV}={raw!r} is not a whole number of bytes") from None
        if max_bytes < 0:
            raise CacheError(f"{CACHE_MAX_BYTES_ENV}={raw!r} must not be negative")
        return cls(Path(root), max_bytes, warn=warn)

    # --- paths ------------------------------------------------------------------------------

    def entry_path(self, kind: str, key: str) -> Path:
        """Where the entry ``kind``/``key`` lives. Raises CacheError for an unknown kind or a key
        that is not a sha256 hex string (never a path built from an arbitrary string)."""
        if kind not in KINDS:
            raise CacheError(f"unknown cache kind {kind!r}")
        if not _KEY.fullmatch(key):
            raise CacheError(f"cache key {key!r} is not a sha256 hex digest")
        return self.root / kind / key

    @contextlib.contextmanager
    def _lock(self, kind: str, key: str, mode: int) -> Iterator[bool]:
        """Hold the entry's flock in ``mode`` (LOCK_SH/LOCK_EX, maybe | LOCK_NB); yields whether
        it was taken (always True without LOCK_NB)."""
        self.entry_path(kind, key)  # validates
        path = self.root / "locks" / kind / f"{key}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    # --- reading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self, kind: str, key: str) -> Iterator[Entry | None]:
        """The verified entry (None on a miss), held under a shared lock for the ``with`` block:
        it is not evicted while the caller copies or links its files out. A corrupted entry is
        deleted and yields None. Its last use is recorded (LRU)."""
        target = self.entry_path(kind, key)
        with self._lock(kind, key, fcntl.LOCK_SH):
            entry, problem = self._verified(kind, key, target)
            if entry is not None:
                with contextlib.suppress(OSError):
                    os.utime(target / ENTRY_FILE)  # the last use, for LRU
                yield entry
                return
        if problem is not None:
            self.warn(f"node cache: {kind}/{key} is corrupted ({problem}): deleted, to be fetched again")
            self._discard_corrupted(kind, key)
        yield None

    def get(self, kind: str, key: str) -> Entry | None:
        """The verified entry, or None (see :meth:`reading`; no lock is held after the call)."""
        with self.reading(kind, key) as entry:
            return entry

    def _verified(self, kind: str, key: str, target: Path) -> tuple[Entry | None, str | None]:
        """(entry, None) when ``target`` matches its entry.json; (None, why) when it is corrupted;
        (None, None) when there is no entry."""
        meta_path = target / ENTRY_FILE
        if not meta_path.is_file():
            return None, ("no entry.json" if target.exists() else None)
        try:
            meta = json.loads(meta_path.read_text())
            files: dict[str, dict[str, Any]] = meta["files"]
            if meta.get("kind") != kind or meta.get("key") != key:
                return None, "entry.json names another entry"
            for rel, want in files.items():
                file = target / rel
                if not file.is_file() or file.stat().st_size != int(want["size"]):
                    return None, f"{rel}: missing or of another size"
                if sha256_file(file) != want["sha256"]:
                    return None, f"{rel}: sha256 differs"
            on_disk = {
                p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() and p != meta_path
            }
            if on_disk != set(files):
                return None, "files not listed in entry.json"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"unreadable: {exc}"
        return (
            Entry(
                kind=kind,
                key=key,
                path=target,
                size=int(meta.get("size", 0)),
                files=files,
                source=str(meta.get("source", "")),
                meta=dict(meta.get("meta") or {}),
            ),
            None,
        )

    def _discard_corrupted(self, kind: str, key: str) -> None:
        target = self.entry_path(kind, key)
        with self._lock(kind, key, fcntl.LOCK_EX):
            # Another job may have replaced it meanwhile: delete only what is still corrupted.
            entry, still = self._verified(kind, key, target)
            if entry is None and still is not None:
                self._remove(target)

    # --- writing ----------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        key: str,
        fill: Callable[[Path], None],
        *,
        source: str = "",
        meta: dict[str, Any] | None = None,
        known_files: list[tuple[str, int, str]] | None = None,
    ) -> Entry | None:
        """Insert the entry ``fill(folder)`` writes, atomically; returns the entry now in the cache
        (this job's, or the one a concurrent writer put there first), or None when it is larger
        than the bound. ``fill`` may raise; nothing is then inserted and the error propagates.

        ``known_files`` (``(path, size, sha256)`` of what ``fill`` writes, already hashed by the
        caller) spares hashing a large folder twice; paths and sizes are still checked."""
        target = self.entry_path(kind, key)
        existing = self.get(kind, key)
        if existing is not None:
            return existing
        tmp = self.root / "tmp" / f"{kind}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            fill(tmp)
            written = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
            files: dict[str, dict[str, Any]]
            if known_files is not None:
                files = {rel: {"size": size, "sha256": sha} for rel, size, sha in known_files}
                if set(files) != set(written) or any(
                    written[rel].stat().st_size != f["size"] for rel, f in files.items()
                ):
                    raise CacheError(f"{kind}/{key}: the files written are not the files described")
            else:
                files = {
                    rel: {"size": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in written.items()
                }
            if ENTRY_FILE in files:
                raise CacheError(f"an entry may not hold a file named {ENTRY_FILE}")
            size = sum(int(f["size"]) for f in files.values())
            if size > self.max_bytes:
                log.warning(
                    "node cache: %s/%s (%d bytes) exceeds the bound (%d): not cached",
                    kind,
                    key,
                    size,
                    self.max_bytes,
                )
                return None
            record = {
                "kind": kind,
                "key": key,
                "size": size,
                "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source": source,
                "meta": meta or {},
            }
            (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))  # written last
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                log.info("node cache: %s/%s was inserted by another job first; using it", kind, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; the loser's copy otherwise
        with self._lock(kind, key, fcntl.LOCK_SH):  # the new entry is in use: eviction skips it
            self.evict()
        return self.get(kind, key)

    # --- eviction ---------------------------------------------------------------------------

    def entries(self) -> list[tuple[float, int, str, str]]:
        """``(last use, size, kind, key)`` of every complete entry, least recently used first."""
        out: list[tuple[float, int, str, str]] = []
        for kind in KINDS:
            for folder in (self.root / kind).iterdir():
                meta = folder / ENTRY_FILE
                if not _KEY.fullmatch(folder.name):
                    continue
                try:
                    size = int(json.loads(meta.read_text()).get("size", 0))
                    out.append((meta.stat().st_mtime, size, kind, folder.name))
                except (OSError, ValueError):
                    out.append((0.0, _folder_size(folder), kind, folder.name))  # broken: evict first
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _used, size, _kind, _key in self.entries())

    def evict(self) -> list[str]:
        """Delete least recently used entries until the total is at most ``max_bytes``; an entry
        some job holds a lock on is kept. Returns the ``kind/key`` names deleted."""
        self._sweep_tmp()
        entries = self.entries()
        total = sum(size for _used, size, _kind, _key in entries)
        deleted: list[str] = []
        for _used, size, kind, key in entries:
            if total <= self.max_bytes:
                break
            with self._lock(kind, key, fcntl.LOCK_EX | fcntl.LOCK_NB) as taken:
                if not taken:
                    continue  # in use by a running job
                self._remove(self.root / kind / key)
            total -= size
            deleted.append(f"{kind}/{key}")
        if deleted:
            log.info(
                "node cache: evicted %d entries (LRU) to stay within %d bytes", len(deleted), self.max_bytes
            )
        return deleted

    def _remove(self, folder: Path) -> None:
        """Rename ``folder`` out of sight, then delete it (no reader ever sees half an entry)."""
        if not folder.exists():
            return
        trash = self.root / "trash" / f"{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_tmp(self) -> None:
        now = time.time()
        for parent in (self.root / "tmp", self.root / "trash"):
            for folder in parent.iterdir():
                with contextlib.suppress(OSError):
                    if now - folder.stat().st_mtime > _STALE_TMP_S:
                        shutil.rmtree(folder, ignore_errors=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def link_tree(src: Path, dst: Path) -> None:
    """Every file under ``src`` at the same place under ``dst``: hard-linked where the filesystem
    allows (no copy, no extra disk), copied otherwise. Symlinks are followed."""
    src = Path(src)
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    for file in files:
        target = dst / (file.name if file == src else file.relative_to(src).as_posix())
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file.resolve(), target)
        except OSError:  # another filesystem, or links not permitted
            shutil.copyfile(file, target)
