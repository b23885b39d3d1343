# Quick start:  make run  (the tiny experiment, offline, CPU)   |   make test  (the test suite)
# Both create .venv and install the package on first use. Extra arguments: make run ARGS="trainer.max_steps=50"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test bench install clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The pinned torch takes the CPU build already on these machines instead of gigabytes of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: install
	$(BIN)/python train.py $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_metric.py
	$(BIN)/python benchmarks/bench_callback.py
	$(BIN)/python benchmarks/bench_replay.py
	$(BIN)/python benchmarks/bench_replay.py --throughput
	$(BIN)/python benchmarks/bench_gpu.py
	$(BIN)/python benchmarks/bench_hidden.py

clean:
	rm -rf $(VENV) outputs
