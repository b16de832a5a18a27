"""What a model version tells its users: eval/report.json, eval/samples.jsonl, the loss curve, README.md.

``report.json`` layout (``schema_version`` 1)::

    {"schema_version": 1,
     "passed": bool,                      # all gates passed (the version is promotable)
     "evaluation": EvalReport.to_dict(),  # tuned/base metrics, paired CIs, extra sets, skipped, memory, settings
     "gates": GateReport.to_dict(),       # <artifact>.<metric> gates included
     "artifacts": [ArtifactReport.to_dict(), ...],  # quantization: size, drift, smoke test, memory
     "artifact_evaluations": [ArtifactEvaluation.to_dict(), ...]}  # merged + formats on the eval set

``samples.jsonl``: one ``SampleRow`` per line: ``{"set", "prompt", "reference", "tuned", "base"}``.

matplotlib is imported inside the plotting functions with the non-interactive Agg backend: it
takes 2 s and 54 MB to import (measured), which the pipeline, importing this module before training,
would otherwise spend up front for plots drawn at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api.rules import split_gate_key
from kubetune_trainer.artifacts.quantize import ArtifactReport
from kubetune_trainer.evaluate.evaluator import ALL_METRICS, ArtifactEvaluation, EvalReport
from kubetune_trainer.evaluate.gates import GateReport
from kubetune_trainer.evaluate.quality import is_default_gate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "loss_figure",
    "plot_loss",
    "render_model_card",
    "write_eval_report",
]

REPORT_SCHEMA_VERSION = 1


def write_eval_report(
    eval_dir: Path,
    report: EvalReport,
    gates: GateReport,
    artifacts: Sequence[ArtifactReport],
    *,
    artifact_evaluations: Sequence[ArtifactEvaluation] = (),
) -> None:
    """Write ``eval_dir/report.json`` and ``eval_dir/samples.jsonl`` (creating ``eval_dir``).

    Raises:
        ValueError: a value is not JSON-representable (NaN/inf that escaped the reports' cleaning).
    """
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "passed": gates.passed,
        "evaluation": report.to_dict(),
        "gates": gates.to_dict(),
        "artifacts": [a.to_dict() for a in artifacts],
        "artifact_evaluations": [e.to_dict() for e in artifact_evaluations],
    }
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers (jq, Go, JS).
    (eval_dir / "report.json").write_text(
        json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    with (eval_dir / "samples.jsonl").open("w", encoding="utf-8") as fh:
        for row in report.samples:
            fh.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Loss curve


def _read_metrics(metrics_jsonl: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    train: list[tuple[float, float]] = []
    evals: list[tuple[float, float]] = []
    with Path(metrics_jsonl).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{metrics_jsonl}:{lineno}: not valid JSON: {exc}") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{metrics_jsonl}:{lineno}: expected an object with a 'step' field")
            if record.get("loss") is not None:
                train.append((float(record["step"]), float(record["loss"])))
            if record.get("eval_loss") is not None:
                evals.append((float(record["step"]), float(record["eval_loss"])))
    return train, evals


def loss_figure(metrics_jsonl: Path) -> Figure:
    """A figure with the train loss (``loss``) and eval loss (``eval_loss``) against ``step``.

    Lines of ``metrics.jsonl`` with neither field are ignored (e.g. throughput records). A series
    with a single point is drawn with a marker so it is visible.

    Raises:
        ValueError: a line is not a JSON object with ``step`` (message: ``path:line: ...``), or the
            file has no loss at all.
    """
    from matplotlib.figure import Figure  # deferred: 2 s to import (see the module docstring)

    train, evals = _read_metrics(metrics_jsonl)
    if not train and not evals:
        raise ValueError(f"{metrics_jsonl}: no 'loss' or 'eval_loss' records to plot")
    # Figure() directly (not pyplot): no global state, no GUI backend, safe in threads.
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_loss(metrics_jsonl: Path, out_png: Path) -> None:
    """Render :func:`loss_figure` to a PNG at ``out_png`` (parent directories created).

    Raises:
        ValueError: as :func:`loss_figure`.
    """
    import matplotlib  # deferred: 2 s to import (see the module docstring)

    matplotlib.use("Agg")
    fig = loss_figure(metrics_jsonl)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")


# --------------------------------------------------------------------------------------------------
# Model card


def _cell(value: Any) -> str:
    """A Markdown table cell: numbers to 4 significant digits, pipes escaped, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _is_significance(message: str) -> bool:
    """Whether a gate message came from a ``significant: true`` gate (gates.significance_verdict)."""
    return "% CI [" in message or "no paired confidence interval" in message


def _requirement(lo: float | None, hi: float | None, *, significant: bool = False) -> str:
    parts = ([f">= {lo:g}"] if lo is not None else []) + ([f"<= {hi:g}"] if hi is not None else [])
    if significant:
        parts.append("better than base (paired CI excludes 0)")
    return " and ".join(parts) or "(no bound)"


#: The folder, next to the version's own folders, where the card's snippets expect the base model.
BASE_MODEL_DIR = "base-model"

#: The message every snippet on the card sends (a plain user turn, rendered by the chat template).
_EXAMPLE_MESSAGES = '[{"role": "user", "content": "Hello"}]'


def _base_copy_command(base_model: str) -> str:
    """A shell command that copies the base model into ``BASE_MODEL_DIR`` (by URI scheme)."""
    if base_model.startswith("hf://"):
        repo, _, revision = base_model.removeprefix("hf://").partition("@")
        return (
            f"hf download {repo}"
            + (f" --revision {revision}" if revision else "")
            + f" --local-dir {BASE_MODEL_DIR}"
        )
    if base_model.startswith("file://"):
        return f"cp -r {base_model.removeprefix('file://')} {BASE_MODEL_DIR}"
    if base_model.startswith("modelversion://"):
        name, _, ref = base_model.removeprefix("modelversion://").partition("/")
        return (
            f"aws s3 sync <URI of {name} {ref}>/merged {BASE_MODEL_DIR}/   "
            f"# kubetune versions show --output <output.uri> --model {name} {ref} prints the URI"
        )
    return f"aws s3 sync {base_model} {BASE_MODEL_DIR}/"


def _chat_prompt_lines(tokenizer_dir: str, *, tensors: str) -> list[str]:
    """Snippet lines: the tokenizer and the example prompt rendered by the version's chat template."""
    return [
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_dir}")',
        "# The chat template the model was trained with; add_generation_prompt opens the answer.",
        "inputs = tokenizer.apply_chat_template(",
        f"    {_EXAMPLE_MESSAGES},",
        f'    add_generation_prompt=True, return_dict=True, return_tensors="{tensors}"',
        ")",
    ]


