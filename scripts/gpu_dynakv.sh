#!/usr/bin/env bash
# DynaKV on one model, on one GPU: calibrate the PCA bases, train the gates at several alphas in parallel
# (stage "train"), then evaluate FullKV, pca_uniform / svd_weights / energy at three rates, the trained DynaKV
# models and SnapKV + DynaKV on perplexity (WikiText-2, C4), needle and LongBench multi_news (stage "eval"),
# one process per method in parallel; then the table (kvh dynakv table). Every run resumes.
#
#   bash scripts/gpu_dynakv.sh data  SHARED_DATA DATA      # DATA: links to ../shared/data's files, as below
#   bash scripts/gpu_dynakv.sh train MODEL_CONFIG GGUF DATA OUT "ALPHAS" [STEPS] [BATCH]
#   bash scripts/gpu_dynakv.sh eval  MODEL_CONFIG GGUF DATA OUT [LONGBENCH_LIMIT (0: none)] [NEEDLE_LENGTHS]
#   bash scripts/gpu_dynakv.sh repro MODEL_CONFIG GGUF DATA OUT [LONGBENCH_LIMIT] [NEEDLE_LENGTHS]
#
# "repro" evaluates the checkpoint shipped for the model (results/reference/dynakv/<model>.safetensors, as
# dynakv_a<its alpha>) after calibrating the PCA bases of the baselines: docs/DYNAKV.md's rows of that checkpoint
# and of every training-free method, without training. GGUF "-": the model config's own weights (no override).
#
# DATA holds gutenberg/ (training and calibration text), wiki.test.raw (WikiText-2 test, reconstructed),
# c4_validation_2k.jsonl.gz, essays/ (the needle haystack) and longbench/ (multi_news.jsonl, config/).
# OUT/<model>/ckpt gets pca.safetensors and dynakv_a<alpha>.safetensors; OUT/<model>/results the runs.
# TIMEOUT=seconds stops each process after that long (finished rows are kept; a re-run resumes). Smaller runs:
# CALIB_TOKENS, EVAL_TOKENS (the retain rate measured after training), PPL_TOKENS, SNAP_BUDGETS. A subset of the
# evaluation: TASKS (default "ppl needle longbench"), SKIP (an extended regex: method lines that match it are left
# out; the lines are printed first). DECODE: the runs' decode path (e.g. continuous: the 20 multi_news samples of
# a method decode together; default: the run default, batched). JOBS: at most this many methods' processes at a
# time (default: all at once; each loads the model once per task, and GGUF loads are CPU-bound).
set -uo pipefail
if [ "${1:-}" = data ]; then      # DATA as the stages read it, from ../shared/data's layout (symbolic links)
  shared=$(cd "$2" && pwd) || exit 2; mkdir -p "$3"
  for pair in "text/gutenberg:gutenberg" "text/wikitext-2-raw-reconstructed/wiki.test.raw:wiki.test.raw" \
      "text/c4-validation-2k/c4_validation_2k.jsonl.gz:c4_validation_2k.jsonl.gz" \
      "haystack/PaulGrahamEssays:essays" "longbench:longbench"; do
    [ -e "$shared/${pair%%:*}" ] || { echo "error: $shared/${pair%%:*} is missing; fix: the path of ../shared/data" >&2; exit 2; }
    ln -sfn "$shared/${pair%%:*}" "$3/${pair##*:}"
  done
  ls -l "$3"; exit 0
fi
stage=$1; model=$2; gguf=$3; data=$4; out=$5
case "$stage" in train|eval|repro) ;; *) echo "error: stage $stage is not one of data, train, eval, repro" >&2; exit 2;; esac
export PPL_TOKENS=${PPL_TOKENS:-262144} PYTHONUNBUFFERED=1 KV_HARNESS_CACHE=${KV_HARNESS_CACHE:-/tmp/kv-harness}
ckpt=$out/$model/ckpt; res=$out/$model/results; logs=$out/$model/logs
mkdir -p "$ckpt" "$res" "$logs"
if [ "$gguf" = - ]; then m=(--model "$model"); source_args=(); else
  m=(--model "$model" --set model.source=gguf --set "++model.path=$gguf"); source_args=(model.source=gguf "++model.path=$gguf"); fi
