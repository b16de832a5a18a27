"""Cross-field rules of the FineTuneJob spec, written once for pydantic and for the API server.

Each :class:`Rule` carries a Python check (run by the pydantic model validator, by the operator
and by ``kubetune run``) and the equivalent CEL expression (emitted into the CRD as an
``x-kubernetes-validations`` entry at ``scope``), with one message naming the field. A unit test
evaluates every CEL expression with cel-python against the same valid and invalid specs as the
Python check, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune_api.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from kubetune_api.models import FineTuneJobSpec

_METRICS_CEL = "[" + ", ".join(f"'{m}'" for m in METRIC_NAMES) + "]"


@dataclass(frozen=True)
class Rule:
    """One cross-field rule.

    ``scope`` is the dotted path of the schema node the CEL rule is attached to (``self`` there);
    ``field`` is the spec path the message is about; ``ok`` returns True when the spec obeys it.
    """

    name: str
    scope: str
    field: str
    cel: str
    message: str
    ok: Callable[[FineTuneJobSpec], bool]


def _world_size(spec: FineTuneJobSpec) -> int:
    return spec.distributed.nodes * max(spec.distributed.gpus_per_node, 1)


RULES: tuple[Rule, ...] = (
    Rule(
        name="qlora-needs-gpu",
        scope="spec",
        field="spec.method.type",
        cel="!has(self.method) || !has(self.method.type) || self.method.type != 'qlora' || "
        "(has(self.distributed) && has(self.distributed.gpusPerNode) && self.distributed.gpusPerNode > 0)",
        message="qlora needs a GPU (4-bit bitsandbytes base): set distributed.gpusPerNode >= 1 or use method.type lora",
        ok=lambda s: s.method.type != "qlora" or s.distributed.gpus_per_node > 0,
    ),
    Rule(
        name="nf4-needs-gpu",
        scope="spec",
        field="spec.quantization.formats",
        cel="!has(self.quantization) || !has(self.quantization.formats) || !('nf4' in self.quantization.formats) || "
        "(has(self.distributed) && has(self.distributed.gpusPerNode) && self.distributed.gpusPerNode > 0)",
        message="nf4 quantization needs a GPU (bitsandbytes): set distributed.gpusPerNode >= 1 or drop nf4",
        ok=lambda s: "nf4" not in s.quantization.formats or s.distributed.gpus_per_node > 0,
    ),
    Rule(
        name="one-eval-source",
        scope="spec.data",
        field="spec.data.evalSplit",
        cel="!(has(self.eval) && has(self.evalSplit))",
        message="set either data.eval.uri or data.evalSplit, not both",
        ok=lambda s: not (s.data.eval is not None and s.data.eval_split is not None),
    ),
    Rule(
        name="multi-node-needs-strategy",
        scope="spec.distributed",
        field="spec.distributed.strategy",
        cel="(!has(self.nodes) || self.nodes == 1) || (has(self.strategy) && self.strategy != 'none')",
        message="nodes > 1 needs a distributed strategy: ddp, deepspeed-zero2 or deepspeed-zero3",
        ok=lambda s: s.distributed.nodes == 1 or s.distributed.strategy != "none",
    ),
    Rule(
        name="multi-gpu-needs-strategy",
        scope="spec.distributed",
        field="spec.distributed.strategy",
        cel="(!has(self.gpusPerNode) || self.gpusPerNode <= 1) || (has(self.strategy) && self.strategy != 'none')",
        message="gpusPerNode > 1 needs a distributed strategy: ddp, deepspeed-zero2 or deepspeed-zero3",
        ok=lambda s: s.distributed.gpus_per_node <= 1 or s.distributed.strategy != "none",
    ),
    Rule(
        name="gate-has-bound",
        scope="spec.evaluation.gates.*",
        field="spec.evaluation.gates",
        cel="has(self.min) || has(self.max)",
        message="every gate needs min or max",
        ok=lambda s: all(g.min is not None or g.max is not None for g in s.evaluation.gates.values()),
    ),
    Rule(
        name="gate-bounds-ordered",
        scope="spec.evaluation.gates.*",
        field="spec.evaluation.gates",
        cel="!has(self.min) || !has(self.max) || self.min <= self.max",
        message="a gate's min must not exceed its max",
        ok=lambda s: all(
            g.min is None or g.max is None or g.min <= g.max for g in s.evaluation.gates.values()
        ),
    ),
    Rule(
        name="gates-name-known-metrics",
        scope="spec.evaluation",
        field="spec.evaluation.gates",
        cel="!has(self.gates) || self.gates.all(k, k in " + _METRICS_CEL + ")",
        message="gates must name known metrics: " + ", ".join(METRIC_NAMES),
        ok=lambda s: all(k in METRIC_NAMES for k in s.evaluation.gates),
    ),
    Rule(
        name="checkpoint-cadence",
        scope="spec.training.checkpoint",
        field="spec.training.checkpoint",
        cel="has(self.everySteps) || has(self.everyMinutes)",
        message="set checkpoint.everySteps or checkpoint.everyMinutes (or both)",
        ok=lambda s: s.training.checkpoint.every_steps is not None
        or s.training.checkpoint.every_minutes is not None,
    ),
    Rule(
        name="ia3-feedforward-in-targets",
        scope="spec.method.ia3",
        field="spec.method.ia3.feedforwardModules",
        cel="!has(self.feedforwardModules) || "
        "(has(self.targetModules) && self.feedforwardModules.all(m, m in self.targetModules))",
        message="feedforwardModules must be a subset of targetModules (set both, or neither for peft's defaults)",
        ok=lambda s: s.method.ia3.feedforward_modules is None
        or (
            s.method.ia3.target_modules is not None
            and set(s.method.ia3.feedforward_modules) <= set(s.method.ia3.target_modules)
        ),
    ),
    Rule(
        name="curriculum-field-named",
        scope="spec.data.curriculum",
        field="spec.data.curriculum.difficultyField",
        cel="!has(self.order) || self.order != 'field' || has(self.difficultyField)",
        message="curriculum order field needs difficultyField (the record field holding the difficulty)",
        ok=lambda s: s.data.curriculum.order != "field" or s.data.curriculum.difficulty_field is not None,
    ),
    Rule(
        name="augmentation-has-a-transform",
        scope="spec.data.augmentation",
        field="spec.data.augmentation",
        cel="has(self.synonyms) || (has(self.sentenceTransforms) && self.sentenceTransforms) || "
        "(has(self.ocrNoise) && self.ocrNoise > 0.0)",
        message="augmentation needs at least one of synonyms, sentenceTransforms: true or ocrNoise > 0",
        ok=lambda s: s.data.augmentation is None
        or s.data.augmentation.synonyms is not None
        or s.data.augmentation.sentence_transforms
        or s.data.augmentation.ocr_noise > 0,
    ),
)


def check_spec(spec: FineTuneJobSpec) -> list[str]:
    """Messages for every rule the spec breaks, each starting with the field path."""
    return [f"{r.field}: {r.message}" for r in RULES if not r.ok(spec)]


def world_size(spec: FineTuneJobSpec) -> int:
    """Training processes in total (CPU jobs run one process per node)."""
    return _world_size(spec)
