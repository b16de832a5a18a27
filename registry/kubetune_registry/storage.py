"""One object-store interface over ``s3://`` and ``file://``.

Two implementations of :class:`ObjectStore`:

* :class:`S3Store` talks to any S3-compatible endpoint through boto3: retries with backoff
  (botocore's ``standard`` or ``adaptive`` retry mode), the transfer manager with parallel
  multipart transfers for large objects, and conditional writes (``If-None-Match: *`` /
  ``If-Match: <etag>``) through ``put_object`` — the transfer manager refuses ``IfNoneMatch``
  and ``copy_object`` ignores it in moto (shared/FACTS.md), so write-once objects are always
  small ``put_object`` calls.
* :class:`LocalStore` keeps objects as files under a root directory: the embedded single-machine
  mode, so the same YAML with ``s3://`` URIs runs on a laptop (``StoreSettings.local_root``).
  Writes go to a temporary file that is renamed into place, so readers never see half a file;
  ``If-None-Match`` is an ``os.link`` (atomic, fails when the name exists) and ``If-Match`` holds
  an ``flock`` on the parent directory while it compares and replaces.

Credentials are never handled here: boto3 reads them from its default chain (the environment,
which in the cluster is filled from a Secret). Nothing in this module logs a credential or stores
one in an object.

Every local path built from an object key goes through :func:`safe_join`, which refuses keys that
could land outside the destination (``..``, a leading ``/``, backslashes, empty segments, control
characters, unicode look-alikes of ``/`` and ``..``).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import os
import shutil
import tempfile
import threading
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable
from urllib.parse import unquote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig

MiB = 1024 * 1024

# Characters that look like a path separator or a dot leader but are not caught by NFKC
# normalisation (NFKC already maps fullwidth '／', '＼', '．' and '‥' to ASCII). Refusing them keeps
# a key from *looking* like a different path to the person reading a listing.
_LOOKALIKE_SEPARATORS = frozenset("∕⁄⧸╱⟋⧵﹨⟍╲")
_TMP_MARKER = ".kubetune-tmp-"
_S3_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


# --- errors -----------------------------------------------------------------------------------


class StorageError(Exception):
    """An object-store operation failed (the message names the store and key, never a credential)."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "object not found"


class PreconditionFailed(StorageError):
    """A conditional write lost: If-None-Match found an object, or If-Match found a different ETag."""


class UnsafeKeyError(ValueError):
    """An object key (or URI path) that could escape its prefix or destination directory."""


class InvalidURI(ValueError):
    """A storage URI that is not ``s3://bucket[/prefix]`` or ``file:///absolute/path``."""


# --- bytes read ---------------------------------------------------------------------------------


