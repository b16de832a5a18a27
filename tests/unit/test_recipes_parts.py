"""Fast tests of the recipe parts: spec rules (Python and CEL), curriculum batching and resume,
augmentation, training-health warnings and gradient norms, peft configs, and the `kubetune data` CLI."""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_api.models import FineTuneJob, MethodSpec
from kubetune_cli.main import main as kubetune
from kubetune_trainer.data import Message, Record, iter_batches
from kubetune_trainer.data.augment import Augmenter, TermDictionaryError, load_term_dictionary, ocr_noise
from kubetune_trainer.data.curriculum import curriculum_keys, read_difficulties
from kubetune_trainer.train.health import LossHealth, RunFacts, layer_grad_norms, layer_group
from tests.support.crd_schema import validate

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "m", "base": {"uri": "s3://bucket/base"}},
    "data": {"train": {"uri": "s3://bucket/train.jsonl"}},
    "output": {"uri": "s3://bucket/models"},
}


def _job(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(BASE_SPEC))
    for path, value in changes.items():
        node = spec
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j"},
        "spec": spec,
    }


# --- spec: every rule in Python and in CEL -----------------------------------------------------

STAGE = {"name": "general", "data": {"train": {"uri": "s3://bucket/general.jsonl"}}}

RULE_CASES = [
    ("stage names repeat", {"stages": [STAGE, STAGE]}, "spec.stages"),
    (
        "stage data with two eval sources",
        {
            "stages": [
                {**STAGE, "data": {**STAGE["data"], "eval": {"uri": "s3://bucket/e.jsonl"}, "evalSplit": 0.1}}
            ]
        },
        "spec.stages[].data.evalSplit",
    ),
    (
        "stage curriculum field without name",
        {"stages": [{**STAGE, "data": {**STAGE["data"], "curriculum": {"order": "field"}}}]},
        "spec.stages[].data.curriculum.difficultyField",
    ),
    (
        "stage model name too long",
        {"model.name": "m" * 40, "stages": [{**STAGE, "name": "s" * 30}]},
        "spec.stages",
    ),
    (
        "curriculum field without name",
        {"data.curriculum": {"order": "field"}},
        "spec.data.curriculum.difficultyField",
    ),
    ("augmentation without transform", {"data.augmentation": {"share": 0.2}}, "spec.data.augmentation"),
    (
        "ia3 feedforward outside targets",
        {
            "method.type": "ia3",
            "method.ia3": {"targetModules": ["k_proj"], "feedforwardModules": ["down_proj"]},
        },
        "spec.method.ia3.feedforwardModules",
    ),
    # Significance gates and terminology coverage (tests/unit/test_eval_significance.py has the rest).
    (
        "significant on latency",
        {"evaluation.gates": {"latency_p50_ms": {"significant": True}}},
        "spec.evaluation.gates",
    ),
    (
        "significant on an artifact",
        {"evaluation.gates": {"merged.rouge_l": {"significant": True}}},
        "spec.evaluation.gates",
    ),
    (
        "significant without the base",
        {
            "evaluation.compareBase": False,
            "evaluation.requireImprovement": False,
            "evaluation.gates": {"rouge_l": {"significant": True}},
        },
        "spec.evaluation.compareBase",
    ),
    (
        "terminology without glossary",
        {"evaluation.metrics": ["terminology_coverage"]},
        "spec.evaluation.glossary",
    ),
    (
        "terminology gate without glossary",
        {"evaluation.gates": {"terminology_coverage": {"min": 0.3}}},
        "spec.evaluation.glossary",
    ),
]


