"""The docs and the GitOps / Kueue examples stay true to the code.

- docs/api-reference.md is exactly what docs/gen_api_reference.py generates from the models;
- every relative link resolves; every `spec` field the docs name exists in the API; every metric the
  operator exports is documented; every chart value is documented; every `kubetune` command exists;
- the troubleshooting table covers the five symptoms, each with a cause and a fix;
- examples/gitops: the kustomization's files exist, and the inputs digest behaves as its README says
  (a promotion or checkpoint change trains nothing, a hyperparameter change does);
- examples/kueue: the Kueue objects are structurally valid and consistent with the queued job.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune_api.loader import load_finetunejob
from kubetune_api.models import FineTuneJob, FineTuneJobSpec
from kubetune_api.runconfig import resolve_run_config

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [
    *sorted(DOCS.glob("*.md")),
    REPO / "examples" / "gitops" / "README.md",
    REPO / "examples" / "kueue" / "README.md",
]
GITOPS = REPO / "examples" / "gitops"
KUEUE = REPO / "examples" / "kueue"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_api_reference", DOCS / "gen_api_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- docs -----------------------------------------------------------------------------------


def test_api_reference_is_generated_from_the_models(tmp_path: Path) -> None:
    gen = _generator()
    assert gen.main(["--check"]) == 0, "run `python docs/gen_api_reference.py`"
    stale = tmp_path / "api-reference.md"
    stale.write_text((DOCS / "api-reference.md").read_text().replace("Adapter rank.", "Adapter size."))
    assert gen.main(["--check", "--target", str(stale)]) == 1
    text = (DOCS / "api-reference.md").read_text()
    for path in (
        "`spec.method.lora.r`",
        "`status.progress.etaSeconds`",
        "`spec.manifestDigest`",
        "`outcome`",
    ):
        assert path in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        path = target.split("#", 1)[0]
        assert (page.parent / path).exists(), f"{page.relative_to(REPO)}: broken link {target}"


def _spec_has(path: str) -> bool:
    """True when a dotted camelCase path (``training.batchSize``) is a field of FineTuneJobSpec."""
    model: Any = FineTuneJobSpec
    for part in path.split("."):
        fields = {(info.alias or name): info for name, info in model.model_fields.items()}
        if part not in fields:
            return False
        annotation = fields[part].annotation
        model = next(
            (
                a
                for a in (annotation, *getattr(annotation, "__args__", ()))
                if isinstance(a, type) and hasattr(a, "model_fields")
            ),
            None,
        )
        if model is None:
            return part == path.split(".")[-1]
    return True


SPEC_SECTIONS = tuple(FineTuneJobSpec.model_fields)
SPEC_ALIASES = tuple((i.alias or n) for n, i in FineTuneJobSpec.model_fields.items())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_spec_fields_named_in_docs_exist(page: Path) -> None:
    text = page.read_text()
    if page.name == "api-reference.md":
        return
    missing = []
    for raw in re.findall(
        r"`((?:spec\.)?[a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)+)", text
    ):  # ia3 has a digit
        path = raw.removeprefix("spec.")
        if path.split(".")[0] not in SPEC_ALIASES:
            continue
        if not _spec_has(path):
            missing.append(raw)
    assert missing == [], f"{page.relative_to(REPO)} names fields the API does not have: {missing}"


def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def test_troubleshooting_table_covers_the_symptoms_with_fixes() -> None:
    rows = _table_rows((DOCS / "operating.md").read_text(), "Troubleshooting")
    symptoms: dict[str, tuple[str, str] | None] = {
        "loss not decreasing": None,
        "repetitive output": None,
        "domain terms wrong": None,
        "oom": None,
        "nccl timeouts": None,
    }
    for symptom, cause, fix in rows:
        for key in symptoms:
            if key in symptom.lower():
                symptoms[key] = (cause, fix)
    for key, found in symptoms.items():
        assert found is not None, f"operating.md: no troubleshooting row for {key!r}"
        cause, fix = found
        assert len(cause) > 20 and len(fix) > 40 and "`" in fix, f"{key}: the fix must name what to change"


def test_every_operator_metric_is_documented() -> None:
    from kubetune_operator.metrics import OperatorMetrics

    text = (DOCS / "operating.md").read_text()
    names = {m.name for m in OperatorMetrics().registry.collect()}
    assert names
    for name in names:
        assert f"`{name}" in text, f"operating.md does not document metric {name}"


def test_every_chart_value_is_documented() -> None:
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    text = (DOCS / "install.md").read_text()
    for key in values:
        assert f"| `{key}` |" in text, f"install.md does not document chart value {key}"


def _commands() -> set[str]:
    from kubetune_cli import cluster as cli_cluster
    from kubetune_cli import main as cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "submit" not in sub.choices:  # until cli.py wires the cluster commands in
        cli_cluster.add_commands(sub)
    return set(sub.choices)


def test_kubetune_commands_in_docs_exist() -> None:
    commands = _commands()
    for page in [*PAGES, REPO / "charts" / "kubetune" / "templates" / "NOTES.txt"]:
        for cmd in re.findall(r"`kubetune ([a-z][a-z-]*)", page.read_text()):
            assert cmd in commands, f"{page.relative_to(REPO)}: `kubetune {cmd}` is not a command"


# --- examples/gitops --------------------------------------------------------------------------


def test_gitops_layout_is_complete() -> None:
    kustomization = yaml.safe_load((GITOPS / "team-support" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (GITOPS / "team-support" / resource).is_file()
    app = yaml.safe_load((GITOPS / "argocd-application.yaml").read_text())
    assert app["kind"] == "Application" and app["apiVersion"] == "argoproj.io/v1alpha1"
    assert (REPO / app["spec"]["source"]["path"]).is_dir()
    assert app["spec"]["destination"]["namespace"] == kustomization["namespace"]


def _digest(job: FineTuneJob) -> str:
    digest: str = resolve_run_config(job).config_digest()
    return digest


def _variant(job: FineTuneJob, path: str, value: Any) -> FineTuneJob:
    data = copy.deepcopy(job.model_dump(mode="json", by_alias=True, exclude_none=True))
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return FineTuneJob.model_validate(data)


def test_gitops_promotion_and_resync_train_nothing_but_a_spec_change_does() -> None:
    job = load_finetunejob(GITOPS / "team-support" / "finetunejob.yaml")
    base = _digest(job)
    # The promotion commit, a checkpoint cadence change and a re-labelled object: same digest.
    assert _digest(_variant(job, "spec.output.promote.alias", "production")) == base
    assert _digest(_variant(job, "spec.training.checkpoint.everySteps", 500)) == base
    assert _digest(_variant(job, "metadata.labels", {"team": "support"})) == base
    # What changes the weights: a new version.
    assert _digest(_variant(job, "spec.training.learningRate", 0.0001)) != base
    assert _digest(_variant(job, "spec.method.lora.r", 32)) != base


# --- examples/kueue ---------------------------------------------------------------------------

_QUANTITY = {"type": ["string", "integer", "number"]}
KUEUE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ResourceFlavor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {
            "apiVersion": {"const": "kueue.x-k8s.io/v1beta1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "nodeLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "nodeTaints": {
                        "type": "array",
                        "items": {"type": "object", "required": ["key", "effect"]},
                    },
                    "tolerations": {"type": "array"},
                },
            },
        },
    },
    "ClusterQueue": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kueue.x-k8s.io/v1beta1"},
            "spec": {
                "type": "object",
                "required": ["resourceGroups"],
                "additionalProperties": False,
                "properties": {
                    "cohort": {"type": "string"},
                    "namespaceSelector": {"type": "object"},
                    "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
                    "preemption": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "withinClusterQueue": {
                                "enum": ["Never", "LowerPriority", "LowerOrNewerEqualPriority"]
                            },
                            "reclaimWithinCohort": {"enum": ["Never", "LowerPriority", "Any"]},
                            "borrowWithinCohort": {"type": "object"},
                        },
                    },
                    "resourceGroups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["coveredResources", "flavors"],
                            "additionalProperties": False,
                            "properties": {
                                "coveredResources": {"type": "array", "items": {"type": "string"}},
                                "flavors": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name", "resources"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "name": {"type": "string"},
                                            "resources": {
                                                "type": "array",
                                                "items": {
                                                    "type": "object",
                                                    "required": ["name", "nominalQuota"],
                                                    "additionalProperties": False,
                                                    "properties": {
                                                        "name": {"type": "string"},
                                                        "nominalQuota": _QUANTITY,
                                                        "borrowingLimit": _QUANTITY,
                                                        "lendingLimit": _QUANTITY,
                                                    },
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "LocalQueue": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "kueue.x-k8s.io/v1beta1"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object",
                "required": ["clusterQueue"],
                "additionalProperties": False,
                "properties": {"clusterQueue": {"type": "string"}},
            },
        },
    },
}


def _kueue_objects() -> dict[str, dict[str, Any]]:
    objs: dict[str, dict[str, Any]] = {}
    for path in sorted(KUEUE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objs[doc["kind"]] = doc
    return objs


def test_kueue_objects_are_valid_and_consistent_with_the_queued_job() -> None:
    objs = _kueue_objects()
    assert set(objs) == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "FineTuneJob"}
    for kind, schema in KUEUE_SCHEMAS.items():
        jsonschema.validate(objs[kind], schema)
    job = load_finetunejob(KUEUE / "finetunejob.yaml")
    local, cluster, flavor = objs["LocalQueue"], objs["ClusterQueue"], objs["ResourceFlavor"]
    assert job.spec.run_policy.queue_name == local["metadata"]["name"]
    assert job.metadata.namespace == local["metadata"]["namespace"]
    assert local["spec"]["clusterQueue"] == cluster["metadata"]["name"]
    (group,) = cluster["spec"]["resourceGroups"]
    assert job.spec.resources.gpu_resource_name in group["coveredResources"]
    (fl,) = group["flavors"]
    assert fl["name"] == flavor["metadata"]["name"]
    quota = {r["name"]: r["nominalQuota"] for r in fl["resources"]}
    gpus = job.spec.distributed.nodes * job.spec.distributed.gpus_per_node
    assert gpus <= quota[job.spec.resources.gpu_resource_name], "the example job could never be admitted"
    # The job's pods land on the flavor's nodes: its selector matches and it tolerates the taint.
    assert job.spec.resources.node_selector.items() <= flavor["spec"]["nodeLabels"].items()
    assert any(t.key == flavor["spec"]["nodeTaints"][0]["key"] for t in job.spec.resources.tolerations)


def test_kueue_schema_catches_a_typo() -> None:
    bad = copy.deepcopy(_kueue_objects()["LocalQueue"])
    bad["spec"]["clusterQueu"] = bad["spec"].pop("clusterQueue")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUEUE_SCHEMAS["LocalQueue"])
