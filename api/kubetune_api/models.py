"""The FineTuneJob and ModelVersion API (group ``kubetune.io``, version ``v1alpha1``).

These pydantic models are the single source of truth: the CRDs in ``crds/`` are generated from
them (``python -m kubetune_api.crdgen``), field descriptions become ``kubectl explain`` text, and
the cross-field rules in :mod:`kubetune_api.rules` run both here (pydantic) and in the API server
(CEL ``x-kubernetes-validations``).

Defaults follow the common SFT recipe (LoRA r=16, alpha=32, dropout 0.1, cosine schedule with
3% warm-up, 3 epochs, max sequence length 512, batch 8 with gradient accumulation 2). Where we
deliberately differ, the field's description says so (for example the learning rate, which
depends on the method: 2e-4 for LoRA/QLoRA, 2e-5 for full fine-tuning).

YAML uses camelCase (``maxSeqLength``); Python attributes are snake_case (``max_seq_length``).
Unknown fields are errors, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from kubetune_api import names
from kubetune_api.metrics import METRIC_NAMES, MetricName
from kubetune_api.rules import check_spec, split_gate_key

# --- vocabularies -----------------------------------------------------------------------------

MethodType = Literal["lora", "qlora", "full", "ia3"]
LoraVariant = Literal["lora", "dora", "rslora"]
CurriculumOrder = Literal["none", "length", "field"]
DataFormat = Literal["auto", "instruction", "prompt-completion", "chat"]
TemplateName = Literal["auto", "inst", "chatml", "alpaca", "tokenizer"]
SchedulerName = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Strategy = Literal["none", "ddp", "deepspeed-zero2", "deepspeed-zero3"]
QuantFormat = Literal["int8", "int4", "onnx-int8", "nf4", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
PromoteWhen = Literal["gatesPassed", "always"]
AddressingStyle = Literal["auto", "path", "virtual"]
Phase = Literal["Pending", "Queued", "Suspended", "Running", "Succeeded", "Failed"]
Stage = Literal[
    "Initializing", "Fetching", "PreparingData", "Training", "Evaluating", "Quantizing", "Publishing"
]
STAGES: tuple[str, ...] = get_args(Stage)


class ApiModel(BaseModel):
    """Base for every API object: camelCase in YAML, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as the Kubernetes API would show it (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- spec: model ------------------------------------------------------------------------------


class BaseModelRef(ApiModel):
    """A model the trainer loads: the base to fine-tune, or a distillation teacher."""

    uri: str = Field(
        description=(
            "Where the model lives: s3://bucket/prefix, file:///abs/path, "
            "hf://org/name@revision (only where the Hugging Face Hub is reachable), or "
            "modelversion://<model>/<vN|alias> for a version kubetune published (as a base: "
            "continue from it)."
        ),
        pattern=names.SOURCE_URI_PATTERN,
        max_length=1024,
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run Python code shipped with the model (auto_map). Off unless you trust the source.",
    )
    allow_pickle: bool = Field(
        default=False,
        description=(
            "Allow pickle-based weight files (*.bin, *.pt). Off: only safetensors load, because "
            "unpickling runs arbitrary code."
        ),
    )


class ModelSpec(ApiModel):
    """What is trained, and under which name its versions are published."""

    name: str = Field(
        description=(
            "Model name: the registry folder <output.uri>/<name>/ and the ModelVersion prefix. "
            "Lowercase letters and digits separated by single '.', '_' or '-'."
        ),
        pattern=names.NAME_PATTERN,
        min_length=1,
        max_length=names.NAME_MAX_LENGTH,
    )
    base: BaseModelRef = Field(description="The base model.")


# --- spec: data -------------------------------------------------------------------------------


class DataSource(ApiModel):
    """One data file or folder of files (JSONL, JSON, Parquet, CSV)."""

    uri: str = Field(
        description="s3://bucket/key, s3://bucket/prefix/ (every data file under it) or file:///abs/path.",
        pattern=names.DATA_URI_PATTERN,
        max_length=1024,
    )


class NamedDataSource(DataSource):
    """An extra evaluation set, reported under its name."""

    name: str = Field(
        description="Name used in the report.",
        pattern=names.NAME_PATTERN,
        max_length=names.NAME_MAX_LENGTH,
    )


class FieldMapping(ApiModel):
    """Column names in the data files, when they differ from the conventional ones."""

    instruction: str = Field(default="instruction", description="Instruction column.", max_length=128)
    input: str = Field(default="input", description="Optional input/context column.", max_length=128)
    output: str = Field(default="output", description="Answer column of instruction records.", max_length=128)
    prompt: str = Field(
        default="prompt", description="Prompt column of prompt/completion records.", max_length=128
    )
    completion: str = Field(
        default="completion", description="Completion column of prompt/completion records.", max_length=128
    )
    messages: str = Field(default="messages", description="Chat messages column.", max_length=128)


class CleaningSpec(ApiModel):
    """Text cleaning applied before validation and de-duplication.

    The defaults never change what an answer means: they remove control characters and the
    whitespace around a whole field. Every normalisation that rewrites text inside a field (inner
    spaces, blank lines, quotes) is an explicit option, off by default.
    """

    strip_control_chars: bool = Field(
        default=True,
        description="CR/CRLF become LF; control characters other than newline and tab are removed.",
    )
    strip_whitespace: bool = Field(
        default=True,
        description="Strip whitespace before and after the whole field (inner text is kept as written).",
    )
    normalize_whitespace: bool = Field(
        default=False,
        description=(
            "Opt-in: collapse runs of spaces/tabs inside a line to one space (leading indentation "
            "kept), drop trailing spaces and squeeze 3+ line breaks to 2. Changes code blocks and "
            "aligned text inside answers."
        ),
    )
    normalize_quotes: bool = Field(
        default=False,
        description="Opt-in: map curly, angle and full-width quotes to ASCII quotes.",
    )
    deduplicate: bool = Field(default=True, description="Drop exact duplicate records (after cleaning).")
    min_answer_chars: int = Field(
        default=1, ge=0, le=100_000, description="Answers shorter than this are invalid."
    )
    max_record_chars: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="Records longer than this (in characters) are invalid.",
    )


