# `make serve` and `make test` work on a fresh clone: each creates .venv and
# installs what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: serve test lint typecheck pytest install node-deps sample-config clean promtool rules-test

serve: $(STAMP)
	$(BIN)/keel serve

test: lint typecheck rules-test pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

node-deps: $(NODE_STAMP)

$(NODE_STAMP): tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --loglevel=error
	touch $@

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) node-deps
	$(BIN)/pytest

# promtool comes from Debian's prometheus package; installed only when missing.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }

rules-test: promtool
	promtool check rules deploy/prometheus/keel-rules.yml
	cd deploy/prometheus && promtool test rules keel-rules.test.yml

sample-config: $(STAMP)
	$(BIN)/keel config sample > config.sample.toml

clean:
	rm -rf $(VENV) tests/node/node_modules
