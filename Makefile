# LLM chat service. `make help` lists the targets; README.md explains them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-from-lock
HOST ?= 127.0.0.1
PORT ?= 8000
BENCH_ARGS ?=
PIP_QUIET := --disable-pip-version-check -q

.DEFAULT_GOAL := help
.PHONY: help install demo run test lint fmt openapi lock bench-tools bench bench-compare soak clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv/ with every runtime and test dependency, pinned by requirements.lock

$(STAMP): requirements.lock
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) -r requirements.lock
	touch $(STAMP)

demo: install ## Run the service on the bundled OFFLINE demo upstream (no OpenAI key needed); HOST/PORT honoured
	@cd backend && ../$(BIN)/python -m src.devtools.demo --host $(HOST) --port $(PORT)

run: install ## Run the service against the real upstream configured in .env (OPENAI_API_KEY, ...)
	@$(BIN)/python -m uvicorn src.main:app --app-dir backend --host $(HOST) --port $(PORT) --no-access-log --ws none

test: install ## Install what is missing and run the whole test suite (unit, integration, end-to-end)
	$(BIN)/python -m pytest

lint: install ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

openapi: install ## Regenerate specs/003-llm-service/contracts/openapi.yaml from the app
	cd backend && ../$(BIN)/python -m src.devtools.openapi

lock: ## Re-pin requirements.lock from pyproject.toml
	$(PYTHON) scripts/lock.py

bench-tools: ## Install wrk (the load generator) from the system's packages when it is missing
	@command -v wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } || \
		{ echo "install wrk (Debian/Ubuntu: apt-get install wrk)"; exit 1; }

bench: install bench-tools ## Benchmark direct upstream vs the service (wrk); prints a table, writes bench/results/latest.json
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-compare: install ## Compare bench/results/latest.json with bench/results/previous.json
	$(BIN)/python -m bench.compare

soak: install ## 1,000 concurrent streams against a slow upstream: completion, errors, peak RSS
	$(BIN)/python -m bench.soak $(BENCH_ARGS)

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