class CurriculumSpec(ApiModel):
    """Easy-to-hard ordering of the training data instead of shuffling."""

    order: CurriculumOrder = Field(
        default="none",
        description=(
            "none: shuffle every epoch (seeded); length: shortest examples (in tokens) first; field: "
            "ascending by the numeric per-record field named in difficultyField."
        ),
    )
    first_epoch_only: bool = Field(
        default=True,
        description="Order only the first epoch easy-to-hard and shuffle the later ones; false orders every epoch.",
    )
    difficulty_field: str | None = Field(
        default=None,
        max_length=128,
        description="Record field holding a number (lower = easier); required for order: field.",
    )


class SynonymsSpec(ApiModel):
    """Synonym replacement from a user-supplied term dictionary."""

    uri: str = Field(
        description=(
            "JSON or YAML term dictionary: a mapping term -> [synonyms] or a list of synonym groups; "
            "s3://bucket/key or file:///abs/path."
        ),
        pattern=names.DATA_URI_PATTERN,
        max_length=1024,
    )
    probability: float = Field(
        default=0.5, gt=0, le=1, description="Chance that each dictionary term found in a prompt is replaced."
    )


class AugmentationSpec(ApiModel):
    """Seeded augmentation of training prompts (answers and eval data are never changed)."""

    share: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="Share of training records that get one augmented copy (chosen by a seeded hash).",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Augmentation seed; training.seed when unset."
    )
    synonyms: SynonymsSpec | None = Field(
        default=None, description="Replace domain terms by synonyms from a term dictionary."
    )
    sentence_transforms: bool = Field(
        default=False,
        description="Simple meaning-preserving rewrites: casing, final punctuation, a polite prefix.",
    )
    ocr_noise: float = Field(
        default=0.0,
        ge=0,
        le=0.2,
        description="Character error rate of OCR-like noise (rn/m, l/1, O/0 swaps, dropped characters); 0 is off.",
    )


class DataSpec(ApiModel):
    """Training and evaluation data."""

    train: DataSource = Field(description="Training data.")
    eval: DataSource | None = Field(
        default=None, description="Evaluation data. Give either this or evalSplit, not both."
    )
    eval_split: float | None = Field(
        default=None,
        gt=0,
        le=0.5,
        description="Share of the training data held out for evaluation (seeded). 0.1 when neither eval nor evalSplit is set.",
    )
    format: DataFormat = Field(
        default="auto",
        description="Record form: instruction/input/output, prompt/completion or chat messages; auto detects it.",
    )
    template: TemplateName = Field(
        default="auto",
        description=(
            "Prompt template: inst ([INST] q [/INST] a </s>), chatml, alpaca, or the tokenizer's chat "
            "template; auto uses the tokenizer's template when it has one, else ChatML."
        ),
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Column names in the data files.")
    system_prompt: str | None = Field(
        default=None, max_length=10_000, description="System prompt added to every example."
    )
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="Text cleaning.")
    max_invalid_records: int = Field(
        default=0,
        ge=0,
        le=100_000_000,
        description="Invalid records tolerated (skipped and reported); one more fails the run before training.",
    )
    curriculum: CurriculumSpec = Field(
        default_factory=CurriculumSpec, description="Easy-to-hard ordering instead of shuffling."
    )
    augmentation: AugmentationSpec | None = Field(
        default=None, description="Opt-in, seeded augmentation of training prompts."
    )


# --- spec: method -----------------------------------------------------------------------------