T=${TIMEOUT:+timeout $TIMEOUT}

if [ "$stage" = train ] || [ "$stage" = repro ]; then
  [ -f "$ckpt/pca.safetensors" ] || python3 -m harness dynakv calibrate "${m[@]}" --text "$data/gutenberg" \
      --tokens ${CALIB_TOKENS:-1048576} --seq-len 1024 --out "$ckpt/pca.safetensors" > "$logs/calibrate.json" 2> "$logs/calibrate.log" \
      || { tail -20 "$logs/calibrate.log"; exit 1; }
fi
if [ "$stage" = repro ]; then
  shipped=$(cd "$(dirname "$0")/.." && pwd)/results/reference/dynakv/$model
  [ -f "$shipped.safetensors" ] || { echo "error: no checkpoint is shipped for $model ($shipped.safetensors)" >&2; exit 2; }
  alpha=$(python3 -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['training']['alpha']:g}\")" "$shipped.json")
  cp "$shipped.safetensors" "$ckpt/dynakv_a$alpha.safetensors"; cp "$shipped.json" "$ckpt/dynakv_a$alpha.json"
  stage=eval
fi

if [ "$stage" = train ]; then
  alphas=$6; steps=${7:-400}; batch=${8:-16}
  pids=()
  for a in $alphas; do
    $T python3 -m harness dynakv train "${m[@]}" --init "$ckpt/pca.safetensors" --text "$data/gutenberg" \
        --tokens $((steps * batch * 1024)) --seq-len 1024 --alpha "$a" --steps "$steps" --batch-size "$batch" \
        --lr 3e-3 --eval-text "$data/wiki.test.raw" --eval-tokens ${EVAL_TOKENS:-65536} --dtype float16 --no-wandb \
        --out "$ckpt/dynakv_a$a.safetensors" > "$logs/train_a$a.json" 2> "$logs/train_a$a.log" &
    pids+=($!)
  done
  status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for a in $alphas; do echo "alpha $a: $(cat "$logs/train_a$a.json" 2>/dev/null || tail -3 "$logs/train_a$a.log")"; done
  exit $status
fi

# ---- eval: the method list, with energy's eta and DynaKV's checkpoints picked for rates ~0.5, 0.3, 0.2
longbench_limit=${6:-30}; needle_lengths=${7:-1000,2000,4000,8000}; SNAP_BUDGETS=${SNAP_BUDGETS:-256,1024}
mapfile -t picks < <(python3 - "$ckpt" <<'EOF'
import json, sys
from pathlib import Path
from harness.dynakv.train import eta_for_rate
ckpt = Path(sys.argv[1])
rates = json.loads((ckpt / "pca.json").read_text())["energy_rate_by_eta"]
trained = {p: json.loads(p.read_text())["measured"]["retain_rate"] for p in ckpt.glob("dynakv_a*.json")
           if "measured" in json.loads(p.read_text())}
for target in (0.5, 0.3, 0.2):
    print(f"pca_uniform method.transform_rate={target} method.transform_checkpoint={ckpt}/pca.safetensors")
    print(f"svd_weights method.transform_rate={target}")
    print(f"energy method.transform_eta={eta_for_rate(rates, target)} method.transform_checkpoint={ckpt}/pca.safetensors")
chosen = sorted({min(trained, key=lambda p: abs(trained[p] - t)) for t in (0.5, 0.3, 0.2)}) if trained else []
for p in chosen:
    print(f"dynakv method.transform_checkpoint={p.with_suffix('.safetensors')}")
    print(f"snapkv+dynakv SNAP {p.with_suffix('.safetensors')}")
print("fullkv")
print("snapkv")
EOF
)
TASKS=${TASKS:-ppl needle longbench}
for task in $TASKS; do
  case "$task" in ppl|needle|longbench) ;; *) echo "error: TASKS word $task is not one of ppl, needle, longbench (space-separated)" >&2; exit 2;; esac
