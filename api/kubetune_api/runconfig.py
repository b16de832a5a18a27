"""RunConfig: the fully resolved configuration the trainer consumes.

:func:`resolve_run_config` is the one pure function that turns a FineTuneJob into a RunConfig.
The operator calls it to fill the job's ConfigMap; ``kubetune run`` calls it on a laptop. So the
same YAML behaves the same on a cluster and on one machine: every default is applied here, once.

What is resolved here (and only here):

* ``training.learningRate``: 2e-4 for lora/qlora, 2e-5 for full, 3e-3 for ia3, when unset;
* ``data.evalSplit``: 0.1 when neither ``data.eval`` nor ``data.evalSplit`` is set;
* ``evaluation.metrics``: every gated metric is added, so a gate can never pass for lack of a value.

``training.precision: auto`` stays ``auto``: it depends on the hardware the trainer lands on, and
the trainer records what it chose in the published ``training/run-config.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field

from kubetune_api import names
from kubetune_api.models import (
    ApiModel,
    DataSpec,
    DistillationSpec,
    DistributedSpec,
    EvaluationSpec,
    FineTuneJob,
    FineTuneJobSpec,
    MethodSpec,
    ModelSpec,
    ObjectMeta,
    OutputSpec,
    QuantizationSpec,
    StageSpec,
    TrackingSpec,
    TrainingSpec,
)
from kubetune_api.names import parse_quantity

# (IA)^3 trains only scaling vectors and needs a far higher rate (peft's IA3 examples use 3e-3).

DEFAULT_LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "ia3": 3e-3}
DEFAULT_EVAL_SPLIT = 0.1


class JobIdentity(ApiModel):
    """Which FineTuneJob generation this run belongs to (not part of the inputs digest)."""

    name: str = Field(description="FineTuneJob name.")
    namespace: str = Field(default="default", description="Namespace ('local' for kubetune run).")
    uid: str | None = Field(default=None, description="FineTuneJob UID.")
    generation: int = Field(default=1, description="Spec generation.")


class ResolvedStorage(ApiModel):
    """Object-store connection without credentials (those come from the environment only)."""

    endpoint: str | None = Field(default=None, description="S3 endpoint URL.")
    region: str | None = Field(default=None, description="S3 region.")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="S3 addressing style."
    )
    local_root: str | None = Field(
        default=None,
        description="When set, s3://bucket/key maps to <localRoot>/bucket/key (single-machine mode).",
    )
    credentials_secret: str | None = Field(
        default=None,
        description=(
            "Name of the Secret the pods get the credentials from (the name only, never its data): "
            "serving manifests reference it."
        ),
    )


class Reporting(ApiModel):
    """Where the trainer reports progress and its final result."""

    status_patch: bool = Field(default=False, description="Patch the FineTuneJob status (in-cluster only).")
    termination_message_path: str | None = Field(
        default=None,
        description="File the final TrainerResult is written to (the pod's termination message).",
    )
    progress_every_seconds: float = Field(default=10.0, gt=0, description="Throttle for status patches.")


class PlanPolicy(ApiModel):
    """What the pre-flight plan checks its memory estimate against, and whether a miss stops the run."""

    ignore: bool = Field(default=False, description="runPolicy.ignorePlan: run even when it will not fit.")
    device_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Memory of one device: resources.gpuMemory on a GPU job, resources.memory (the pod's limit) "
            "on a CPU one; unset: the machine's own (kubetune run) or unknown."
        ),
    )
    device_memory_source: str | None = Field(
        default=None, description="The spec field the bound came from, for messages."
    )


class TrialRun(ApiModel):
    """This job is trial ``number`` of sweep ``sweep`` (a child FineTuneJob of a FineTuneSweep): it
    trains and measures ``objective``, reports each intermediate eval_loss to its status, and
    publishes nothing (docs/sweeps.md)."""

    sweep: str = Field(description="The FineTuneSweep's name.")
    number: int = Field(ge=0, description="Trial number, from 0.")
    objective: str = Field(description="The metric the sweep optimises.")


class ResolvedStage(ApiModel):
    """A stage with its data and full training settings resolved (overrides applied to spec.training)."""

    name: str = Field(description="Stage name.")
    data: DataSpec = Field(description="The stage's data, evalSplit resolved.")
    training: TrainingSpec = Field(
        description="spec.training with the stage's overrides, learningRate resolved."
    )
    publish: bool = Field(default=False, description="Publish the stage's result as <model>-<stage>.")


class RunConfig(ApiModel):
    """Everything the trainer needs, defaults applied. Serialised into the job's ConfigMap."""

    schema_version: Literal[1] = Field(default=1, description="RunConfig format version.")
    job: JobIdentity = Field(description="Source FineTuneJob.")
    model: ModelSpec = Field(description="Model name and base.")
    data: DataSpec = Field(description="Data, evalSplit resolved.")
    method: MethodSpec = Field(description="Tuning method.")
    distillation: DistillationSpec | None = Field(default=None, description="Knowledge distillation.")
    training: TrainingSpec = Field(description="Hyperparameters, learningRate resolved.")
    stages: list[ResolvedStage] = Field(
        default_factory=list, description="Stages trained before this config's own data, in order."
    )
    distributed: DistributedSpec = Field(description="Nodes, GPUs, strategy.")
    evaluation: EvaluationSpec = Field(description="Metrics (gated ones included) and gates.")
    quantization: QuantizationSpec = Field(description="Quantized formats.")
    output: OutputSpec = Field(description="Registry root and promotion.")
    storage: ResolvedStorage = Field(default_factory=ResolvedStorage, description="Object-store connection.")
    reporting: Reporting = Field(default_factory=Reporting, description="Progress and result reporting.")
    tracking: TrackingSpec | None = Field(default=None, description="Experiment tracking (MLflow).")
    plan: PlanPolicy = Field(default_factory=PlanPolicy, description="The pre-flight plan's memory bound.")
    trial: TrialRun | None = Field(
        default=None, description="Set on a sweep's trial: train and evaluate, publish nothing."
    )
    sweep: dict[str, Any] | None = Field(
        default=None,
        description="Set on a sweep's winner: the sweep's lineage, recorded in its manifest and model card.",
    )

    @property
    def learning_rate(self) -> float:
        """The resolved peak learning rate (never None in a RunConfig)."""
        assert self.training.learning_rate is not None
        return self.training.learning_rate

    @property
    def eval_split(self) -> float | None:
        """Held-out share, or None when a separate eval set is given."""
        return self.data.eval_split

    def to_json(self) -> str:
        """Canonical JSON, as stored in the ConfigMap and in training/run-config.json."""
        return json.dumps(self.to_api(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Parse a RunConfig written by :meth:`to_json`."""
        return cls.model_validate_json(text)

    def digest_material(self) -> dict[str, Any]:
        """The parts of the config that change what is trained.

        Left out, so a GitOps re-sync or a move of the same data is free: the job's identity,
        storage connection, reporting, experiment tracking, the output location, checkpoint cadence, logging and health monitoring,
        and source URIs (the content digests of base model and data stand for them).
        """
        d = self.to_api()
        # A sweep's trial and its winner train the same thing: the winner resumes from the trial's
        # checkpoint, found by this digest (docs/sweeps.md).
        for key in (
            "job",
            "storage",
            "reporting",
            "output",
            "schemaVersion",
            "tracking",
            "plan",
            "trial",
            "sweep",
        ):
            d.pop(key, None)
        d["model"].pop("name", None)
        d["model"]["base"].pop("uri", None)
        if "distillation" in d:  # the teacher's content digest is in the inputs record instead
            d["distillation"]["teacher"].pop("uri", None)
        d["data"]["train"].pop("uri", None)
        if "eval" in d["data"]:
            d["data"]["eval"].pop("uri", None)
        for extra in d["evaluation"].get("extraSets", []):
            extra.pop("uri", None)
        if "glossary" in d["evaluation"]:  # its content digest is in the inputs record instead
            d["evaluation"]["glossary"].pop("uri", None)
        d["training"].pop("checkpoint", None)
        d["training"].pop("logEverySteps", None)
        d["training"].pop("health", None)  # monitoring only: it never changes what is trained
        for stage in d.get("stages", []):  # the same for every stage; publish changes nothing trained
            stage.pop("publish", None)
            stage["data"]["train"].pop("uri", None)
            if "eval" in stage["data"]:
                stage["data"]["eval"].pop("uri", None)
            for key in ("checkpoint", "logEverySteps", "health"):
                stage["training"].pop(key, None)
        return d

    def stage_config(self, index: int) -> RunConfig:
        """The RunConfig of stage ``index`` as a job of its own: the stages before it, then its data
        and training, published (when it is) as the model ``<model.name>-<stage>``.

        Its inputs digest therefore identifies exactly what that stage's weights came from, so a
        published stage is found again (and reused) by the same digest lookup as any version.
        Evaluation keeps its metrics but drops gates (the default ones too); quantization and promotion belong to the last
        stage only.
        """
        stage = self.stages[index]
        return self.model_copy(
            update={
                "model": self.model.model_copy(update={"name": f"{self.model.name}-{stage.name}"}),
                "data": stage.data,
                "training": stage.training,
                "stages": self.stages[:index],
                # An intermediate stage need not beat the base on its own data: no default gates.
                "evaluation": self.evaluation.model_copy(update={"gates": {}, "require_improvement": False}),
                "quantization": self.quantization.model_copy(update={"formats": []}),
                "output": self.output.model_copy(update={"promote": None}),
            },
            deep=True,
        )

    def config_digest(self) -> str:
        """sha256 of :meth:`digest_material` as canonical JSON."""
        blob = json.dumps(self.digest_material(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def resolve_run_config(
    job: FineTuneJob,
    *,
    local_root: str | None = None,
    reporting: Reporting | None = None,
) -> RunConfig:
    """Resolve a FineTuneJob into the RunConfig its trainer runs. Pure: no I/O, input untouched.

    ``local_root`` turns on the single-machine object store (``kubetune run``); ``reporting``
    says how the trainer reports (the operator turns on status patches and the termination
    message). Raises pydantic.ValidationError only if the job itself is invalid.
    """
    spec = job.spec.model_copy(deep=True)
    training = spec.training
    if training.learning_rate is None:
        training = training.model_copy(update={"learning_rate": DEFAULT_LEARNING_RATE[spec.method.type]})
    data = spec.data
    if data.eval is None and data.eval_split is None:
        data = data.model_copy(update={"eval_split": DEFAULT_EVAL_SPLIT})
    evaluation = spec.evaluation
    missing = [m for m in evaluation.gate_metrics() if m not in evaluation.metrics]
    if evaluation.require_improvement and "eval_loss" not in [*evaluation.metrics, *missing]:
        missing.append("eval_loss")  # the default gate eval_loss_vs_base needs it
    if missing:
        evaluation = evaluation.model_copy(update={"metrics": [*evaluation.metrics, *missing]})
    stages = [_resolve_stage(stage, training, spec.method.type) for stage in spec.stages]
    meta = job.metadata
    return RunConfig(
        job=JobIdentity(
            name=meta.name or spec.model.name,
            namespace=meta.namespace or "default",
            uid=meta.uid,
            generation=meta.generation or 1,
        ),
        model=spec.model,
        data=data,
        method=spec.method,
        distillation=spec.distillation,
        training=training,
        stages=stages,
        distributed=spec.distributed,
        evaluation=evaluation,
        quantization=spec.quantization,
        output=spec.output,
        storage=ResolvedStorage(
            endpoint=spec.storage.endpoint,
            region=spec.storage.region,
            addressing_style=spec.storage.addressing_style,
            local_root=local_root,
            credentials_secret=spec.storage.credentials_secret,
        ),
        reporting=reporting or Reporting(),
        tracking=spec.tracking,
        plan=_plan_policy(spec),
        trial=_trial_run(meta),
        sweep=_sweep_lineage(meta),
    )


def _trial_run(meta: ObjectMeta) -> TrialRun | None:
    """RunConfig.trial from the child's kubetune.io/sweep-trial annotation (set by the operator)."""
    text = meta.annotations.get(names.ANNOTATION_SWEEP_TRIAL)
    return TrialRun.model_validate_json(text) if text else None


def _sweep_lineage(meta: ObjectMeta) -> dict[str, Any] | None:
    """RunConfig.sweep from the winner's kubetune.io/sweep-lineage annotation (set by the operator)."""
    text = meta.annotations.get(names.ANNOTATION_SWEEP_LINEAGE)
    if not text:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"annotation {names.ANNOTATION_SWEEP_LINEAGE} is not a JSON object")
    return value


def _plan_policy(spec: FineTuneJobSpec) -> PlanPolicy:
    """The memory bound of one device, from the spec fields that state it."""
    res = spec.resources
    field, value = (
        ("spec.resources.gpuMemory", res.gpu_memory)
        if spec.distributed.gpus_per_node > 0
        else ("spec.resources.memory", res.memory)
    )
    return PlanPolicy(
        ignore=spec.run_policy.ignore_plan,
        device_memory_bytes=int(parse_quantity(value)) if value else None,
        device_memory_source=field if value else None,
    )


def _resolve_stage(stage: StageSpec, training: TrainingSpec, method: str) -> ResolvedStage:
    """spec.training (learning rate already resolved) with the stage's overrides applied."""
    overrides = stage.training.model_dump(exclude_none=True)
    if "epochs" in overrides and "max_steps" not in overrides:
        overrides["max_steps"] = None  # the stage asked for epochs: the job's maxSteps must not win
    data = stage.data
    if data.eval is None and data.eval_split is None:
        data = data.model_copy(update={"eval_split": DEFAULT_EVAL_SPLIT})
    return ResolvedStage(
        name=stage.name,
        data=data,
        training=training.model_copy(update=overrides, deep=True),
        publish=stage.publish,
    )