class LoraSpec(ApiModel):
    """LoRA adapter settings (peft)."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.1, ge=0, le=0.9, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Modules to adapt: names such as q_proj, v_proj, or 'all-linear'.",
    )
    variant: LoraVariant = Field(
        default="lora",
        description=(
            "lora; dora (weight-decomposed LoRA, peft use_dora); rslora (rank-stabilised scale "
            "alpha/sqrt(r), peft use_rslora)."
        ),
    )
    layers: list[Annotated[int, Field(ge=0, le=100_000)]] | None = Field(
        default=None,
        max_length=1024,
        description="Adapt only these transformer layers (0-based indices, peft layers_to_transform); all when unset.",
    )


class IA3Spec(ApiModel):
    """(IA)^3 adapter settings (peft IA3Config): learned scaling vectors, far fewer parameters than LoRA."""

    target_modules: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Modules to scale; peft's default for the architecture when unset (Llama: k_proj, v_proj, down_proj).",
    )
    feedforward_modules: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Of targetModules, those scaled on their input (feed-forward); peft's default when unset.",
    )


class MethodSpec(ApiModel):
    """How the model is tuned."""

    type: MethodType = Field(
        default="lora",
        description="lora (adapter), qlora (adapter on a 4-bit base; needs a GPU), full, or ia3 ((IA)^3 adapter).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings for lora and qlora.")
    ia3: IA3Spec = Field(default_factory=IA3Spec, description="Adapter settings for ia3.")


class DistillationSpec(ApiModel):
    """Knowledge distillation from a teacher model."""

    teacher: BaseModelRef = Field(
        description=(
            "The teacher model: any URI the base supports (s3://, file://, hf://, "
            "modelversion://<model>/<vN|alias>). It must use the student's tokenizer (same vocabulary)."
        )
    )
    temperature: float = Field(
        default=2.0,
        gt=0,
        le=20,
        description="Softens both the teacher's and the student's distributions; the KL term is scaled by T^2.",
    )
    weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "Share of the distillation term: loss = weight * T^2 * KL(teacher || student) + "
            "(1 - weight) * SFT cross-entropy. 1 is pure distillation, 0 plain SFT."
        ),
    )
    teacher_logits: Literal["onTheFly", "cached"] = Field(
        default="onTheFly",
        description=(
            "onTheFly: the teacher runs next to the student every step (two models in memory, exact). "
            "cached: the teacher runs once over the training set before training, only its topK logits "
            "per trained token are kept, and it is freed (one model in memory while training)."
        ),
    )
    top_k: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Teacher logits kept per trained token in cached mode (ignored on the fly).",
    )


# --- spec: training ---------------------------------------------------------------------------


class EarlyStoppingSpec(ApiModel):
    """Stop when eval loss stops improving."""

    patience: int = Field(
        default=3, ge=1, le=1000, description="Evaluations without improvement before stopping."
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="Smallest decrease of eval loss that counts as improvement."
    )


class CheckpointSpec(ApiModel):
    """Checkpoints in object storage, for resuming after a restart."""

    every_steps: int | None = Field(
        default=200, ge=1, le=10_000_000, description="Checkpoint every N optimizer steps."
    )
    every_minutes: float | None = Field(
        default=30,
        gt=0,
        le=10_080,
        description="Also checkpoint when this many minutes passed since the last one.",
    )
    keep: int = Field(
        default=2, ge=1, le=100, description="Complete checkpoints kept; older ones are deleted."
    )


class HealthSpec(ApiModel):
    """Training-health tracking: gradient norms per layer and loss warnings with hints."""

    grad_norms: bool = Field(
        default=True,
        description=(
            "Record per-layer gradient norms every logEverySteps (rank 0) into training/grad-norms.jsonl "
            "and a heat map training/grad-norms.png. Not available with DeepSpeed (gradients are sharded)."
        ),
    )
    plateau_windows: int = Field(
        default=5,
        ge=2,
        le=1000,
        description="Warn of a loss plateau after this many logged windows without improvement.",
    )
    plateau_min_improvement: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Relative loss decrease over plateauWindows that counts as progress.",
    )


class TrainingSpec(ApiModel):
    """Optimisation hyperparameters."""

    epochs: float = Field(default=3, gt=0, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Optimizer steps; when set it overrides epochs."
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(
        default=2, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Peak learning rate. Default depends on the method: 2e-4 for lora/qlora (adapters need a "
            "higher rate than the 2e-5 common for full fine-tuning), 2e-5 for full, 3e-3 for ia3."
        ),
    )
    scheduler: SchedulerName = Field(default="cosine", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=0.5, description="Share of steps spent warming up linearly."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000, description="Gradient clipping norm.")
    max_seq_length: int = Field(
        default=512, ge=16, le=131_072, description="Tokens per example (longer ones are truncated)."
    )
    packing: bool = Field(
        default=True,
        description=(
            "Pack several examples into one row without padding. Exact: attention never crosses "
            "examples (positions restart per example)."
        ),
    )
    precision: Precision = Field(
        default="auto", description="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory.")
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, description="Seed for data order, split, init and sampling."
    )
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Evaluate eval loss every N steps; unset: at the end of each epoch.",
    )
    log_every_steps: int = Field(
        default=10, ge=1, le=100_000, description="Progress line and metrics row every N steps."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when eval loss stops improving."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpoint cadence and retention."
    )
    health: HealthSpec = Field(
        default_factory=HealthSpec, description="Gradient-norm tracking and loss warnings."
    )


# --- spec: stages -----------------------------------------------------------------------------


class StageTrainingOverrides(ApiModel):
    """Hyperparameters a stage changes; every other field comes from spec.training."""

    epochs: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="Passes over this stage's data. Setting epochs without maxSteps clears spec.training.maxSteps.",
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Optimizer steps of this stage."
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=1, description="Peak learning rate of this stage (default: the job's)."
    )
    scheduler: SchedulerName | None = Field(default=None, description="Learning-rate schedule of this stage.")
    warmup_ratio: float | None = Field(default=None, ge=0, le=0.5, description="Warm-up share of this stage.")
    weight_decay: float | None = Field(default=None, ge=0, le=1, description="AdamW weight decay.")
    batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="Examples per device per micro-batch."
    )
    gradient_accumulation_steps: int | None = Field(
        default=None, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    max_seq_length: int | None = Field(default=None, ge=16, le=131_072, description="Tokens per example.")
    eval_every_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Evaluate eval loss every N steps."
    )


class StageSpec(ApiModel):
    """One training stage that runs before the job's own training (spec.data, spec.training)."""

    name: str = Field(
        description=(
            "Stage name (e.g. general, domain): lowercase letters, digits and '-'. A published stage "
            "becomes a version of the model <model.name>-<name>."
        ),
        pattern=names.DNS1123_LABEL_PATTERN,
        min_length=1,
        max_length=40,
    )
    data: DataSpec = Field(description="This stage's training (and evaluation) data.")
    training: StageTrainingOverrides = Field(
        default_factory=StageTrainingOverrides,
        description="Hyperparameters this stage overrides; the rest come from spec.training.",
    )
    publish: bool = Field(
        default=False,
        description=(
            "Also evaluate this stage's result and publish it as a version of <model.name>-<name> "
            "(adapter and merged model; no quantization, gates or promotion). Its lineage lists the "
            "stages before it."
        ),
    )


