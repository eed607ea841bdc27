# ime-recorder: `make run` records from the built-in simulator, `make test` runs the suite.
PYTHON ?= $(shell command -v python3.12 || command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: all install run test lint format bench clean

all: lint test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/ime-recorder demo

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check recorder tests
	$(BIN)/ruff format --check recorder tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix recorder tests
	$(BIN)/ruff format recorder tests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist
