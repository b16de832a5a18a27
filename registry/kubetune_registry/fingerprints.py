"""What a source holds, said by its listing, and the content digests kubetune last read for it.

A *listing fingerprint* (:func:`source_fingerprint`) names the objects under an ``s3://`` or
``file://`` URI without reading any of them: the sha256 of the sorted ``(relative path, size,
ETag)`` of its listing (one LIST request, paginated), plus the store the ETags come from. Any
object that is added, removed, renamed inside the source, resized or rewritten changes it; moving
or copying the same objects to another prefix or bucket of the same store keeps it (S3 ETags are
content checksums that a server-side copy keeps; a local store's ETag is the file's inode, mtime
and size, which a rename keeps and a copy does not).

The :class:`FingerprintCache` lives in the OUTPUT registry, which kubetune owns and writes anyway,
never in a user's input bucket: ``<output uri>/.kubetune/fingerprints/<key>.json`` (model names
cannot start with ``.``, so no model folder can collide with it). An entry maps a fingerprint (and
a small *context*: what the content digest also depends on, such as the precision a GGUF base is
dequantised to) to the digests kubetune computed the last time it actually downloaded those
bytes. The trainer uses it to take the reuse decision before downloading a base model.

What the fingerprint relies on, and where it is weaker than a content digest: that a store gives a
changed object a different ETag or size. S3 and S3-compatible stores do (an MD5 of the content, or
of its parts); a local store's stat ETag does unless a file is rewritten in place at the same size
and its mtime is set back to the old nanosecond. A store that returns no ETag gets no fingerprint.
An entry that ever disagrees with a fresh download is replaced by what was downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from kubetune_registry.digests import digest_json
from kubetune_registry.storage import (
    InvalidURI,
    LocalStore,
    ObjectInfo,
    ObjectNotFound,
    S3Store,
    StoreSettings,
    UnsafeKeyError,
    file_uri_path,
    join_key,
    open_uri,
    relative_key,
    walk_files,
)

FINGERPRINT_SCHEMA_VERSION: Final = 1
FINGERPRINT_KIND: Final = "kubetune.io/SourceFingerprint"
CACHE_FOLDER: Final = ".kubetune/fingerprints"


@dataclass(frozen=True)
class Fingerprint:
    """A source's listing: ``key`` (sha256 hex), how many objects and bytes it holds, and whether
    the URI named one object (``single``) rather than a folder."""

    key: str
    objects: int
    size: int
    single: bool
    names: tuple[str, ...]  # relative paths (a single object: its file name), sorted

    def may_be_gguf(self) -> bool:
        """True unless the listing rules out a GGUF base (see ``fetch.gguf.find_gguf``): a single
        object, or a folder with a ``*.gguf`` file and no top-level ``config.json``."""
        if self.single:
            return True
        return "config.json" not in self.names and any(n.lower().endswith(".gguf") for n in self.names)


def _fingerprint(namespace: str, single: bool, entries: list[tuple[str, int, str]]) -> Fingerprint | None:
    if not entries or any(not etag for _rel, _size, etag in entries):
        return None
    entries = sorted(entries, key=lambda e: e[0].encode("utf-8"))
    key = digest_json(
        {"v": FINGERPRINT_SCHEMA_VERSION, "store": namespace, "single": single, "objects": entries}
    )
    return Fingerprint(
        key=key,
        objects=len(entries),
        size=sum(size for _rel, size, _etag in entries),
        single=single,
        names=tuple(rel for rel, _size, _etag in entries),
    )


def _store_namespace(store: Any, settings: StoreSettings) -> str:
    # ETags are only comparable within one kind of store: S3 ones per endpoint, local ones per device.
    if isinstance(store, S3Store):
        return f"s3:{settings.endpoint or 'default'}"
    if isinstance(store, LocalStore):
        try:
            return f"local:{os.stat(store.root).st_dev:x}"
        except OSError:
            return "local"
    return type(store).__name__


def source_fingerprint(uri: str, settings: StoreSettings) -> Fingerprint | None:
    """The :class:`Fingerprint` of ``uri`` from its listing alone (no object byte is read), chosen
    as ``fetch`` would fetch it: ``s3://bucket/key`` is that one object when it exists and the URI
    does not end in ``/``, else the folder ``key/``; ``file:///path`` is that file or every file
    under that folder (symlinks followed, as the fetch follows them).

    None when the source cannot be fingerprinted: another scheme (``hf://``, ``modelversion://``),
    nothing there, or an object without an ETag. Raises StorageError when the LIST fails.
    """
    if uri.startswith("file://"):
        return _file_fingerprint(uri)
    if not uri.startswith("s3://"):
        return None
    try:
        store, key = open_uri(uri, settings)
    except (InvalidURI, UnsafeKeyError):
        return None
    namespace = _store_namespace(store, settings)
    if key and not uri.endswith("/"):
        # One LIST answers both questions: is ``key`` an object, and what is under ``key/``.
        listed: list[ObjectInfo] = list(store.list(key))
        exact = [info for info in listed if info.key == key]
        if exact:
            return _fingerprint(namespace, True, [(key.rsplit("/", 1)[-1], exact[0].size, exact[0].etag)])
        folder = key + "/"
        inside = [info for info in listed if info.key.startswith(folder)]
    else:
        folder = key.rstrip("/") + "/" if key else ""
        inside = list(store.list(folder))
    return _fingerprint(namespace, False, [(relative_key(i.key, key), i.size, i.etag) for i in inside])


def _stat_tag(path: Path) -> tuple[int, str]:
    st = os.stat(path)  # follows symlinks: the file the fetch links or copies
    return st.st_size, f"{st.st_dev:x}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _file_fingerprint(uri: str) -> Fingerprint | None:
    try:
        source = file_uri_path(uri)
        if source.is_file():
            size, tag = _stat_tag(source)
            return _fingerprint("file", True, [(source.name, size, tag)])
        if not source.is_dir():
            return None
        entries = []
        for path, rel in walk_files(source):
            size, tag = _stat_tag(path)
            entries.append((rel, size, tag))
    except (InvalidURI, UnsafeKeyError, OSError):
        return None
    return _fingerprint("file", False, entries)


class FingerprintCache:
    """Entries under ``<output uri>/.kubetune/fingerprints/``: a fingerprint plus a context, mapped
    to a JSON value (what the trainer computed from the bytes). Reads and writes are single small
    objects; a damaged or foreign entry reads as a miss. Raises StorageError on store failures."""

    def __init__(self, output_uri: str, settings: StoreSettings) -> None:
        self.output_uri = output_uri.rstrip("/")
        self.store, self._prefix = open_uri(output_uri, settings)

    def _entry_key(self, fingerprint: Fingerprint, context: dict[str, Any] | None) -> str:
        name = digest_json({"fingerprint": fingerprint.key, "context": context})
        return join_key(self._prefix, CACHE_FOLDER, f"{name}.json")

    def get(self, fingerprint: Fingerprint, context: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The value remembered for ``fingerprint`` in ``context``, or None."""
        try:
            data, _etag = self.store.get_bytes(self._entry_key(fingerprint, context))
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if (
            not isinstance(doc, dict)
            or doc.get("kind") != FINGERPRINT_KIND
            or doc.get("schemaVersion") != FINGERPRINT_SCHEMA_VERSION
            or doc.get("fingerprint") != fingerprint.key
            or doc.get("context") != context
            or not isinstance(doc.get("value"), dict)
        ):
            return None
        value: dict[str, Any] = doc["value"]
        return value

    def put(
        self,
        fingerprint: Fingerprint,
        value: dict[str, Any],
        *,
        context: dict[str, Any] | None = None,
        source: str = "",
    ) -> bool:
        """Remember ``value`` for ``fingerprint`` in ``context``; ``source`` (the URI it was read
        from) is kept for people reading the entry, never used. Returns False when an entry with
        a different value was there (it is replaced: the fresh download is the truth)."""
        previous = self.get(fingerprint, context)
        if previous == value:
            return True
        doc = {
            "kind": FINGERPRINT_KIND,
            "schemaVersion": FINGERPRINT_SCHEMA_VERSION,
            "fingerprint": fingerprint.key,
            "context": context,
            "objects": fingerprint.objects,
            "size": fingerprint.size,
            "source": source,
            "value": value,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        blob = json.dumps(doc, sort_keys=True, indent=2).encode("utf-8") + b"\n"
        self.store.put_bytes(self._entry_key(fingerprint, context), blob)
        return previous is None
