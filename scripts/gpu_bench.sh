#!/usr/bin/env bash
# The benchmark of docs/BENCHMARKS.md on the lent GPU (Llama-3-8B shape, random weights, bf16, budget 512):
#
#   bash scripts/gpu_bench.sh OUT [KVPRESS_SITE]
#
# 1. methods: prefill + compression overhead, peak memory and batch-1 decode (x floor, with and without
#    compile) at 8K and 32K;
# 2. sweep: 128 LongBench-shaped samples through `harness run task=longbench decode=continuous` (the path of
#    `make longbench`), with the projection of the whole six-method LongBench-16 sweep, and the projection
#    of the one-at-a-time plain path;
# 3. kvpress: its SnapKV prefill, peak memory and end to end against ours (when KVPRESS_SITE is given);
# 4. profile: where a batch-1 step and each compressed prefill spend their GPU time
#    (scripts/gpu_profile_decode.py), and the grouped gather's bit equality on this GPU;
# 5. sweepfused: the sweep with protocol.h2o_scorer=fused; continuous: a continuous-batching allocation's steps
#    (scripts/gpu_profile_continuous.py); h2o: the H2O scorers' fidelity, speed and kernel tuning
#    (scripts/gpu_check_h2o.py --tune).
# Each step writes under OUT/<step>/ and its log to OUT/<step>.log; a failed step does not stop the others,
# and the script's status is the number of failed steps.
set -u
OUT=${1:?usage: bash scripts/gpu_bench.sh OUT [KVPRESS_SITE]}
SITE=${2:-}
STEPS=${STEPS:-"methods sweep sweepfused kvpress profile continuous h2o"}
mkdir -p "$OUT"
failed=0
step() {   # name, command...
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $* ($(date -u +%T))"
    if "$@" > "$OUT/$name.log" 2>&1; then echo "== $name done ($(date -u +%T))"; else
        echo "== $name FAILED (status $?), last lines:"; tail -20 "$OUT/$name.log"; failed=$((failed + 1)); fi
}
step methods python3 -m harness bench --sections methods --contexts 8192 32768 --repeats 3 --decode-tokens 16 \
    --compile --h2o-scorers reference fused --out "$OUT/methods"
step sweep python3 -m harness bench --sections sweep --sweep-samples 128 --sweep-plain --out "$OUT/sweep"
step sweepfused python3 -m harness bench --sections sweep --sweep-samples 128 --sweep-set protocol.h2o_scorer=fused \
    --out "$OUT/sweepfused"
if [ -n "$SITE" ]; then
    step kvpress python3 -m harness bench --sections kvpress --contexts 8192 32768 --kvpress-site "$SITE" \
        --out "$OUT/kvpress"
fi
step profile python3 scripts/gpu_profile_decode.py --out "$OUT/profile"
step continuous python3 scripts/gpu_profile_continuous.py --out "$OUT/continuous"
step h2o python3 scripts/gpu_check_h2o.py --tune --out "$OUT/h2o"
exit $failed
