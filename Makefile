# One entry each for install, run, test, lint, bench. Everything lives in .venv.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install run test lint fmt bench mutants

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The embedded default: SQLite in .broker/, the jwt backend, the dev issuer, examples/policy.yaml.
run: install
	$(BIN)/broker serve --dev

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy broker

fmt: install
	$(BIN)/ruff format broker tests bench
	$(BIN)/ruff check --fix broker tests bench

bench: install
	$(BIN)/python bench/exchange_load.py

# Mutation testing of the security-critical modules ([tool.mutmut] in pyproject.toml;
# docs/testing.md): on demand, never in CI. It works in mutants/ and keeps its results there, so
# a second run only tries what changed. Narrow it with mutant names:
#   make mutants MUTANTS='broker.policy.engine.*'
MUTANTS ?=
mutants: install
	BROKER_SHARED_DIR=$${BROKER_SHARED_DIR:-$(CURDIR)/../shared} $(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results