def _generate_lines(generation_config_dir: str) -> list[str]:
    """Snippet lines: greedy generation that stops on every id in the folder's generation_config."""
    return [
        "# generation_config.json lists every id that ends an answer (EOS and the end-of-turn token).",
        f'generation = GenerationConfig.from_pretrained("{generation_config_dir}")',
        "out = model.generate(**inputs, generation_config=generation, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
    ]


def _gate_artifact(gate: str) -> str | None:
    """The artifact a gate judges (``int8`` for ``int8.rouge_l``), None for the tuned model."""
    return None if is_default_gate(gate) else split_gate_key(gate)[0]


def _gate_source(gate: str) -> str:
    artifact = _gate_artifact(gate)
    return "spec" if artifact is None else f"spec, on {artifact}"


def _vs_tuned(value: float | None, tuned: float | None) -> str:
    """An artifact's value with its relative change from the tuned model's, e.g. ``0.84 (-1.2%)``."""
    if value is None:
        return "—"
    cell = _cell(value)
    if tuned is not None and math.isfinite(tuned) and math.isfinite(value) and tuned != 0:
        cell += f" ({(value - tuned) / abs(tuned):+.1%})"
    return cell


def _artifact_evaluation_section(report: EvalReport, evaluations: Sequence[ArtifactEvaluation]) -> list[str]:
    """The table of every published artifact beside the tuned model, on the same eval set."""
    keys = set().union(*(e.metrics for e in evaluations))
    names = [m for m in ALL_METRICS if m in keys] + sorted(keys - set(ALL_METRICS))
    header = ["Metric", "Tuned"] + [f"`{e.artifact}`" for e in evaluations]
    rows = [
        [name, report.tuned.get(name)]
        + [_vs_tuned(e.metrics.get(name), e.tuned_reference(report.tuned).get(name)) for e in evaluations]
        for name in names
    ]
    fewer = [e for e in evaluations if e.tuned_on_same]
    lines = [
        "### What ships, on the same eval set",
        "",
        "Each published artifact, reloaded from its folder, scored like the tuned model: eval_loss and "
        "perplexity over every eval example, generation metrics and latency (batch 1, "
        "`spec.evaluation.maxNewTokens`) on the same first `spec.evaluation.maxSamples` examples with "
        "the same seed. In brackets: the change from the tuned model. Folders: "
        + ", ".join(f"`{e.artifact}` = `{e.path}/`" for e in evaluations)
        + "."
        + (
            " peak_memory_ratio of a quantized format is against the merged full-precision model, the "
            "merged model's against the base."
            if "peak_memory_ratio" in keys
            else ""
        ),
        "",
        _table(header, rows),
        "",
    ]
    if fewer:
        n = fewer[0].settings.get("generation_examples")
        lines += [
            "`spec.evaluation.artifactMaxSamples`: the generation metrics of "
            + ", ".join(f"`{e.artifact}`" for e in fewer)
            + f" are on the first {n} of the tuned model's "
            f"{fewer[0].settings.get('tuned_generation_examples')} answered examples, and the change in "
            "brackets is against the tuned model's own answers to those same examples.",
            "",
        ]
    skipped = [f"`{e.artifact}.{k}` ({v})" for e in evaluations for k, v in e.skipped.items()]
    if skipped:
        lines += ["Not computed: " + "; ".join(skipped) + ".", ""]
    return lines


