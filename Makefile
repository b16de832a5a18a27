# kubetune developer entry points. Every target sets itself up on a fresh machine.
#   make quickstart   — a full LoRA fine-tune of examples/quickstart on this machine (CPU, minutes)
#   make test         — lint, type-check, CRD drift check, unit + integration tests (what CI runs)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
STORE ?= .kubetune/store
PYTEST_ARGS ?=

.PHONY: setup tools quickstart test lint typecheck crds crds-check docs-check unit integration kube clean

setup:
	@bash scripts/bootstrap.sh

# Debian packages the tests use for real: Lua 5.4 + lua-cjson run the Argo CD health checks.
tools:
	@command -v lua5.4 >/dev/null && lua5.4 -e 'require("cjson")' 2>/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq lua5.4 lua-cjson >/dev/null)

quickstart: setup
	$(VENV)/bin/kubetune demo prepare --store-dir $(STORE)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/kubetune run examples/quickstart/finetunejob.yaml --store-dir $(STORE)

lint: setup
	$(VENV)/bin/ruff check api registry cli operator trainer_image tests bench docs
	$(VENV)/bin/ruff format --check api registry cli operator trainer_image tests bench docs
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy -p kubetune_api -p kubetune_registry -p kubetune_cli -p kubetune_operator -p kubetune_trainer

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

unit: setup tools
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: setup tools kube
	$(VENV)/bin/pytest tests/integration -m integration $(PYTEST_ARGS)

test: setup tools lint typecheck crds-check docs-check kube
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

clean:
	rm -rf .kubetune .pytest_cache .mypy_cache .ruff_cache