@pytest.mark.parametrize(("case", "changes", "field"), RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_recipe_rules_reject_in_python_and_cel(case: str, changes: dict[str, Any], field: str) -> None:
    job = _job(**changes)
    with pytest.raises(ValidationError, match=re.escape(field)):
        FineTuneJob.model_validate(job)
    cel = [e for e in validate(job) if "Invalid value" in e]
    assert cel and field.removeprefix("spec.").split(".")[-1] in " ".join(cel), validate(job)


def test_stages_resolve_to_whole_training_settings_and_their_own_job() -> None:
    from kubetune_api.runconfig import resolve_run_config

    job = _job(
        **{
            "training.maxSteps": 50,
            "output.promote": {"alias": "production"},
            "evaluation.gates": {"eval_loss": {"max": 2.0}},
            "quantization.formats": ["int8"],
            "stages": [
                {**STAGE, "training": {"epochs": 1, "learningRate": 1e-4}, "publish": True},
                {"name": "domain", "data": {"train": {"uri": "s3://bucket/domain.jsonl"}}},
            ],
        }
    )
    FineTuneJob.model_validate(job)
    assert validate(job) == []
    rc = resolve_run_config(FineTuneJob.model_validate(job))
    general, domain = rc.stages
    # epochs without maxSteps: the job's maxSteps must not cut the stage short.
    assert (general.training.epochs, general.training.max_steps, general.training.learning_rate) == (
        1,
        None,
        1e-4,
    )
    assert (domain.training.max_steps, domain.training.learning_rate) == (50, 2e-4)  # the job's
    assert domain.data.eval_split == 0.1  # resolved like spec.data
    as_job = rc.stage_config(1)
    assert as_job.model.name == "m-domain" and [s.name for s in as_job.stages] == ["general"]
    assert (
        as_job.evaluation.gates == {} and as_job.quantization.formats == [] and as_job.output.promote is None
    )
    # A stage's data location is not part of the digest (its content is); its hyperparameters are.
    moved = json.loads(json.dumps(job))
    moved["spec"]["stages"][1]["data"]["train"]["uri"] = "s3://other/domain.jsonl"
    assert resolve_run_config(FineTuneJob.model_validate(moved)).config_digest() == rc.config_digest()
    changed = json.loads(json.dumps(job))
    changed["spec"]["stages"][1]["training"] = {"maxSteps": 7}
    assert resolve_run_config(FineTuneJob.model_validate(changed)).config_digest() != rc.config_digest()


def test_valid_recipe_specs_pass_both_checks() -> None:
    job = _job(
        **{
            "method.lora": {"variant": "dora", "layers": [0, 2]},
            "data.curriculum": {"order": "field", "difficultyField": "difficulty", "firstEpochOnly": False},
            "data.augmentation": {"ocrNoise": 0.05, "synonyms": {"uri": "s3://bucket/terms.yaml"}},
            "training.health": {"plateauWindows": 3},
        }
    )
    FineTuneJob.model_validate(job)
    assert validate(job) == []
    ia3 = _job(
        **{
            "method.type": "ia3",
            "method.ia3": {"targetModules": ["k_proj", "down_proj"], "feedforwardModules": ["down_proj"]},
        }
    )
    FineTuneJob.model_validate(ia3)
    assert validate(ia3) == []
    from kubetune_api.runconfig import resolve_run_config

    assert resolve_run_config(FineTuneJob.model_validate(ia3)).learning_rate == 3e-3
    bad = _job(**{"method.lora": {"variant": "qora"}})
    with pytest.raises(ValidationError, match="variant"):
        FineTuneJob.model_validate(bad)
    assert any("variant" in e for e in validate(bad))


# --- curriculum --------------------------------------------------------------------------------


class Ex:
    def __init__(self, n: int, source: str = "f", line: int = 0) -> None:
        self.input_ids = list(range(1, n + 1))
        self.labels = list(range(1, n + 1))
        self.source, self.line = source, line


def _lengths(batches: list[dict[str, Any]]) -> list[list[int]]:
    return [batch["attention_mask"].sum(dim=1).tolist() for batch in batches]


def test_curriculum_orders_easy_to_hard_and_resumes_at_the_same_batch() -> None:
    rng = random.Random(3)
    examples = [Ex(rng.randint(2, 30)) for _ in range(23)]
    keys, summary = curriculum_keys(examples, "length")
    assert keys is not None and summary["easiest"] == min(keys)
    kw: dict[str, Any] = dict(batch_size=4, max_seq_length=32, packing=False, pad_token_id=0, seed=1, epoch=0)
    full = list(iter_batches(examples, **kw, order_keys=keys))
    flat = [n for b in _lengths(full) for n in b]
    assert flat == sorted(flat)  # easy-to-hard
    shuffled = [n for b in _lengths(list(iter_batches(examples, **kw))) for n in b]
    assert shuffled != flat  # the default still shuffles
    resumed = list(iter_batches(examples, **kw, order_keys=keys, start_batch=3))
    assert _lengths(resumed) == _lengths(full)[3:]
    # Two ranks: each sees its share easy-to-hard, together every example once (padded).
    per_rank = [
        [
            n
            for b in _lengths(list(iter_batches(examples, **kw, order_keys=keys, rank=r, world_size=2)))
            for n in b
        ]
        for r in (0, 1)
    ]
    assert all(p == sorted(p) for p in per_rank)
    packed = list(iter_batches(examples, **{**kw, "packing": True}, order_keys=keys))
    assert len(packed) == len(list(iter_batches(examples, **{**kw, "packing": True})))
    with pytest.raises(ValueError, match="order_keys has 2 keys"):
        list(iter_batches(examples, **kw, order_keys=[1.0, 2.0]))


def test_difficulty_field_keys_name_records_without_one(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"difficulty": 3}\n{"x": 1}\n\n{"difficulty": "1.5"}\n{"difficulty": true}\n')
    diffs = read_difficulties([data], "difficulty", {data: "s3://b/d.jsonl"})
    assert diffs == {("s3://b/d.jsonl", 1): 3.0, ("s3://b/d.jsonl", 4): 1.5}
    examples = [Ex(5, "s3://b/d.jsonl", line) for line in (1, 2, 4)]
    keys, summary = curriculum_keys(examples, "field", difficulties=diffs, difficulty_field="difficulty")
    assert keys == [3.0, math.inf, 1.5]
    assert summary["missingDifficulty"] == 1 and summary["missingAt"] == ["s3://b/d.jsonl:2"]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('instruction,output,difficulty\n"a\nb",x,2\nc,y,oops\n')
    assert read_difficulties([csv_file], "difficulty") == {(str(csv_file), 2): 2.0}


# --- augmentation ------------------------------------------------------------------------------


def _record(i: int) -> Record:
    instruction = f"Translate the words to Zorbish number {i}."
    return Record(
        "f",
        i,
        "instruction",
        (Message("system", "Be brief."), Message("user", instruction), Message("assistant", f"answer {i}")),
        instruction=instruction,
        input="",
    )


def test_augmentation_is_seeded_changes_prompts_only_and_reports_its_share() -> None:
    records = [_record(i) for i in range(200)]
    terms = {"Translate": ["Convert"], "words": ["terms"]}
    aug = Augmenter(
        seed=5, share=0.3, terms=terms, synonym_probability=1.0, sentence_transforms=True, ocr_noise_rate=0.05
    )
    out, summary = aug.augment(records)
    again, _ = Augmenter(**{**aug.__dict__}).augment(list(reversed(records)))
    assert sorted(r.key() for r in out) == sorted(r.key() for r in again)  # order-independent
    copies = out[len(records) :]
    assert summary["augmentedRecords"] == len(copies) and 30 < len(copies) < 90
    assert summary["augmentedShare"] == round(len(copies) / len(out), 4)
    for c in copies:
        original = records[c.line]
        assert c.messages[-1] == original.messages[-1] and c.messages[0] == original.messages[0]
        assert c.messages[1].content == c.instruction != original.instruction
    assert summary["transforms"]["synonyms"] > 0 and len(summary["examples"]) == 3
    other, _ = Augmenter(seed=6, share=0.3, terms=terms).augment(records)
    assert [r.key() for r in other] != [r.key() for r in out]


def test_term_dictionary_forms_and_errors(tmp_path: Path) -> None:
    groups = tmp_path / "t.yaml"
    groups.write_text("- [MI, myocardial infarction, heart attack]\n")
    terms = load_term_dictionary(groups)
    assert terms["MI"] == ["myocardial infarction", "heart attack"]
    bad = tmp_path / "t.json"
    bad.write_text('{"fever": [3]}')
    with pytest.raises(TermDictionaryError, match=r"t\.json: entry 'fever'"):
        load_term_dictionary(bad)
    assert ocr_noise("hello world", 0.0, random.Random(1)) == "hello world"
    assert ocr_noise("hello world", 1.0, random.Random(1)) != "hello world"


# --- training health ---------------------------------------------------------------------------


def test_plateau_and_rising_loss_warn_once_with_hints() -> None:
    facts = RunFacts(train_examples=120, truncated_examples=30, max_seq_length=64, learning_rate=2e-4)
    health = LossHealth(facts, windows=3, min_improvement=0.01)
    warnings = [
        w
        for step, loss in enumerate([2.0, 1.5, 1.2, 1.2, 1.2, 1.21, 1.2, 1.2], 1)
        if (w := health.update(step, loss))
    ]
    assert [w["kind"] for w in warnings] == ["plateau"]
    hints = " ".join(warnings[0]["hints"])
    assert "context too short" in hints and "25%" in hints and "maxSeqLength" in hints
    assert "too little domain data" in hints
    rising = LossHealth(RunFacts(50_000, 0, 512, 1e-3))
    kinds = [
        w["kind"] for s, loss in enumerate([2.0, 1.0, 0.9, 2.5, 2.6], 1) if (w := rising.update(s, loss))
    ]
    assert kinds == ["rising"]
    assert "learning rate too high" in rising.hints("rising")[0]
    learned = LossHealth(facts, windows=2)
    converged = [learned.update(s, loss) for s, loss in enumerate([0.04, 0.03, 0.03, 0.03, 0.03], 1)]
    assert converged == [None] * 5


def test_gradient_norms_are_grouped_per_layer() -> None:
    import torch

    assert layer_group("base_model.model.model.layers.11.mlp.down_proj.lora_A.default.weight") == "layers.11"
    assert layer_group("model.embed_tokens.weight") == "embed_tokens"
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    norms = layer_grad_norms(
        [
            ("m.layers.10.q.weight", a),
            ("m.layers.2.v.weight", b),
            ("m.layers.2.k.weight", c),
            ("lm_head.weight", a),
        ]
    )
    assert list(norms) == ["layers.2", "layers.10", "lm_head"]
    assert norms["layers.2"] == pytest.approx(4.0) and norms["layers.10"] == pytest.approx(3.0)


# --- peft configs ------------------------------------------------------------------------------


def test_peft_configs_for_each_method() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune_trainer.train.adapters import AdapterConfigError, build_peft_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    dora = build_peft_config(MethodSpec.model_validate({"lora": {"variant": "dora"}}), model)
    assert dora.use_dora and not dora.use_rslora and dora.target_modules == "all-linear"
    layered = build_peft_config(
        MethodSpec.model_validate({"lora": {"variant": "rslora", "layers": [2, 0, 2]}}), model
    )
    assert layered.use_rslora and layered.layers_to_transform == [0, 2]
    assert "lm_head" not in layered.target_modules and "q_proj" in layered.target_modules
    ia3 = build_peft_config(MethodSpec.model_validate({"type": "ia3"}), model)
    assert type(ia3).__name__ == "IA3Config"
    with pytest.raises(AdapterConfigError, match=r"spec\.method\.lora\.layers: layer\(s\) \[3\]"):
        build_peft_config(MethodSpec.model_validate({"lora": {"layers": [3]}}), model)


# --- kubetune data validate / prepare ----------------------------------------------------------


def test_data_validate_prints_the_trainer_report_and_exits_3_on_bad_data(tmp_path: Path, capsys: Any) -> None:
    good = tmp_path / "train.jsonl"
    rows = [{"instruction": f"q{i}", "output": "a" * (i + 1)} for i in range(30)]
    good.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[0]]))
    assert kubetune(["data", "validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "read=31 valid=31 invalid=0" in out and "1 duplicate(s) removed" in out
    assert "split: 27 train / 3 eval records (evalSplit 0.1, seed 42)" in out
    assert "length (characters per record): <=64: 30" in out and "result: OK" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"instruction": "x", "output": ""}\n{oops\n')
    assert kubetune(["data", "validate", str(bad)]) == 3
    out = capsys.readouterr().out
    assert f"{bad}:32: output: empty answer" in out and f"{bad}:33: invalid JSON" in out
    assert "result: FAIL, 2 invalid records, more than maxInvalidRecords=0" in out
    assert kubetune(["data", "validate", str(bad), "--max-invalid-records", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["invalidRecords"] == 2


def test_data_validate_takes_the_jobs_settings(tmp_path: Path, capsys: Any) -> None:
    import yaml

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"q": f"q{i}", "a": "yes"}) + "\n" for i in range(10)))
    job = _job(
        **{"data.fields": {"instruction": "q", "output": "a"}, "data.evalSplit": 0.2, "training.seed": 9}
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert kubetune(["data", "validate", str(data), "--job", str(path)]) == 0
    assert "8 train / 2 eval records (evalSplit 0.2, seed 9)" in capsys.readouterr().out
    assert kubetune(["data", "validate", str(data)]) == 3  # default column names: no record fields


def test_data_prepare_converts_csv_json_and_sqlite_exports(tmp_path: Path, capsys: Any) -> None:
    csv_file = tmp_path / "tickets.csv"
    csv_file.write_text(
        'subject,body,team\nLogin fails,"cannot log in,\nsince Monday",auth\nRefund,please refund,billing\n'
    )
    jsonl = tmp_path / "more.json"
    jsonl.write_text(json.dumps({"data": [{"subject": "Slow", "body": "app is slow", "team": "perf"}]}))
    db = tmp_path / "faq.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE faq (q TEXT, a TEXT)")
        conn.execute("INSERT INTO faq VALUES ('Opening hours?', '9 to 5')")
    out = tmp_path / "out" / "train.jsonl"
    args = ["data", "prepare", str(csv_file), str(jsonl), "-o", str(out)]
    assert (
        kubetune(
            [*args, "--instruction", "Route the ticket: {subject}", "--input", "{body}", "--output", "{team}"]
        )
        == 0
    )
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0] == {
        "instruction": "Route the ticket: Login fails",
        "input": "cannot log in,\nsince Monday",
        "output": "auth",
    }
    assert len(records) == 3
    assert kubetune(["data", "validate", str(out), "--format", "instruction"]) == 0
    capsys.readouterr()

    assert kubetune([*args, "--instruction", "{subject}", "--output", "{missing}"]) == 3
    err = capsys.readouterr().err
    assert f"{csv_file}:3: missing column(s) ['missing']" in err
    db_out = tmp_path / "faq.jsonl"
    assert (
        kubetune(
            [
                "data",
                "prepare",
                str(db),
                "-o",
                str(db_out),
                "--query",
                "SELECT q AS instruction, a AS output FROM faq",
            ]
        )
        == 0
    )
    assert json.loads(db_out.read_text()) == {"instruction": "Opening hours?", "output": "9 to 5"}
    assert kubetune(["data", "prepare", str(db), "-o", str(db_out)]) == 3
    assert "--query" in capsys.readouterr().err


def test_data_prepare_splits_docx_by_heading(tmp_path: Path) -> None:
    docx = pytest.importorskip("docx")
    document = docx.Document()
    document.add_heading("Dosage", level=1)
    document.add_paragraph("Take one tablet daily.")
    document.add_heading("Side effects", level=1)
    document.add_paragraph("Rarely, headache.")
    path = tmp_path / "leaflet.docx"
    document.save(str(path))
    out = tmp_path / "leaflet.jsonl"
    assert kubetune(["data", "prepare", str(path), "-o", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records == [
        {"instruction": "Write the section 'Dosage' of 'leaflet'.", "output": "Take one tablet daily."},
        {"instruction": "Write the section 'Side effects' of 'leaflet'.", "output": "Rarely, headache."},
    ]