# --- spec: distributed, resources -------------------------------------------------------------


class DistributedSpec(ApiModel):
    """How many pods and GPUs train together."""

    nodes: int = Field(default=1, ge=1, le=256, description="Pods (one per node) in the Indexed Job.")
    gpus_per_node: int = Field(
        default=1, ge=0, le=16, description="GPUs per pod, and torchrun processes per pod; 0 trains on CPU."
    )
    strategy: Strategy = Field(
        default="none",
        description="none (one process), ddp, or DeepSpeed ZeRO stage 2/3 (generated from this spec).",
    )


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    key: str | None = Field(default=None, description="Taint key.", max_length=316)
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value.", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound."
    )


class ResourcesSpec(ApiModel):
    """Pod resources and placement. Unset values come from the operator's defaults."""

    gpu_resource_name: str = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPU.", max_length=253
    )
    cpu: str | None = Field(
        default=None, pattern=names.QUANTITY_PATTERN, description="CPU request and limit per pod."
    )
    memory: str | None = Field(
        default=None, pattern=names.QUANTITY_PATTERN, description="Memory request and limit per pod."
    )
    gpu_memory: str | None = Field(
        default=None,
        pattern=names.QUANTITY_PATTERN,
        description=(
            "Memory of one GPU (e.g. 80Gi for an 80 GB H100): the pre-flight plan checks its estimate "
            "of peak memory per GPU against it and stops a job that will not fit (WillNotFit). Unset on "
            "a GPU job: the plan estimates but cannot decide."
        ),
    )
    shared_memory: str = Field(
        default="8Gi",
        pattern=names.QUANTITY_PATTERN,
        description="Size of the memory-backed /dev/shm (NCCL, data loaders).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for GPU taints."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="A Kubernetes affinity object, passed through."
    )
    priority_class_name: str | None = Field(
        default=None,
        pattern=names.DNS1123_SUBDOMAIN_PATTERN,
        max_length=253,
        description="PriorityClass of the pods.",
    )


# --- spec: evaluation, quantization, output, storage, run policy ------------------------------


class Gate(ApiModel):
    """A threshold a metric must meet for the version to be promotable."""

    min: float | None = Field(default=None, description="The metric must be >= min.")
    max: float | None = Field(default=None, description="The metric must be <= max.")
    max_drop_vs_tuned: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "Artifact gates (<artifact>.<metric>) only: the artifact may be at most this fraction "
            "worse than the tuned model on the same metric and eval set, in the metric's bad "
            "direction (0.02 = 2%: rouge_l >= 0.98 x tuned; latency_p95_ms or eval_loss <= 1.02 x "
            "tuned). Combines with min/max."
        ),
    )
    significant: bool = Field(
        default=False,
        description=(
            "Gates on the tuned model only: true requires the paired bootstrap confidence interval "
            "of tuned - base (spec.evaluation.significance) to exclude 0 on the metric's better side, "
            "i.e. a gain that is not noise. Needs compareBase and a metric with per-example scores "
            "(eval_loss, perplexity, exact_match, accuracy, bleu, rouge_l, terminology_coverage). "
            "Combines with min/max."
        ),
    )


