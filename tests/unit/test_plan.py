"""The pre-flight plan's pure parts: shapes from config.json and GGUF headers, trainable-parameter
counts against peft's, the memory terms, suggestions that fit when applied, the Fits condition."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api.loader import parse_finetunejob
from kubetune_api.names import parse_quantity
from kubetune_api.runconfig import resolve_run_config
from kubetune_registry.storage import StoreSettings
from kubetune_trainer.plan import (
    TrainSettings,
    estimate_memory,
    make_plan,
    shape_from_config,
    suggest,
)
from kubetune_trainer.plan.memory import trainable_parameters
from kubetune_trainer.plan.shape import (
    GgufHeaderTruncated,
    ShapeError,
    read_base_shape,
    shape_from_gguf_header,
)
from tests.support.gguf_files import write_llama_gguf

# Llama-3-8B's config.json (public; the fields the plan reads).
LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def _load(job: dict[str, Any]) -> Any:
    return parse_finetunejob(yaml.safe_dump(job))


def _tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "tie_word_embeddings": False,
    }
    return cfg | overrides


@pytest.mark.parametrize("tied", [False, True])
def test_config_parameter_count_is_the_models(tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _tiny_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    assert shape_from_config(cfg).parameters == sum(p.numel() for p in model.parameters())


def test_llama3_8b_count_is_its_published_size() -> None:
    assert shape_from_config(LLAMA3_8B).parameters == 8_030_261_248  # Meta's 8.03B


def test_config_without_widths_is_refused_by_field() -> None:
    with pytest.raises(ShapeError, match=r"config.json: no hidden_size.*model_type 'mystery'"):
        shape_from_config(
            {"model_type": "mystery", "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 9}
        )


def test_gguf_header_gives_the_exact_count(tiny_model_dir: Path, tmp_path: Path) -> None:
    gguf_file = write_llama_gguf(tiny_model_dir, tmp_path / "tiny.gguf", quantize_linear=True)
    data = gguf_file.read_bytes()
    shape = shape_from_gguf_header(data, name="tiny.gguf")
    from_config = shape_from_config(__import__("json").loads((tiny_model_dir / "config.json").read_text()))
    assert shape.exact_count and shape.source == "gguf header"
    assert shape.parameters == from_config.parameters
    assert (shape.layers, shape.hidden, shape.intermediate, shape.vocab) == (
        from_config.layers,
        from_config.hidden,
        from_config.intermediate,
        from_config.vocab,
    )
    # A prefix that ends inside the tensor table is told apart from a bad file.
    with pytest.raises(GgufHeaderTruncated, match="longer than the 4,000 bytes read"):
        shape_from_gguf_header(data[:4000], name="tiny.gguf")
    with pytest.raises(ShapeError, match="not a GGUF file"):
        shape_from_gguf_header(b"PK\x03\x04" + data[4:], name="x.gguf")


def test_read_base_shape_reads_only_the_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kubetune_registry.storage import bytes_read

    store = tmp_path / "store"
    (store / "bkt" / "m").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (store / "bkt" / "m" / f.name).write_bytes(f.read_bytes())
    settings = StoreSettings(local_root=str(store))
    before = bytes_read()
    shape = read_base_shape("s3://bkt/m/", settings)
    read = bytes_read() - before
    assert shape.source == "config.json"
    assert read == (tiny_model_dir / "config.json").stat().st_size
    gguf_dir = store / "bkt" / "g"
    gguf_dir.mkdir()
    write_llama_gguf(tiny_model_dir, gguf_dir / "model.gguf")
    assert read_base_shape("s3://bkt/g/", settings).source == "gguf header"
    with pytest.raises(ShapeError, match=r"no config\.json"):
        read_base_shape("s3://bkt/nothing/", settings)


@pytest.mark.parametrize(
    ("targets", "variant", "layers"),
    [(["all-linear"], "lora", None), (["q_proj", "v_proj"], "lora", None), (["all-linear"], "dora", [0, 2])],
)
def test_trainable_parameters_are_peft_s(targets: list[str], variant: str, layers: list[int] | None) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _tiny_config()
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    if targets == ["all-linear"] and layers is not None:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            target_modules=targets if targets != ["all-linear"] else "all-linear",
            use_dora=variant == "dora",
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        ),
    )
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    settings = TrainSettings(
        lora_r=8,
        lora_targets=tuple(targets),
        lora_variant=variant,
        lora_layers=tuple(layers) if layers else None,
    )
    assert trainable_parameters(shape_from_config(cfg), settings) == expected


def test_memory_terms_move_the_way_the_methods_do() -> None:
    shape = shape_from_config(LLAMA3_8B)
    gpu = TrainSettings(device="cuda", precision="bf16", batch_size=4, seq_len=2048, lora_dropout=0.0)
    lora = estimate_memory(shape, gpu)
    qlora = estimate_memory(shape, TrainSettings(**{**gpu.__dict__, "method": "qlora"}))
    full = estimate_memory(shape, TrainSettings(**{**gpu.__dict__, "method": "full"}))
    ckpt = estimate_memory(shape, TrainSettings(**{**gpu.__dict__, "gradient_checkpointing": True}))
    assert lora.terms["weights"] == shape.parameters * 2  # bf16
    # QLoRA: the blocks' linears in NF4, but the 128k-vocabulary embeddings and head upcast to fp32
    # by prepare_model_for_kbit_training (4.2 GB of Llama-3-8B's 7.8 GB).
    blocks = shape.layers * sum(i * o for i, o in shape.block_linears().values())
    assert qlora.terms["weights"] == int(blocks * 4.127 / 8 + (shape.parameters - blocks) * 4)
    assert qlora.terms["weights"] < lora.terms["weights"] / 2
    assert full.terms["optimizer"] == shape.parameters * 2 * 2  # two bf16 AdamW moments
    assert ckpt.terms["activations"] < lora.terms["activations"] / 5
    zero3 = [
        estimate_memory(
            shape,
            TrainSettings(
                **{**gpu.__dict__, "method": "full", "strategy": "deepspeed-zero3", "world_size": n}
            ),
        )
        for n in (2, 8)
    ]
    assert zero3[1].terms["weights"] < zero3[0].terms["weights"] < full.terms["weights"]
    assert zero3[1].terms["optimizer"] * 4 == pytest.approx(zero3[0].terms["optimizer"], rel=1e-6)
    # CPU: fp32 weights, no CUDA runtime, and the heap's retained copy of the activations.
    cpu = estimate_memory(shape, TrainSettings(batch_size=1, seq_len=128))
    assert cpu.terms["weights"] == shape.parameters * 4 and cpu.terms["runtime"] == 0
    assert cpu.terms["cpuHeap"] == pytest.approx(cpu.terms["activations"] + cpu.terms["lmHead"], rel=1e-6)


def _job(**spec_overrides: Any) -> dict[str, Any]:
    job = yaml.safe_load(Path("examples/quickstart/finetunejob.yaml").read_text())
    spec = job["spec"]
    for path, value in spec_overrides.items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return job


def _apply(job: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(job)
    for path, value in patch.items():
        node = out["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _gpu_plan(job: dict[str, Any]) -> Any:
    rc = resolve_run_config(_load(job))
    assert rc.plan.device_memory_bytes is not None
    return make_plan(
        rc,
        shape_from_config(LLAMA3_8B),
        None,
        device="cuda",
        world_size=rc.distributed.nodes * rc.distributed.gpus_per_node,
        capacity=rc.plan.device_memory_bytes,
        capacity_source=rc.plan.device_memory_source or "",
    )


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        # LoRA on one 24 GB GPU at batch 8 x 2048: too much activation memory.
        (
            {"training.batchSize": 8, "training.maxSeqLength": 2048, "resources.gpuMemory": "24Gi"},
            "batchSize",
        ),
        # A full fine-tune of 8B on 4 x 80 GB with DDP: the optimizer states alone do not fit.
        (
            {
                "method.type": "full",
                "distributed.strategy": "ddp",
                "distributed.gpusPerNode": 4,
                "resources.gpuMemory": "80Gi",
                "training.batchSize": 1,
                "training.maxSeqLength": 1024,
            },
            "deepspeed-zero3",
        ),
    ],
)
def test_a_job_that_will_not_fit_gets_suggestions_that_fit_when_applied(
    overrides: dict[str, Any], expect: str
) -> None:
    job = _job(**{"distributed.gpusPerNode": 1, "training.precision": "bf16", **overrides})
    plan = _gpu_plan(job)
    assert plan.fits is False
    assert plan.suggestions, plan.render()
    assert any(expect in s.change for s in plan.suggestions)
    for suggestion in plan.suggestions:
        replanned = _gpu_plan(_apply(job, suggestion.patch))  # the spec change, re-planned from the YAML
        assert replanned.fits is True, (suggestion.change, replanned.render())
        assert replanned.memory.peak == suggestion.estimate.peak
    assert "WILL NOT FIT" in "\n".join(plan.render())
    assert "would fit with:" in plan.summary()


def test_suggest_returns_nothing_when_nothing_fits() -> None:
    shape = shape_from_config(LLAMA3_8B)
    assert suggest(shape, TrainSettings(device="cuda", precision="bf16"), capacity=2 * 1024**3) == []


@pytest.mark.parametrize(
    ("text", "value"), [("80Gi", 80 * 2**30), ("24G", 24e9), ("500m", 0.5), ("1e3", 1000.0), ("8", 8.0)]
)
def test_parse_quantity(text: str, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


def test_parse_quantity_refuses_words() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("lots")


def test_run_config_takes_the_bound_from_the_spec_and_leaves_it_out_of_the_digest() -> None:
    gpu = resolve_run_config(_load(_job(**{"distributed.gpusPerNode": 1, "resources.gpuMemory": "80Gi"})))
    assert (
        gpu.plan.device_memory_bytes == 80 * 2**30
        and gpu.plan.device_memory_source == "spec.resources.gpuMemory"
    )
    cpu = resolve_run_config(_load(_job(**{"resources.memory": "16Gi", "runPolicy.ignorePlan": True})))
    assert cpu.plan.device_memory_bytes == 16 * 2**30 and cpu.plan.ignore
    plain = resolve_run_config(_load(_job()))
    assert cpu.config_digest() == plain.config_digest()  # the bound and ignorePlan train nothing different