class _ReadCounter:
    """Object bytes this process has read through any store, across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    @property
    def total(self) -> int:
        with self._lock:
            return self._bytes


_READ = _ReadCounter()


def bytes_read() -> int:
    """How many object bytes this process has read from any store so far: downloads, small GETs
    and streamed reads (``download_file``, ``download_dir``, ``get_bytes``, ``open_read``), of
    ``s3://`` and local stores alike. LISTs and HEADs read no object bytes and are not counted;
    ``file://`` sources the trainer hard-links are not read through a store either. Take the
    difference of two calls to measure one operation."""
    return _READ.total


class _CountingReader:
    """A read-only stream that adds what is read from it to the process's byte count."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._inner.read(size)
        _READ.add(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- settings and value types -----------------------------------------------------------------


@dataclass(frozen=True)
class StoreSettings:
    """How to reach object storage. Holds no credentials: those come from the environment only.

    ``local_root``: when set, ``s3://bucket/key`` maps to ``<local_root>/bucket/key`` (the embedded
    single-machine mode). ``max_concurrency`` bounds both the files transferred at once and the
    parts of one multipart transfer; objects of ``multipart_threshold_mb`` or more go multipart.
    ``max_attempts`` is the total number of tries of one request, the first one included.
    """

    endpoint: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    local_root: str | None = None
    max_concurrency: int = 8
    multipart_threshold_mb: int = 16
    retry_mode: Literal["standard", "adaptive"] = "standard"
    max_attempts: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``etag`` is opaque: compare it only with other ETags of the same store."""

    key: str
    size: int
    etag: str


@runtime_checkable
class ObjectStore(Protocol):
    """What the trainer and the registry need from an object store.

    Keys are ``/``-separated and validated with :func:`validate_key` before any write. ``list``
    treats ``prefix`` as a plain string prefix, as S3 does (pass ``"a/b/"`` to list a folder).
    """

    @property
    def description(self) -> str:
        """Where this store points, for messages (``s3://bucket`` or a directory)."""
        ...

    def uri_for(self, key: str) -> str:
        """The URI a user would type for ``key``."""
        ...

    def exists(self, key: str) -> bool:
        """True when an object with exactly this key exists."""
        ...

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """A small object's content and ETag. Raises ObjectNotFound."""
        ...

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write a small object and return its ETag. Raises PreconditionFailed on a conditional conflict."""
        ...

    def open_read(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A streaming reader for ``key`` (use as a context manager). Raises ObjectNotFound."""
        ...

    def upload_file(self, path: Path, key: str) -> None:
        """Upload a local file (streamed; multipart and parallel when large)."""
        ...

    def download_file(self, key: str, path: Path) -> None:
        """Download to ``path`` (created with its parents; replaced atomically). Raises ObjectNotFound."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` and return how many were deleted."""
        ...

    def upload_dir(self, src_dir: Path, prefix: str, *, exclude: Iterable[str] = ()) -> builtins.list[str]:
        """Upload every file under ``src_dir`` to ``prefix/<relative path>`` in parallel; returns the keys."""
        ...

    def download_dir(self, prefix: str, dest_dir: Path) -> builtins.list[Path]:
        """Download every object under ``prefix/`` into ``dest_dir``; returns the local paths."""
        ...


# --- keys and paths ---------------------------------------------------------------------------


def validate_key(key: str, *, what: str = "object key") -> str:
    """Return ``key`` unchanged when it is a safe relative ``/``-separated key; else raise UnsafeKeyError.

    Refused: the empty key; a leading ``/``; backslashes; empty segments (``a//b``, a trailing
    ``/``); ``.`` and ``..`` segments; control and format characters (including NUL); keys that
    change under NFKC normalisation (fullwidth ``／``, the one-dot/two-dot leaders ``․``/``‥``, ...)
    and other look-alikes of ``/``.
    """
    if not key:
        raise UnsafeKeyError(f"{what} is empty")
    if key.startswith("/"):
        raise UnsafeKeyError(f"{what} {key!r} starts with '/'")
    if "\\" in key:
        raise UnsafeKeyError(f"{what} {key!r} contains a backslash")
    for ch in key:
        if unicodedata.category(ch).startswith("C"):
            raise UnsafeKeyError(f"{what} {key!r} contains the control character U+{ord(ch):04X}")
        if ch in _LOOKALIKE_SEPARATORS:
            raise UnsafeKeyError(f"{what} {key!r} contains {ch!r} (U+{ord(ch):04X}), a look-alike of '/'")
    if unicodedata.normalize("NFKC", key) != key:
        raise UnsafeKeyError(
            f"{what} {key!r} contains unicode look-alike characters (it reads as "
            f"{unicodedata.normalize('NFKC', key)!r}); rename it with plain characters"
        )
    for segment in key.split("/"):
        if segment == "":
            raise UnsafeKeyError(f"{what} {key!r} has an empty path segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise UnsafeKeyError(f"{what} {key!r} has a {segment!r} segment")
    return key


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, skipping empty parts (an empty prefix means the store's root)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def safe_join(root: Path, key: str) -> Path:
    """The local path for ``key`` under ``root``; raise UnsafeKeyError if it could land elsewhere.

    The key is validated with :func:`validate_key`, and the resolved result (following any
    symlinks already on disk) must still be inside the resolved ``root``.
    """
    validate_key(key)
    base = Path(os.path.abspath(root)).resolve()
    candidate = (base / key).resolve()
    if candidate != base and not candidate.is_relative_to(base):
        raise UnsafeKeyError(f"object key {key!r} resolves outside {base}")
    return candidate


def relative_key(key: str, prefix: str) -> str:
    """``key`` relative to the folder ``prefix`` (``""`` means the root)."""
    if not prefix:
        return key
    folder = prefix.rstrip("/") + "/"
    if not key.startswith(folder):
        raise ValueError(f"object key {key!r} is not under {folder!r}")
    return key[len(folder) :]


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(Path(rel).name, p) for p in patterns)


def walk_files(src_dir: Path) -> list[tuple[Path, str]]:
    """``(path, relative posix key)`` of every regular file under ``src_dir``, sorted by key.

    Symlinks are followed, as a Hugging Face cache snapshot needs.
    """
    out: list[tuple[Path, str]] = []
    for dirpath, _dirnames, filenames in os.walk(src_dir, followlinks=True):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            out.append((path, path.relative_to(src_dir).as_posix()))
    out.sort(key=lambda item: item[1])
    return out


class _DirTransfers:
    """upload_dir / download_dir for any store that has upload_file, download_file and list."""

    _max_concurrency: int

    def upload_file(self, path: Path, key: str) -> None:
        raise NotImplementedError

    def download_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def upload_dir(self, src_dir: Path, prefix: str, *, exclude: Iterable[str] = ()) -> builtins.list[str]:
        """Upload every regular file under ``src_dir`` to ``prefix/<relative path>``, in parallel.

        ``exclude`` holds glob patterns matched against the relative path and the file name.
        Every key is validated before the first byte is sent. Raises the first transfer error.
        """
        src_dir = Path(src_dir)
        if not src_dir.is_dir():
            raise StorageError(f"{src_dir} is not a directory")
        patterns = tuple(exclude)
        jobs: builtins.list[tuple[Path, str]] = []
        for path, rel in walk_files(src_dir):
            if _excluded(rel, patterns):
                continue
            jobs.append((path, validate_key(join_key(prefix, validate_key(rel)))))
        self._run_parallel(lambda job: self.upload_file(job[0], job[1]), jobs)
        return [key for _path, key in jobs]

    def download_dir(self, prefix: str, dest_dir: Path) -> builtins.list[Path]:
        """Download every object under the folder ``prefix`` into ``dest_dir``, in parallel.

        All keys are checked with :func:`safe_join` before anything is written, so one hostile key
        refuses the whole download (UnsafeKeyError) and nothing lands anywhere.
        """
        dest_dir = Path(dest_dir)
        folder = prefix.rstrip("/") + "/" if prefix else ""
        jobs: builtins.list[tuple[str, Path]] = []
        for info in self.list(folder):
            rel = relative_key(info.key, prefix)
            jobs.append((info.key, safe_join(dest_dir, rel)))
        self._run_parallel(lambda job: self.download_file(job[0], job[1]), jobs)
        return [path for _key, path in jobs]

    def _run_parallel(self, fn: Any, jobs: builtins.list[Any]) -> None:
        if not jobs:
            return
        workers = max(1, min(self._max_concurrency, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-transfer") as pool:
            # list() drains the iterator so the first exception propagates here.
            list(pool.map(fn, jobs))


# --- local directory store --------------------------------------------------------------------


def _stat_etag(st: os.stat_result) -> str:
    # Every write is a rename of a fresh file, so (inode, mtime, size) changes with every write.
    # Cheap: listing a folder of multi-GB weights must not hash them.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStore(_DirTransfers):
    """Objects as files under ``root`` (created on first write).

    Guarantees: a reader sees either the old or the new content of a key, never a partial file;
    ``put_bytes(if_none_match=True)`` creates the key only if absent, atomically (``os.link``);
    ``put_bytes(if_match=etag)`` compares and replaces under an exclusive ``flock`` on the key's
    directory, which serialises it with other ``if_match`` writers on the same host/filesystem.
    Temporary files (``.<name>.kubetune-tmp-*``) are never listed.
    """

    def __init__(self, root: Path | str, *, max_concurrency: int = 8) -> None:
        self.root = Path(os.path.abspath(root))
        self._max_concurrency = max_concurrency

    @property
    def description(self) -> str:
        return str(self.root)

    def uri_for(self, key: str) -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def _path(self, key: str) -> Path:
        return safe_join(self.root, key)

    def _write_tmp(self, target: Path, fill: Callable[[IO[bytes]], object]) -> Path:
        """A fully written, fsynced temporary file next to ``target`` (same filesystem: rename is atomic)."""
        for _ in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}{_TMP_MARKER}{uuid.uuid4().hex}"
            try:
                with open(tmp, "xb") as fh:
                    fill(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                return tmp
            except FileNotFoundError:
                # A concurrent delete() pruned the just-created empty folder: create it again.
                continue
        raise StorageError(f"could not create a file in {target.parent}: it keeps disappearing")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
                _READ.add(len(data))
                return data, _stat_etag(st)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if if_none_match and if_match is not None:
            raise ValueError("pass if_none_match or if_match, not both")
        target = self._path(key)
        tmp = self._write_tmp(target, lambda fh: fh.write(data))
        try:
            if if_none_match:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    raise PreconditionFailed(f"{self.uri_for(key)} already exists (If-None-Match)") from None
            elif if_match is not None:
                with self._dir_lock(target.parent):
                    try:
                        current = _stat_etag(target.stat())
                    except FileNotFoundError:
                        raise PreconditionFailed(f"{self.uri_for(key)} does not exist (If-Match)") from None
                    if current != if_match:
                        raise PreconditionFailed(f"{self.uri_for(key)} changed since it was read (If-Match)")
                    os.replace(tmp, target)
            else:
                os.replace(tmp, target)
            return _stat_etag(target.stat())
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def _dir_lock(self, directory: Path) -> Iterator[None]:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        path = self._path(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with below; open errors are mapped first
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None
        with fh:
            yield cast(IO[bytes], _CountingReader(fh))

    def upload_file(self, path: Path, key: str) -> None:
        target = self._path(key)
        if not Path(path).is_file():
            raise StorageError(f"{path} is not a file")

        def copy(out: IO[bytes]) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, length=4 * MiB)

        tmp = self._write_tmp(target, copy)
        try:
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARKER}", dir=path.parent)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp_name)
            _READ.add(os.stat(tmp_name).st_size)
            os.replace(tmp_name, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the deepest directory the prefix names; filter the rest by string prefix.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / head if head else self.root
        if not start.is_dir():
            return
        found: builtins.list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in filenames:
                if _TMP_MARKER in name:
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted while we listed
                    continue
                found.append(ObjectInfo(key=key, size=st.st_size, etag=_stat_etag(st)))
        found.sort(key=lambda info: info.key)
        yield from found

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # Object stores have no folders: drop the directories that emptied, up to the root.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise
            parent = parent.parent

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)


# --- S3 ---------------------------------------------------------------------------------------


def _error_code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Store(_DirTransfers):
    """Objects in one S3 bucket, through boto3.

    Retries: botocore's ``settings.retry_mode`` with ``settings.max_attempts`` (exponential backoff
    with jitter on throttling, 5xx and connection errors). Large transfers: boto3's transfer manager
    with ``settings.max_concurrency`` parallel parts above ``settings.multipart_threshold_mb``.
    Conditional writes: ``put_object`` with ``IfNoneMatch='*'`` / ``IfMatch``; 412 and AWS's 409
    ``ConditionalRequestConflict`` both raise :class:`PreconditionFailed`.
    """

    def __init__(self, bucket: str, settings: StoreSettings, *, client: Any | None = None) -> None:
        self.bucket = bucket
        self.settings = settings
        self._max_concurrency = settings.max_concurrency
        self._client = client if client is not None else make_s3_client(settings)
        self._transfer_config: TransferConfig | None = None

    @property
    def description(self) -> str:
        return f"s3://{self.bucket}"

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    @property
    def transfer_config(self) -> TransferConfig:
        if self._transfer_config is None:
            from boto3.s3.transfer import TransferConfig  # boto3 is deferred: see make_s3_client

            threshold = max(5, self.settings.multipart_threshold_mb) * MiB  # S3's minimum part is 5 MiB
            self._transfer_config = TransferConfig(
                multipart_threshold=threshold,
                multipart_chunksize=threshold,
                max_concurrency=self.settings.max_concurrency,
                use_threads=self.settings.max_concurrency > 1,
            )
        return self._transfer_config

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"{self.uri_for(key)} does not exist")

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        code, status = _error_code(exc)
        if code or status:
            detail = f"{code or type(exc).__name__} (HTTP {status})"
        else:
            # botocore's own errors (no endpoint, no credentials, timeouts) say what went wrong and
            # name the endpoint, never a credential.
            detail = f"{type(exc).__name__}: {exc}"
        return StorageError(f"{action} {self.uri_for(key)} failed: {detail}")

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except (ClientError, BotoCoreError) as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("checking", key, exc) from None

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            with contextlib.closing(response["Body"]) as body:
                data = body.read()
                _READ.add(len(data))
                return data, str(response["ETag"])
        except (ClientError, BotoCoreError) as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("NoSuchKey", "404"):
                raise self._not_found(key) from None
            raise self._fail("reading", key, exc) from None

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        if if_none_match and if_match is not None:
            raise ValueError("pass if_none_match or if_match, not both")
        validate_key(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            response = self._client.put_object(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            code, status = _error_code(exc)
            conditional = if_none_match or if_match is not None
            if conditional and (
                status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
            ):
                which = "If-None-Match" if if_none_match else "If-Match"
                raise PreconditionFailed(f"conditional write of {self.uri_for(key)} lost ({which})") from None
            if if_match is not None and (status == 404 or code == "NoSuchKey"):
                raise PreconditionFailed(f"{self.uri_for(key)} does not exist (If-Match)") from None
            raise self._fail("writing", key, exc) from None
        return str(response["ETag"])

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("NoSuchKey", "404"):
                raise self._not_found(key) from None
            raise self._fail("reading", key, exc) from None
        with contextlib.closing(response["Body"]) as body:
            yield cast(IO[bytes], _CountingReader(body))

    def upload_file(self, path: Path, key: str) -> None:
        from boto3.exceptions import S3UploadFailedError  # boto3 is deferred: see make_s3_client

        validate_key(key)
        try:
            self._client.upload_file(str(path), self.bucket, key, Config=self.transfer_config)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._fail(f"uploading {path} to", key, exc) from None

    def download_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # s3transfer writes to a temporary name and renames it into place when complete.
            self._client.download_file(self.bucket, key, str(path), Config=self.transfer_config)
        except (ClientError, BotoCoreError) as exc:
            code, status = _error_code(exc)
            if status == 404 or code in ("NoSuchKey", "404"):
                raise self._not_found(key) from None
            raise self._fail("downloading", key, exc) from None
        _READ.add(path.stat().st_size)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=str(item.get("ETag", "")))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("listing", prefix, exc) from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("deleting", key, exc) from None

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._fail("deleting under", prefix, exc) from None
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(
                    f"deleting {self.uri_for(first.get('Key', prefix))} failed: {first.get('Code')}"
                )
        return len(keys)


def make_s3_client(settings: StoreSettings) -> Any:
    """A boto3 S3 client for ``settings``; credentials from boto3's default chain (environment)."""
    # boto3 is imported only when an S3 store is opened: it is ~0.2 s of a ~0.3 s `kubetune` start
    # (python -X importtime), and local-directory stores (`kubetune run`, the quickstart) never need it.
    import boto3
    from botocore.config import Config

    config = Config(
        # total_max_attempts counts the first try too; botocore's "max_attempts" would mean retries
        # and make one more request than StoreSettings.max_attempts says.
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        s3={"addressing_style": settings.addressing_style},
        # Files go up in parallel and each large one in parallel parts: room for both.
        max_pool_connections=max(10, settings.max_concurrency * 4),
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # Only send/validate checksums where S3 requires them: many S3-compatible stores reject
        # the newer default CRC headers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A fresh session per client: boto3's default session is not thread-safe to create clients from.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.endpoint, region_name=settings.region, config=config)


# --- URIs -------------------------------------------------------------------------------------


def _check_bucket(bucket: str, uri: str) -> str:
    if (
        not (3 <= len(bucket) <= 63)
        or not set(bucket) <= _S3_BUCKET_CHARS
        or bucket[0] in ".-"
        or bucket[-1] in ".-"
    ):
        raise InvalidURI(f"{uri}: {bucket!r} is not a valid S3 bucket name")
    if ".." in bucket:
        raise InvalidURI(f"{uri}: {bucket!r} is not a valid S3 bucket name")
    return bucket


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the prefix is validated (may be empty)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidURI(f"{uri!r} is not an s3://bucket[/prefix] URI")
    if parts.query or parts.fragment:
        raise InvalidURI(f"{uri!r}: '?' and '#' are not allowed in object-store URIs")
    bucket = _check_bucket(parts.netloc, uri)
    prefix = parts.path.strip("/")
    if prefix:
        validate_key(prefix, what=f"{uri}: prefix")
    return bucket, prefix


def file_uri_path(uri: str) -> Path:
    """``file:///abs/path`` -> ``Path("/abs/path")``; refuses hosts, relative paths and ``..``."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise InvalidURI(f"{uri!r} is not a file:// URI")
    if parts.netloc not in ("", "localhost"):
        raise InvalidURI(f"{uri!r}: file:// URIs must be absolute (file:///abs/path), not name a host")
    if parts.query or parts.fragment:
        raise InvalidURI(f"{uri!r}: '?' and '#' are not allowed in file:// URIs")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidURI(f"{uri!r} is not an absolute path")
    rest = path.strip("/")
    if rest:
        validate_key(rest, what=f"{uri}: path")
    return Path(path)


def open_uri(uri: str, settings: StoreSettings) -> tuple[ObjectStore, str]:
    """The store for ``uri`` and the key prefix inside it (no leading or trailing ``/``).

    ``s3://bucket/prefix`` -> an S3Store (or, with ``settings.local_root``, a LocalStore rooted at
    ``<local_root>/bucket``). ``file:///abs/path`` -> a LocalStore rooted at ``/abs/path`` with an
    empty prefix. Raises InvalidURI / UnsafeKeyError for anything else.
    """
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        if settings.local_root:
            root = safe_join(Path(settings.local_root), bucket)
            return LocalStore(root, max_concurrency=settings.max_concurrency), prefix
        return S3Store(bucket, settings), prefix
    if uri.startswith("file://"):
        return LocalStore(file_uri_path(uri), max_concurrency=settings.max_concurrency), ""
    raise InvalidURI(f"{uri!r}: object storage URIs are s3://bucket/prefix or file:///absolute/path")


def sha256_stream(stream: IO[bytes], chunk_size: int = 4 * MiB) -> tuple[str, int]:
    """sha256 hex digest and byte count of a stream, read in chunks (never whole in memory)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
