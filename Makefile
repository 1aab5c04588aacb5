# The two Quick start commands: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ECO2 := $(BIN)/eco2
STAMP := $(VENV)/.installed
# Node tools the tests drive (official AsyncAPI parser, a standards-following EventSource).
NODE_DIR := .local/node
NODE_STAMP := $(NODE_DIR)/.installed

PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: install node-tools demo test lint unit up down bench soak lock lock-upgrade image

install: $(STAMP)

# Only the tests need them (make test / make unit), not the stack or the demo.
node-tools: $(NODE_STAMP)

# Exactly the pinned, hash-checked versions of requirements-dev.lock, then the project itself.
$(STAMP): pyproject.toml requirements-dev.lock
	@$(PYTHON) -m eco2.lock --check
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements-dev.lock
	$(PIP) --no-deps -e .
	@touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js 20+ with npm (Debian: nodejs npm)"; exit 1; }
	@mkdir -p $(NODE_DIR)
	cp tests/node/package.json tests/node/package-lock.json $(NODE_DIR)/
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error
	@touch $@

# Refresh both lock files from pyproject.toml (after changing a dependency): keeps the pins the
# ranges still allow; lock-upgrade moves every pin to the newest allowed. Takes seconds (uv).
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m uv --version >/dev/null 2>&1 || $(PIP) 'uv>=0.5,<1'
	$(BIN)/python -m eco2.lock

lock-upgrade:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m uv --version >/dev/null 2>&1 || $(PIP) 'uv>=0.5,<1'
	$(BIN)/python -m eco2.lock --upgrade

# The one image every pod runs, built with buildah from deploy/Dockerfile (see docs/operations.md).
image: install
	$(ECO2) image build

up: install
	$(ECO2) stack up

down: install
	$(ECO2) stack down

demo: up
	$(ECO2) demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy .

# pytest exits 5 when it collected nothing: that must fail, not pass silently.
test: up lint node-tools
	@$(BIN)/pytest -q -rfE; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

unit: install node-tools
	$(BIN)/pytest -q -m "not integration"

# The full benchmark runs of docs/benchmarks.md (about 30 minutes; not part of `make test`).
bench: up
	$(ECO2) bench suite

# The hour-long soak of docs/benchmarks.md (300 VUs, SSE, faults; not part of `make test`).
soak: up
	$(ECO2) bench soak
