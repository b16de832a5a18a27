"""Make a staged version stand alone before it is published: no scratch paths, no boilerplate.

The libraries that write a version's folders leave traces of the trainer's machine in them:
peft's ``adapter_config.json`` names the base by the scratch directory it was loaded from, peft
writes a template ``README.md`` full of "[More Information Needed]", and optimum-quanto's
``save_pretrained`` writes a README saying the model was "pushed to the Hub". A version is
immutable and outlives that machine, so :func:`make_standalone`

* sets ``base_model_name_or_path`` of every ``adapter_config.json`` to the base model's URI as
  the spec names it (``s3://...``, ``hf://...``, ``modelversion://...``) and writes
  ``kubetune-base.json`` beside it with that URI and the base's content digest (peft refuses
  unknown keys in its own config, so the digest lives in its own file);
* deletes every ``README.md`` below the version root: the model card at the root is the only one.

Input: the staging folder; output: the list of paths (relative) it changed or removed. Raises
nothing for a folder without adapters or READMEs.
"""

from __future__ import annotations

import json
from pathlib import Path

BASE_RECORD = "kubetune-base.json"


def make_standalone(staging: Path, *, base_uri: str, base_digest: str | None) -> list[str]:
    """Rewrite scratch paths and drop boilerplate READMEs in ``staging`` (see the module docstring)."""
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
    return changed


__all__ = ["BASE_RECORD", "make_standalone"]
