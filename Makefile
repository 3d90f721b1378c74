# One-command setup, demo and tests. Every target does its own setup on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup dev test lint demo system-test-deps clean

# The virtualenv with the runtime package. torch comes first: a CPU build where no NVIDIA GPU is present.
$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Without an NVIDIA GPU take PyTorch's CPU build (its own index, when reachable; a local wheel otherwise).
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	elif $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" >/dev/null 2>&1; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX); \
	else \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.runtime

dev: $(VENV)/.dev

# Debian packages the real-service tests need: chromium (browser test) and GStreamer's RTSP server.
system-test-deps:
	@./scripts/system-test-deps.sh

lint: dev
	$(VENV)/bin/ruff check .

test: dev system-test-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/valora demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .state .pytest_cache .ruff_cache
