#!/usr/bin/env bash
# One GPU vs two (torchrun, NCCL) on the same run: Llama-3-8B shape with random weights, passkey at
# 8K and 16K tokens, FullKV + SnapKV with one shared prefill, 32 new tokens per sample.
#   bash scripts/gpu_dataparallel.sh OUT_DIR
set -euo pipefail
out=${1:-results/dataparallel}
args=(model=${MODEL:-llama3_8b_random} task=passkey "task.context_lengths=${LENGTHS:-[8000,16000]}" "task.depths=[10,30,50,70,90]"
      task.samples_per_cell=4 task.max_new_tokens=32 "methods=[fullkv,snapkv]" "budgets=[512]" wandb=false)
export PYTHONUNBUFFERED=1
mkdir -p "$out"
start=$(date +%s%N)
CUDA_VISIBLE_DEVICES=0 python3 -m harness "${args[@]}" results_dir="$out/one" hydra.run.dir=/tmp/h1 > "$out/one.log" 2>&1
one=$(( ($(date +%s%N) - start) / 1000000 ))
start=$(date +%s%N)
python3 -m torch.distributed.run --nproc_per_node 2 -m harness "${args[@]}" results_dir="$out/two" hydra.run.dir=/tmp/h2 > "$out/two.log" 2>&1
two=$(( ($(date +%s%N) - start) / 1000000 ))
echo "one GPU: ${one} ms; two GPUs: ${two} ms (wall, model initialisation included)"
for run in fullkv snapkv_b512_w32_k7_maxpool_qh; do
  a=$(python3 -c "import json,sys; [print(json.dumps({k:v for k,v in json.loads(l).items() if k!='seconds'})) for l in open(sys.argv[1])]" "$out/one/passkey/${MODEL:-llama3_8b_random}/default/$run/predictions.jsonl" | md5sum)
  b=$(python3 -c "import json,sys; [print(json.dumps({k:v for k,v in json.loads(l).items() if k!='seconds'})) for l in open(sys.argv[1])]" "$out/two/passkey/${MODEL:-llama3_8b_random}/default/$run/predictions.jsonl" | md5sum)
  echo "$run: one=$a two=$b $([ "$a" = "$b" ] && echo identical || echo DIFFERENT)"
done
