# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/wq_wv_r4.py
# pytest worker processes (pytest-xdist): make test WORKERS=1 runs in one process
WORKERS ?= 2

.PHONY: demo test test-fast plan-test lint fetch clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-plan: pyproject.toml $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test,plan,plan-tpu]'
	touch $@

# Fetch the pretrained model and data set once into the cache (~/.cache/lorax, or $LORAX_CACHE).
fetch: $(VENV)/.installed
	$(BIN)/python -m lorax.assets minilm-l6 snli

demo: fetch
	$(BIN)/python -m lorax.train --config=$(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/python -m lorax.assets minilm-l6 snli smollm2-135m rotten-tomatoes
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not plan"

# The developer loop: everything not marked slow (real-model loads, kill -9 runs, studies).
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m lorax.assets minilm-l6 snli
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not slow and not plan"

# The GPU gates (tests/test_plan.py, marked plan): the benchmark steps compiled for a described
# H100/H200 by JAX's CUDA plugin (the [plan] extra), no GPU needed; and a TPU slice's plan
# (libtpu, the [plan-tpu] extra). One process: a module compiles each step once for its tests.
# No persistent XLA cache: a deviceless executable cannot be read back from it.
plan-test: $(VENV)/.installed-plan
	JAX_PLATFORMS=cpu JAX_ENABLE_COMPILATION_CACHE=false \
	$(BIN)/python -m pytest -q -p no:xdist -m plan tests/test_plan.py tests/test_plan_fsdp.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check lorax tests configs experiments benchmarks
	$(BIN)/ruff format --check lorax tests configs experiments benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .jax-cache
