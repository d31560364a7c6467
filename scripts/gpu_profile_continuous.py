"""Where a decode=continuous allocation's steps go (issue 18): the sweep's decode half.

Run on the GPU machine (random Llama-3-8B shape, bf16)::

    python3 scripts/gpu_profile_continuous.py [--prompts 24] [--tokens 6000] [--new 128] [--out DIR]

It prefills ``--prompts`` prompts of ``--tokens`` tokens with the six methods of the sweep (budget 512, window
32, H2O ``reference_2024`` with the fused scorer, as ``protocol.h2o_scorer=fused`` runs it) through
``harness.engine.continuous.prompt_rows``, holding every row as a window does, then:

1. decodes them all with ``decode_rows`` (CUDA graphs, ``--new`` tokens per row, no stop): wall time, steps,
   ms per step, occupancy, the allocation's segments (rows per layout class) and capacities, and the bytes a
   step reads (weights + every slot buffer) over the step time;
2. decodes them again eagerly for ``--profile-steps`` tokens under ``torch.profiler``: each CUDA kernel's device
   time, grouped into matmuls, attention and the rest.

Writes ``continuous.json`` to ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_profile_decode import categories, kernels  # scripts/ is on the path when this script runs
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from harness import config
from harness.bench.speed import SIX, build, copy_bandwidth_gbs, weight_bytes
from harness.engine.continuous import ContinuousStats, Row, decode_rows, prompt_rows
from harness.engine.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--model", default="llama3_8b_random", help="a conf/model/*.yaml name (tiny_llama: a CPU "
                        "smoke run)")
    parser.add_argument("--out", default="results/profile_continuous")
    args = parser.parse_args()
    cfg = OmegaConf.load(config.config_dir() / "model" / f"{args.model}.yaml")
    cfg.dtype = "bfloat16"
    lm = load_model(cfg)
    model, device = lm.model, next(lm.model.parameters()).device
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    compressors = [build(n, 512, 32, **({"variant": "reference_2024", "scorer": "fused"} if n == "h2o" else {}))
                   for n in SIX]
    rows: list[Row] = []
    start = time.perf_counter()
    with torch.no_grad():
        for p in range(args.prompts):
            ids = torch.randint(2, min(30000, model.config.vocab_size), (1, args.tokens), device=device,
                                generator=torch.Generator(device).manual_seed(p))
            rows += prompt_rows(model, lm.tokenizer, ids, compressors, args.new)[0]
    sync()
    out = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "args": vars(args), "rows": len(rows),
           "prefill_s": time.perf_counter() - start, "held_gib": torch.cuda.memory_allocated(device) / 2**30 if cuda else None}
    stats = ContinuousStats()
    sync()
    start = time.perf_counter()
    decode_rows(model, rows, stats=stats)
    sync()
    seconds = time.perf_counter() - start
    slot_bytes = max(stats.buffer_bytes)      # a step reads every slot buffer of its allocation, idle or not
    weights = weight_bytes(model)
    out.update({"decode_s": seconds, "steps": stats.steps, "ms_per_step": 1000 * seconds / max(stats.steps, 1),
                "occupancy": stats.occupancy, "segments": stats.segments, "graphs": stats.graphs,
                "tokens": stats.busy_slot_steps, "tokens_per_s": stats.busy_slot_steps / seconds,
                "allocations": stats.allocations, "slot_bytes": stats.buffer_bytes, "weight_bytes": weights,
                "copy_bandwidth_gbs": copy_bandwidth_gbs(device)})
    out["read_gbs"] = (weights + slot_bytes) / (out["ms_per_step"] / 1000) / 1e9   # one allocation: exact
    print(json.dumps({k: v for k, v in out.items() if k != "segments"}), flush=True)
    for row in rows:
        row.max_new_tokens = args.profile_steps + 1
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        decode_rows(model, rows, cuda_graphs=False)
        sync()
    ks = kernels(prof)
    cat = categories(ks)
    out["eager_profile"] = {"steps": args.profile_steps, "categories": cat, "top": ks[:40]}
    print(json.dumps(cat), flush=True)
    for k in ks[:25]:
        print(f"{k['us'] / 1000:9.2f} ms  x{k['count']:<6} {k['name']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "continuous.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