def _onnx_howto(quantized_root: str) -> list[str]:
    onnx_dir = f"{quantized_root}/onnx-int8"
    return [
        f"The ONNX model (`{onnx_dir}/model.onnx`, int8 weights) with onnxruntime. The graph takes "
        "`input_ids` and `attention_mask` (int64, [batch, sequence]) and returns `logits`; it has no KV "
        "cache, so decode by feeding the whole sequence each step. `kubetune-onnx.json` beside it lists "
        "`stop_token_ids`: the answer ends at the first of them (EOS or the chat template's end-of-turn "
        "token), not only at EOS:",
        "",
        "```python",
        "import json",
        "",
        "import numpy as np",
        "import onnxruntime as ort",
        "from transformers import AutoTokenizer",
        "",
        f'session = ort.InferenceSession("{onnx_dir}/model.onnx", providers=["CPUExecutionProvider"])',
        f'stop_ids = set(json.load(open("{onnx_dir}/kubetune-onnx.json"))["stop_token_ids"])',
        *_chat_prompt_lines(onnx_dir, tensors="np"),
        'ids = inputs["input_ids"].astype(np.int64)',
        "prompt_length = ids.shape[1]",
        "for _ in range(64):",
        '    (logits,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})',
        "    next_id = int(logits[0, -1].argmax())",
        "    if next_id in stop_ids:",
        "        break",
        "    ids = np.concatenate([ids, [[next_id]]], axis=1)",
        "print(tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True))",
        "```",
        "",
    ]


