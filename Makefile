# `make test` sets everything up on a fresh CPU-only machine: its own virtual environment,
# the CPU build of torch, the package with its test extras, then lint and the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: test venv lint

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

test: lint
	$(PY) -m pytest -n 2 -q tests
