# Two commands do everything on a fresh machine: `make up` and `make test`.
SHELL := /bin/bash
VENV ?= .nadi/venv
BIN := $(VENV)/bin
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: up test check install services services-editions migrate lint typecheck clean-services web browser-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

services: install
	$(BIN)/nadi services up

## Also the second PostgreSQL with the Timescale-licensed TimescaleDB (built once, cached in
## ~/.cache/nadi). Without its source only CI fails here; elsewhere one line says it is skipped.
services-editions: install
	$(BIN)/nadi services up --timescale-edition $(if $(filter true,$(CI)),,--skip-missing-source)

migrate: services
	$(BIN)/nadi migrate

## Run the whole platform: services, migrations, simulator, processor, API, Dagster.
up: install
	$(BIN)/nadi up

## Import contracts (pyproject [tool.importlinter]), lint, format and types, code and tests.
check: lint typecheck
	PYTHONPATH=. $(BIN)/lint-imports

## The static checks, then the services the tests need (both TimescaleDB editions), then every test.
test: check services-editions browser-deps
	$(BIN)/pytest $(PYTEST_ARGS)

## Debian's chromium and playwright-core for the live page's browser test.
browser-deps:
	bash tests/browser/setup.sh

## Rebuild the live page (api/static is committed, so only after editing web/src).
web:
	cd web && npm ci --no-audit --no-fund && npm run build

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy command nadi streaming api pipelines infra bench tests

clean-services: install
	$(BIN)/nadi services down
