# LLM chat service. `make help` lists the targets; README.md explains them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-from-lock
# Runtime only (what production installs), and runtime + the `dev` extra (what `make install` puts in .venv/).
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# Where `make install-prod` puts the runtime-only virtualenv.
PROD_VENV ?= .venv-prod
HOST ?= 127.0.0.1
PORT ?= 8000
# Where `make demo` keeps its usage ledger (SQLite).
DEMO_LEDGER ?= $(CURDIR)/data/llm-service.db
BENCH_ARGS ?=
# The official openai Node SDK the end-to-end tests drive, pinned by its package-lock.json.
NODE_SDK_DIR := backend/tests/support/node_sdk
NODE_STAMP := $(NODE_SDK_DIR)/node_modules/.installed-from-lock
# Extra arguments for pytest (`make test PYTEST_ARGS='-k stream'`) and for both uv runs (`make lock LOCK_ARGS=--upgrade`).
PYTEST_ARGS ?=
LOCK_ARGS ?=
LOCK_INDEX ?= https://pypi.org/simple
PIP_QUIET := --disable-pip-version-check -q
PIP_LOCKED := $(PIP_QUIET) --require-hashes -r
# Hashed pins resolved for Python 3.11+ on every platform, from the public index (never a machine's own index or
# pip config), with the lock header naming `make lock`.
UV_COMPILE := pip compile pyproject.toml --quiet --no-config --universal --python-version 3.11 --generate-hashes \
	--default-index $(LOCK_INDEX) --custom-compile-command 'make lock'
CHECK_PYTHON := $(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required, found " + sys.version.split()[0]) \
	if sys.version_info < (3, 11) else None'

.DEFAULT_GOAL := help
.PHONY: help install install-prod system-deps node-deps demo run test lint fmt openapi lock bench bench-instructions bench-compare soak clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv/ with the runtime and dev dependencies, hash-checked from requirements-dev.lock

$(STAMP): $(DEV_LOCK)
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_LOCKED) $(DEV_LOCK)
	touch $(STAMP)

install-prod: ## Production: runtime dependencies only, hash-checked from requirements.lock, into PROD_VENV (.venv-prod)
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(PROD_VENV)
	$(PROD_VENV)/bin/python -m pip install $(PIP_LOCKED) $(LOCK)

system-deps: ## Install the Debian packages the tests and bench use (nginx, tinyproxy, wrk, nodejs, npm, chromium, valgrind) when missing (root only)
	@$(PYTHON) scripts/system_deps.py

node-deps: ## Install the Node SDK the end-to-end tests drive (npm ci from its lock); without npm, say so (those tests skip)
	@if command -v npm >/dev/null 2>&1; then $(MAKE) -s --no-print-directory $(NODE_STAMP); \
	else echo "npm not found: the Node SDK tests will skip (under CI they fail); install Node.js 20+"; fi

$(NODE_STAMP): $(NODE_SDK_DIR)/package-lock.json
	cd $(NODE_SDK_DIR) && npm ci --no-audit --no-fund --ignore-scripts
	touch $(NODE_STAMP)

demo: install ## Run the service on the bundled OFFLINE demo upstream (no OpenAI key needed); HOST/PORT honoured
	@cd backend && ../$(BIN)/python -m src.devtools.demo --host $(HOST) --port $(PORT) --ledger $(DEMO_LEDGER)

run: install ## Run the service against the real upstream configured in .env (OPENAI_API_KEY, ...)
	@$(BIN)/python -m uvicorn src.main:app --app-dir backend --host $(HOST) --port $(PORT) --no-access-log --ws none

test: install system-deps node-deps ## Run the whole test suite (unit, integration, end-to-end) with coverage of backend/src (floor 90%)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

openapi: install ## Regenerate specs/003-llm-service/contracts/openapi.yaml from the app
	cd backend && ../$(BIN)/python -m src.devtools.openapi

# The dev lock first, then the runtime lock constrained by it: production runs exactly the versions the tests ran.
lock: install ## Re-pin requirements-dev.lock and requirements.lock (hashed) from pyproject.toml with uv
	$(BIN)/uv $(UV_COMPILE) --extra dev $(LOCK_ARGS) -o $(DEV_LOCK)
	$(BIN)/uv $(UV_COMPILE) --constraint $(DEV_LOCK) $(LOCK_ARGS) -o $(LOCK)

bench: install system-deps ## Benchmark direct upstream vs the service (wrk); prints a table, writes bench/results/latest.json
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-instructions: install system-deps ## CPU instructions per call (callgrind): repeatable on a noisy machine; BENCH_ARGS="--baseline PATH/backend"
	$(BIN)/python -m bench.instructions $(BENCH_ARGS)

bench-compare: install ## Compare bench/results/latest.json with bench/results/previous.json
	$(BIN)/python -m bench.compare

soak: install ## 1,000 concurrent streams against a slow upstream: completion, errors, peak RSS
	$(BIN)/python -m bench.soak $(BENCH_ARGS)

clean: ## Remove the virtualenv, caches and coverage data
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
