"""The Dockerfiles, checked without a Docker engine (none runs on these machines).

What is checked: every base image is pinned (a version tag or a digest, never latest), the final
stage runs as a non-root numeric USER that matches what the operator's pods and the chart run as,
the install steps are the project's own (`pip install ".[<extra>]"` from pyproject.toml, torch pinned
to pyproject's pin and installed first), the entry points exist as importable modules / console
scripts, and every COPY source exists. What is NOT checked: that the images build and run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
TRAINER_DOCKERFILES = [REPO / "trainer_image" / "Dockerfile", REPO / "trainer_image" / "Dockerfile.cuda"]
OPERATOR_DOCKERFILE = REPO / "operator" / "Dockerfile"
GATEWAY_DOCKERFILE = REPO / "gateway" / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str, int]] = field(default_factory=list)  # (op, args, line)


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]
    stages: list[Stage]

    def final(self) -> Stage:
        return self.stages[-1]

    def all(self, op: str) -> list[tuple[str, int]]:
        return [(a, line) for s in self.stages for (o, a, line) in s.instructions if o == op]


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comment lines dropped (as Docker does)."""
    logical: list[tuple[str, int]] = []
    buf, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((buf + line, start))
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text, number in logical:
        op, _, rest = text.partition(" ")
        op = op.upper()
        if op == "ARG":
            key, _, default = rest.partition("=")
            if stages:
                stages[-1].instructions.append((op, rest, number))
            if default and key not in args:
                args[key] = _substitute(default.strip().strip('"'), args)
            continue
        if op == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=_substitute(parts[0], args), name=name))
            continue
        assert stages, f"{path}:{number}: {op} before FROM"
        stages[-1].instructions.append((op, rest, number))
    return Dockerfile(path, args, stages)


def all_dockerfiles() -> list[Path]:
    return [*TRAINER_DOCKERFILES, OPERATOR_DOCKERFILE, GATEWAY_DOCKERFILE]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_torch() -> str:
    (pin,) = [
        d for d in pyproject()["project"]["optional-dependencies"]["trainer"] if d.startswith("torch==")
    ]
    return pin


