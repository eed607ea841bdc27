# ime-recorder: `make run` records from the built-in simulator, `make test` runs the suite.
# the first interpreter that really runs and is >= 3.11 (pyenv shims may exist but fail)
PYTHON ?= $(shell for p in python3 python3.12 python3.11 python3.13; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; \
	done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: all install run test lint format bench clean promtool

all: lint test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is needed (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/ime-recorder demo

test: install
	$(BIN)/pytest

# promtool (checks configs/alerts.yml) is not on PyPI: take the binary out of Debian's
# prometheus package, without installing the package (no service, no dependencies)
$(BIN)/promtool: | $(STAMP)
	@command -v apt-get >/dev/null || { echo "promtool: needs apt-get (Debian); install promtool into $(BIN)"; exit 1; }
	set -e; tmp=$$(mktemp -d); chmod 755 $$tmp; \
	(cd $$tmp && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus; }; }); \
	dpkg-deb --fsys-tarfile $$tmp/prometheus_*.deb | tar -xO ./usr/bin/promtool >$$tmp/promtool; \
	install -m 755 $$tmp/promtool $@; rm -rf $$tmp
	$@ --version | head -1

promtool: $(BIN)/promtool

lint: install $(BIN)/promtool
	$(BIN)/ruff check recorder tests
	$(BIN)/ruff format --check recorder tests
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/promtool check rules configs/alerts.yml
	$(BIN)/promtool test rules configs/alerts.test.yml

format: install
	$(BIN)/ruff check --fix recorder tests
	$(BIN)/ruff format recorder tests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist

# the benchmark suite (bench/README.md): about 10 minutes on 2 cores; prints the results table
# and writes it to bench/results.md. BENCH_SCALE=0.1 make bench is a quick run (a tenth of the
# messages and seconds); BENCH_KEEP=1 keeps the recordings and the store in bench/.work.
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run
