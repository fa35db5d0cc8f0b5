# crm-erp-sync developer entry points. The local stack (Kafka KRaft + PostgreSQL 15, no Docker)
# is deploy/local/stack.sh; state and logs go to .stack/.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STACK  := deploy/local/stack.sh

.PHONY: help venv up down stack-status clean-stack lint test demo bench-produce bench-apply
.PHONY: bench-capture
.PHONY: validate-deploy

help:
	@echo "make venv          create .venv (pinned by requirements.lock) with the test extras"
	@echo "make up            start the local stack (Kafka 127.0.0.1:19092, PostgreSQL 127.0.0.1:15432)"
	@echo "make down          stop the local stack (data in .stack/ is kept)"
	@echo "make stack-status  health, port and version of each service"
	@echo "make clean-stack   stop the stack and delete .stack/"
	@echo "make lint          ruff + mypy"
	@echo "make test          lint, then pytest (integration tests use the stack when it is up)"
	@echo "make demo          bring the stack up and run the demo"
	@echo "make validate-deploy   kustomize + kubeconform on deploy/k8s, compose checks"
	@echo "make bench-produce / bench-apply   benchmarks"
	@echo "make bench-capture  CRM CPU of capture: SQL peek vs streaming replication"

# ---- python environment -------------------------------------------------------------------
venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	@touch $@

# ---- local stack ----------------------------------------------------------------------------
up:
	bash $(STACK) up

down:
	bash $(STACK) down

stack-status:
	bash $(STACK) status

clean-stack: down
	rm -rf .stack

# ---- checks ---------------------------------------------------------------------------------
lint: venv
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy

test: venv lint
	$(BIN)/pytest -q

validate-deploy: venv
	bash .ci/validate-deploy

# ---- demo and benchmarks -------------------------------------------------------------------
demo: venv up
	$(BIN)/crm-erp-sync demo run

bench-produce: venv up
	$(BIN)/python -m bench.produce

bench-apply: venv up
	$(BIN)/python -m bench.apply
	$(BIN)/python -m bench.e2e

bench-capture: venv up
	$(BIN)/python -m bench.capture_cpu --burst 20000
