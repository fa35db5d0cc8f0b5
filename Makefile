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

.PHONY: help venv up down stack-status clean-stack lint test demo demo-bottlecrm bench-produce bench-apply
.PHONY: bench
.PHONY: bench-capture bench-big-txn
.PHONY: validate-deploy bottlecrm bottlecrm-if-possible tryton tryton-rebuild test-tryton bench-tryton
.PHONY: bench-stock
.PHONY: demo-tryton

help:
	@echo "make venv          create .venv (pinned by requirements.lock) with the test extras"
	@echo "make up            start the local stack (Kafka 127.0.0.1:19092, PostgreSQL 127.0.0.1:15432)"
	@echo "make down          stop the local stack (data in .stack/ is kept)"
	@echo "make stack-status  health, port and version of each service"
	@echo "make clean-stack   stop the stack and delete .stack/"
	@echo "make lint          ruff + mypy"
	@echo "make test          lint, then pytest (integration tests use the stack when it is up)"
	@echo "make demo          bring the stack up and run the demo"
	@echo "make demo-bottlecrm   the same on a real CRM, BottleCRM (installed in .stack/)"
	@echo "make demo-tryton   the same with Tryton as the ERP (20 customers, 30 orders)"
	@echo "make validate-deploy   kustomize + kubeconform on deploy/k8s, compose checks"
	@echo "make bench         issue #13's comparison: bulk, burst, steady rates; latency, CPU of"
	@echo "                   CRM/ERP PostgreSQL, broker and ours, RSS; targets PASS/FAIL (~10 min;"
	@echo "                   make bench BENCH_ARGS=--quick: ~2 min)"
	@echo "make bench-produce / bench-apply   benchmarks"
	@echo "make bench-big-txn  producer peak RSS for one 1,000,000-row CRM transaction (< 300 MB)"
	@echo "make bench-stock   apply into an empty ERP vs one holding 1M orders (new vs old stock)"
	@echo "make bench-capture  CRM CPU of capture: SQL peek vs streaming replication"
	@echo "make bottlecrm     install BottleCRM (Python 3.12 venv in .stack/bottlecrm) and build its"
	@echo "                   migrated template database on the local stack (once: ~2-5 min)"
	@echo "make tryton        Tryton 8.2 in .stack/tryton/venv + template database tryton_template_<checkout hash>"
	@echo "make test-tryton   the tryton target's tests against a real Tryton server"
	@echo "make bench-tryton  sales/s applied into Tryton beside the sql target"

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

# ---- a real CRM for the integration tests: BottleCRM (idempotent; seconds once built) ------
bottlecrm:
	bash deploy/bottlecrm/install.sh

# `make test` on a machine without Python 3.12 (install.sh exits 3): the BottleCRM tests skip
# and say why; CI (.ci/run) runs `make bottlecrm` first, where that is a failure.
bottlecrm-if-possible:
	@bash deploy/bottlecrm/install.sh || { rc=$$?; [ $$rc -eq 3 ] && \
	    echo "make: no Python 3.12 here: the BottleCRM tests will be skipped" >&2 || exit $$rc; }

# ---- checks ---------------------------------------------------------------------------------
lint: venv
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy

test: venv lint bottlecrm-if-possible
	$(BIN)/pytest -q

validate-deploy: venv
	bash .ci/validate-deploy

# ---- demo and benchmarks -------------------------------------------------------------------
demo: venv up
	$(BIN)/crm-erp-sync demo run

demo-bottlecrm: venv up bottlecrm
	$(BIN)/crm-erp-sync demo bottlecrm

BENCH_ARGS ?=
bench: venv up
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

bench-produce: venv up
	$(BIN)/python -m bench.produce

bench-big-txn: venv up
	$(BIN)/python -m bench.produce --big-txn 1000000

bench-apply: venv up
	$(BIN)/python -m bench.apply

bench-stock: venv up
	$(BIN)/python -m bench.stock_scale

bench-capture: venv up
	$(BIN)/python -m bench.capture_cpu --burst 20000

# ---- Tryton (the `tryton` ERP target) -------------------------------------------------------
# Needs the stack's PostgreSQL (make up); install.sh says so when it is not reachable.
tryton:
	bash deploy/tryton/install.sh

tryton-rebuild:
	bash deploy/tryton/install.sh rebuild

test-tryton: venv tryton
	$(BIN)/pytest -q tests/unit/erp/test_tryton_rpc.py tests/unit/erp/test_tryton_target.py \
	    tests/integration/erp/test_tryton.py tests/integration/erp/test_consumer_tryton.py

demo-tryton: venv up tryton
	$(BIN)/crm-erp-sync demo tryton

bench-tryton: venv tryton
	$(BIN)/python -m bench.apply_tryton
