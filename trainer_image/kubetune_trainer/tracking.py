"""``spec.tracking.mlflow``: the run as an MLflow run, and its version in MLflow's model registry.

Rank 0's :class:`~kubetune_trainer.reporting.Reporter` drives an :class:`MlflowTracker`:

* the first report starts a run in the experiment (``experiment``, default the model name), named
  ``<job>-g<generation>``, tagged with the job, namespace, generation and base model, and logs
  the parameters that decide the model (the RunConfig's digest material, flattened:
  ``training.learningRate``, ``method.lora.r``, ...; never the storage connection or any secret);
* every progress report logs ``train_loss``, ``learning_rate``, ``tokens_per_second`` and
  ``epoch`` at its optimizer step;
* the result ends it: the evaluation metrics of the tuned model (and ``base.<metric>`` of the base,
  and ``paired.<metric>.{difference,ci_low,ci_high,significant}``: tuned - base with its paired
  bootstrap interval; ``significant`` is 1 when it excludes 0 on the better side),
  the evaluation losses logged during training at their steps, the gates (``gates.passed`` and one
  tag per gate), the model card (``model-card/README.md``) and the eval report as artifacts, tags
  linking the version (``kubetune.version``, ``kubetune.version_uri``, ``kubetune.inputs_digest``,
  ``kubetune.reason``); status FINISHED for a published or reused version whose gates passed, FAILED
  otherwise. With ``registerVersion`` (the default) the version is registered in the registered model
  (:class:`kubetune_registry.mlflow_sync.MlflowMirror`: ``source`` = the version's URI, linked to
  this run) and the alias the job's promotion moved is set there too.

MLflow authenticates with its own environment variables (``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, from ``credentialsSecret`` in a pod). A tracking server
that cannot be reached or refuses a call is a warning line, and tracking stops for the run: it
never fails or slows a training run beyond its first refused call. ``kubetune versions mlflow-sync``
backfills the registry side afterwards.

``mlflow`` (the ``mlflow-skinny`` client) is imported when a tracker starts: ~3 s that runs
without tracking never pay.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from kubetune_api.models import Progress
from kubetune_api.reports import TrainerResult
from kubetune_api.runconfig import RunConfig
from kubetune_registry.mlflow_sync import MlflowMirror, MlflowSyncError, MlflowTarget
from kubetune_registry.storage import ObjectNotFound, StoreSettings, open_uri
from kubetune_registry.versions import ModelRegistry, PublishedVersion

log = logging.getLogger("kubetune.trainer")

_PARAM_LIMIT = 6000  # MLflow refuses longer parameter values
_BATCH = 100  # MLflow's log_batch takes at most 100 params / 1000 metrics per call


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"training": {"batchSize": 8}}`` -> ``{"training.batchSize": "8"}``; lists as JSON."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    text = json.dumps(tree, sort_keys=True) if isinstance(tree, list) else str(tree)
    out[prefix] = text[:_PARAM_LIMIT]
    return out


def run_params(rc: RunConfig) -> dict[str, str]:
    """What decides the trained model, as MLflow parameters, plus where the inputs came from."""
    params = flatten(rc.digest_material())
    params["model.name"] = rc.model.name
    params["model.base.uri"] = rc.model.base.uri
    params["data.train.uri"] = rc.data.train.uri
    if rc.data.eval is not None:
        params["data.eval.uri"] = rc.data.eval.uri
    params["training.learningRate"] = str(rc.learning_rate)
    return params


class MlflowTracker:
    """One MLflow run for one trainer run (rank 0). Every method is safe to call in any order."""

    def __init__(
        self, rc: RunConfig, store: StoreSettings, *, client: Any = None, stream: TextIO | None = None
    ) -> None:
        spec = rc.tracking.mlflow if rc.tracking is not None else None
        if spec is None:
            raise ValueError("spec.tracking.mlflow is not set")
        self.rc = rc
        self.spec = spec
        self.store = store
        self.stream = stream or sys.stderr
        self.client = client
        self.run_id: str | None = None
        self.disabled = False

    # --- plumbing -------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call MLflow; on any failure warn once and stop tracking (training goes on)."""
        if self.disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a tracking server must never fail a training run
            self.disabled = True
            message = getattr(exc, "message", None) or str(exc)
            print(
                f"[kubetune] warning: MLflow tracking at {self.spec.tracking_uri}: {what} failed "
                f"({type(exc).__name__}: {str(message)[:300]}); tracking stops, training goes on",
                file=self.stream,
                flush=True,
            )
            return None

    def _ensure_run(self) -> str | None:
        if self.run_id is not None or self.disabled:
            return self.run_id
        self._guard("starting the run", self._start)
        return self.run_id

    def _start(self) -> None:
        if self.client is None:
            from mlflow.tracking import MlflowClient  # deferred: ~3 s, see the module docstring

            self.client = MlflowClient(
                tracking_uri=self.spec.tracking_uri, registry_uri=self.spec.tracking_uri
            )
        name = self.spec.experiment or self.rc.model.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        )
        job = self.rc.job
        run = self.client.create_run(
            experiment_id,
            run_name=f"{job.name}-g{job.generation}",
            tags={
                "kubetune.job": job.name,
                "kubetune.namespace": job.namespace,
                "kubetune.generation": str(job.generation),
                "kubetune.model": self.rc.model.name,
                "kubetune.base": self.rc.model.base.uri,
                "kubetune.method": self.rc.method.type,
            },
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in sorted(run_params(self.rc).items())]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        print(
            f"[kubetune] MLflow: run {self.run_id} in experiment {name!r} at {self.spec.tracking_uri}",
            file=self.stream,
            flush=True,
        )

    def _metrics(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    # --- what the reporter calls ------------------------------------------------------------------
    def stage(self, stage: str) -> None:
        if self._ensure_run() is not None:
            self._guard("tagging the stage", self.client.set_tag, self.run_id, "kubetune.stage", stage)

    def progress(self, p: Progress) -> None:
        if self._ensure_run() is None or p.step is None:
            return
        values = {
            "train_loss": p.loss,
            "learning_rate": p.learning_rate,
            "tokens_per_second": p.tokens_per_second,
            "epoch": p.epoch,
        }
        self._guard("logging step metrics", self._metrics, values, p.step)

    def result(self, result: TrainerResult) -> None:
        if self._ensure_run() is None:
            return
        self._guard("logging the result", self._finish, result)
        ok = result.outcome == "Succeeded" and (result.gates is None or result.gates.passed)
        self._guard("ending the run", self.client.set_terminated, self.run_id, "FINISHED" if ok else "FAILED")

    def _finish(self, result: TrainerResult) -> None:
        tags: dict[str, str] = {"kubetune.outcome": result.outcome, "kubetune.reason": result.reason}
        if result.inputs_digest:
            tags["kubetune.inputs_digest"] = result.inputs_digest
        if result.message:
            tags["kubetune.message"] = result.message[:5000]
        if result.gates is not None:
            tags["kubetune.gates"] = result.gates.summary or ("passed" if result.gates.passed else "failed")
            for gate in result.gates.results:
                tags[f"gate.{gate.metric}"] = ("passed" if gate.passed else "FAILED") + (
                    f": {gate.message}" if gate.message else ""
                )
        if result.version is not None:
            tags["kubetune.version"] = result.version.name
            tags["kubetune.version_uri"] = result.version.uri
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        if result.version is None:
            return
        registry = ModelRegistry(self.rc.output.uri, self.rc.model.name, self.store)
        published = registry.get_version(result.version.name)
        manifest = published.manifest
        steps = int((manifest.get("extra") or {}).get("steps") or 0)
        final: dict[str, float | None] = {
            k: v for k, v in result.metrics.items() if isinstance(v, int | float)
        }
        report = json.loads(self._read(f"{published.uri}/eval/report.json") or "{}")
        base = (report.get("evaluation") or {}).get("base") or {}  # None when compareBase is false
        final |= {f"base.{k}": v for k, v in base.items() if isinstance(v, int | float)}
        # tuned - base with its paired bootstrap interval, per metric (eval/report.json's "paired").
        for metric, d in ((report.get("evaluation") or {}).get("paired") or {}).items():
            for key in ("difference", "ci_low", "ci_high"):
                if isinstance(d.get(key), int | float):
                    final[f"paired.{metric}.{key}"] = d[key]
            final[f"paired.{metric}.significant"] = 1.0 if d.get("improved") else 0.0
        for artifact, values in ((manifest.get("extra") or {}).get("artifactMetrics") or {}).items():
            final |= {f"{artifact}.{k}": v for k, v in values.items() if isinstance(v, int | float)}
        if result.gates is not None:
            final["gates.passed"] = 1.0 if result.gates.passed else 0.0
        self._metrics(final, steps)
        self._log_version_files(published.uri)
        if self.spec.register_version and not result.version.reused:
            self._register(published, result)

    def _log_version_files(self, version_uri: str) -> None:
        """The model card and eval report as artifacts; eval losses logged during training at their steps."""
        files = {"README.md": "model-card/README.md", "eval/report.json": "eval/report.json"}
        for name, artifact in files.items():
            text = self._read(f"{version_uri}/{name}")
            if text is not None:
                self.client.log_text(self.run_id, text, artifact)
        rows = self._read(f"{version_uri}/training/metrics.jsonl") or ""
        evals = [json.loads(line) for line in rows.splitlines() if line.strip()]
        # One value per step: the final evaluation repeats the last periodic one at the same step.
        by_step = {int(r["step"]): r["eval_loss"] for r in evals if "eval_loss" in r and "loss" not in r}
        for step, value in sorted(by_step.items()):
            self._metrics({"eval_loss_during_training": value}, step)

    def _read(self, uri: str) -> str | None:
        store, key = open_uri(uri, self.store)
        try:
            data, _ = store.get_bytes(key)
        except ObjectNotFound:
            return None
        return data.decode("utf-8", errors="replace")

    def _register(self, published: PublishedVersion, result: TrainerResult) -> None:
        mirror = MlflowMirror(
            MlflowTarget(self.spec.tracking_uri, self.spec.registered_model or self.rc.model.name),
            client=self.client,
        )
        try:
            number = mirror.ensure_version(published, run_id=self.run_id)
            if result.promoted_alias:
                mirror.set_alias(result.promoted_alias, published)
        except MlflowSyncError as exc:
            raise RuntimeError(str(exc)) from None
        print(
            f"[kubetune] MLflow: registered {published.name} as version {number} of "
            f"{mirror.target.registered_model!r}"
            + (f", alias {result.promoted_alias} set" if result.promoted_alias else ""),
            file=self.stream,
            flush=True,
        )
