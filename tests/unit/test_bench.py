"""Smoke tests of the bench scripts: each runs in its tiny mode and prints its table.

The pure helpers (tables, verdicts, stage arithmetic, summaries) are tested directly and fast. The
end-to-end smoke runs start real worker processes (torch, transformers, moto, the aws CLI), so on a
shared 2-core machine they take tens of seconds each; they are marked ``integration``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._common import format_table, median, verdict
from bench._synth import SHAPES, instruction_records
from bench.startup import MARKERS, stage_durations
from bench.throughput import _counting, flop_params, summarise

REPO = Path(__file__).resolve().parents[2]


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    out = format_table(["name", "tok/s"], [["kubetune", 1234.5], ["trl", 9.5]]).splitlines()
    assert out[0].startswith("name")
    assert out[2].endswith("1,234") and out[3].endswith("9.50")
    assert len({len(line) for line in out[2:]}) == 1


def test_verdict_and_median() -> None:
    assert verdict(3.1, 3.0) == "PASS"
    assert verdict(2.9, 3.0) == "MISS"
    assert verdict(0.3, 0.35, higher_is_better=False) == "PASS"
    assert verdict(None, 1.0) == "n/a"
    assert median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        median([])


def test_generated_data_has_a_long_tail() -> None:
    records = instruction_records(400, seed=0)
    lengths = sorted(len((r["input"] + " " + r["output"]).split()) for r in records)
    median_words = lengths[len(lengths) // 2]
    assert lengths[-1] > 4 * median_words  # long right tail, as in real instruction data
    assert instruction_records(5, seed=0) == instruction_records(5, seed=0)


def test_model_shapes_hit_their_nominal_sizes() -> None:
    vocab = 8192
    assert 4e6 < SHAPES["5m"].params(vocab) < 6e6
    assert 20e6 < SHAPES["25m"].params(vocab) < 30e6
    assert 90e6 < SHAPES["100m"].params(vocab) < 110e6


def test_stage_durations_are_differences_of_marker_times() -> None:
    seen = {name: float(i + 1) for i, (name, _) in enumerate(MARKERS)}
    out = stage_durations(seen)
    assert out["cli+spec"] == 1.0 and all(out[n] == 1.0 for n, _ in MARKERS)
    assert out["total"] == float(len(MARKERS))


def _run(
    kubetune: float, other: float, contender: str, rep: int, eval_loss: float = 9.0, rss: int = 2**30
) -> dict[str, object]:
    return {
        "repeat": rep,
        "size": "tiny",
        "contender": contender,
        "peak_rss_bytes": rss,
        "trainable_params": 10,
        "tokens_per_s": kubetune if contender == "kubetune" else other,
        "final_train_loss": 9.0,
        "eval_loss": eval_loss,
        "batch": "b",
    }


def _data(runs: list[dict[str, object]]) -> dict[str, object]:
    """A bench run of the ``tiny`` size holding ``runs``, as summarise reads it."""
    return {
        "settings": {"sizes": ["tiny"]},
        "models": {"tiny": {"params": 100, "non_embedding_params": 50}},
        "peak_matmul_flops": 1e9,
        "runs": runs,
    }


def test_summary_ratios_are_pair_by_pair_and_verdicts_follow_targets() -> None:
    runs = [
        _run(300.0, 100.0, "kubetune", 0),
        _run(300.0, 100.0, "hf-peft", 0),
        _run(300.0, 250.0, "trl", 0),
        _run(200.0, 100.0, "kubetune", 1),
        _run(200.0, 50.0, "hf-peft", 1),
        _run(200.0, 100.0, "trl", 1),
    ]
    data = _data(runs)
    s = summarise(data)["sizes"]["tiny"]
    # Pairs: 300/100=3.0, 200/50=4.0 -> median 3.5 (not 250/75).
    assert s["ratios"]["hf-peft"]["ratio"] == pytest.approx(3.5)
    assert s["ratios"]["hf-peft"]["verdict"] == "PASS"
    assert s["ratios"]["trl"]["per_repeat"] == pytest.approx([1.2, 2.0])
    assert s["contenders"]["kubetune"]["mfu_6n"] == pytest.approx(6 * 50 * 250 / 1e9)


def test_summary_misses_when_eval_loss_is_worse() -> None:
    runs = [_run(300.0, 100.0, "kubetune", 0, eval_loss=9.5), _run(300.0, 100.0, "hf-peft", 0, eval_loss=9.0)]
    data = _data(runs)
    r = summarise(data)["sizes"]["tiny"]["ratios"]["hf-peft"]
    assert r["speed"] == "PASS" and r["eval_loss_ok"] is False and r["verdict"] == "MISS"


def test_summary_trl_packed_pair_targets_2x_and_counts_memory() -> None:
    runs = [
        _run(300.0, 140.0, "kubetune", 0, rss=2**30),
        _run(300.0, 140.0, "trl-packed", 0, rss=2**30 + 2**20),  # kubetune 1 MiB less
        _run(300.0, 140.0, "trl", 0, rss=2**29),  # kubetune uses more: not part of this verdict
    ]
    data = _data(runs)
    r = summarise(data)["sizes"]["tiny"]["ratios"]
    assert r["trl-packed"]["target"] == 2.0 and r["trl-packed"]["ratio"] == pytest.approx(300 / 140)
    assert r["trl-packed"]["rss_ok"] and r["trl-packed"]["verdict"] == "PASS"
    assert r["trl"]["rss_ok"] is False and r["trl"]["verdict"] == "PASS"  # 1.3x target, RSS informative
    runs[0] = _run(300.0, 140.0, "kubetune", 0, rss=2**31)  # twice trl-packed's memory
    assert summarise(data)["sizes"]["tiny"]["ratios"]["trl-packed"]["verdict"] == "MISS"


def test_summary_on_a_gpu_compares_the_device_s_peak_not_the_host_s_rss() -> None:
    runs = [
        {**_run(300.0, 140.0, "kubetune", 0, rss=2**31), "peak_cuda_bytes": 2**30},
        {**_run(300.0, 140.0, "trl-packed", 0, rss=2**30), "peak_cuda_bytes": 2**31},
    ]
    data = _data(runs)
    s = summarise(data)["sizes"]["tiny"]
    assert s["contenders"]["kubetune"]["peak_cuda_mib"] == 1024.0
    # Twice the host RSS of trl-packed, half its GPU peak: on a GPU the device's memory decides.
    assert s["ratios"]["trl-packed"]["rss_ok"] and s["ratios"]["trl-packed"]["verdict"] == "PASS"
    runs[0]["peak_cuda_bytes"] = 2**32
    assert summarise(data)["sizes"]["tiny"]["ratios"]["trl-packed"]["verdict"] == "MISS"


def test_a_real_shape_keeps_the_architecture_and_tokenizer_with_fresh_weights(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from bench.throughput import build_real_shape, export_shape

    real = tmp_path / "real"
    model: Any = _tiny_llama(tied=True)
    model.save_pretrained(real)
    (real / "tokenizer.json").write_text("{}")
    shape = tmp_path / "shape"
    assert export_shape(real, shape) == ["config.json", "generation_config.json", "tokenizer.json"]
    assert not list(shape.glob("*.safetensors"))  # no weights travel
    out = build_real_shape(shape, tmp_path / "model")
    rebuilt, original = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(real)
    assert rebuilt.to_diff_dict() | {"transformers_version": ""} == original.to_diff_dict() | {
        "transformers_version": ""
    }
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").read_text() == "{}"


def _tiny_llama(attn: str = "sdpa", tied: bool = False) -> object:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
        "attn_implementation": attn,
    }
    config = LlamaConfig(**shape)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trl_padding_free_rows_do_not_attend_across_examples_on_cpu(attn: str) -> None:
    """What trl-packed trains on: TRL's padding-free collator, a Llama on CPU, use_cache=False.

    transformers 5 finds the packed examples from position_ids restarting at 0 (no attention_mask)
    and masks block-causally, so example B's logits in the packed row are B's logits alone. The
    controls show the isolation depends on that path: with a KV cache (the config's default) or an
    all-ones attention_mask the same row lets B attend to A.
    """
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model: Any = _tiny_llama(attn)
    assert model.config.use_cache is True  # TRL's compute_loss passes use_cache=False
    a, b = list(range(3, 8)), list(range(20, 27))
    counts: list[int] = []
    examples: list[int] = []
    collator = _counting(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), counts, examples)
    batch = collator([{"input_ids": a + b, "labels": a + b, "seq_lengths": [len(a), len(b)]}])
    assert "attention_mask" not in batch and batch["position_ids"].tolist() == [[*range(5), *range(7)]]
    assert counts == [12] == [batch["input_ids"].numel()] and examples == [2]  # no padding counted
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits
        packed = model(**batch, use_cache=False).logits[:, len(a) :]
        cached = model(**batch, use_cache=True).logits[:, len(a) :]
        ones = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            use_cache=False,
        ).logits[:, len(a) :]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (cached - alone).abs().max() > 1e-3
    assert (ones - alone).abs().max() > 1e-3


def test_flop_params_keep_the_tied_head_matmul() -> None:
    untied: Any = _tiny_llama(tied=False)
    tied: Any = _tiny_llama(tied=True)
    embed = 64 * 32
    u, t = flop_params(untied), flop_params(tied)
    assert u["tied_embeddings"] is False and u["non_embedding_params"] == u["params"] - embed
    assert t["tied_embeddings"] is True and t["params"] == u["params"] - embed  # one shared matrix
    # The head's matmul costs the same tied or not: N is the same.
    assert t["non_embedding_params"] == u["non_embedding_params"] == t["params"]


def _bench(args: list[str], timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.integration
def test_throughput_quick_prints_table_and_ratios() -> None:
    out = _bench(["bench.throughput", "--quick", "--steps", "2"], timeout=600)
    assert "real tok/s" in out and "kubetune / hf-peft" in out and "kubetune / trl" in out
    assert "kubetune / trl-packed" in out
    assert ("PASS" in out) or ("MISS" in out)
    assert "peak matmul" in out


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("aws") is None, reason="aws CLI not installed")
def test_storage_small_prints_rates_and_verdicts() -> None:
    out = _bench(["bench.storage", "--size-mb", "8", "--repeats", "1"], timeout=300)
    assert "kubetune S3Store" in out and "aws s3 cp --recursive" in out and "raw loopback TCP" in out
    assert out.count("PASS") + out.count("MISS") == 2


@pytest.mark.integration
def test_quantized_tiny_prints_formats() -> None:
    out = _bench(
        [
            "bench.quantized",
            "--size",
            "tiny",
            "--prompts",
            "1",
            "--new-tokens",
            "2",
            "--formats",
            "int8,onnx-int8",
        ],
        timeout=600,
    )
    assert "fp32 (merged)" in out and "int8" in out and "onnx-int8" in out
    assert "int8 size ratio" in out


@pytest.mark.integration
def test_startup_quick_reaches_first_step() -> None:
    out = _bench(["bench.startup", "--quick"], timeout=900)
    assert "first step" in out and "model load" in out and "total" in out


def test_bench_cache_reads_the_trainer_s_model_bytes_lines(tmp_path: Path) -> None:
    import yaml

    from bench.cache import QUICKSTART, job_file, model_bytes

    hit = "[kubetune] base: models/0123456789ab… from the node cache (580,528 bytes in 7 files; 0 model bytes read from object storage)\n"
    miss = "[kubetune] base: not in the node cache; 580,528 bytes read from object storage, cached as models/0123…\n"
    assert model_bytes(["[kubetune] stage Fetching\n", hit]) == 0
    assert model_bytes([miss]) == 580_528
    assert model_bytes(["[kubetune] data: 100 train / 10 eval examples\n"]) is None
    doc = yaml.safe_load(job_file(QUICKSTART, tmp_path / "b.yaml", lr_factor=0.5).read_text())
    original = yaml.safe_load(QUICKSTART.read_text())["spec"]["training"]["learningRate"]
    assert doc["spec"]["training"] == doc["spec"]["training"] | {
        "logEverySteps": 1,
        "learningRate": original * 0.5,
    }


def test_executed_flops_charge_padding_and_the_head_only_where_it_ran() -> None:
    from bench.throughput import executed_flops_per_s

    model = {"params": 1_000, "non_embedding_params": 700, "head_params": 200}  # body = 500
    run = {
        "trainable_params": 10,
        "step_times": [1.0, 2.0, 4.0],  # steps 2..3 take 3 s
        "step_positions": [999, 100, 50],  # step 1 (set-up) is left out
        "step_head_positions": [999, 40, 50],
    }
    per_position = 4 * 500 + 6 * 10
    expected = (100 * per_position + 40 * 4 * 200 + 50 * per_position + 50 * 4 * 200) / 3.0
    assert executed_flops_per_s(run, model) == pytest.approx(expected)
    # The head at every position costs more than at the labelled ones only.
    everywhere = {**run, "step_head_positions": run["step_positions"]}
    assert executed_flops_per_s(everywhere, model) > executed_flops_per_s(run, model)  # type: ignore[operator]
    # Runs recorded before positions were logged have no executed figure.
    assert executed_flops_per_s({"step_times": [1.0, 2.0], "trainable_params": 1}, model) is None


def test_audit_counting_is_per_user_window_and_kind_without_watches() -> None:
    import datetime

    from bench._audit import per_job, requests_of, service_account_user

    user = service_account_user("ns", "kubetune-operator")

    def event(
        verb: str, resource: str, at: str, who: str = user, sub: str | None = None
    ) -> dict[str, object]:
        ref: dict[str, object] = {"resource": resource, "namespace": "ns"}
        if sub:
            ref["subresource"] = sub
        return {
            "stage": "ResponseComplete",
            "verb": verb,
            "objectRef": ref,
            "user": {"username": who},
            "requestReceivedTimestamp": at,
        }

    events = [
        event("create", "jobs", "2026-12-02T10:00:00.500000Z"),
        event("create", "jobs", "2026-12-02T10:00:01.000000Z"),
        event("patch", "finetunejobs", "2026-12-02T10:00:01.100000Z", sub="status"),
        event("watch", "pods", "2026-12-02T10:00:01.200000Z"),  # long-running: not per object
        event("create", "jobs", "2026-12-02T10:00:01.300000Z", who="admin"),  # someone else
        event("create", "jobs", "2026-12-02T09:59:59.000000Z"),  # before the window
    ]
    since = datetime.datetime(2026, 12, 2, 10, 0, 0, tzinfo=datetime.UTC)
    counts = requests_of(events, user, since)
    assert counts == {"create jobs": 2, "patch finetunejobs/status": 1}
    assert per_job(counts, 2) == {"create jobs": 1.0, "patch finetunejobs/status": 0.5}
    until = datetime.datetime(2026, 12, 2, 10, 0, 1, tzinfo=datetime.UTC)
    assert requests_of(events, user, since, until) == {"create jobs": 1}