class ConsistencySpec(ApiModel):
    """Response consistency: the same prompt answered several times with sampling."""

    samples: int = Field(default=5, ge=2, le=50, description="Answers sampled per prompt.")
    temperature: float = Field(default=0.7, gt=0, le=2, description="Sampling temperature.")
    prompts: int = Field(default=20, ge=1, le=1000, description="Prompts used.")


DEFAULT_METRICS: tuple[MetricName, ...] = ("eval_loss", "perplexity", "exact_match", "bleu", "rouge_l")


class GlossarySpec(ApiModel):
    """The domain glossary terminology_coverage counts terms from."""

    uri: str = Field(
        description=(
            "UTF-8 text file, one term per line (# starts a comment line); s3://bucket/key or "
            "file:///abs/path. Its content is part of the version's inputs."
        ),
        pattern=names.DATA_URI_PATTERN,
        max_length=1024,
    )


class SignificanceSpec(ApiModel):
    """The paired bootstrap of tuned - base on the same held-out examples."""

    resamples: int = Field(
        default=2000, ge=100, le=100_000, description="Bootstrap resamples of the example indices."
    )
    confidence: float = Field(
        default=0.95, ge=0.5, le=0.999, description="Confidence level of the percentile interval."
    )


class EvaluationSpec(ApiModel):
    """What is measured after training, and the gates a version must pass."""

    metrics: list[MetricName] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        max_length=len(METRIC_NAMES),
        description="Metrics computed for base and tuned model. Gated metrics are always computed.",
    )
    max_samples: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description=(
            "Eval examples used for generation metrics (exact_match, bleu, rouge_l, accuracy, "
            "json_validity, latency). eval_loss and perplexity always use the whole eval set, so a "
            "version has one eval_loss."
        ),
    )
    artifact_max_samples: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description=(
            "Eval examples used for the generation metrics of each published artifact (merged and "
            "every quantization format): the first artifactMaxSamples of the maxSamples the tuned "
            "model answered; unset: the same maxSamples. Their eval_loss and perplexity still use "
            "the whole eval set, and a maxDropVsTuned gate compares with the tuned model's score on "
            "the same examples (from its recorded answers), so a smaller check costs no fairness."
        ),
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=8192, description="Generation length for generation metrics."
    )
    compare_base: bool = Field(
        default=True,
        description="Also evaluate the base model on the same data (the default gates need it).",
    )
    require_improvement: bool = Field(
        default=True,
        description=(
            "Default quality gates: the version is promotable only if the tuned model's eval_loss is "
            "below the base's (eval_loss_vs_base), it is no worse than the base on every gated quality "
            "metric (<metric>_vs_base), and the training loss fell (train_loss_decrease). false opts "
            "out explicitly; with no gates left, promote.when gatesPassed never moves an alias."
        ),
    )
    min_train_loss_decrease: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description=(
            "train_loss_decrease gate: relative fall of the training loss from the first steps to "
            "the last that counts as learning (0.02 = 2%)."
        ),
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema answers must follow (json_validity = share that parse and validate).",
    )
    consistency: ConsistencySpec = Field(
        default_factory=ConsistencySpec, description="Consistency measurement."
    )
    glossary: GlossarySpec | None = Field(
        default=None,
        description=(
            "Domain glossary for terminology_coverage: the share of the reference answer's glossary "
            "terms that the generated answer contains, over the examples whose reference has one."
        ),
    )
    significance: SignificanceSpec = Field(
        default_factory=SignificanceSpec,
        description=(
            "With compareBase, every metric with per-example scores gets a paired bootstrap "
            "confidence interval of tuned - base in the eval report and model card."
        ),
    )
    generation_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description=(
            "Prompts answered per greedy generate call for the text metrics (left-padded batches; "
            "the same tokens as one at a time up to floating-point ties). Latency is measured "
            "separately, one prompt at a time, on latencySamples prompts."
        ),
    )
    latency_samples: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Prompts timed one at a time (batch 1) for latency_p50_ms/latency_p95_ms.",
    )
    extra_sets: list[NamedDataSource] = Field(
        default_factory=list, max_length=16, description="Extra evaluation sets."
    )
    gates: dict[str, Gate] = Field(
        default_factory=dict,
        description=(
            "Per-metric thresholds; a failed gate makes the version not promotable. A key <metric> "
            "judges the tuned model as evaluated (the adapter on its base; the trained weights for "
            "full fine-tuning), e.g. {accuracy: {min: 0.92}}. A key <artifact>.<metric> judges a "
            "published artifact, evaluated on the same eval set: merged or a format of "
            "quantization.formats, e.g. {int8.latency_p95_ms: {max: 500}, onnx-int8.rouge_l: "
            "{maxDropVsTuned: 0.02}}."
        ),
    )

    def gate_metrics(self) -> list[MetricName]:
        """The metric names the gates need, once each, in gate order (``int8.rouge_l`` needs
        ``rouge_l``, of the tuned model too: an artifact is compared with it)."""
        out: list[MetricName] = []
        for key in self.gates:
            metric = split_gate_key(key)[1]
            if metric in METRIC_NAMES and metric not in out:
                out.append(metric)  # type: ignore[arg-type]
        return out


