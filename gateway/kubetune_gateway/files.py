"""Uploaded files in the object store, one prefix per tenant, checked with kubetune's data validation.

Layout under the admin's ``files.uri``: ``<namespace>/files/<file id>/meta.json`` (the OpenAI file
object) and ``<namespace>/files/<file id>/data.jsonl`` (the bytes as uploaded). A file is written
only after it passed validation, so a rejected upload leaves nothing behind. Checkpoint markers of
a job are read from the output store (``<output>/<namespace>/<model>/checkpoints/``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from kubetune_api.models import CleaningSpec, DataSpec, FieldMapping
from kubetune_gateway.config import ConfigError, StoreConfig
from kubetune_gateway.errors import ApiError, bad_request
from kubetune_registry.storage import ObjectNotFound, StoreSettings, join_key, open_uri

# Torch-free at import time (the trainer's data layer; tests/unit/test_layering.py checks it).
from kubetune_trainer.data import read_file

_ERRORS_SHOWN = 10
_CHUNK = 1 << 20


@dataclass
class UploadSettings:
    """The data settings an upload is validated with: the admin template's ``data`` (DataSettings)."""

    eval_split: float | None = None
    format: str = "auto"
    template: str = "auto"
    fields: FieldMapping = field(default_factory=FieldMapping)
    system_prompt: str | None = None
    cleaning: CleaningSpec = field(default_factory=CleaningSpec)
    max_invalid_records: int = 0


def upload_settings(template: Mapping[str, Any]) -> UploadSettings:
    """The template's data settings, read with the API's own model (so defaults agree with the trainer)."""
    try:
        data = DataSpec.model_validate(
            {**(template.get("data") or {}), "train": {"uri": "s3://placeholder/train.jsonl"}}
        )
    except ValidationError as e:
        raise ConfigError(f"template.data: {e}") from None
    return UploadSettings(
        format=data.format,
        template=data.template,
        fields=data.fields,
        system_prompt=data.system_prompt,
        cleaning=data.cleaning,
        max_invalid_records=data.max_invalid_records,
    )


def store_settings(cfg: StoreConfig) -> StoreSettings:
    style: Any = cfg.addressing_style
    return StoreSettings(endpoint=cfg.endpoint, region=cfg.region, addressing_style=style)


class FileStore:
    """Tenant files: validate, store, list, read, delete. Every call names the tenant's namespace."""

    def __init__(
        self, cfg: StoreConfig, data_settings: UploadSettings, *, max_bytes: int, output_uri: str
    ) -> None:
        self.settings = store_settings(cfg)
        self.store, self.prefix = open_uri(cfg.uri, self.settings)
        self.output_store, self.output_prefix = open_uri(output_uri, self.settings)
        self.data_settings = data_settings
        self.max_bytes = max_bytes

    def _key(self, namespace: str, *parts: str) -> str:
        return join_key(*(p for p in (self.prefix, namespace, "files", *parts) if p))

    def upload(self, namespace: str, file_id: str, filename: str, source: IO[bytes]) -> dict[str, Any]:
        """Validate and store one training/validation file; returns the OpenAI file object.

        Raises ApiError(400) with the ``file:line`` errors when kubetune's data validation refuses it.
        """
        if not filename.lower().endswith(".jsonl"):
            raise bad_request(f"{filename!r}: fine-tune files must be JSONL (.jsonl)", param="file")
        with tempfile.TemporaryDirectory(prefix="kubetune-gateway-") as tmp:
            path = Path(tmp) / "upload.jsonl"
            size = 0
            with path.open("wb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise bad_request(f"{filename!r} is larger than {self.max_bytes} bytes", param="file")
                    out.write(chunk)
            # The trainer's own record reader: the same forms, cleaning and file:line errors the run
            # would report (the split and de-duplication are the job's business, not the file's).
            result = read_file(path, self.data_settings, name=filename)
            limit = self.data_settings.max_invalid_records
            whole = any(e.whole_file for e in result.errors)
            if whole or result.invalid > limit or not result.records:
                errors = [str(e) for e in result.errors[:_ERRORS_SHOWN]] or [f"{filename}: no records"]
                more = len(result.errors) - _ERRORS_SHOWN
                tail = f"\n  ... and {more} more" if more > 0 else ""
                raise bad_request(
                    f"{filename} is not valid fine-tuning data ({result.invalid} invalid records, at "
                    f"most {limit} allowed):\n  " + "\n  ".join(errors) + tail,
                    param="file",
                    code="invalid_file",
                )
            info = {
                "object": "file",
                "id": file_id,
                "bytes": size,
                "created_at": int(time.time()),
                "filename": filename,
                "purpose": "fine-tune",
                "status": "processed",
                "status_details": None,
                "expires_at": None,
                "form": result.form,
                "records": len(result.records),
            }
            # Data first, meta.json last: a file is listed only once both are there.
            self.store.upload_file(path, self._key(namespace, file_id, "data.jsonl"))
            self.store.put_bytes(self._key(namespace, file_id, "meta.json"), json.dumps(info).encode())
        return info

    def get(self, namespace: str, file_id: str) -> dict[str, Any] | None:
        if "/" in file_id or not file_id.startswith("file-"):
            return None
        try:
            data, _ = self.store.get_bytes(self._key(namespace, file_id, "meta.json"))
        except ObjectNotFound:
            return None
        return dict(json.loads(data))

    def list_files(self, namespace: str) -> list[dict[str, Any]]:
        """The tenant's files, newest first."""
        found = []
        for info in self.store.list(self._key(namespace) + "/"):
            if info.key.endswith("/meta.json"):
                data, _ = self.store.get_bytes(info.key)
                found.append(json.loads(data))
        return sorted(found, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def uri(self, namespace: str, file_id: str) -> str:
        """Where the trainer reads the file from (the FineTuneJob's data URI)."""
        return self.store.uri_for(self._key(namespace, file_id, "data.jsonl"))

    def copy_content(self, namespace: str, file_id: str, out: IO[bytes]) -> None:
        with self.store.open_read(self._key(namespace, file_id, "data.jsonl")) as src:
            shutil.copyfileobj(src, out, _CHUNK)

    def delete(self, namespace: str, file_id: str) -> None:
        self.store.delete(self._key(namespace, file_id, "meta.json"))
        self.store.delete(self._key(namespace, file_id, "data.jsonl"))

    def checkpoint_markers(self, namespace: str, model: str) -> list[dict[str, Any]]:
        """The COMPLETE.json markers under the job's model (one model per job, see mapping.model_name)."""
        prefix = join_key(*(p for p in (self.output_prefix, namespace, model, "checkpoints") if p)) + "/"
        markers = []
        for info in self.output_store.list(prefix):
            if info.key.endswith("/COMPLETE.json"):
                try:
                    data, _ = self.output_store.get_bytes(info.key)
                except ObjectNotFound:
                    continue  # pruned between list and read
                markers.append(json.loads(data))
        return markers


__all__ = ["ApiError", "FileStore", "upload_settings"]
