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


def copy_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float | None:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s); None on the CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.ms)
    del src, dst
    return 2 * gib * 2**30 / (statistics.median(times) / 1000) / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def batched_decode(model, compressor, input_ids, batches: list[int], tokens: int = 8) -> list[dict]:
    """Decode throughput with the kept cache replicated to each batch size (one prompt prefilled,
    its cache repeated), up to the largest batch that fits."""
    device = input_ids.device
    out = []
    for batch in batches:
        try:
            cache = make_cache(model)
            with attach(model, compressor):
                token = prefill(model, input_ids, cache)
                for layer in cache.layers:
                    layer.batch_repeat_interleave(batch)
                token = token.repeat(batch, 1)
                position, times = input_ids.shape[1], []
                for _ in range(tokens):
                    with Timer(device) as t:
                        token = decode_one(model, token, cache, position)
                    times.append(t.ms)
                    position += 1
            ms = statistics.median(times[2:] or times)
            out.append({"batch": batch, "ms_per_step": ms, "tokens_per_s": batch / ms * 1000})
            del cache
        except torch.cuda.OutOfMemoryError:
            out.append({"batch": batch, "oom": True})
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def run(model_name: str, contexts: list[int], budget: int, names: list[str], repeats: int, decode_tokens: int,
        dtype: str, window: int, batches: list[int] = ()) -> list[dict]:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{model_name}.yaml")
    cfg.dtype = dtype
    lm = load_model(cfg)
    run.weight_bytes = weight_bytes(lm.model)
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
            if batches:
                result["batched_decode"] = batched_decode(lm.model, compressor, ids, batches)
            rows.append({"context": n, "method": name, "budget": None if name == "fullkv" else budget,
                         **result, "overhead_pct": None if base is None else 100 * (result["prefill_ms"] / base - 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], device: str, hardware: dict | None = None) -> str:
    hardware = hardware or {}
    floor = hardware.get("weight_read_floor_ms")
    lines = [f"device: {device}"]
    if floor:
        lines.append(f"weights {hardware['weight_gb']:.2f} GB, copy bandwidth {hardware['copy_bandwidth_gbs']:.0f} GB/s "
                     f"(read + write), weight-read floor {floor:.2f} ms/token")
    lines += ["",
             "| context | method | budget | prefill ms | overhead vs FullKV | peak GiB | KV kept GiB | decode ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        over = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
        lines.append(f"| {r['context']} | {r['method']} | {r['budget'] or 'full'} | {r['prefill_ms']:.1f} | {over} | "
                     f"{peak} | {r['kv_gib']:.3f} | {r['decode_ms_per_token']:.2f} |")
    batched = [r for r in rows if r.get("batched_decode")]
    if batched:
        lines += ["", "| context | method | batch | ms/step | tokens/s | x floor |", "|---|---|---|---|---|---|"]
        for r in batched:
            for b in r["batched_decode"]:
                if b.get("oom"):
                    lines.append(f"| {r['context']} | {r['method']} | {b['batch']} | out of memory | | |")
                else:
                    ratio = f"{b['ms_per_step'] / floor:.1f}" if floor else "-"
                    lines.append(f"| {r['context']} | {r['method']} | {b['batch']} | {b['ms_per_step']:.2f} | "
                                 f"{b['tokens_per_s']:.0f} | {ratio} |")
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
    parser.add_argument("--batches", type=int, nargs="*", default=[],
                        help="also decode with the kept cache repeated to these batch sizes (stops at the first OOM)")
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if args.methods[0] != "fullkv":
        args.methods = ["fullkv"] + [m for m in args.methods if m != "fullkv"]
    rows = run(args.model, args.contexts, args.budget, args.methods, args.repeats, args.decode_tokens, args.dtype,
               args.window, args.batches)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    hardware = {}
    bandwidth = copy_bandwidth_gbs(torch.device("cuda")) if torch.cuda.is_available() else None
    if bandwidth:
        weights = run.weight_bytes
        hardware = {"copy_bandwidth_gbs": bandwidth, "weight_gb": weights / 1e9,
                    "weight_read_floor_ms": weights / (bandwidth * 1e9) * 1000}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"device": device, "hardware": hardware, "args": vars(args),
                                                "rows": rows}, indent=1))
    text = markdown(rows, device, hardware)
    (out / "bench.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