class QuantizationSpec(ApiModel):
    """Quantized variants published with the version."""

    formats: list[QuantFormat] = Field(
        default_factory=list,
        max_length=len(get_args(QuantFormat)),  # one job may ask for every format
        description=(
            "int8/int4 (optimum-quanto), onnx-int8 (ONNX + onnxruntime dynamic int8), nf4 (bitsandbytes; "
            "GPU), gguf-f16/gguf-q8_0/gguf-q4_k_m (llama.cpp GGUF + Ollama Modelfile). Each is evaluated on the eval set like the tuned model (gate it as <format>.<metric>)."
        ),
    )


class PromoteSpec(ApiModel):
    """Move an alias to the new version."""

    alias: str = Field(
        description="Alias to move, e.g. candidate or production.",
        pattern=names.NAME_PATTERN,
        max_length=names.NAME_MAX_LENGTH,
    )
    when: PromoteWhen = Field(default="gatesPassed", description="gatesPassed (default) or always.")


class OutputSpec(ApiModel):
    """Where versions are published."""

    uri: str = Field(
        description="Registry root: versions land in <uri>/<model.name>/versions/<vN>/.",
        pattern=names.OUTPUT_URI_PATTERN,
        max_length=1024,
    )
    merge: bool = Field(default=True, description="Also publish the adapter merged into the base (merged/).")
    promote: PromoteSpec | None = Field(default=None, description="Alias to move when the version qualifies.")


class StorageSpec(ApiModel):
    """S3-compatible object storage connection. Credentials come only from the Secret."""

    endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        max_length=1024,
        description="S3 endpoint URL; AWS when unset.",
    )
    region: str | None = Field(default=None, max_length=64, description="S3 region.")
    addressing_style: AddressingStyle = Field(
        default="auto", description="S3 addressing style (path for most on-prem stores)."
    )
    credentials_secret: str | None = Field(
        default=None,
        pattern=names.DNS1123_SUBDOMAIN_PATTERN,
        max_length=253,
        description=(
            "Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
            "AWS_SESSION_TOKEN). Mounted into the trainer pods as environment; the operator never reads it."
        ),
    )


class MlflowTrackingSpec(ApiModel):
    """An MLflow tracking server that follows the run and registers its version."""

    tracking_uri: str = Field(
        pattern=r"^https?://[^\s/]+(/.*)?$",
        max_length=1024,
        description="MLflow tracking server URL (also used as the model registry URI).",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="MLflow experiment of the run; spec.model.name when unset.",
    )
    registered_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description=(
            "MLflow registered model the published version is registered in (source = the version's URI, "
            "linked to the run), with kubetune's promotion alias mirrored; spec.model.name when unset."
        ),
    )
    register_version: bool = Field(
        default=True,
        description="Register the published version in MLflow's model registry; false tracks the run only.",
    )
    credentials_secret: str | None = Field(
        default=None,
        pattern=names.DNS1123_SUBDOMAIN_PATTERN,
        max_length=253,
        description=(
            "Secret in the job's namespace with MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD). Mounted into the trainer pods as environment; the operator never reads it."
        ),
    )


class TrackingSpec(ApiModel):
    """Experiment tracking. It never changes what is trained (not part of the inputs digest)."""

    mlflow: MlflowTrackingSpec | None = Field(
        default=None,
        description=(
            "Track the run in MLflow: parameters, per-step training metrics, evaluation metrics, gates, "
            "the model card and a link to the version. A tracking server that fails is a warning, never a "
            "failed run."
        ),
    )


class RunPolicySpec(ApiModel):
    """Retries, deadlines, suspension and queueing."""

    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Pod failures retried (evictions do not count)."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the run after this many seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=86_400,
        ge=0,
        description="Delete the finished Job (not the FineTuneJob) after this many seconds.",
    )
    suspend: bool = Field(default=False, description="Suspend: no pods run; set back to false to resume.")
    ignore_plan: bool = Field(
        default=False,
        description=(
            "Run even when the pre-flight plan says the job will not fit its GPUs (or its memory "
            "limit on CPU); the Fits condition still says so."
        ),
    )
    queue_name: str | None = Field(
        default=None,
        pattern=names.DNS1123_SUBDOMAIN_PATTERN,
        max_length=253,
        description="Kueue LocalQueue; the Job is created suspended and admitted by Kueue.",
    )


