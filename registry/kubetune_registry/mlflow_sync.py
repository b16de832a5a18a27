"""kubetune's model registry mirrored into MLflow's: versions and aliases.

kubetune's registry (the object store) stays the source of truth; MLflow's model registry gets a
copy that teams who work in MLflow can read:

* :meth:`MlflowMirror.ensure_version` — a published version becomes a version of the MLflow
  registered model (``source`` = the version's ``s3://`` URI; tags ``kubetune.version``,
  ``kubetune.manifest_sha256``, ``kubetune.uri``), once: a second call finds it by its tag.
* :meth:`MlflowMirror.set_alias` — an alias move (promotion, ``kubetune alias set``, rollback) is
  set on the registered model too, pointing at the mirrored version.

Needs ``mlflow-skinny`` (the ``[cli]`` and ``[trainer]`` extras pin it), imported when a mirror is
made: ``import mlflow`` takes ~3 s, which every other command would pay. Raises
:class:`MlflowSyncError` naming the tracking server when MLflow refuses a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_registry.versions import PublishedVersion

VERSION_TAG = "kubetune.version"


class MlflowSyncError(RuntimeError):
    """MLflow refused or could not be reached; the message names the tracking URI."""


@dataclass(frozen=True)
class MlflowTarget:
    """Where to mirror: the tracking server and the registered model's name."""

    tracking_uri: str
    registered_model: str


class MlflowMirror:
    """Mirror versions and aliases of one kubetune model into one MLflow registered model."""

    def __init__(self, target: MlflowTarget, client: Any | None = None) -> None:
        self.target = target
        if client is None:
            from mlflow.tracking import MlflowClient  # deferred: ~3 s import, see the module docstring

            client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
        self.client = client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            raise MlflowSyncError(
                f"MLflow at {self.target.tracking_uri}: {what} failed: {exc.message}"
            ) from exc

    def _registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        name = self.target.registered_model
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            # Absent (or a race with another publisher): create, and accept "already exists".
            try:
                self.client.create_registered_model(
                    name, tags={"kubetune.managed": "true"}, description="Mirrored from kubetune's registry."
                )
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise MlflowSyncError(
                        f"MLflow at {self.target.tracking_uri}: creating registered model {name} failed: {exc.message}"
                    ) from exc

    def find_version(self, version: str) -> str | None:
        """The MLflow version number mirroring kubetune version ``version`` (None: not mirrored)."""
        name = self.target.registered_model
        found = self._call(
            "searching model versions",
            self.client.search_model_versions,
            f"name='{name}' and tag.`{VERSION_TAG}`='{version}'",
        )
        numbers = sorted(int(mv.version) for mv in found)
        return str(numbers[0]) if numbers else None

    def ensure_version(
        self, pv: PublishedVersion, run_id: str | None = None, run_link: str | None = None
    ) -> str:
        """Mirror ``pv`` (idempotent); returns its MLflow version number."""
        self._registered_model()
        existing = self.find_version(pv.name)
        if existing is not None:
            return existing
        mv = self._call(
            f"registering {pv.name}",
            self.client.create_model_version,
            self.target.registered_model,
            source=pv.uri,
            run_id=run_id,
            run_link=run_link,
            tags={
                VERSION_TAG: pv.name,
                "kubetune.manifest_sha256": pv.manifest_digest,
                "kubetune.uri": pv.uri,
            },
            description=f"kubetune {pv.manifest.get('model')} {pv.name}: {pv.uri}",
        )
        return str(mv.version)

    def set_alias(self, alias: str, pv: PublishedVersion) -> str:
        """Point MLflow alias ``alias`` at the mirror of ``pv`` (mirroring it first if needed)."""
        number = self.ensure_version(pv)
        self._call(
            f"setting alias {alias}",
            self.client.set_registered_model_alias,
            self.target.registered_model,
            alias,
            number,
        )
        return number

    def aliases(self) -> dict[str, str]:
        """MLflow's aliases of the registered model: alias -> kubetune version name."""
        model = self._call(
            "reading the registered model", self.client.get_registered_model, self.target.registered_model
        )
        out: dict[str, str] = {}
        for alias, number in (model.aliases or {}).items():
            mv = self._call(
                "reading a model version", self.client.get_model_version, self.target.registered_model, number
            )
            out[alias] = str((mv.tags or {}).get(VERSION_TAG, ""))
        return out
