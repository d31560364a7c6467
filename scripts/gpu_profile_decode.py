"""Where a batch-1 decode step and a compressed prefill spend their GPU time (issue 18).

Run on the GPU machine (random Llama-3-8B shape, bf16)::

    python3 scripts/gpu_profile_decode.py [--context 8192] [--out DIR]

For SnapKV 512 it prefills ``--context`` tokens, builds the fast path's slot cache at batch 1 and profiles
one eager step with ``torch.profiler`` (every CUDA kernel with its device time, grouped into matmuls,
attention, and the rest), then times the captured step. For each compressing method it also profiles the
prefill and lists the kernels that FullKV's prefill does not run. First it checks on this GPU that the
grouped-query gather (``methods.base.gather_grouped``) equals the repeated keys' gather in bfloat16. Writes ``profile.json`` and a short
``profile.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from harness import config
from harness.bench.speed import Timer, build, copy_bandwidth_gbs, weight_bytes
from harness.engine import batched
from harness.engine.cache import make_cache
from harness.engine.generate import prefill
from harness.engine.hook import attach
from harness.engine.models import load_model

GEMM = re.compile(r"gemm|gemv|cutlass|nvjet|sm90_|sm80_|xmma|cublas", re.I)
ATTN = re.compile(r"flash|fmha|attention|efficient", re.I)


def kernels(prof) -> list[dict]:
    out = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type == torch.autograd.DeviceType.CUDA and cuda_us > 0:
            out.append({"name": evt.key[:140], "count": evt.count, "us": cuda_us})
    return sorted(out, key=lambda k: -k["us"])


def categories(ks: list[dict]) -> dict:
    cat = defaultdict(lambda: {"count": 0, "us": 0.0})
    for k in ks:
        c = "matmul" if GEMM.search(k["name"]) else "attention" if ATTN.search(k["name"]) else "other"
        cat[c]["count"] += k["count"]
        cat[c]["us"] += k["us"]
    return dict(cat)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--out", default="results/profile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(config.config_dir() / "model" / "llama3_8b_random.yaml")
    cfg.dtype = "bfloat16"
    lm = load_model(cfg)
    model = lm.model
    device = next(model.parameters()).device
    weights = weight_bytes(model)
    bw = copy_bandwidth_gbs(device)
    data = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "floor_ms": weights / (bw * 1e9) * 1000, "copy_gbs": bw}
    ids = torch.randint(2, 30000, (1, args.context), device=device, generator=torch.Generator(device).manual_seed(0))

    with torch.no_grad():
        # ---- the grouped-query gather against the repeated keys on this GPU (bit equality, bf16)
        from methods.base import gather_grouped, gather_tokens, repeat_heads
        gen = torch.Generator(device).manual_seed(1)
        checks = {}
        for n in (args.context, 4 * args.context):
            k = torch.randn(1, 8, n, 128, device=device, generator=gen).to(torch.bfloat16)
            idx = torch.randint(0, n, (1, 32, 480), device=device, generator=gen)
            checks[n] = {"gather": torch.equal(gather_grouped(k, idx), gather_tokens(repeat_heads(k, 4), idx))}
            del k
        data["grouped_equals_repeated"] = checks
        print("grouped gather == repeated (bf16):", checks, flush=True)

        # ---- the decode step at batch 1
        compressor = build("snapkv", args.budget, 32)
        cache = make_cache(model)
        with attach(model, compressor):
            token = prefill(model, ids, cache)
        row = batched.row_layers(cache)
        shape = batched.layout([row], [[0]], 200, 64)
        slot = batched.allocate(shape, row[0].keys.dtype, device)
        batched.load(slot, [row], args.context)
        decoder = batched.Decoder(slot, 1, batched.vocab_size(model))
        decoder.reset(token.reshape(-1)[:1], torch.full((1,), args.context, device=device))
        with batched.slot_routing(model, slot):
            for _ in range(3):
                decoder.step(model, False)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                decoder.step(model, False)
                torch.cuda.synchronize()
            ks = kernels(prof)
            data["step_kernels"] = ks[:60]
            data["step_kernel_count"] = sum(k["count"] for k in ks)
            data["step_categories"] = categories(ks)
            data["step_device_us"] = sum(k["us"] for k in ks)
            with Timer(device) as t:
                for _ in range(20):
                    decoder.step(model, False)
            data["eager_ms"] = t.ms / 20
            decoder.capture(model)
            for _ in range(3):
                decoder.step(model, True)
            with Timer(device) as t:
                for _ in range(50):
                    decoder.step(model, True)
            data["graph_ms"] = t.ms / 50
            # the same step's matmuls alone: every Linear weight times a [1, in] vector, back to back
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            xs = {m.in_features: torch.randn(1, m.in_features, device=device, dtype=torch.bfloat16) for m in linears}
            g = torch.cuda.CUDAGraph()
            for m in linears:
                m(xs[m.in_features])
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                for m in linears:
                    m(xs[m.in_features])
            for _ in range(3):
                g.replay()
            with Timer(device) as t:
                for _ in range(50):
                    g.replay()
            data["linears_graph_ms"] = t.ms / 50
            data["linear_count"] = len(linears)
        del decoder, slot, cache
        batched.clear_pools()
        torch.cuda.empty_cache()

        # ---- compressed prefills: kernels beyond FullKV's
        base = None
        data["prefill"] = {}
        for name in ["fullkv", "snapkv", "pyramidkv", "dynamickv", "h2o"]:
            compressor = build(name, args.budget, 32)
            for _ in range(2):
                cache = make_cache(model)
                with attach(model, compressor):
                    prefill(model, ids, cache)
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                cache = make_cache(model)
                with Timer(device) as t, attach(model, compressor):
                    prefill(model, ids, cache)
                times.append(t.ms)
            cache = make_cache(model)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof, attach(model, compressor):
                prefill(model, ids, cache)
                torch.cuda.synchronize()
            ks = {k["name"]: k for k in kernels(prof)}
            entry = {"ms": sorted(times)[1], "kernel_us": sum(k["us"] for k in ks.values())}
            if base is None:
                base = ks
            else:
                extra = []
                for n, k in ks.items():
                    b = base.get(n, {"us": 0.0, "count": 0})
                    if k["us"] - b["us"] > 50:
                        extra.append({"name": n, "count": k["count"] - b["count"], "us": k["us"] - b["us"]})
                entry["extra_kernels"] = sorted(extra, key=lambda k: -k["us"])[:25]
                cpu = sorted(((e.key, e.cpu_time_total) for e in prof.key_averages() if e.cpu_time_total > 5000),
                             key=lambda x: -x[1])[:25]
                entry["cpu_ops"] = cpu
            data["prefill"][name] = entry
            del cache
            torch.cuda.empty_cache()
            print(name, entry["ms"], flush=True)

    (out / "profile.json").write_text(json.dumps(data, indent=1))
    lines = [f"grouped-query gather == repeated keys: {json.dumps(data['grouped_equals_repeated'])}",
             f"# {data['device']}: floor {data['floor_ms']:.2f} ms, graph step {data['graph_ms']:.2f} ms, "
             f"eager {data['eager_ms']:.2f} ms, Linear layers alone in a graph {data['linears_graph_ms']:.2f} ms "
             f"({data['linear_count']} Linear)",
             f"step kernels: {data['step_kernel_count']}, device time {data['step_device_us'] / 1000:.2f} ms",
             json.dumps(data["step_categories"]), "", "| kernel | count | us |", "|---|---|---|"]
    lines += [f"| {k['name']} | {k['count']} | {k['us']:.0f} |" for k in data["step_kernels"][:40]]
    for name, e in data["prefill"].items():
        lines += ["", f"## prefill {name}: {e['ms']:.1f} ms"]
        lines += [f"- {k['name']} x{k['count']}: {k['us']:.0f} us" for k in e.get("extra_kernels", [])]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
