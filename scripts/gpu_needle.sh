#!/usr/bin/env bash
# The needle grid of the papers' Llama-3 figure shape (1K-8K step 1K, 10 depths), all six methods,
# on a GPU machine with the model given as a GGUF file:
#   bash scripts/gpu_needle.sh MODEL_CONFIG GGUF_FILE BUDGET HAYSTACK_DIR [RESULTS_DIR]
# e.g. bash scripts/gpu_needle.sh smollm2_135m /tmp/models/smollm2_135m.gguf 64 ../shared/data/haystack/PaulGrahamEssays
set -euo pipefail
model=$1; gguf=$2; budget=$3; haystack=$4; results=${5:-results}
export PYTHONUNBUFFERED=1 KV_HARNESS_CACHE=${KV_HARNESS_CACHE:-/tmp/kv-harness}
kvh run task=needle model="$model" model.source=gguf ++model.path="$gguf" \
    "methods=[fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv]" "budgets=[$budget]" \
    task.haystack=essays task.haystack_dir="$haystack" results_dir="$results" hydra.run.dir=/tmp/hydra
kvh heatmap "$results/needle/$model" --out "$results/needle/$model/figures"
kvh report "$results/needle/$model" --out "$results/needle/$model"
