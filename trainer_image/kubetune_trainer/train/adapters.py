"""Adapter methods through peft: LoRA, DoRA, rsLoRA, (IA)^3, and LoRA on selected layers only.

(IA)^3 always adapts every layer: peft 0.21's IA3Config has no ``layers_to_transform``.

:func:`build_peft_config` turns ``spec.method`` into the peft config the recipe wraps the model
with; :func:`adapter_record` is the same choice as plain JSON for the version's manifest (``extra``)
and model card. Everything lands in ``adapter/adapter_config.json`` through peft's own
``save_pretrained``, so ``PeftModel.from_pretrained(base, "adapter/")`` reloads any of them.

Why ``all-linear`` is expanded here for layer selection: peft refuses ``layers_to_transform`` when
``target_modules`` is a string (its ``all-linear`` shorthand is one), so with ``layers`` set the
linear module names are listed explicitly, leaving out the output head as peft's shorthand does.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import IA3Config, LoraConfig

from kubetune_api.models import MethodSpec


class AdapterConfigError(ValueError):
    """``spec.method`` cannot be applied to this base model (the message names the field)."""


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``down_proj`` ...), output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    return sorted(names)


def _check_layers(layers: list[int] | None, model: Any, field: str) -> list[int] | None:
    if layers is None:
        return None
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(count, int):
        bad = sorted({i for i in layers if i >= count})
        if bad:
            raise AdapterConfigError(
                f"{field}: layer(s) {bad} do not exist; the base model has {count} layers (0-{count - 1})"
            )
    return sorted(set(layers))


def build_peft_config(method: MethodSpec, model: Any) -> Any:
    """The peft config for ``method`` (type lora, qlora or ia3) on ``model``.

    Raises AdapterConfigError for layer indices the model does not have, and ValueError for
    ``method.type: full`` (nothing to wrap).
    """
    if method.type == "full":
        raise ValueError("method.type full trains the whole model: there is no adapter config")
    if method.type == "ia3":
        ia3 = method.ia3
        return IA3Config(
            target_modules=list(ia3.target_modules) if ia3.target_modules is not None else None,
            feedforward_modules=(
                list(ia3.feedforward_modules) if ia3.feedforward_modules is not None else None
            ),
            task_type="CAUSAL_LM",
        )
    lora = method.lora
    layers = _check_layers(lora.layers, model, "spec.method.lora.layers")
    targets: Any = list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = linear_module_names(model) if layers is not None else "all-linear"
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        use_dora=lora.variant == "dora",
        use_rslora=lora.variant == "rslora",
        task_type="CAUSAL_LM",
    )


def adapter_record(method: MethodSpec) -> dict[str, Any]:
    """The adapter choice as JSON for the manifest's ``extra.adapter`` and the model card.

    ``peftType`` is what ``adapter_config.json`` says (LORA or IA3); ``variant`` tells LoRA, DoRA and
    rsLoRA apart; ``layers`` is None when every layer is adapted.
    """
    if method.type == "full":
        return {"method": "full", "peftType": None}
    if method.type == "ia3":
        ia3 = method.ia3
        return {
            "method": "ia3",
            "peftType": "IA3",
            "variant": "ia3",
            "targetModules": ia3.target_modules,
            "feedforwardModules": ia3.feedforward_modules,
            "layers": None,
        }
    lora = method.lora
    return {
        "method": method.type,
        "peftType": "LORA",
        "variant": lora.variant,
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targetModules": list(lora.target_modules),
        "layers": sorted(set(lora.layers)) if lora.layers is not None else None,
    }


def describe(method: MethodSpec) -> dict[str, str]:
    """Human-readable adapter lines for the model card's hyperparameter table."""
    if method.type == "full":
        return {}
    if method.type == "ia3":
        ia3 = method.ia3
        return {
            "adapter": "(IA)^3 (peft IA3)",
            "IA3 target modules": ", ".join(ia3.target_modules or ["peft default for the architecture"]),
            "adapted layers": "all",
        }
    lora = method.lora
    name = {"lora": "LoRA", "dora": "DoRA (use_dora)", "rslora": "rsLoRA (use_rslora)"}[lora.variant]
    return {
        "adapter": name,
        "LoRA r / alpha / dropout": f"{lora.r} / {lora.alpha} / {lora.dropout:g}",
        "LoRA target modules": ", ".join(lora.target_modules),
        "adapted layers": _layers_text(lora.layers),
    }


def _layers_text(layers: list[int] | None) -> str:
    return "all" if layers is None else ", ".join(str(i) for i in sorted(set(layers)))
