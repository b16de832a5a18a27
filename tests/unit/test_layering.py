"""The house's arrows (issue 15): which wing may import which, and who pays for torch.

The static contracts live in pyproject.toml's ``[tool.importlinter]`` (run by ``make lint`` and by
the test below); what a static graph cannot tell apart, *when* a module is imported, is checked here
by importing in a fresh interpreter and looking at ``sys.modules``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "deepspeed")


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "module",
    ["kubetune_api.models", "kubetune_api.runconfig", "kubetune_api.crdgen", "kubetune_operator.handlers"],
)
def test_api_and_operator_never_load_torch(module: str) -> None:
    loaded = _modules_after_import(module)
    assert not [m for m in HEAVY if m in loaded], module


@pytest.mark.parametrize(
    "module",
    [
        "kubetune_cli.main",  # the whole `kubetune` parser, every command registered
        "kubetune_registry.storage",
        "kubetune_registry.versions",
        "kubetune_trainer.data",  # `kubetune data validate` runs it in a [cli] install
    ],
)
def test_cli_and_registry_load_no_torch_at_import_time(module: str) -> None:
    loaded = _modules_after_import(module)
    assert not [m for m in HEAVY if m in loaded], module
    assert "kubernetes" not in loaded, f"{module}: the kubernetes client is for the cluster commands only"


def test_no_package_is_importable_as_operator_shadowing_the_stdlib() -> None:
    import operator

    assert hasattr(operator, "itemgetter") and "site-packages" not in (operator.__file__ or "")


def test_trainer_does_not_import_kopf() -> None:
    loaded = _modules_after_import("kubetune_trainer.pipeline")
    assert "kopf" not in loaded and "kubetune_operator" not in loaded


def test_import_contracts_hold() -> None:
    """pyproject.toml's import-linter contracts: forbidden arrows and no cycles in any package."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a dev dependency (pyproject.toml)"
    result = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    assert "BROKEN" not in result.stdout and "0 broken" in result.stdout


def test_every_wing_has_a_readme_that_says_what_it_may_import() -> None:
    for wing in ("api", "registry", "cli", "operator", "trainer_image"):
        readme = REPO / wing / "README.md"
        assert readme.exists(), f"{wing}/ has no README.md"
        text = readme.read_text().lower()
        assert "may import" in text and "imported by" in text, f"{wing}/README.md"
