# Quick start:  make run  (the tiny experiment, offline, CPU, ~5 min)   |   make test  (the suite, ~11 min on 2 idle cores)
# Both create .venv and install the package on first use. Extra arguments: make run ARGS="trainer.max_steps=50"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test test-fast docs bench install install-dev clean

# `make run` installs what running needs ([all]: no test tools, no triton); `make test` adds [dev] on top.
install: $(BIN)/.installed-all
install-dev: $(BIN)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned torch takes the CPU build already on these machines instead of gigabytes of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0

$(BIN)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

$(BIN)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(BIN)/.installed-all

# Tells train.py it was started by `make run`, so the hints it prints use the make form (make run ARGS="...").
run: export CE_DYNAMICS_LAUNCHER := make
run: install
	$(BIN)/python train.py $(ARGS)

# The whole suite: about 11 minutes on an idle 2-core machine (slow tests included).
test: install-dev
	@echo "make test: the whole suite, about 11 minutes on an idle 2-core machine (make test-fast: about 2)"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite without the tests marked slow (end-to-end runs): under 3 minutes on an idle 2-core machine.
test-fast: install-dev
	@echo "make test-fast: the suite without the slow tests, under 3 minutes on an idle 2-core machine"
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The documentation site, built into site/ (strict: a broken link or reference fails).
docs: install-dev
	$(BIN)/mkdocs build --strict

bench: install-dev
	$(BIN)/python benchmarks/bench_metric.py
	$(BIN)/python benchmarks/bench_callback.py
	$(BIN)/python benchmarks/bench_replay.py
	$(BIN)/python benchmarks/bench_replay.py --throughput
	$(BIN)/python benchmarks/bench_gpu.py
	$(BIN)/python benchmarks/bench_hidden.py

clean:
	rm -rf $(VENV) outputs site
