"""Make a staged version stand alone before it is published: no scratch paths, no boilerplate,
and every model folder saying how to prompt it and where its answers end.

The libraries that write a version's folders leave traces of the trainer's machine in them:
peft's ``adapter_config.json`` names the base by the scratch directory it was loaded from, peft
writes a template ``README.md`` full of "[More Information Needed]", and optimum-quanto's
``save_pretrained`` writes a README saying the model was "pushed to the Hub". A version is
immutable and outlives that machine, so :func:`make_standalone`

* sets ``base_model_name_or_path`` of every ``adapter_config.json`` to the base model's URI as
  the spec names it (``s3://...``, ``hf://...``, ``modelversion://...``) and writes
  ``kubetune-base.json`` beside it with that URI and the base's content digest (peft refuses
  unknown keys in its own config, so the digest lives in its own file);
* deletes every ``README.md`` below the version root: the model card at the root is the only one;
* in every folder with a tokenizer (``adapter/``, ``merged/``, ``quantized/<format>/``): writes the
  chat template the model was trained with as ``chat_template.jinja`` when the tokenizer lacks it
  (``data.template`` ``chatml``, or ``auto`` on a tokenizer without a template), so
  ``apply_chat_template`` renders the prompt training rendered; and lists in
  ``generation_config.json``'s ``eos_token_id`` every id that ends an answer (the tokenizer's EOS,
  the ids already there, and the end-of-turn token of the chat templates when the vocabulary has
  one, e.g. ChatML's ``<|im_end|>``), so ``generate`` stops where the tuned model stops.

Input: the staging folder; output: the list of paths (relative) it changed or removed. Raises
nothing for a folder without adapters, READMEs or tokenizers; OSError / ValueError (from
transformers) for a tokenizer folder it cannot load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from kubetune_trainer.evaluate.evaluator import stop_token_ids

BASE_RECORD = "kubetune-base.json"

#: ``data.template: chatml`` as a chat template: the prompt is exactly what
#: :mod:`kubetune_trainer.data.templates` renders before an answer (tested against it).
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_GENERATION_CONFIG = "generation_config.json"


def make_standalone(
    staging: Path, *, base_uri: str, base_digest: str | None, template: str | None = None
) -> list[str]:
    """Rewrite scratch paths, drop boilerplate READMEs and make every tokenizer folder carry its
    chat template and stop ids (see the module docstring).

    ``template`` is ``spec.data.template``; None leaves the tokenizers' chat templates as saved.
    """
    changed: list[str] = []
    for config_path in sorted(staging.rglob("adapter_config.json")):
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_uri
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (config_path.parent / BASE_RECORD).write_text(
            json.dumps({"uri": base_uri, "digest": base_digest}, indent=2) + "\n"
        )
        changed += [
            config_path.relative_to(staging).as_posix(),
            (config_path.parent / BASE_RECORD).relative_to(staging).as_posix(),
        ]
    for readme in sorted(staging.rglob("README.md")):
        if readme.parent != staging:
            readme.unlink()
            changed.append(readme.relative_to(staging).as_posix())
    for tokenizer_config in sorted(staging.rglob("tokenizer_config.json")):
        folder = tokenizer_config.parent
        changed += [p.relative_to(staging).as_posix() for p in _prompt_and_stops(folder, template)]
    return changed


def training_chat_template(template: str | None, saved: str | None) -> str | None:
    """The chat template a folder must carry for ``data.template`` = ``template``, given the one its
    tokenizer ``saved``; None when the saved one is right (or there is nothing to write).

    ``tokenizer`` (and ``auto`` with a saved template) trained on the tokenizer's own template;
    ``chatml`` (and ``auto`` without one) on ChatML. ``inst`` and ``alpaca`` have no chat template
    here yet: their tokenizers are left as saved.
    """
    wanted = "chatml" if template == "chatml" or (template == "auto" and not saved) else None
    if wanted == "chatml" and saved != CHATML_CHAT_TEMPLATE:
        return CHATML_CHAT_TEMPLATE
    return None


def _prompt_and_stops(folder: Path, template: str | None) -> list[Path]:
    """Write ``folder``'s chat template (when needed) and stop ids; returns the files written."""
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    written: list[Path] = []
    chat_template = training_chat_template(template, getattr(tokenizer, "chat_template", None) or None)
    if chat_template is not None:
        # chat_template.jinja takes priority over a chat_template entry in tokenizer_config.json.
        (folder / _CHAT_TEMPLATE_FILE).write_text(chat_template)
        written.append(folder / _CHAT_TEMPLATE_FILE)
    path = folder / _GENERATION_CONFIG
    generation = json.loads(path.read_text()) if path.is_file() else {}
    existing = generation.get("eos_token_id")
    ids = [i for i in (existing if isinstance(existing, list) else [existing]) if isinstance(i, int)]
    ids += [i for i in stop_token_ids(None, tokenizer) if i not in ids]
    if ids != existing:
        generation["eos_token_id"] = ids
        if generation.get("pad_token_id") is None and getattr(tokenizer, "pad_token_id", None) is not None:
            generation["pad_token_id"] = int(tokenizer.pad_token_id)
        path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


__all__ = ["BASE_RECORD", "CHATML_CHAT_TEMPLATE", "make_standalone", "training_chat_template"]
