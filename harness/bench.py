"""Prefill, compression and decode cost per method: ``python -m harness.bench`` (``make bench``).

For a model config (default: Llama-3-8B's shape with random weights; speed does not depend on the
weight values) and context lengths, per method: prefill + compression time (CUDA events after a
warm-up, median of repeats), the overhead over FullKV's prefill, peak GPU memory of the prefill,
the KV bytes kept, and decode ms/token at batch 1 with the kept cache. Writes JSON and a Markdown
table. On a CPU the same code runs (wall-clock timers, no GPU memory) for tests.

Not yet here (see the speed issue): batched decoding of variants, CUDA graphs, the largest-batch
throughput, the memory-bandwidth floor and the kvpress comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import methods
from harness.cache import CompressedLayer, make_cache
from harness.generate import decode_one, prefill
from harness.hook import attach
from harness.models import load_model

ROOT = Path(__file__).resolve().parents[1]


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.stop.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.stop)
        else:
            self.ms = 1000 * (time.perf_counter() - self.t0)


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.numel())


def measure(model, compressor, input_ids, repeats: int, decode_tokens: int) -> dict:
    device = input_ids.device
    times, peak = [], None
    for _ in range(repeats + 1):  # the first is a warm-up
        cache = make_cache(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with attach(model, compressor), Timer(device) as t:
            token = prefill(model, input_ids, cache)
        times.append(t.ms)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
    kept = kv_bytes(cache)
    decode = []
    with attach(model, compressor):
        position = input_ids.shape[1]
        for _ in range(decode_tokens):
            with Timer(device) as t:
                token = decode_one(model, token, cache, position)
            decode.append(t.ms)
            position += 1
    del cache
    return {"prefill_ms": statistics.median(times[1:]), "peak_gib": peak, "kv_gib": kept / 2**30,
            "decode_ms_per_token": statistics.median(decode[2:] or decode)}


def run(model_name: str, contexts: list[int], budget: int, names: list[str], repeats: int, decode_tokens: int,
        dtype: str, window: int) -> list[dict]:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{model_name}.yaml")
    cfg.dtype = dtype
    lm = load_model(cfg)
    device = next(lm.model.parameters()).device
    rows = []
    for n in contexts:
        ids = torch.randint(2, min(lm.model.config.vocab_size, 30000), (1, n), device=device)
        base = None
        for name in names:
            knobs = {} if name == "fullkv" else {"budget": budget, "window_size": window}
            if name == "streamingllm":
                knobs = {"budget": budget, "sink_tokens": 4}
            compressor = methods.build(name, **knobs)
            result = measure(lm.model, compressor, ids, repeats, decode_tokens)
            if name == "fullkv":
                base = result["prefill_ms"]
            rows.append({"context": n, "method": name, "budget": None if name == "fullkv" else budget,
                         **result, "overhead_pct": None if base is None else 100 * (result["prefill_ms"] / base - 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"device: {device}", "",
             "| context | method | budget | prefill ms | overhead vs FullKV | peak GiB | KV kept GiB | decode ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        over = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
        lines.append(f"| {r['context']} | {r['method']} | {r['budget'] or 'full'} | {r['prefill_ms']:.1f} | {over} | "
                     f"{peak} | {r['kv_gib']:.3f} | {r['decode_ms_per_token']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3_8b_random", help="a conf/model/*.yaml name")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=["fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.methods[0] != "fullkv":
        args.methods = ["fullkv"] + [m for m in args.methods if m != "fullkv"]
    rows = run(args.model, args.contexts, args.budget, args.methods, args.repeats, args.decode_tokens, args.dtype,
               args.window)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    text = markdown(rows, device)
    (out / "bench.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
