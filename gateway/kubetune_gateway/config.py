"""The gateway's settings: one YAML file the platform admin writes (a ConfigMap in the chart).

It names where uploaded files go, the base models tenants may pick (by name), the FineTuneJob
template every job starts from, the defaults behind ``"auto"`` hyperparameters, and the file of
tenants (bearer-token digest -> namespace and quota), which the chart mounts from a Secret: the
gateway reads it from disk and never reads a Secret through the Kubernetes API.

:func:`load_settings` raises :class:`ConfigError` naming the file and the field for anything wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kubetune_api.names import NAME_PATTERN

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """The settings or the tenants file cannot be used (the message names the file and field)."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Tenant(_Model):
    """One application team: its token's sha256, its namespace and its quota."""

    name: str = Field(description="Who this is, for logs (never the token).")
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    token_sha256: str = Field(
        description="Hex sha256 of the bearer token (the token itself is never stored)."
    )
    max_concurrent_jobs: int = Field(default=2, ge=0, description="Jobs not yet finished at once; 0 = none.")

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256_RE.fullmatch(value):
            raise ValueError("must be 64 lower-case hex digits (sha256 of the token)")
        return value


class TenantsFile(_Model):
    tenants: list[Tenant] = Field(default_factory=list)


class StoreConfig(_Model):
    """Where uploaded files live: ``<uri>/<namespace>/files/<file id>/...`` (one prefix per tenant)."""

    uri: str = Field(description="s3://bucket/prefix (or file:///path for a single machine).")
    endpoint: str | None = None
    region: str | None = None
    addressing_style: str = "auto"


class GatewaySettings(_Model):
    """The whole settings file."""

    files: StoreConfig
    # name a tenant passes as `model` -> the base model URI the FineTuneJob trains from
    base_models: dict[str, str] = Field(min_length=1)
    # A FineTuneJob spec (camelCase, as in YAML) without model, data.train, data.eval, output.uri:
    # every job starts from it.
    template: dict[str, Any] = Field(default_factory=dict)
    # Versions go to <outputUri>/<namespace>/<model name>/versions/vN.
    output_uri: str
    tenants_file: Path
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1)

    @field_validator("base_models")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [n for n in value if not re.fullmatch(NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"base model names must match {NAME_PATTERN}: {bad}")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = ["model"] if "model" in value else []
        owned += [f"data.{k}" for k in ("train", "eval") if k in (value.get("data") or {})]
        owned += ["output.uri"] if "uri" in (value.get("output") or {}) else []
        if owned:
            raise ValueError(f"the template may not set {owned}: the gateway fills them per job")
        return value


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML: {e}") from None


def _errors(path: Path, exc: ValidationError) -> ConfigError:
    lines = [f"{path}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    return ConfigError("\n".join(lines))


def load_settings(path: Path) -> GatewaySettings:
    try:
        return GatewaySettings.model_validate(_load_yaml(path) or {})
    except ValidationError as e:
        raise _errors(path, e) from None


def load_tenants(path: Path) -> list[Tenant]:
    try:
        tenants = TenantsFile.model_validate(_load_yaml(path) or {}).tenants
    except ValidationError as e:
        raise _errors(path, e) from None
    digests = [t.token_sha256 for t in tenants]
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{path}: two tenants share a token")
    return tenants


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TenantDirectory:
    """Bearer token -> tenant, re-reading the tenants file when it changes (a Secret update)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._tenants: list[Tenant] = []
        try:
            self._refresh()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the tenants file: {e.strerror}") from None

    def _refresh(self) -> None:
        mtime = self.path.stat().st_mtime
        if mtime != self._mtime:
            self._tenants = load_tenants(self.path)
            self._mtime = mtime

    def resolve(self, token: str) -> Tenant | None:
        """The tenant whose token digest matches (constant-time compare), or None."""
        # A broken update keeps the last good file in service; the error shows at the next start.
        with contextlib.suppress(OSError, ConfigError):
            self._refresh()
        digest = token_digest(token)
        found = None
        for tenant in self._tenants:
            if hmac.compare_digest(tenant.token_sha256, digest):
                found = tenant
        return found