# --- FineTuneJob ------------------------------------------------------------------------------


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, and where the versions go."""

    model: ModelSpec = Field(description="Model name and base model.")
    data: DataSpec = Field(description="Training and evaluation data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="LoRA, QLoRA or full fine-tuning.")
    distillation: DistillationSpec | None = Field(
        default=None,
        description="Knowledge distillation: also learn the teacher model's token distributions.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    stages: list[StageSpec] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Stages trained in order before the job's own training, e.g. general data, then domain "
            "data; spec.data and spec.training form the last stage, whose result is the job's version. "
            "Each stage continues from the previous one's weights (the same adapter) and is "
            "checkpointed on its own, so a restarted job resumes inside the stage it was in."
        ),
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Nodes, GPUs and strategy."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Pod resources and placement."
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Metrics and gates.")
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec, description="Quantized variants."
    )
    output: OutputSpec = Field(description="Where versions are published.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object-store connection.")
    tracking: TrackingSpec | None = Field(default=None, description="Experiment tracking (MLflow).")
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Retries, deadlines, suspend, Kueue."
    )
    image: str | None = Field(
        default=None, max_length=1024, description="Trainer image override (the operator may restrict it)."
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> FineTuneJobSpec:
        problems = check_spec(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(description="Ready, Succeeded, Failed, Invalid, Suspended, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The spec generation this condition is about."
    )


class Progress(ApiModel):
    """Training progress reported by the trainer (rank 0)."""

    stage: Stage | None = Field(default=None, description="Pipeline stage.")
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps planned.")
    percent: float = Field(default=0, ge=0, le=100, description="step / totalSteps in percent.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(
        default=None, description="Real (non-pad) tokens per second, all ranks."
    )
    eta_seconds: float | None = Field(default=None, description="Estimated seconds until training ends.")
    summary: str = Field(default="", description="Short text for the Progress column, e.g. '120/400 (30%)'.")
    updated_at: str | None = Field(default=None, description="When the trainer last reported (RFC 3339).")


class GateResult(ApiModel):
    """One gate's outcome."""

    metric: str = Field(description="Metric name.")
    value: float | None = Field(
        default=None, description="Measured value (absent when the metric is missing)."
    )
    min: float | None = Field(default=None, description="Lower bound.")
    max: float | None = Field(default=None, description="Upper bound.")
    passed: bool = Field(description="Whether the gate passed.")
    message: str = Field(default="", description="Why it failed.")


class GatesStatus(ApiModel):
    """All gates of a version."""

    passed: bool = Field(description="True when every gate passed (or there are none).")
    summary: str = Field(default="", description="'passed', 'none' or 'failed 1/3'.")
    results: list[GateResult] = Field(default_factory=list, description="Per-gate outcomes.")


class VersionRef(ApiModel):
    """The published (or reused) model version."""

    name: str = Field(description="Version name, e.g. v3.", pattern=names.VERSION_PATTERN)
    uri: str = Field(description="Version folder in object storage.")
    manifest_digest: str = Field(description="sha256 of manifest.json.")
    reused: bool = Field(
        default=False, description="True when an existing version with the same inputs was reused."
    )


class GenerationRecord(ApiModel):
    """What one attempt (a spec generation, or several differing only in suspend) ended as."""

    generation: int = Field(ge=1, description="The spec generation this record is about.")
    job_name: str | None = Field(default=None, description="The batch/v1 Job of the attempt, if any.")
    phase: str = Field(description="Succeeded, Failed, or Superseded (replaced by a newer generation).")
    reason: str | None = Field(default=None, description="Why (CamelCase).")
    version: str | None = Field(default=None, description="The version it published or reused.")
    completion_time: str | None = Field(default=None, description="When it ended (RFC 3339).")


class PlanStatus(ApiModel):
    """The pre-flight plan's verdict, reported by the trainer before any weight is downloaded."""

    generation: int | None = Field(default=None, description="The spec generation it was computed for.")
    fits: bool | None = Field(
        default=None, description="True: fits; False: will not fit; unset: no memory bound to check against."
    )
    peak_bytes_per_device: int | None = Field(
        default=None, ge=0, description="Estimated peak memory per GPU (or process on CPU)."
    )
    capacity_bytes: int | None = Field(default=None, ge=0, description="The memory it was checked against.")
    total_steps: int | None = Field(default=None, ge=0, description="Estimated optimizer steps.")
    tokens_per_epoch: int | None = Field(
        default=None, ge=0, description="Estimated training tokens per epoch."
    )
    estimated_seconds: float | None = Field(default=None, ge=0, description="Estimated training time.")
    summary: str = Field(
        default="", max_length=1000, description="One line: estimate, bound, verdict, suggestion."
    )


class TrialReport(ApiModel):
    """A sweep trial's reports (a child FineTuneJob of a FineTuneSweep): what the sweep's pruner reads."""

    number: int = Field(ge=0, description="Trial number, from 0.")
    inputs_digest: str | None = Field(default=None, description="The trial's inputs digest.")
    intermediate: dict[str, float] = Field(
        default_factory=dict,
        max_length=1000,
        description="eval_loss by optimizer step (the step as a string key), every evaluation so far.",
    )