@pytest.mark.parametrize("path", all_dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_exists_and_bases_are_pinned(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    df = parse_dockerfile(path)
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        if stage.base in stage_names:
            continue
        assert "$" not in stage.base, f"{path.name}: unresolved base {stage.base}"
        image, _, digest = stage.base.partition("@")
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert digest.startswith("sha256:") or (tag and tag != "latest" and re.search(r"\d", tag)), (
            f"{path.name}: base image {stage.base} is not pinned to a version tag or digest"
        )


def _final_user(df: Dockerfile) -> tuple[int, int]:
    users = [a for (op, a, _) in df.final().instructions if op == "USER"]
    assert users, f"{df.path.name}: the final stage has no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), (
        f"{df.path.name}: USER {users[-1]} must be numeric (runAsNonRoot can only verify a UID)"
    )
    return int(uid), int(gid or uid)


@pytest.mark.parametrize("path", all_dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_runs_as_non_root(path: Path) -> None:
    uid, gid = _final_user(parse_dockerfile(path))
    assert uid != 0 and gid != 0


def test_trainer_uid_is_what_the_pods_and_chart_run_as() -> None:
    chart_values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    for path in TRAINER_DOCKERFILES:
        uid, gid = _final_user(parse_dockerfile(path))
        assert uid == OperatorSettings().run_as_user == chart_values["trainer"]["runAsUser"], path.name
        assert gid == OperatorSettings().run_as_group == chart_values["trainer"]["runAsGroup"], path.name


def test_operator_uid_is_what_the_chart_runs_it_as() -> None:
    from tests.unit.test_chart import by_kind, render_objects

    uid, _ = _final_user(parse_dockerfile(OPERATOR_DOCKERFILE))
    (deploy,) = by_kind(render_objects(), "Deployment")
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


@pytest.mark.parametrize("path", TRAINER_DOCKERFILES, ids=lambda p: p.name)
def test_trainer_install_is_the_projects_own_with_torch_pinned_first(path: Path) -> None:
    runs = " && ".join(a for a, _ in parse_dockerfile(path).all("RUN"))
    torch_at = runs.find(pinned_torch())
    project_at = runs.find('pip install ".[trainer]"')
    assert torch_at >= 0, f"{path.name}: torch is not installed as {pinned_torch()} (pyproject's pin)"
    assert project_at >= 0, f'{path.name}: no `pip install ".[trainer]"` (the project\'s own install)'
    assert torch_at < project_at, f"{path.name}: torch must be installed before the rest (FACTS: CPU wheel)"
    assert "--index-url" in runs[max(0, torch_at - 200) : torch_at], "torch must come from an explicit index"
    assert "pip check" in runs
    for dep in ("requirements.txt",):
        assert dep not in runs, "the image installs from pyproject.toml only"


@pytest.mark.parametrize("path", TRAINER_DOCKERFILES, ids=lambda p: p.name)
def test_trainer_images_build_llama_cpp_with_the_scripts_pins_for_gguf(path: Path) -> None:
    """gguf-* formats run in pods too: the image builds llama.cpp with the same script (pins, sha256,
    CMake flags) `make test` uses, into the image's environment, and its import check covers it."""
    df = parse_dockerfile(path)
    runs = " && ".join(a for a, _ in df.all("RUN"))
    assert "KUBETUNE_VENV=/opt/kubetune" in runs and "bash scripts/build-llama-cpp.sh" in runs
    assert runs.find('pip install ".[trainer]"') < runs.find("build-llama-cpp.sh") < runs.find("pip check")
    assert "cmake" in runs
    assert "llama_cpp" in df.all("RUN")[-1][0], "the final import check must import llama_cpp"
    ignore = path.with_name(path.name + ".dockerignore").read_text().splitlines()
    assert "!scripts/build-llama-cpp.sh" in ignore


def test_cuda_variant_compiles_deepspeed_ops_at_build_time() -> None:
    df = parse_dockerfile(REPO / "trainer_image" / "Dockerfile.cuda")
    runs = " && ".join(a for a, _ in df.all("RUN"))
    ds_pin = next(
        d for d in pyproject()["project"]["optional-dependencies"]["trainer"] if d.startswith("deepspeed==")
    )
    assert ds_pin in runs, "DeepSpeed must be built at the version pyproject pins"
    assert re.search(r"DS_BUILD_(FUSED_ADAM|CPU_ADAM|OPS)=1", runs), "no DeepSpeed op is pre-compiled"
    assert "--no-build-isolation" in runs and "ds_report" in runs
    assert "cuda" in df.stages[-1].base and "runtime" in df.stages[-1].base
    assert any("devel" in s.base for s in df.stages), "ops need nvcc: a -devel build stage"
    cpu = " && ".join(a for a, _ in parse_dockerfile(REPO / "trainer_image" / "Dockerfile").all("RUN"))
    assert (
        "download.pytorch.org/whl/cpu"
        in parse_dockerfile(REPO / "trainer_image" / "Dockerfile").args["TORCH_INDEX_URL"]
    )
    assert "cuda" not in cpu.lower()


def _entrypoint(df: Dockerfile) -> list[str]:
    (entry,) = [a for (op, a, _) in df.final().instructions if op == "ENTRYPOINT"]
    return list(yaml.safe_load(entry))  # exec form is a JSON array


@pytest.mark.parametrize("path", TRAINER_DOCKERFILES, ids=lambda p: p.name)
def test_trainer_entry_point_is_the_module_the_operator_starts(path: Path) -> None:
    entry = _entrypoint(parse_dockerfile(path))
    assert entry[:2] == ["python", "-m"]
    module = entry[2]
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module}.__main__ does not exist"
    settings = OperatorSettings()
    assert list(settings.trainer_command) == entry and settings.trainer_module == module


def test_operator_image_entry_point_is_a_console_script_and_has_no_torch() -> None:
    df = parse_dockerfile(OPERATOR_DOCKERFILE)
    (script,) = _entrypoint(df)
    target = pyproject()["project"]["scripts"][script]
    module, _, func = target.partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin and f"def {func}(" in Path(spec.origin).read_text()
    runs = " ".join(a for a, _ in df.all("RUN"))
    assert '".[operator]"' in runs and "torch" not in runs and "[trainer]" not in runs


@pytest.mark.parametrize("path", all_dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_copy_sources_exist(path: Path) -> None:
    df = parse_dockerfile(path)
    for args, line in df.all("COPY"):
        parts = shlex.split(args)
        if any(p.startswith("--from") for p in parts):
            continue
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"{path.relative_to(REPO)}:{line}: COPY source {src} does not exist"


def test_parser_catches_an_unpinned_root_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python:latest\nRUN pip install torch\nENTRYPOINT ["python"]\n')
    df = parse_dockerfile(bad)
    assert df.stages[0].base == "python:latest"
    with pytest.raises(AssertionError, match="no USER"):
        _final_user(df)


def test_gateway_image_is_its_extra_and_runs_as_the_charts_user() -> None:
    df = parse_dockerfile(GATEWAY_DOCKERFILE)
    runs = " ".join(a for a, _ in df.all("RUN"))
    assert 'pip install ".[gateway]"' in runs and "torch" not in runs
    uid, _ = _final_user(df)
    chart = (REPO / "charts" / "kubetune" / "templates" / "gateway.yaml").read_text()
    assert f"runAsUser: {uid}" in chart
    (entry,) = [a for (op, a, _) in df.final().instructions if op == "ENTRYPOINT"]
    script = json.loads(entry)[0]
    assert script in pyproject()["project"]["scripts"]
