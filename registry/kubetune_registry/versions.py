"""The model registry: immutable, versioned model snapshots in object storage.

Layout under ``<output uri>/<model>/`` (DESIGN.md, "Model versions"):

``versions/<vN>/``
    The version's files as the trainer staged them (``adapter/``, ``merged/``, ``quantized/<format>/``,
    ``eval/``, ``training/``, ``README.md``) and ``manifest.json``, written LAST with If-None-Match.
    A version without ``manifest.json`` does not exist for :meth:`ModelRegistry.list_versions`,
    :meth:`~ModelRegistry.get_version` and :meth:`~ModelRegistry.find_by_inputs_digest`.
``claims/<vN>.json``
    Version-name allocation. A publisher owns ``vN`` once it created this object with If-None-Match;
    a concurrent publisher that loses the write moves on to ``vN+1``. Names are never reused: a
    publish that fails after its claim leaves a gap (``v1``, ``v3``) and a retry takes a fresh name,
    so a slow or half-dead publisher can never mix its files into somebody else's version.
``index/inputs/<inputs digest>/<vN>.json``
    Written after the claim and before any upload, so every published version is indexed by its
    inputs digest and a reuse check is one LIST, not a scan of every manifest.
``aliases/<alias>.json``
    The alias target plus its complete move history in one object, replaced by compare-and-swap
    (If-Match on the ETag read, If-None-Match when creating), so a move and its history entry land
    together or not at all.

Checkpoints (``<model>/checkpoints/``) belong to the trainer's checkpoint module; nothing here
touches them.

Concurrency guarantees: two publishers never get the same version name; files of a version are
written by exactly one publisher; a version appears whole or not at all. Two publishers racing with
the *same* inputs digest both re-check for a published twin just before writing their manifests;
only if both reach that point within the same instant can two versions share an inputs digest
(harmless: both are complete, and :meth:`ModelRegistry.find_by_inputs_digest` returns the older).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from kubetune_api.names import check_name, is_valid_name, is_valid_version
from kubetune_registry.digests import sha256_file
from kubetune_registry.storage import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreSettings,
    join_key,
    open_uri,
    relative_key,
    safe_join,
    sha256_stream,
    validate_key,
    walk_files,
)

MANIFEST_NAME: Final = "manifest.json"
MANIFEST_SCHEMA_VERSION: Final = 1
MANIFEST_KIND: Final = "kubetune.io/ModelVersionManifest"
ALIAS_SCHEMA_VERSION: Final = 1
_VERSION_FILE_RE = re.compile(r"^versions/(v[1-9][0-9]*)/manifest\.json$")
_CLAIM_RE = re.compile(r"^claims/(v[1-9][0-9]*)\.json$")
_DIGEST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{7,127}$")
_MAX_CLAIM_ATTEMPTS = 1000
_MAX_ALIAS_ATTEMPTS = 10


# --- errors -----------------------------------------------------------------------------------


class RegistryError(Exception):
    """A registry operation cannot be done; the message says which version/alias and why."""


class VersionNotFound(RegistryError, LookupError):
    """No published version (or alias) by that name."""


class AliasConflict(RegistryError):
    """A compare-and-swap alias move found another target than the caller expected."""

    def __init__(self, message: str, current: AliasRecord | None = None) -> None:
        super().__init__(message)
        self.current = current


class MissingContent(RegistryError):
    """The version exists but has no files in the requested folder (e.g. no ``merged/``)."""


class IntegrityError(RegistryError):
    """A downloaded file does not match its manifest entry (size or sha256), or is missing."""


class _AnyTarget:
    """Sentinel type for "move the alias whatever it points to now"."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Final = _AnyTarget()


# --- value types ------------------------------------------------------------------------------


@dataclass
class PublishedVersion:
    """A visible version. ``manifest_digest`` is the sha256 of the exact ``manifest.json`` bytes."""

    name: str
    uri: str
    manifest_digest: str
    reused: bool
    manifest: dict[str, Any]

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("files", []))


@dataclass(frozen=True)
class AliasRecord:
    """One alias move: the alias now points to ``version`` (it pointed to ``previous`` before)."""

    alias: str
    version: str
    previous: str | None
    time: str
    reason: str = ""
    actor: str = ""
    sequence: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "previous": self.previous,
            "time": self.time,
            "reason": self.reason,
            "actor": self.actor,
            "sequence": self.sequence,
        }