done
if [ -n "${SKIP:-}" ]; then
  grep -qE "$SKIP" < /dev/null; [ $? -ne 2 ] || { echo "error: SKIP=$SKIP is not an extended regular expression" >&2; exit 2; }
  mapfile -t picks < <(printf '%s\n' "${picks[@]}" | grep -vE "$SKIP")
fi
[ ${#picks[@]} -gt 0 ] || { echo "error: no method left to evaluate (SKIP=${SKIP:-})" >&2; exit 2; }
printf 'method: %s\n' "${picks[@]}"
common=(model="$model" "${source_args[@]}" wandb=false progress=never ${DECODE:+decode=$DECODE})
run_tasks() {   # $1: a label, $2: the method's name; the rest: method overrides. Fails if any of its runs failed.
  local label=$1 name=$2 rc=0; shift 2
  {
    if [ "${name%%+*}" != snapkv ] && [[ " $TASKS " == *" ppl "* ]]; then   # eviction changes no logit of one forward
      for text in "wiki.test.raw:wikitext2" "c4_validation_2k.jsonl.gz:c4"; do
        python3 -m harness run "${common[@]}" results_dir="$res/ppl_${text##*:}" task=perplexity \
            task.text_path="$data/${text%%:*}" task.label="${text##*:}" task.context_length=1024 task.stride=1024 \
            task.max_tokens=$PPL_TOKENS "$@" hydra.run.dir="$logs/hydra/$label/ppl_${text##*:}" || rc=1
      done
    fi
    if [[ " $TASKS " == *" needle "* ]]; then
      python3 -m harness run "${common[@]}" results_dir="$res/needle" task=needle task.haystack=essays \
          task.haystack_dir="$data/essays" "task.context_lengths=[$needle_lengths]" "task.depths=[0,25,50,75,100]" \
          "$@" hydra.run.dir="$logs/hydra/$label/needle" || rc=1
    fi
    if [ "$longbench_limit" != 0 ] && [[ " $TASKS " == *" longbench "* ]]; then
      python3 -m harness run "${common[@]}" results_dir="$res/longbench" task=longbench task.data_dir="$data/longbench" \
          task.config_dir="$data/longbench/config" "task.datasets=[multi_news]" task.limit="$longbench_limit" "$@" \
          hydra.run.dir="$logs/hydra/$label/longbench" || rc=1
    fi
  } > "$logs/eval_$label.jsonl" 2> "$logs/eval_$label.log"
  return $rc
}
pids=(); i=0
for line in "${picks[@]}"; do
  read -r name rest <<< "$line"; i=$((i + 1))
  case "$name" in
    snapkv+dynakv) read -r _ file <<< "$rest"
      args=("methods=[snapkv+dynakv]" "budgets=[$SNAP_BUDGETS]" "++method_overrides={transform_checkpoint: '$file'}") ;;
    snapkv) args=("methods=[snapkv]" "budgets=[$SNAP_BUDGETS]" "method_overrides={granularity: layer}") ;;
    *) args=("method=$name"); for kv in $rest; do args+=("$kv"); done ;;
  esac
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1000}" ]; do sleep 1; done   # at most JOBS methods at a time
  $T bash -c "$(declare -f run_tasks); $(declare -p common data logs res needle_lengths longbench_limit TASKS); \
      run_tasks $i-${name/+/_} $name ${args[*]@Q}" &
  pids+=($!)
done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python3 -m harness dynakv table "$res" --checkpoints "$ckpt" --out "$out/$model/dynakv_table.md" || status=1
cat "$out/$model/dynakv_table.md" 2>/dev/null
exit $status
