"""The operator image has no torch; the trainer has no kopf (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_operator_and_api_do_not_import_torch() -> None:
    for module in ("kubetune_api.models", "kubetune_api.runconfig", "kubetune_operator"):
        loaded = _modules_after_import(module)
        assert "torch" not in loaded and "transformers" not in loaded, module


def test_no_package_is_importable_as_operator_shadowing_the_stdlib() -> None:
    import operator

    assert hasattr(operator, "itemgetter") and "site-packages" not in (operator.__file__ or "")


def test_trainer_does_not_import_kopf() -> None:
    loaded = _modules_after_import("kubetune_trainer")
    assert "kopf" not in loaded