@dataclass(frozen=True)
class AlteredFile:
    """A file whose content differs from its manifest entry."""

    path: str
    expected_size: int
    actual_size: int
    expected_sha256: str
    actual_sha256: str


@dataclass
class VerifyReport:
    """What :meth:`ModelRegistry.verify` found. ``ok`` is False when a file is missing or altered;
    unexpected extra files are reported but do not make a version invalid."""

    version: str
    uri: str
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    altered: list[AlteredFile] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.altered


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(obj: Any) -> bytes:
    # Readable (indent) and deterministic (sorted keys); the digest covers these exact bytes.
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode(
        "utf-8"
    )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key in sorted(obj):
            out.update(_flatten(obj[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: obj} if prefix else {}


# --- the registry -----------------------------------------------------------------------------


class ModelRegistry:
    """Versions and aliases of one model under ``<output_uri>/<model_name>/``.

    Raises ValueError for an invalid model name (``^[a-z0-9]+([._-][a-z0-9]+)*$``, at most 63
    characters) and InvalidURI/UnsafeKeyError for an output URI that is not ``s3://`` or
    ``file:///``. Object-store failures surface as :class:`~kubetune_registry.storage.StorageError`.
    """

    def __init__(
        self,
        output_uri: str,
        model_name: str,
        settings: StoreSettings,
        *,
        store: ObjectStore | None = None,
    ) -> None:
        self.model_name = check_name(model_name, "model name")
        self.settings = settings
        self.output_uri = output_uri.rstrip("/")
        opened, prefix = open_uri(output_uri, settings)
        # ``store`` lets a caller share one client (or wrap it); the prefix always comes from the URI.
        self.store: ObjectStore = store if store is not None else opened
        self._root = join_key(prefix, self.model_name)

    # keys and URIs

    def _key(self, *parts: str) -> str:
        return join_key(self._root, *parts)

    def _version_prefix(self, version: str) -> str:
        return self._key("versions", version)

    def version_uri(self, version: str) -> str:
        """``<output uri>/<model>/versions/<version>``."""
        return f"{self.output_uri}/{self.model_name}/versions/{version}"

    # reading versions

    def _load(self, version: str, *, reused: bool = False) -> PublishedVersion:
        key = join_key(self._version_prefix(version), MANIFEST_NAME)
        try:
            data, _etag = self.store.get_bytes(key)
        except ObjectNotFound:
            raise VersionNotFound(
                f"model {self.model_name!r} has no published version {version!r} (no {self.version_uri(version)}/"
                f"{MANIFEST_NAME})"
            ) from None
        try:
            manifest = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"{self.version_uri(version)}/{MANIFEST_NAME} is not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from None
        schema = manifest.get("schemaVersion") if isinstance(manifest, dict) else None
        if not isinstance(schema, int) or schema > MANIFEST_SCHEMA_VERSION:
            raise RegistryError(
                f"{self.version_uri(version)}/{MANIFEST_NAME} has schemaVersion {schema!r}; this kubetune "
                f"reads up to {MANIFEST_SCHEMA_VERSION} (upgrade kubetune)"
            )
        return PublishedVersion(
            name=version,
            uri=self.version_uri(version),
            manifest_digest=hashlib.sha256(data).hexdigest(),
            reused=reused,
            manifest=manifest,
        )

    def list_versions(self) -> list[PublishedVersion]:
        """Every visible version (with a manifest), sorted by number. Invisible ones are skipped."""
        names: set[str] = set()
        versions_root = self._key("versions") + "/"
        for info in self.store.list(versions_root):
            match = _VERSION_FILE_RE.match(relative_key(info.key, self._root))
            if match:
                names.add(match.group(1))
        out: list[PublishedVersion] = []
        for name in sorted(names, key=lambda n: int(n[1:])):
            with contextlib.suppress(VersionNotFound):  # deleted between LIST and GET
                out.append(self._load(name))
        return out

    def get_version(self, ref: str) -> PublishedVersion:
        """The version named ``ref`` (``vN``) or the one the alias ``ref`` points to.

        Raises VersionNotFound when there is no such version or the alias is unset, ValueError when
        ``ref`` is neither a version nor an alias name.
        """
        if is_valid_version(ref):
            return self._load(ref)
        if is_valid_name(ref):
            record = self.get_alias(ref)
            if record is None:
                raise VersionNotFound(f"model {self.model_name!r} has no version or alias named {ref!r}")
            return self._load(record.version)
        raise ValueError(f"{ref!r} is neither a version name (v1, v2, ...) nor an alias name")

    def find_by_inputs_digest(self, inputs_digest: str) -> PublishedVersion | None:
        """The oldest visible version published from ``inputs_digest``, with ``reused=True``; or None.

        Looks in ``index/inputs/<digest>/`` (one LIST) and confirms each candidate's manifest.
        """
        self._check_digest(inputs_digest)
        candidates: list[str] = []
        for info in self.store.list(self._key("index", "inputs", inputs_digest) + "/"):
            name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            if is_valid_version(name):
                candidates.append(name)
        for name in sorted(candidates, key=lambda n: int(n[1:])):
            try:
                found = self._load(name, reused=True)
            except VersionNotFound:
                continue  # claimed but never completed
            if found.manifest.get("inputsDigest") == inputs_digest:
                return found
        return None

    @staticmethod
    def _check_digest(inputs_digest: str) -> None:
        if not _DIGEST_RE.fullmatch(inputs_digest):
            raise ValueError(f"inputs digest {inputs_digest!r} is not a digest (8-128 of [A-Za-z0-9:._-])")

    # publishing

    def publish(
        self,
        staging_dir: Path,
        *,
        inputs: dict[str, Any],
        inputs_digest: str,
        metrics: dict[str, float],
        gates: dict[str, Any],
        parent: str | None,
        extra: dict[str, Any] | None = None,
        before_upload: Callable[[str, str], None] | None = None,
    ) -> PublishedVersion:
        """Publish ``staging_dir`` as the next version, or reuse the version with the same inputs.

        ``before_upload(version, version_uri)`` runs once the name is claimed and before anything is
        hashed or uploaded, so files that name their own version (the model card) can be written
        into ``staging_dir`` then.

        Steps: reuse check -> hash every staged file -> claim the next free ``vN`` (If-None-Match;
        losers move on to ``vN+1``) -> index it by inputs digest -> upload all files in parallel ->
        re-check for a twin published meanwhile -> write ``manifest.json`` with If-None-Match.
        ``manifest.json`` lists every file (``path``, ``size``, ``sha256``), ``inputs``,
        ``inputsDigest``, ``metrics``, ``gates``, ``parent``, ``extra``, ``created`` and
        ``schemaVersion``.

        If anything fails before the manifest is written, the uploaded files are deleted (best
        effort) and the exception propagates: no version becomes visible, the name is not reused, and
        calling publish again completes under a fresh name. Returns the version with
        ``reused=True`` when one with ``inputs_digest`` already exists (nothing is uploaded).
        Raises RegistryError for a staging folder that is missing, empty or has its own
        ``manifest.json``; UnsafeKeyError for a staged path that is not a safe key.
        """
        self._check_digest(inputs_digest)
        if parent is not None and not isinstance(parent, str):
            raise TypeError("parent must be a string (e.g. modelversion://model/v3) or None")
        staging_dir = Path(staging_dir)
        existing = self.find_by_inputs_digest(inputs_digest)
        if existing is not None:
            return existing

        version = self._claim_next_version(inputs_digest)
        prefix = self._version_prefix(version)
        try:
            if before_upload is not None:
                before_upload(version, self.version_uri(version))
            files = self._hash_staging(staging_dir)
            self.store.put_bytes(
                self._key("index", "inputs", inputs_digest, f"{version}.json"),
                _dump({"version": version, "inputsDigest": inputs_digest}),
                if_none_match=True,
            )
            uploaded: set[str] = set(self.store.upload_dir(staging_dir, prefix))
            expected = {join_key(prefix, f["path"]) for f in files}
            if uploaded != expected:
                raise RegistryError(
                    f"{staging_dir} changed while it was being published; publish a staging folder nobody writes to"
                )
            twin = self.find_by_inputs_digest(inputs_digest)
            if twin is not None:
                self.store.delete_prefix(prefix + "/")
                return twin
            manifest = {
                "schemaVersion": MANIFEST_SCHEMA_VERSION,
                "kind": MANIFEST_KIND,
                "model": self.model_name,
                "version": version,
                "created": _now(),
                "parent": parent,
                "inputsDigest": inputs_digest,
                "inputs": inputs,
                "metrics": metrics,
                "gates": gates,
                "extra": extra or {},
                "files": files,
            }
            data = _dump(manifest)
            try:
                self.store.put_bytes(join_key(prefix, MANIFEST_NAME), data, if_none_match=True)
            except PreconditionFailed:
                # A retried PUT whose first attempt landed answers 412 too: that is our manifest.
                if self._manifest_bytes(version) != data:
                    raise RegistryError(
                        f"{self.version_uri(version)}/{MANIFEST_NAME} already exists although this publisher claimed "
                        f"{version}: the registry was modified outside kubetune"
                    ) from None
        except BaseException:
            # No manifest -> nothing is visible; drop what we uploaded so the gap costs no storage.
            with contextlib.suppress(Exception):
                if not self.store.exists(join_key(prefix, MANIFEST_NAME)):
                    self.store.delete_prefix(prefix + "/")
            raise
        return PublishedVersion(
            name=version,
            uri=self.version_uri(version),
            manifest_digest=hashlib.sha256(data).hexdigest(),
            reused=False,
            manifest=manifest,
        )

    def _manifest_bytes(self, version: str) -> bytes | None:
        try:
            return self.store.get_bytes(join_key(self._version_prefix(version), MANIFEST_NAME))[0]
        except ObjectNotFound:
            return None

    def _hash_staging(self, staging_dir: Path) -> list[dict[str, Any]]:
        if not staging_dir.is_dir():
            raise RegistryError(f"staging folder {staging_dir} does not exist")
        paths: list[tuple[Path, str]] = []
        for path, rel in walk_files(staging_dir):
            validate_key(rel, what="staged file")
            if rel == MANIFEST_NAME:
                raise RegistryError(
                    f"{path}: {MANIFEST_NAME} is written by the registry; remove it from staging"
                )
            paths.append((path, rel))
        if not paths:
            raise RegistryError(f"staging folder {staging_dir} is empty: nothing to publish")
        workers = max(1, min(self.settings.max_concurrency, len(paths)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-hash") as pool:
            digests = list(pool.map(lambda item: sha256_file(item[0]), paths))
        return [
            {"path": rel, "size": path.stat().st_size, "sha256": sha}
            for (path, rel), sha in zip(paths, digests, strict=True)
        ]

    def _claim_next_version(self, inputs_digest: str) -> str:
        taken = [0]
        for info in self.store.list(self._key("claims") + "/"):
            match = _CLAIM_RE.match(relative_key(info.key, self._root))
            if match:
                taken.append(int(match.group(1)[1:]))
        number = max(taken) + 1
        publisher = uuid.uuid4().hex
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            version = f"v{number}"
            claim = {
                "version": version,
                "inputsDigest": inputs_digest,
                "publisher": publisher,
                "claimed": _now(),
            }
            try:
                self.store.put_bytes(self._key("claims", f"{version}.json"), _dump(claim), if_none_match=True)
            except PreconditionFailed:
                number += 1  # another publisher owns this name; the next one may be free
                continue
            if self.store.exists(join_key(self._version_prefix(version), MANIFEST_NAME)):
                # A version folder without a claim: copied in from elsewhere. Never write into it.
                number += 1
                continue
            return version
        raise RegistryError(
            f"could not claim a version name for {self.model_name!r} in {_MAX_CLAIM_ATTEMPTS} tries"
        )

    # integrity

    def _version_listing(self, version: str) -> dict[str, int]:
        prefix = self._version_prefix(version)
        return {relative_key(info.key, prefix): info.size for info in self.store.list(prefix + "/")}

    def verify(self, ref: str) -> VerifyReport:
        """Re-hash every file of version ``ref`` (streamed) against its manifest.

        Reports files that are missing, altered (size or sha256 differ) and unexpected (present but
        not in the manifest). Raises VersionNotFound.
        """
        pv = self.get_version(ref)
        prefix = self._version_prefix(pv.name)
        listed = self._version_listing(pv.name)
        listed.pop(MANIFEST_NAME, None)
        report = VerifyReport(version=pv.name, uri=pv.uri)
        expected = {f["path"]: f for f in pv.files}
        report.missing = sorted(p for p in expected if p not in listed)
        report.unexpected = sorted(p for p in listed if p not in expected)
        present = [expected[p] for p in sorted(expected) if p in listed]

        def check(entry: dict[str, Any]) -> AlteredFile | None:
            with self.store.open_read(join_key(prefix, entry["path"])) as stream:
                sha, size = sha256_stream(stream)
            if sha == entry["sha256"] and size == entry["size"]:
                return None
            return AlteredFile(entry["path"], int(entry["size"]), size, str(entry["sha256"]), sha)

        workers = max(1, min(self.settings.max_concurrency, len(present) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-verify") as pool:
            results = list(pool.map(check, present))
        report.altered = [r for r in results if r is not None]
        report.checked = len(present)
        return report

    def download(self, ref: str, dest_dir: Path, subdir: str | None = None) -> Path:
        """Download version ``ref`` (or only its ``subdir/``) into ``dest_dir`` and return ``dest_dir``.

        With ``subdir`` (``"merged"``, ``"adapter"``, ``"quantized/int8"``), paths are relative to
        that folder: ``merged/config.json`` lands at ``dest_dir/config.json``. Without it the whole
        version lands, ``manifest.json`` included. Only files listed in the manifest are fetched;
        each is checked against its size and sha256 after download (a local file that already
        matches is kept). Raises VersionNotFound; MissingContent when ``subdir`` holds no files;
        IntegrityError naming the file when one is missing or does not match (the bad local copy is
        removed); UnsafeKeyError for a manifest path that would land outside ``dest_dir``.
        """
        pv = self.get_version(ref)
        dest_dir = Path(dest_dir)
        prefix = self._version_prefix(pv.name)
        folder = subdir.strip("/") if subdir else ""
        if folder:
            validate_key(folder, what="subdir")
        selected = [f for f in pv.files if not folder or f["path"].startswith(folder + "/")]
        if not selected:
            have = sorted({f["path"].split("/", 1)[0] for f in pv.files if "/" in f["path"]})
            raise MissingContent(
                f"{pv.uri} has no {folder}/ files (it has: {', '.join(have) or 'top-level files only'})"
            )
        # Check every destination first: one hostile path refuses the download before any write.
        jobs = [(entry, safe_join(dest_dir, relative_key(entry["path"], folder))) for entry in selected]

        def fetch_one(job: tuple[dict[str, Any], Path]) -> None:
            entry, local = job
            if (
                local.is_file()
                and local.stat().st_size == entry["size"]
                and sha256_file(local) == entry["sha256"]
            ):
                return
            key = join_key(prefix, entry["path"])
            try:
                self.store.download_file(key, local)
            except ObjectNotFound:
                raise IntegrityError(
                    f"{pv.uri}/{entry['path']} is listed in the manifest but missing"
                ) from None
            actual = sha256_file(local)
            if actual != entry["sha256"] or local.stat().st_size != entry["size"]:
                local.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{pv.uri}/{entry['path']}: sha256 {actual} does not match the manifest ({entry['sha256']}); "
                    "the stored file was altered after publishing"
                )

        workers = max(1, min(self.settings.max_concurrency, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-download") as pool:
            list(pool.map(fetch_one, jobs))
        if not folder:
            (dest_dir / MANIFEST_NAME).write_bytes(_dump(pv.manifest))
        return dest_dir

    def diff(self, a: str, b: str) -> dict[str, Any]:
        """What changed from version ``a`` to ``b``.

        Returns ``{"a": name, "b": name, "changes": [{"section", "field", "a", "b"}...],
        "metrics": {metric: {"a", "b", "delta"}}, "files": {"added", "removed", "changed",
        "unchanged"}}``. ``changes`` covers parent, inputs (config, data digests, base model,
        trainer version: flattened to dotted fields), gates and extra; only differing fields.
        """
        va, vb = self.get_version(a), self.get_version(b)
        ma, mb = va.manifest, vb.manifest
        changes: list[dict[str, Any]] = []
        if ma.get("parent") != mb.get("parent"):
            changes.append(
                {"section": "parent", "field": "parent", "a": ma.get("parent"), "b": mb.get("parent")}
            )
        if ma.get("inputsDigest") != mb.get("inputsDigest"):
            changes.append(
                {
                    "section": "inputs",
                    "field": "inputsDigest",
                    "a": ma.get("inputsDigest"),
                    "b": mb.get("inputsDigest"),
                }
            )
        for section in ("inputs", "gates", "extra"):
            fa, fb = _flatten(ma.get(section) or {}), _flatten(mb.get(section) or {})
            for name in sorted(set(fa) | set(fb)):
                if fa.get(name) != fb.get(name):
                    changes.append({"section": section, "field": name, "a": fa.get(name), "b": fb.get(name)})
        metrics: dict[str, dict[str, Any]] = {}
        xa, xb = ma.get("metrics") or {}, mb.get("metrics") or {}
        for name in sorted(set(xa) | set(xb)):
            left, right = xa.get(name), xb.get(name)
            delta = right - left if isinstance(left, int | float) and isinstance(right, int | float) else None
            metrics[name] = {"a": left, "b": right, "delta": delta}
        files_a = {f["path"]: f["sha256"] for f in va.files}
        files_b = {f["path"]: f["sha256"] for f in vb.files}
        return {
            "a": va.name,
            "b": vb.name,
            "changes": changes,
            "metrics": metrics,
            "files": {
                "added": sorted(set(files_b) - set(files_a)),
                "removed": sorted(set(files_a) - set(files_b)),
                "changed": sorted(p for p in files_a if p in files_b and files_a[p] != files_b[p]),
                "unchanged": sum(1 for p in files_a if files_b.get(p) == files_a[p]),
            },
        }

    # aliases

    def _alias_key(self, alias: str) -> str:
        return self._key("aliases", f"{alias}.json")

    @staticmethod
    def _check_alias(alias: str) -> str:
        check_name(alias, "alias name")
        if is_valid_version(alias):
            raise ValueError(
                f"alias name {alias!r} looks like a version name; pick another (e.g. 'production')"
            )
        return alias

    def _read_alias(self, alias: str) -> tuple[dict[str, Any], str] | None:
        try:
            data, etag = self.store.get_bytes(self._alias_key(alias))
        except ObjectNotFound:
            return None
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"alias object for {alias!r} is not valid JSON (line {exc.lineno}: {exc.msg})"
            ) from None
        return doc, etag

    def _records(self, alias: str, doc: dict[str, Any]) -> list[AliasRecord]:
        return [
            AliasRecord(
                alias=alias,
                version=str(h["version"]),
                previous=h.get("previous"),
                time=str(h.get("time", "")),
                reason=str(h.get("reason", "")),
                actor=str(h.get("actor", "")),
                sequence=int(h.get("sequence", i + 1)),
            )
            for i, h in enumerate(doc.get("history", []))
        ]

    def get_alias(self, alias: str) -> AliasRecord | None:
        """The alias's current target (its latest move), or None when it was never set."""
        self._check_alias(alias)
        current = self._read_alias(alias)
        if current is None:
            return None
        records = self._records(alias, current[0])
        return records[-1] if records else None

    def alias_history(self, alias: str) -> list[AliasRecord]:
        """Every move of the alias, oldest first (the last one is the current target)."""
        self._check_alias(alias)
        current = self._read_alias(alias)
        return self._records(alias, current[0]) if current else []

    def list_aliases(self) -> list[AliasRecord]:
        """The current target of every alias, sorted by alias name."""
        out: list[AliasRecord] = []
        for info in self.store.list(self._key("aliases") + "/"):
            name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            if is_valid_name(name) and not is_valid_version(name):
                record = self.get_alias(name)
                if record is not None:
                    out.append(record)
        return sorted(out, key=lambda r: r.alias)

    def set_alias(
        self,
        alias: str,
        version: str,
        *,
        expected: str | None | _AnyTarget = ANY,
        reason: str = "",
        actor: str = "",
    ) -> AliasRecord:
        """Point ``alias`` at the published ``version`` by compare-and-swap, recording the move.

        ``expected``: the version the caller believes the alias points to now (None: "not set");
        the default ANY moves it whatever it points to. Concurrent moves never get lost: each
        write is conditional on the ETag just read and is retried on a lost race. Setting the
        target it already has is a no-op that returns the current record. Raises AliasConflict
        (with ``.current``) when the alias does not point to ``expected``; VersionNotFound when
        ``version`` is not a visible version; ValueError for bad names.
        """
        self._check_alias(alias)
        if not is_valid_version(version):
            raise ValueError(f"{version!r} is not a version name (v1, v2, ...)")
        self._load(version)  # only visible versions can be aliased
        for _ in range(_MAX_ALIAS_ATTEMPTS):
            current = self._read_alias(alias)
            doc, etag = current if current else ({}, None)
            records = self._records(alias, doc)
            now = records[-1] if records else None
            now_version = now.version if now else None
            if not isinstance(expected, _AnyTarget) and expected != now_version:
                raise AliasConflict(
                    f"alias {alias!r} of {self.model_name!r} points to {now_version or 'nothing'}, "
                    f"not {expected or 'nothing'} as expected; re-read it and retry",
                    current=now,
                )
            if now is not None and now_version == version:
                return now
            record = AliasRecord(
                alias=alias,
                version=version,
                previous=now_version,
                time=_now(),
                reason=reason,
                actor=actor,
                sequence=(now.sequence + 1) if now else 1,
            )
            new_doc = {
                "schemaVersion": ALIAS_SCHEMA_VERSION,
                "model": self.model_name,
                "alias": alias,
                "version": version,
                "history": [r.to_json() for r in records] + [record.to_json()],
            }
            try:
                if etag is None:
                    self.store.put_bytes(self._alias_key(alias), _dump(new_doc), if_none_match=True)
                else:
                    self.store.put_bytes(self._alias_key(alias), _dump(new_doc), if_match=etag)
            except PreconditionFailed:
                continue  # somebody moved it meanwhile: re-read, re-check ``expected``
            return record
        raise AliasConflict(
            f"alias {alias!r} kept changing under us; gave up after {_MAX_ALIAS_ATTEMPTS} attempts"
        )

    def promote(
        self,
        alias: str,
        version: str,
        gates_passed: bool,
        when: Literal["gatesPassed", "always"],
        *,
        actor: str = "kubetune",
    ) -> AliasRecord | None:
        """Apply a promote rule: move ``alias`` to ``version`` when ``when`` allows, else return None.

        ``gatesPassed`` moves only when ``gates_passed`` is True; ``always`` moves regardless.
        Raises ValueError for another ``when``.
        """
        if when not in ("gatesPassed", "always"):
            raise ValueError(f"promote rule when={when!r} is not gatesPassed or always")
        if when == "gatesPassed" and not gates_passed:
            return None
        outcome = "passed" if gates_passed else "failed"
        return self.set_alias(
            alias, version, reason=f"promote rule when={when}; gates {outcome}", actor=actor
        )

    def rollback(self, alias: str, *, reason: str = "rollback", actor: str = "") -> AliasRecord:
        """Move ``alias`` back to the version it pointed to before its latest move (a new history entry).

        Raises VersionNotFound when the alias is unset or has no earlier target; AliasConflict when
        it moved concurrently.
        """
        now = self.get_alias(alias)
        if now is None or now.previous is None:
            raise VersionNotFound(
                f"alias {alias!r} of {self.model_name!r} has no earlier version to roll back to"
            )
        return self.set_alias(alias, now.previous, expected=now.version, reason=reason, actor=actor)

    def iter_claims(self) -> Iterator[str]:
        """Every claimed version name, published or not (for housekeeping tools)."""
        for info in self.store.list(self._key("claims") + "/"):
            match = _CLAIM_RE.match(relative_key(info.key, self._root))
            if match:
                yield match.group(1)


__all__ = [
    "ANY",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "AliasConflict",
    "AliasRecord",
    "AlteredFile",
    "IntegrityError",
    "MissingContent",
    "ModelRegistry",
    "PublishedVersion",
    "RegistryError",
    "VerifyReport",
    "VersionNotFound",
]
