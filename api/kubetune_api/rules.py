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

from kubetune_api.metrics import METRIC_NAMES, PAIRED_METRICS

# The checks read the spec by attribute (a FineTuneJobSpec / DataSpec of kubetune_api.models); they
# are typed as Any so this module imports nothing from models, which imports it to run them.
FineTuneJobSpec = Any
DataSpec = Any

#: What a gate key may name besides the tuned model: the merged model and the quantized formats
#: (``spec.quantization.formats``, kubetune_api.models.QuantFormat) — the artifacts a version ships.
GATE_ARTIFACTS: tuple[str, ...] = (
    "merged",
    "int8",
    "int4",
    "onnx-int8",
    "nf4",
    "gguf-f16",
    "gguf-q8_0",
    "gguf-q4_k_m",
)
#: Every valid key of ``spec.evaluation.gates``: ``<metric>`` or ``<artifact>.<metric>``.
GATE_KEYS: tuple[str, ...] = METRIC_NAMES + tuple(f"{a}.{m}" for a in GATE_ARTIFACTS for m in METRIC_NAMES)


def split_gate_key(key: str) -> tuple[str | None, str]:
    """``"int8.rouge_l"`` -> ``("int8", "rouge_l")``; ``"rouge_l"`` -> ``(None, "rouge_l")`` (the tuned
    model). Metric and artifact names hold no dot, so the first dot separates them."""
    artifact, dot, metric = key.partition(".")
    return (artifact, metric) if dot else (None, key)


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _merged_ships(spec: FineTuneJobSpec) -> bool:
    """A version holds merged/ when output.merge is on, and always for full fine-tuning."""
    return spec.method.type == "full" or spec.output.merge


def _unshipped_artifact_gates(spec: FineTuneJobSpec) -> list[str]:
    problems = []
    formats = list(spec.quantization.formats)
    for key in spec.evaluation.gates:
        artifact, _ = split_gate_key(key)
        if artifact is None or artifact not in GATE_ARTIFACTS:
            continue
        if artifact == "merged" and not _merged_ships(spec):
            problems.append(
                f"{key}: the merged model is not published (spec.output.merge is false); "
                "set output.merge: true or gate a quantized format"
            )
        elif artifact != "merged" and artifact not in formats:
            problems.append(
                f"{key}: artifact {artifact} is not in spec.quantization.formats "
                f"({', '.join(formats) or 'empty'}); "
                f"add {artifact} there or remove the gate"
            )
    return problems


_ARTIFACT_SHIPPED_CEL = (
    "!has(self.evaluation) || !has(self.evaluation.gates) || self.evaluation.gates.all(k, "
    "!k.contains('.') || "
    "(k.startsWith('merged.') && ((has(self.method) && has(self.method.type) && self.method.type == 'full') "
    "|| !has(self.output.merge) || self.output.merge)) || "
    "(has(self.quantization) && has(self.quantization.formats) && "
    "self.quantization.formats.exists(f, k.startsWith(f + '.'))))"
)


