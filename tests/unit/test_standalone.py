"""A version stands alone: no scratch paths, no boilerplate READMEs (issue 17, item 8)."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_trainer.artifacts.standalone import BASE_RECORD, make_standalone


def test_scratch_base_path_is_replaced_and_boilerplate_readmes_are_dropped(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "quantized" / "int8").mkdir(parents=True)
    (staging / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/tmp/work/inputs/base", "r": 16, "peft_type": "LORA"})
    )
    (staging / "adapter" / "README.md").write_text("## Model Details\n[More Information Needed]\n" * 39)
    (staging / "quantized" / "int8" / "README.md").write_text("This model has been pushed to the Hub")
    (staging / "README.md").write_text("# the model card")

    changed = make_standalone(staging, base_uri="s3://bucket/base-models/llama", base_digest="sha256:abc")

    config = json.loads((staging / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "s3://bucket/base-models/llama"
    assert config["r"] == 16  # the rest untouched
    assert json.loads((staging / "adapter" / BASE_RECORD).read_text()) == {
        "uri": "s3://bucket/base-models/llama",
        "digest": "sha256:abc",
    }
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("README.md")) == ["README.md"]
    assert "adapter/README.md" in changed and "quantized/int8/README.md" in changed
    assert "/tmp/" not in "".join(p.read_text() for p in staging.rglob("*.json"))