def render_model_card(
    *,
    model_name: str,
    version: str,
    base_model: str,
    data_digests: Mapping[str, str],
    hyperparameters: Mapping[str, Any],
    report: EvalReport,
    gates: GateReport,
    artifacts: Sequence[ArtifactReport],
    artifact_evaluations: Sequence[ArtifactEvaluation] = (),
    adapter_path: str = "adapter",
    merged_path: str = "merged",
    quantized_root: str = "quantized",
    base_model_digest: str | None = None,
    lora_rank: int | None = None,
    vllm_lora: bool = True,
) -> str:
    """The version's ``README.md``: what it is, how good, how big and fast, and how to load it.

    Args:
        model_name, version: the ModelVersion's identity (e.g. ``support-bot``, ``v3``).
        base_model: the base model URI as the user wrote it (``hf://org/name@rev``, ``s3://...``).
        data_digests: data name (``train``, ``eval``, extra sets) -> content digest.
        hyperparameters: resolved training settings worth reading (method, r, alpha, lr, epochs...).
        artifact_evaluations: each published artifact (merged, quantized formats) on the eval set,
            shown next to the tuned model.
        adapter_path, merged_path, quantized_root: paths inside the version directory.
        lora_rank: shown in the vLLM example (``--max-lora-rank`` must be at least this).
        vllm_lora: the adapter is one vLLM's LoRA path serves (plain LoRA or rsLoRA); otherwise
            (full fine-tuning, IA3, DoRA) the card shows serving the merged model instead.

    Returns:
        Markdown with a YAML front matter block (``base_model``, ``library_name``, ``tags``) as the
        Hugging Face Hub expects. Pure: no I/O.
    """
    out: list[str] = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: peft",
        "tags: [kubetune, lora, sft]",
        "---",
        "",
        f"# {model_name} {version}",
        "",
        f"Fine-tuned from `{base_model}` by kubetune. "
        + (
            "**All quality gates passed.**"
            if gates.passed and gates.results
            else "**No quality gate ran.**"
            if gates.passed
            else "**Quality gates FAILED: this version is not promotable.**"
        ),
        "",
        "## Base model and data",
        "",
        _table(
            ["Input", "Digest"],
            [("base model " + base_model, base_model_digest or "—")]
            + [(k, v) for k, v in data_digests.items()],
        ),
        "",
        "## Hyperparameters",
        "",
        _table(
            ["Setting", "Value"],
            [(k, json.dumps(v) if isinstance(v, dict | list) else v) for k, v in hyperparameters.items()],
        ),
        "",
        f"## Evaluation ({report.num_examples} examples)",
        "",
    ]
    names = [m for m in ALL_METRICS if m in report.tuned] + sorted(set(report.tuned) - set(ALL_METRICS))
    rows = []
    for name in names:
        base_value = report.base.get(name) if report.base else None
        tuned_value = report.tuned[name]
        delta = tuned_value - base_value if base_value is not None else None
        rows.append((name, base_value, tuned_value, delta))
    out += [_table(["Metric", "Base", "Tuned", "Δ"], rows), ""]
    if report.paired:
        from kubetune_trainer.evaluate.paired import paired_table  # deferred: rouge-score, sacrebleu

        out += [
            "### Is the gain real? Paired bootstrap on the same held-out examples",
            "",
            "Each interval resamples the held-out examples with replacement (the same examples for "
            "both models) and recomputes tuned - base; *significant* means the interval excludes 0. "
            "Per-example scores are in `eval/samples.jsonl`.",
            "",
            paired_table(report.paired),
            "",
        ]
    if report.skipped:
        out += ["Not computed: " + "; ".join(f"`{k}` ({v})" for k, v in report.skipped.items()) + ".", ""]
    if artifact_evaluations:
        out += _artifact_evaluation_section(report, artifact_evaluations)
    for set_name, sides in report.extra_sets.items():
        tuned_m = sides.get("tuned") or {}
        base_m = sides.get("base") or {}
        out += [
            f"Extra eval set `{set_name}`:",
            "",
            _table(["Metric", "Base", "Tuned"], [(k, base_m.get(k), v) for k, v in tuned_m.items()]),
            "",
        ]

    out += ["## Gates", ""]
    if gates.results:
        ran = len(gates.results)
        defaults = sum(is_default_gate(r.metric) for r in gates.results)
        out += [
            f"{ran} gate(s) ran: {ran - defaults} from `spec.evaluation.gates`, {defaults} default "
            "(the tuned model must beat its base; opt out with `spec.evaluation.requireImprovement: false`).",
            "",
        ]
        on_artifacts = sorted({a for r in gates.results if (a := _gate_artifact(r.metric)) is not None})
        if on_artifacts:
            out += [
                "Gates named `<artifact>.<metric>` judge that published artifact ("
                + ", ".join(f"`{a}`" for a in on_artifacts)
                + "), evaluated on the same eval set; the others judge the tuned model as evaluated "
                "(the adapter on its base; the trained weights for full fine-tuning).",
                "",
            ]
        out += [
            _table(
                ["Gate", "Source", "Requirement", "Value", "Result", "Detail"],
                [
                    (
                        r.metric,
                        "default" if is_default_gate(r.metric) else _gate_source(r.metric),
                        _requirement(r.min, r.max, significant=_is_significance(r.message)),
                        r.value,
                        "pass" if r.passed else "FAIL",
                        r.message,
                    )
                    for r in gates.results
                ],
            ),
            "",
        ]
    else:
        out += [
            "No gate ran: `spec.evaluation.gates` is empty and the default gates were opted out "
            "(`spec.evaluation.requireImprovement: false`), so nothing checked that this model is better "
            "than its base and `promote.when: gatesPassed` does not promote it.",
            "",
        ]

    out += ["## Quantized variants", ""]
    if artifacts:
        out += [
            _table(
                [
                    "Format",
                    "Path",
                    "Size",
                    "Size vs merged",
                    "Latency p50 (ms)",
                    "Latency p95 (ms)",
                    "Max logit drift",
                    "Peak memory vs full precision",
                ],
                [
                    (
                        a.format,
                        f"{quantized_root}/{a.path}/",
                        _size(a.size_bytes),
                        a.size_ratio,
                        a.latency_p50_ms,
                        a.latency_p95_ms,
                        a.logit_drift_max_abs,
                        a.peak_memory_ratio,
                    )
                    for a in artifacts
                ],
            ),
            "",
            "Latency: one greedy generate call per prompt, batch 1, on the trainer's hardware "
            f"({artifacts[0].device}). Logit drift: max |logit - full precision logit| on sample prompts.",
            "",
        ]
    else:
        out += ["None requested in `spec.quantization.formats`.", ""]

    # vLLM's default max_lora_rank is 16 and it accepts powers of two: round the rank up.
    vllm_rank = 1 << (lora_rank - 1).bit_length() if lora_rank and lora_rank > 16 else None
    rank_flag = f" --max-lora-rank {vllm_rank}" if vllm_rank else ""
    formats = {a.format for a in artifacts}
    out += [
        "## How to load",
        "",
        "Every Python snippet below runs as written (a test runs them, all but vLLM's, which needs a GPU) "
        "in a folder laid out like this:",
        "",
        "```text",
        f"./                this version's folder: {adapter_path}/, {merged_path}/, {quantized_root}/, README.md, ...",
        f"./{BASE_MODEL_DIR}/     the base model (only {adapter_path}/ needs it)",
        "```",
        "",
        "Copy this version there with `aws s3 sync <version URI> .` (`kubetune versions show --output "
        f"<the job's output.uri> --model {model_name} {version}` prints the URI; `kubetune versions verify` "
        f"checks the copy against the manifest), and the base model `{base_model}`"
        + (f" (digest `{base_model_digest}`)" if base_model_digest else "")
        + f" into `{BASE_MODEL_DIR}/`:",
        "",
        "```bash",
        _base_copy_command(base_model),
        "```",
        "",
        f"`{adapter_path}/adapter_config.json` names that base by its URI, and `{adapter_path}/kubetune-base.json` "
        "records its URI and digest. Each folder's tokenizer carries the chat template the model was trained "
        "with, and each `generation_config.json` lists the ids that end an answer.",
        "",
        f"The LoRA adapter (`{adapter_path}/`) on the base model, with peft:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{BASE_MODEL_DIR}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_path}")',
        *_chat_prompt_lines(adapter_path, tensors="pt"),
        *_generate_lines(adapter_path),
        "```",
        "",
        f"The merged model (`{merged_path}/`) with transformers, no peft needed:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{merged_path}")',
        *_chat_prompt_lines(merged_path, tensors="pt"),
        *_generate_lines(merged_path),
        "```",
        "",
    ]
    if formats & {"int8", "int4"}:
        fmt = "int8" if "int8" in formats else "int4"
        out += [
            f"The optimum-quanto {'/'.join(sorted(formats & {'int8', 'int4'}))} model "
            f"(`{quantized_root}/{fmt}/`):",
            "",
            "```python",
            "from optimum.quanto import QuantizedModelForCausalLM",
            "from transformers import AutoTokenizer, GenerationConfig",
            "",
            f'model = QuantizedModelForCausalLM.from_pretrained("{quantized_root}/{fmt}")',
            *_chat_prompt_lines(f"{quantized_root}/{fmt}", tensors="pt"),
            *_generate_lines(f"{quantized_root}/{fmt}"),
            "```",
            "",
        ]
    if "onnx-int8" in formats:
        out += _onnx_howto(quantized_root)
    if not vllm_lora:
        out += [
            "With vLLM, serve the merged model (vLLM's LoRA support takes plain LoRA adapters only):",
            "",
            "```bash",
            f"vllm serve {merged_path}",
            "```",
            "",
        ]
        return "\n".join(out)
    out += [
        "The adapter with vLLM's LoRA support, served (OpenAI-compatible API; request `model` = the "
        f"adapter's name; `--tokenizer {adapter_path}` for the chat template it was trained with):",
        "",
        "```bash",
        f"vllm serve {BASE_MODEL_DIR} --tokenizer {adapter_path} --enable-lora "
        f"--lora-modules {model_name}={adapter_path}{rank_flag}",
        "```",
        "",
        "or offline (not run by the test: vLLM needs a GPU):",
        "",
        "```python",
        "from transformers import GenerationConfig",
        "from vllm import LLM, SamplingParams",
        "from vllm.lora.request import LoRARequest",
        "",
        f'stop_ids = GenerationConfig.from_pretrained("{adapter_path}").eos_token_id',
        f'llm = LLM(model="{BASE_MODEL_DIR}", tokenizer="{adapter_path}", enable_lora=True'
        f"{f', max_lora_rank={vllm_rank}' if vllm_rank else ''})",
        "outputs = llm.chat(",
        f"    {_EXAMPLE_MESSAGES},",
        "    SamplingParams(temperature=0, max_tokens=64, stop_token_ids=stop_ids),",
        f'    lora_request=LoRARequest("{model_name}", 1, "{adapter_path}"),',
        ")",
        "print(outputs[0].outputs[0].text)",
        "```",
        "",
    ]
    return "\n".join(out)
