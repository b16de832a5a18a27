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
from typing import Any

from kubetune_api.metrics import METRIC_NAMES

# The checks read the spec by attribute (a FineTuneJobSpec / DataSpec of kubetune_api.models); they
# are typed as Any so this module imports nothing from models, which imports it to run them.
FineTuneJobSpec = Any
DataSpec = Any

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


_SPEC_RULES: tuple[Rule, ...] = (
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
)

# Rules of a data section: they hold for spec.data and for every stage's data alike.
_DATA_RULES: tuple[tuple[str, str, str, str, str, Callable[[DataSpec], bool]], ...] = (
    (
        "one-eval-source",
        "",
        "evalSplit",
        "!(has(self.eval) && has(self.evalSplit))",
        "set either data.eval.uri or data.evalSplit, not both",
        lambda d: not (d.eval is not None and d.eval_split is not None),
    ),
    (
        "curriculum-field-named",
        "curriculum",
        "curriculum.difficultyField",
        "!has(self.order) || self.order != 'field' || has(self.difficultyField)",
        "curriculum order field needs difficultyField (the record field holding the difficulty)",
        lambda d: d.curriculum.order != "field" or d.curriculum.difficulty_field is not None,
    ),
    (
        "augmentation-has-a-transform",
        "augmentation",
        "augmentation",
        "has(self.synonyms) || (has(self.sentenceTransforms) && self.sentenceTransforms) || "
        "(has(self.ocrNoise) && self.ocrNoise > 0.0)",
        "augmentation needs at least one of synonyms, sentenceTransforms: true or ocrNoise > 0",
        lambda d: d.augmentation is None
        or d.augmentation.synonyms is not None
        or d.augmentation.sentence_transforms
        or d.augmentation.ocr_noise > 0,
    ),
)


def _data_rules() -> tuple[Rule, ...]:
    out: list[Rule] = []
    for name, node, path, cel, message, ok in _DATA_RULES:
        suffix = f".{node}" if node else ""
        out.append(
            Rule(
                name=name,
                scope=f"spec.data{suffix}",
                field=f"spec.data.{path}",
                cel=cel,
                message=message,
                ok=lambda s, ok=ok: ok(s.data),  # type: ignore[misc]
            )
        )
        out.append(
            Rule(
                name=f"{name}-stages",
                scope=f"spec.stages.[].data{suffix}",
                field=f"spec.stages[].data.{path}",
                cel=cel,
                message=message,
                ok=lambda s, ok=ok: all(ok(st.data) for st in s.stages),  # type: ignore[misc]
            )
        )
    return tuple(out)


_STAGE_RULES: tuple[Rule, ...] = (
    Rule(
        name="stage-names-unique",
        scope="spec.stages",
        field="spec.stages",
        cel="self.all(a, self.exists_one(b, b.name == a.name))",
        message="stage names must be unique",
        ok=lambda s: len({st.name for st in s.stages}) == len(s.stages),
    ),
    Rule(
        name="stage-model-name-fits",
        scope="spec",
        field="spec.stages",
        cel="!has(self.stages) || self.stages.all(st, size(self.model.name) + size(st.name) < 63)",
        message="a published stage is the model <model.name>-<stage name>: keep both together under 63 characters",
        ok=lambda s: all(len(s.model.name) + len(st.name) < 63 for st in s.stages),
    ),
)

RULES: tuple[Rule, ...] = _SPEC_RULES + _data_rules() + _STAGE_RULES
"""Every rule, in the order check_spec reports them."""


def check_spec(spec: FineTuneJobSpec) -> list[str]:
    """Messages for every rule the spec breaks, each starting with the field path."""
    return [f"{r.field}: {r.message}" for r in RULES if not r.ok(spec)]


def world_size(spec: FineTuneJobSpec) -> int:
    """Training processes in total (CPU jobs run one process per node)."""
    return _world_size(spec)
