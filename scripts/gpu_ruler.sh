#!/usr/bin/env bash
# RULER for one model: every length in its own process (in parallel on one GPU), all six methods at the
# given budgets with one shared prefill per sample, then the pieces merged into one run (kvh merge) and the
# tables and heatmap written:
#   bash scripts/gpu_ruler.sh MODEL_CONFIG GGUF_FILE "LENGTHS" BUDGETS SAMPLES HAYSTACK_DIR OUT [SCOPE] [OVERRIDES...]
# e.g. bash scripts/gpu_ruler.sh gemma3_270m /tmp/models/gemma3_270m.gguf "4096 8192" 128,512 20 \
#          ../shared/data/haystack/PaulGrahamEssays results/gpu prompt
# Without SQuAD/HotpotQA files (task.squad_path, task.hotpotqa_path) the suite is RULER-11. TIMEOUT=seconds stops
# each length's process after that long (its finished rows are kept and merged; a re-run resumes them).
set -euo pipefail
model=$1; gguf=$2; lengths=$3; budgets=$4; samples=$5; haystack=$6; out=$7; scope=${8:-prompt}
shift $(( $# < 8 ? $# : 8 ))
export PYTHONUNBUFFERED=1 KV_HARNESS_CACHE=${KV_HARNESS_CACHE:-/tmp/kv-harness}
mkdir -p "$out/pieces" "$out/logs"
pids=()
for length in $lengths; do
  ${TIMEOUT:+timeout "$TIMEOUT"} python3 -m harness run task=ruler model="$model" model.source=gguf ++model.path="$gguf" \
      "methods=[fullkv,streamingllm,h2o,snapkv,pyramidkv,dynamickv]" "budgets=[$budgets]" \
      "task.context_lengths=[$length]" task.samples_per_task="$samples" task.haystack_dir="$haystack" \
      protocol.compression_scope="$scope" results_dir="$out/pieces/$length" wandb=false progress=never \
      hydra.run.dir="$out/logs/hydra_${model}_$length" "$@" \
      > "$out/logs/${model}_${length}.jsonl" 2> "$out/logs/${model}_${length}.log" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
pieces=(); for length in $lengths; do pieces+=("$out/pieces/$length"); done
python3 -m harness merge "${pieces[@]}" --into "$out/results"
folder="$out/results/ruler/$model"
python3 -m harness ruler-table "$folder" --out "$folder/ruler_table.md"
python3 -m harness ruler-table "$folder" --format csv --out "$folder/ruler_table.csv"
python3 -m harness ruler-heatmap "$folder" --out "$folder/ruler_heatmap.png"
exit $status