@dataclass(frozen=True)
class Rule:
    """One cross-field rule.

    ``scope`` is the dotted path of the schema node the CEL rule is attached to (``self`` there);
    ``field`` is the spec path the message is about; ``ok`` returns True when the spec obeys it;
    ``explain``, when set, gives the specific messages for a spec that breaks it.
    """

    name: str
    scope: str
    field: str
    cel: str
    message: str
    ok: Callable[[FineTuneJobSpec], bool]
    #: Messages naming exactly what is wrong (e.g. which gate key), for pydantic; CEL messages are
    #: static, so the API server shows ``message``.
    explain: Callable[[FineTuneJobSpec], list[str]] | None = None


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
        cel="has(self.min) || has(self.max) || has(self.maxDropVsTuned) || "
        "(has(self.significant) && self.significant)",
        message="every gate needs min, max or significant: true (or, on an artifact, maxDropVsTuned)",
        ok=lambda s: all(
            g.min is not None or g.max is not None or g.max_drop_vs_tuned is not None or g.significant
            for g in s.evaluation.gates.values()
        ),
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
        cel="!has(self.gates) || self.gates.all(k, k in " + _cel_list(GATE_KEYS) + ")",
        message="gates must name a known metric (the tuned model) or <artifact>.<metric> (artifact: "
        + ", ".join(GATE_ARTIFACTS)
        + "); metrics: "
        + ", ".join(METRIC_NAMES),
        ok=lambda s: all(k in GATE_KEYS for k in s.evaluation.gates),
        explain=lambda s: [
            f"unknown gate {k!r}: name a metric ({', '.join(METRIC_NAMES)}) or <artifact>.<metric> "
            f"with artifact one of {', '.join(GATE_ARTIFACTS)}"
            for k in s.evaluation.gates
            if k not in GATE_KEYS
        ],
    ),
    Rule(
        name="gate-artifact-is-published",
        scope="spec",
        field="spec.evaluation.gates",
        cel=_ARTIFACT_SHIPPED_CEL,
        message="a gate <artifact>.<metric> needs that artifact in the version: a format listed in "
        "spec.quantization.formats, or merged with output.merge true",
        ok=lambda s: not _unshipped_artifact_gates(s),
        explain=_unshipped_artifact_gates,
    ),
    Rule(
        name="gate-drop-is-on-an-artifact",
        scope="spec.evaluation",
        field="spec.evaluation.gates",
        cel="!has(self.gates) || self.gates.all(k, k.contains('.') || !has(self.gates[k].maxDropVsTuned))",
        message="maxDropVsTuned compares an artifact with the tuned model: use it on <artifact>.<metric> gates only",
        ok=lambda s: all(
            split_gate_key(k)[0] is not None or g.max_drop_vs_tuned is None
            for k, g in s.evaluation.gates.items()
        ),
        explain=lambda s: [
            f"{k}: maxDropVsTuned compares an artifact with the tuned model; use it on a gate such "
            f"as int8.{k}, or set min/max"
            for k, g in s.evaluation.gates.items()
            if split_gate_key(k)[0] is None and g.max_drop_vs_tuned is not None
        ],
    ),
    Rule(
        name="gate-significant-is-paired",
        scope="spec.evaluation",
        field="spec.evaluation.gates",
        cel="!has(self.gates) || self.gates.all(k, !has(self.gates[k].significant) || "
        "!self.gates[k].significant || k in " + _cel_list(PAIRED_METRICS) + ")",
        message="significant: true needs a gate on the tuned model (no <artifact>. prefix) for a metric "
        "with per-example scores: " + ", ".join(PAIRED_METRICS),
        ok=lambda s: all(not g.significant or k in PAIRED_METRICS for k, g in s.evaluation.gates.items()),
        explain=lambda s: [
            f"{k}: significant: true needs a tuned-model gate on one of {', '.join(PAIRED_METRICS)} "
            "(a paired interval of tuned - base exists only for those)"
            for k, g in s.evaluation.gates.items()
            if g.significant and k not in PAIRED_METRICS
        ],
    ),
    Rule(
        name="gate-significant-needs-base",
        scope="spec.evaluation",
        field="spec.evaluation.compareBase",
        cel="!has(self.compareBase) || self.compareBase || !has(self.gates) || "
        "self.gates.all(k, !has(self.gates[k].significant) || !self.gates[k].significant)",
        message="a significant: true gate compares the tuned model with its base: compareBase must not be false",
        ok=lambda s: s.evaluation.compare_base or not any(g.significant for g in s.evaluation.gates.values()),
    ),
    Rule(
        name="terminology-needs-glossary",
        scope="spec.evaluation",
        field="spec.evaluation.glossary",
        cel="has(self.glossary) || ((!has(self.metrics) || !('terminology_coverage' in self.metrics)) && "
        "(!has(self.gates) || self.gates.all(k, !k.endsWith('terminology_coverage'))))",
        message="terminology_coverage needs a domain glossary: set evaluation.glossary.uri",
        ok=lambda s: s.evaluation.glossary is not None
        or (
            "terminology_coverage" not in s.evaluation.metrics
            and not any(k.endswith("terminology_coverage") for k in s.evaluation.gates)
        ),
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
    problems: list[str] = []
    for r in RULES:
        if not r.ok(spec):
            details = r.explain(spec) if r.explain is not None else []
            problems += [f"{r.field}: {d}" for d in details] or [f"{r.field}: {r.message}"]
    return problems


def world_size(spec: FineTuneJobSpec) -> int:
    """Training processes in total (CPU jobs run one process per node)."""
    return _world_size(spec)
