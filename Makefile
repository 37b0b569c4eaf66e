# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Both create .venv when it is missing: CPU torch 2.13.0 first (pinned so that pip takes the
# CPU build on this machine's disk rather than a multi-GB CUDA build), then this package with
# its dev extras. On a GPU cluster, install your own CUDA torch and then `pip install -e .[dev]`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
# Triton on a CPU machine only for its interpreter, which runs the fused loss kernels'
# tests (tests/test_fused_cross_entropy.py); 3.8 because older interpreters fail with numpy >= 2.4.
TRITON_CPU := triton==3.8.0

.PHONY: setup train test lint bench clean-cache

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU) $(TRITON_CPU)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: setup
	$(PY) benchmarks/epoch_time.py $(ARGS)

clean-cache:
	rm -rf .cache
