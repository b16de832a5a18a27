"""Fetch base models and data to local disk, and refuse model folders that would run code.

Sources (:func:`fetch`):

* ``s3://bucket/key`` — one object, or every object under ``s3://bucket/prefix/`` (a "folder"),
  downloaded in parallel through the transfer manager; every key must stay inside ``dest_dir``.
  With ``StoreSettings.local_root`` the bucket is a local directory (embedded mode).
* ``file:///abs/path`` — a file or a folder, hard-linked where the filesystem allows (instant, no
  extra disk) and copied otherwise. The source is never modified, but a hard link shares the
  source's bytes: callers treat fetched files as read-only (the trainer only reads base models).
* ``hf://org/name@revision`` — ``huggingface_hub.snapshot_download`` when a hub is reachable;
  otherwise :class:`FetchError` telling the user to mirror the model to s3:// or file://.
* ``modelversion://<model>/<vN|alias>`` — a version published by kubetune, resolved through
  :class:`~kubetune_registry.versions.ModelRegistry` under ``registry_output_uri``. By default its
  ``merged/`` folder (the adapter merged into its base: a complete model) is downloaded and checked
  against the manifest's sha256s; pass ``subdir_for_modelversion="adapter"`` for the adapter alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from kubetune_registry.storage import (
    InvalidURI,
    StoreSettings,
    UnsafeKeyError,
    file_uri_path,
    open_uri,
    safe_join,
    validate_key,
)
from kubetune_registry.versions import MissingContent, ModelRegistry, VersionNotFound

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HF_CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json")


class FetchError(Exception):
    """A source cannot be fetched; the message names the URI and what the user can do."""


class UnsafeModelError(Exception):
    """A model folder holds pickle weights or remote code that the spec did not allow; names the file."""


def fetch(
    uri: str,
    dest_dir: Path,
    settings: StoreSettings,
    *,
    registry_output_uri: str | None = None,
    subdir_for_modelversion: str = "merged",
) -> Path:
    """Fetch ``uri`` into ``dest_dir`` and return the local path.

    A folder source lands as ``dest_dir`` itself (returned); a single-file source lands as
    ``dest_dir/<file name>`` (that file is returned). Raises FetchError (unreachable hub, nothing at
    the URI, unknown scheme, unresolvable modelversion), UnsafeKeyError (a key that would land
    outside ``dest_dir``), IntegrityError (a modelversion file that does not match its manifest) and
    StorageError (object-store failures).
    """
    dest_dir = Path(dest_dir)
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return _fetch_file(uri, dest_dir)
    if scheme == "s3":
        return _fetch_s3(uri, dest_dir, settings)
    if scheme == "hf":
        return _fetch_hf(uri, dest_dir)
    if scheme == "modelversion":
        return _fetch_modelversion(uri, dest_dir, settings, registry_output_uri, subdir_for_modelversion)
    raise FetchError(
        f"{uri}: unsupported source; use s3://, file:///, hf://org/name@rev or modelversion://name/vN"
    )


def _fetch_s3(uri: str, dest_dir: Path, settings: StoreSettings) -> Path:
    try:
        store, key = open_uri(uri, settings)
    except (InvalidURI, UnsafeKeyError) as exc:
        raise FetchError(str(exc)) from None
    if key and not uri.endswith("/") and store.exists(key):
        name = key.rsplit("/", 1)[-1]
        target = safe_join(dest_dir, name)
        store.download_file(key, target)
        return target
    paths = store.download_dir(key, dest_dir)
    if not paths:
        raise FetchError(f"{uri}: no object and no objects under it (check the bucket, prefix and endpoint)")
    return dest_dir


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not permitted: copy instead
        shutil.copyfile(src, dst)


def _fetch_file(uri: str, dest_dir: Path) -> Path:
    try:
        source = file_uri_path(uri)
    except (InvalidURI, UnsafeKeyError) as exc:
        raise FetchError(str(exc)) from None
    if source.is_file():
        target = dest_dir / source.name
        _link_or_copy(source.resolve(), target)
        return target
    if not source.is_dir():
        raise FetchError(f"{uri}: {source} does not exist")
    dest_dir.mkdir(parents=True, exist_ok=True)
    for dirpath, _dirnames, filenames in os.walk(source, followlinks=True):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            rel = path.relative_to(source).as_posix()
            # Symlinks are followed (an HF cache snapshot), but a name must still be a safe key.
            _link_or_copy(path.resolve(), safe_join(dest_dir, rel))
    return dest_dir


def _parse_hf(uri: str) -> tuple[str, str | None]:
    rest = uri[len("hf://") :]
    repo, _, revision = rest.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise FetchError(f"{uri}: expected hf://org/name@revision")
    for part in parts:
        validate_key(part, what=f"{uri}: repository name")
    return repo, (revision or None)


def _fetch_hf(uri: str, dest_dir: Path) -> Path:
    repo_id, revision = _parse_hf(uri)
    unreachable = (
        f"{uri}: the Hugging Face Hub is not reachable from here; mirror the model to s3:// or file:// "
        "and point model.base.uri at it"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise FetchError(unreachable + " (HF_HUB_OFFLINE is set)")
    try:  # hf:// only; an image without huggingface_hub gets a FetchError that says so
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise FetchError(f"{uri}: huggingface_hub is not installed in this image") from None
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(dest_dir))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise FetchError(
            f"{uri}: {type(exc).__name__}: the repository or revision is not available"
        ) from None
    except LocalEntryNotFoundError:
        raise FetchError(unreachable) from None
    except OSError as exc:  # connection refused, DNS failure, timeouts (httpx/requests errors are OSErrors)
        raise FetchError(f"{unreachable} ({type(exc).__name__})") from None
    except Exception as exc:
        # huggingface_hub wraps transport errors in its own types across versions; any of them here
        # means "could not get the snapshot", which the user fixes the same way.
        raise FetchError(f"{unreachable} ({type(exc).__name__})") from None
    return Path(path)


def _fetch_modelversion(
    uri: str, dest_dir: Path, settings: StoreSettings, registry_output_uri: str | None, subdir: str
) -> Path:
    parts = urlsplit(uri)
    model, ref = parts.netloc, parts.path.strip("/")
    if not model or not ref or "/" in ref:
        raise FetchError(f"{uri}: expected modelversion://<model>/<vN or alias>")
    if not registry_output_uri:
        raise FetchError(f"{uri}: no registry to resolve it in (output.uri is not set)")
    try:
        registry = ModelRegistry(registry_output_uri, model, settings)
        return registry.download(ref, dest_dir, subdir=subdir)
    except VersionNotFound as exc:
        raise FetchError(f"{uri}: {exc}") from None
    except ValueError as exc:  # bad model/ref names
        raise FetchError(f"{uri}: {exc}") from None
    except MissingContent as exc:
        raise FetchError(
            f"{uri}: {exc}. Publish the parent with output.merge enabled so it can serve as a base model"
        ) from None


def check_weights_safety(model_dir: Path, *, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Refuse a model folder that would run code when loaded, unless the spec allowed it.

    Raises UnsafeModelError naming the file for: a pickle weight file (``*.bin``, ``*.pt``,
    ``*.pth``, ``*.pkl``, ``*.pickle``, ``*.ckpt``) when ``allow_pickle`` is False; a folder with no
    ``*.safetensors`` file when ``allow_pickle`` is False; an ``auto_map`` in a config file
    (``config.json``, ``tokenizer_config.json``, ...) or any ``*.py`` file when
    ``trust_remote_code`` is False. FetchError when ``model_dir`` is not a folder.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FetchError(f"{model_dir} is not a model folder")
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not trust_remote_code:
        for path in files:
            rel = path.relative_to(model_dir)
            if path.suffix == ".py":
                raise UnsafeModelError(
                    f"{rel}: the model ships Python code; set model.base.trustRemoteCode: true only if you trust "
                    "its source"
                )
            if path.name in _HF_CONFIG_FILES:
                try:
                    config = json.loads(path.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise UnsafeModelError(f"{rel}: not valid JSON ({exc})") from None
                if isinstance(config, dict) and config.get("auto_map"):
                    raise UnsafeModelError(
                        f"{rel}: auto_map needs code from the model repository; set model.base.trustRemoteCode: "
                        "true only if you trust its source"
                    )
    if not allow_pickle:
        for path in files:
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise UnsafeModelError(
                    f"{path.relative_to(model_dir)}: pickle files can run code when loaded; convert the model to "
                    "safetensors or set model.base.allowPickle: true"
                )
        if not any(p.suffix == ".safetensors" for p in files):
            raise UnsafeModelError(
                f"{model_dir}: no *.safetensors weights found; only safetensors load unless model.base.allowPickle "
                "is true"
            )
