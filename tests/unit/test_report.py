"""report.json, samples.jsonl, the loss PNG and the model card, as a user reads them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kubetune_trainer.artifacts.quantize import ArtifactReport
from kubetune_trainer.artifacts.report import loss_figure, plot_loss, render_model_card, write_eval_report
from kubetune_trainer.evaluate.evaluator import EvalReport, SampleRow
from kubetune_trainer.evaluate.gates import check_gates


def _eval_report() -> EvalReport:
    return EvalReport(
        tuned={"eval_loss": 0.8, "perplexity": 2.2255, "accuracy": 0.94, "latency_p95_ms": 120.0},
        base={"eval_loss": 1.6, "perplexity": 4.953, "accuracy": 0.41, "latency_p95_ms": 118.0},
        samples=[
            SampleRow(set="eval", prompt="2+2=", reference="4", tuned="4", base="five"),
            SampleRow(
                set="eval", prompt="capital of France?", reference="Paris", tuned="Paris", base="Lyon | ?"
            ),
        ],
        num_examples=2,
        settings={"max_new_tokens": 8},
        skipped={"json_validity": "spec.evaluation.jsonSchema is not set"},
    )


def _artifact() -> ArtifactReport:
    return ArtifactReport(
        format="int8",
        path="int8",
        files=["model.safetensors"],
        size_bytes=3 * 1024 * 1024,
        reference_size_bytes=10 * 1024 * 1024,
        size_ratio=0.3,
        logit_drift_max_abs=0.012,
        logit_drift_mean_abs=0.002,
        latency_p50_ms=41.0,
        latency_p95_ms=55.5,
        new_tokens=8,
        smoke_text="hi",
        device="cpu",
        peak_memory_bytes=500 * 2**20,
        peak_memory_ratio=0.8,
        memory_method="process_peak_rss",
    )


GATES = {"accuracy": {"min": 0.92}, "latency_p95_ms": {"max": 100}, "json_validity": {"min": 0.99}}


def test_report_json_and_samples_jsonl(tmp_path: Path) -> None:
    report = _eval_report()
    report.tuned["bleu"] = float("nan")  # must not make report.json invalid JSON
    gates = check_gates(report.gate_metrics(), GATES)
    write_eval_report(tmp_path / "eval", report, gates, [_artifact()])

    doc = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert doc["schema_version"] == 1
    assert doc["passed"] is False
    assert doc["evaluation"]["tuned"]["accuracy"] == 0.94
    assert doc["evaluation"]["tuned"]["bleu"] is None
    assert doc["evaluation"]["base"]["eval_loss"] == 1.6
    assert [(g["metric"], g["passed"]) for g in doc["gates"]["results"]] == [
        ("accuracy", True),
        ("latency_p95_ms", False),
        ("json_validity", False),
    ]
    assert doc["artifacts"][0]["format"] == "int8" and doc["artifacts"][0]["size_ratio"] == 0.3

    lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"set": "eval", "prompt": "2+2=", "reference": "4", "tuned": "4", "base": "five"},
        {
            "set": "eval",
            "prompt": "capital of France?",
            "reference": "Paris",
            "tuned": "Paris",
            "base": "Lyon | ?",
        },
    ]


def _write_metrics(path: Path) -> None:
    records = [
        {"step": s, "loss": 3.0 - s / 50, "learning_rate": 1e-4, "epoch": s / 100} for s in range(10, 101, 10)
    ]
    records += [
        {"step": 50, "eval_loss": 2.1},
        {"step": 100, "eval_loss": 1.9},
        {"step": 100, "tokens_per_s": 900},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_loss_png_is_a_real_image_with_both_curves(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)

    fig = loss_figure(metrics)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["train loss", "eval loss"]
    assert list(lines[0].get_xdata()) == list(range(10, 101, 10))
    assert list(lines[1].get_ydata()) == [2.1, 1.9]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "eval loss"]

    out = tmp_path / "training" / "loss.png"
    plot_loss(metrics, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    assert (width, height) == (700, 400)
    assert len(data) > 10_000  # drawn axes, curves and text, not a blank canvas


def test_loss_plot_errors_name_file_and_line(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=rf"{metrics}:2: not valid JSON"):
        plot_loss(metrics, tmp_path / "loss.png")
    metrics.write_text('{"step": 1, "tokens_per_s": 3}\n')
    with pytest.raises(ValueError, match="no 'loss' or 'eval_loss' records"):
        plot_loss(metrics, tmp_path / "loss.png")


def test_model_card_tables_and_loading_instructions() -> None:
    report = _eval_report()
    gates = check_gates(report.gate_metrics(), GATES)
    card = render_model_card(
        model_name="support-bot",
        version="v3",
        base_model="hf://Qwen/Qwen2.5-0.5B@main",
        base_model_digest="sha256:aaa",
        data_digests={"train": "sha256:bbb", "eval": "sha256:ccc"},
        hyperparameters={
            "method": "lora",
            "r": 32,
            "learning_rate": 0.0002,
            "target_modules": ["q_proj", "v_proj"],
        },
        report=report,
        gates=gates,
        artifacts=[_artifact()],
        lora_rank=32,
    )
    assert card.startswith('---\nbase_model: "hf://Qwen/Qwen2.5-0.5B@main"\nlibrary_name: peft\n')
    assert "# support-bot v3" in card
    assert "**Quality gates FAILED: this version is not promotable.**" in card
    assert "| train | sha256:bbb |" in card and "| eval | sha256:ccc |" in card
    assert "| r | 32 |" in card and '| target_modules | ["q_proj", "v_proj"] |' in card
    # Metrics table: base, tuned, delta.
    assert "| Metric | Base | Tuned | Δ |" in card
    assert "| eval_loss | 1.6 | 0.8 | -0.8 |" in card
    assert "| accuracy | 0.41 | 0.94 | 0.53 |" in card
    assert "`json_validity` (spec.evaluation.jsonSchema is not set)" in card
    # Gates table.
    assert "3 gate(s) ran: 3 from `spec.evaluation.gates`, 0 default" in card
    assert "| accuracy | spec | >= 0.92 | 0.94 | pass | accuracy = 0.94 meets >= 0.92 |" in card
    assert "| latency_p95_ms | spec | <= 100 | 120 | FAIL | latency_p95_ms = 120 is above max 100 |" in card
    assert "| json_validity | spec | >= 0.99 | — | FAIL |" in card
    # Quantized variants.
    assert "| int8 | quantized/int8/ | 3.0 MiB | 0.3 | 41 | 55.5 | 0.012 | 0.8 |" in card
    # How to load: peft, transformers, quanto, vLLM (rank 32 needs --max-lora-rank).
    assert 'PeftModel.from_pretrained(base, "adapter")' in card
    assert 'AutoModelForCausalLM.from_pretrained("merged")' in card
    assert 'QuantizedModelForCausalLM.from_pretrained("quantized/int8")' in card
    assert (
        "vllm serve base-model --tokenizer adapter --enable-lora --lora-modules support-bot=adapter "
        "--max-lora-rank 32" in card
    )
    # The base model is a folder the card names, with its URI, digest and how to copy it there.
    assert "<base model" not in card
    assert "`hf://Qwen/Qwen2.5-0.5B@main` (digest `sha256:aaa`) into `base-model/`" in card
    assert "hf download Qwen/Qwen2.5-0.5B --revision main --local-dir base-model" in card
    assert 'AutoModelForCausalLM.from_pretrained("base-model")' in card
    assert 'LoRARequest("support-bot", 1, "adapter")' in card
    assert "onnxruntime" not in card  # no onnx-int8 artifact, no ONNX instructions


def test_model_card_onnx_section_and_passing_gates() -> None:
    report = _eval_report()
    onnx = ArtifactReport(**{**_artifact().to_dict(), "format": "onnx-int8", "path": "onnx-int8"})
    card = render_model_card(
        model_name="m",
        version="v1",
        base_model="s3://models/base",
        data_digests={},
        hyperparameters={},
        report=report,
        gates=check_gates(report.gate_metrics(), {"accuracy": {"min": 0.9}}),
        artifacts=[onnx],
    )
    assert "**All quality gates passed.**" in card
    assert 'ort.InferenceSession("quantized/onnx-int8/model.onnx"' in card
    # The ONNX snippet renders the chat template and stops on every listed stop id, not only EOS.
    assert "tokenizer.apply_chat_template(" in card and "add_generation_prompt=True" in card
    assert '["stop_token_ids"]' in card and "if next_id in stop_ids:" in card
    assert "eos_token_id" not in card.split("The ONNX model")[1].split("```bash")[0]
    assert "aws s3 sync s3://models/base base-model/" in card
    assert "--max-lora-rank" not in card