class FineTuneJobStatus(ApiModel):
    """What the operator and the trainer observed."""

    phase: Phase | None = Field(
        default=None, description="Pending, Queued, Suspended, Running, Succeeded or Failed."
    )
    stage: Stage | None = Field(default=None, description="Stage while Running.")
    reason: str | None = Field(default=None, description="Why the run is in this phase (CamelCase).")
    message: str | None = Field(default=None, description="What a user can do about it.")
    observed_generation: int | None = Field(default=None, description="Spec generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    trial: TrialReport | None = Field(
        default=None, description="A sweep trial's intermediate eval_loss reports (its trainer writes them)."
    )
    plan: PlanStatus | None = Field(
        default=None, description="The pre-flight plan: estimated memory and time."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Evaluation metrics of the tuned model."
    )
    gates: GatesStatus | None = Field(default=None, description="Gate results.")
    version: VersionRef | None = Field(default=None, description="The version this generation produced.")
    restarts: int = Field(default=0, ge=0, description="Trainer pod restarts.")
    resumed_from_step: int | None = Field(
        default=None, description="Checkpoint step the current attempt resumed from."
    )
    start_time: str | None = Field(default=None, description="When training pods were first created.")
    completion_time: str | None = Field(default=None, description="When the run finished.")
    job_name: str | None = Field(default=None, description="The batch/v1 Job running this generation.")
    attempt_generation: int | None = Field(
        default=None, description="The spec generation that started the current attempt (its Job)."
    )
    attempt_fingerprint: str | None = Field(
        default=None,
        description=(
            "Fingerprint of the spec the current attempt trains (suspend left out), as this operator "
            "reads it; re-recorded when an upgrade only changes defaults."
        ),
    )
    history: list[GenerationRecord] = Field(
        default_factory=list,
        description="What each earlier attempt ended as, oldest first (the last 20).",
    )


class ObjectMeta(BaseModel):
    """The subset of Kubernetes metadata kubetune reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow")

    # Validated as the API server would: `kubetune run` builds its work directory from the name, so
    # a name like '../../x' must never get that far.
    name: str | None = Field(
        default=None,
        description="Object name (a DNS-1123 subdomain).",
        pattern=names.DNS1123_SUBDOMAIN_PATTERN,
        max_length=253,
    )
    namespace: str | None = Field(
        default=None,
        description="Namespace (a DNS-1123 label).",
        pattern=names.DNS1123_LABEL_PATTERN,
        max_length=63,
    )
    uid: str | None = Field(default=None, description="UID.")
    generation: int | None = Field(default=None, description="Spec generation.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


class FineTuneJob(ApiModel):
    """A supervised fine-tuning run. Every spec generation becomes exactly one model version."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default="kubetune.io/v1alpha1", description="API version."
    )
    kind: Literal["FineTuneJob"] = Field(default="FineTuneJob", description="Kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="What to fine-tune and how.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")


# --- ModelVersion -----------------------------------------------------------------------------


class SourceJobRef(ApiModel):
    """The FineTuneJob generation that produced a version."""

    name: str = Field(description="FineTuneJob name.")
    namespace: str = Field(description="FineTuneJob namespace.")
    uid: str | None = Field(default=None, description="FineTuneJob UID.")
    generation: int | None = Field(default=None, description="Spec generation.")


class ModelVersionSpec(ApiModel):
    """An immutable record of a published version (the cluster's model catalogue)."""

    model: str = Field(
        description="Model name.", pattern=names.NAME_PATTERN, max_length=names.NAME_MAX_LENGTH
    )
    version: str = Field(description="Version name.", pattern=names.VERSION_PATTERN)
    uri: str = Field(description="Version folder in object storage.")
    manifest_digest: str = Field(description="sha256 of manifest.json: verifies the whole version.")
    inputs_digest: str | None = Field(
        default=None, description="Digest of base model, data, config and trainer."
    )
    base: str = Field(description="Base model URI.")
    parent: str | None = Field(default=None, description="Parent version (modelversion://...) when chained.")
    method: str | None = Field(default=None, description="lora, qlora or full.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics.")
    key_metric: str = Field(default="", description="The headline metric, e.g. 'eval_loss=1.234'.")
    gates: GatesStatus | None = Field(default=None, description="Gate results.")
    quantized: list[str] = Field(default_factory=list, description="Quantized formats published.")
    source: SourceJobRef | None = Field(default=None, description="The FineTuneJob that produced it.")
    created: str | None = Field(default=None, description="When it was published (RFC 3339).")


class ModelVersion(ApiModel):
    """A published, immutable model version."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default="kubetune.io/v1alpha1", description="API version."
    )
    kind: Literal["ModelVersion"] = Field(default="ModelVersion", description="Kind.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: ModelVersionSpec = Field(description="The version record.")
