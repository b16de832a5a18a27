"""What every stage of a run is handed: the :class:`RunContext`, and the error any stage may raise.

Also the two pieces a context is built from: :func:`store_settings` (the RunConfig's storage
section) and :func:`make_reporter` (rank 0 reports; in a cluster it patches the job's status).

A stage function takes the context plus its own small, named input (fetch's ``Inputs``, the data
stage's ``StageData``, ``Trained``, ``Evaluation``, ``Artifacts``) and returns its own named output;
nothing else travels between stages. :meth:`RunContext.for_stage` gives a ``spec.stages`` entry a
context of its own (its RunConfig, work directory and registry), so a stage is trained, evaluated
and published by the same functions as the job itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api.runconfig import RunConfig
from kubetune_registry.storage import StoreSettings
from kubetune_registry.versions import ModelRegistry
from kubetune_trainer.reporting import KubeStatusClient, Reporter
from kubetune_trainer.runtime import Runtime
from kubetune_trainer.tracking import MlflowTracker


class BadInputError(ValueError):
    """Input the run cannot use (data too small to split, no examples left...): fails at once."""


def store_settings(rc: RunConfig) -> StoreSettings:
    """StoreSettings for the RunConfig's storage section (credentials come from the environment)."""
    s = rc.storage
    return StoreSettings(
        endpoint=s.endpoint, region=s.region, addressing_style=s.addressing_style, local_root=s.local_root
    )


def make_reporter(rc: RunConfig, runtime: Runtime) -> Reporter:
    """Rank 0 reports; in a cluster it also patches the FineTuneJob status, and with
    ``spec.tracking.mlflow`` it tracks the run in MLflow."""
    kube = KubeStatusClient.from_environment() if rc.reporting.status_patch and runtime.is_main else None
    tracked = rc.tracking is not None and rc.tracking.mlflow is not None and runtime.is_main
    return Reporter(
        enabled=runtime.is_main,
        tracker=MlflowTracker(rc, store_settings(rc)) if tracked else None,
        kube=kube,
        termination_message_path=rc.reporting.termination_message_path if runtime.is_main else None,
        min_interval_s=rc.reporting.progress_every_seconds,
    )


@dataclass
class Trial:
    """This run is trial ``number`` of a sweep (docs/adr/0001): trained and evaluated, never published.

    ``on_eval(step, eval_loss)`` is called at every intermediate evaluation and returns True when
    the sweep's pruner stops the trial there; the run fills in ``inputs_digest`` (the winner, of the
    same digest, resumes from that trial's final checkpoint).
    """

    number: int
    objective: str
    on_eval: Callable[[int, float], bool]
    inputs_digest: str | None = None


@dataclass(frozen=True)
class RunContext:
    """One run (or one ``spec.stages`` entry) as the stages see it.

    ``rc`` is the RunConfig being trained, ``runtime`` this process's rank and device, ``workdir``
    its scratch folder (``staging/`` inside it becomes the published version), ``reporter`` where
    progress and the result go, ``store`` how to reach object storage and ``registry`` the versions
    of ``rc.model.name`` under ``rc.output.uri``.
    """

    rc: RunConfig
    runtime: Runtime
    workdir: Path
    reporter: Reporter
    store: StoreSettings
    registry: ModelRegistry
    trial: Trial | None = None
    """Set when this run is a sweep's trial: evaluate the objective, publish nothing."""
    sweep: dict[str, Any] | None = None
    """Set on a sweep's winner: the sweep's lineage (every trial), for the manifest and model card."""

    @classmethod
    def create(cls, rc: RunConfig, runtime: Runtime, workdir: Path, reporter: Reporter) -> RunContext:
        """The context of ``rc``. Raises ValueError for an invalid model name and InvalidURI /
        UnsafeKeyError for an output URI that is not ``s3://`` or ``file:///``."""
        store = store_settings(rc)
        registry = ModelRegistry(rc.output.uri, rc.model.name, store)
        return cls(rc=rc, runtime=runtime, workdir=workdir, reporter=reporter, store=store, registry=registry)

    def for_stage(self, index: int) -> RunContext:
        """``spec.stages[index]`` as a job of its own: :meth:`RunConfig.stage_config`, trained in
        ``workdir/stages/<n>-<name>`` and published (when it is) as ``<model>-<stage>``."""
        stage = self.rc.stages[index]
        rc = self.rc.stage_config(index)
        return dataclasses.replace(
            self,
            rc=rc,
            workdir=self.workdir / "stages" / f"{index + 1}-{stage.name}",
            registry=ModelRegistry(rc.output.uri, rc.model.name, self.store),
        )

    @property
    def staging(self) -> Path:
        """The folder rank 0 fills and publishes as the version."""
        return self.workdir / "staging"

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where evaluation and quantization run."""
        return "cuda" if self.runtime.device.type == "cuda" else "cpu"
