"""Content digests: files, folders and JSON values. Pure standard library, streaming.

All digests are lowercase hex sha256 strings without an algorithm prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks (a weight file is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dir_entries(path: Path | str) -> list[tuple[str, int, str]]:
    """``(relative posix path, size, sha256)`` for every regular file under ``path``, sorted by path.

    Symlinks are followed (a Hugging Face cache snapshot is a folder of symlinks to blobs).
    """
    root = Path(path)
    entries: list[tuple[str, int, str]] = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_file():
                entries.append((file.relative_to(root).as_posix(), file.stat().st_size, sha256_file(file)))
    entries.sort(key=lambda e: e[0].encode("utf-8"))
    return entries


def digest_entries(entries: list[tuple[str, int, str]]) -> str:
    """The folder digest of ``(path, size, sha256)`` entries; see :func:`digest_dir` for the format."""
    digest = hashlib.sha256()
    for rel, size, sha in sorted(entries, key=lambda e: e[0].encode("utf-8")):
        digest.update(f"{rel}\t{size}\t{sha}\n".encode())
    return digest.hexdigest()


def digest_dir(path: Path | str) -> str:
    """A digest of a folder's content that ignores timestamps and file order on disk.

    Exact format: for every regular file under ``path`` (following symlinks), one line
    ``<relative posix path>\\t<size in bytes, decimal>\\t<sha256 hex>\\n``, encoded as UTF-8, lines
    sorted by the UTF-8 bytes of the path; the result is the sha256 hex of the concatenated lines.
    An empty folder digests to sha256 of the empty string. Renaming, adding, removing or changing
    any file changes the digest; empty directories do not count.
    """
    return digest_entries(dir_entries(path))


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no insignificant whitespace, UTF-8, non-ASCII kept as is.

    Raises TypeError for values JSON cannot represent and ValueError for NaN/Infinity (they have no
    JSON form, and two NaNs would digest equal while comparing unequal).
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def digest_json(obj: Any) -> str:
    """sha256 hex of :func:`canonical_json` of ``obj``: equal values digest equally."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()
