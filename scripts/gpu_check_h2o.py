"""H2O's scorers on the GPU (issue 18): the fused Triton scorer (``methods.h2o_fused``) against the chunked
reference scorer (``methods.h2o.accumulated_attention``) and against the reference code's literal computation
(the whole ``[B, H, n, n]`` attention in one piece: bf16 product, / sqrt(d), mask, float32 softmax cast to bf16,
one sum over the queries), on random bf16 queries and keys of the Llama-3-8B shape (32 query heads, 8 KV heads,
d 128); then the time of each scorer per layer.

    python3 scripts/gpu_check_h2o.py [--out DIR] [--tune]

Fidelity: for each variant and length, how many scores differ from the literal computation (chunked and fused
alike: both differ from it only in summation order and the last float32 bit), and how many of the kept
tokens (top ``budget - window`` per head) differ. Also: whether the grouped-query product (each KV head times
its stacked query heads) equals the repeated-keys product bit for bit on this GPU. Prints JSON (and writes
``DIR/h2o_check.json``).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from methods.base import repeat_heads
from methods.h2o import accumulated_attention
from methods.h2o_fused import fused_triton, two_pass_torch


def literal(q, k, window, variant):
    """The reference code's H2O score, in one piece (KVCache-Factory ``H2OKVCluster``, as reference-methods.md
    section 2.3 describes it)."""
    n, d = k.shape[2], k.shape[3]
    logits = torch.matmul(q, k.transpose(2, 3)) / d ** 0.5
    rows = torch.arange(n, device=q.device)[:, None]
    cols = torch.arange(n, device=q.device)[None, :]
    future = cols > rows
    if variant == "reference_2024":
        future &= rows >= n - window
    logits = logits.masked_fill(future, torch.finfo(logits.dtype).min)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs[:, :, :, : n - window].sum(dim=-2)


def kept_differences(a, b, count):
    ka = a.float().topk(count, dim=-1).indices.sort(dim=-1).values
    kb = b.float().topk(count, dim=-1).indices.sort(dim=-1).values
    diff = 0
    for h in range(a.shape[1]):
        diff += count - len(set(ka[0, h].tolist()) & set(kb[0, h].tolist()))
    return diff


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--scale", type=float, default=2.0, help="std of the random queries and keys")
    parser.add_argument("--tune", action="store_true", help="also time the kernels over num_warps x num_stages")
    args = parser.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    dev = "cuda"
    out = {"device": torch.cuda.get_device_name(), "grouped_product": [], "fidelity": [], "speed": []}

    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 2, 7, 32, 256):
            for n in (100, 6000, 32768):
                q = torch.randn(1, 32, m, 128, device=dev, generator=g).to(dtype)
                k = torch.randn(1, 8, n, 128, device=dev, generator=g).to(dtype)
                rep = torch.matmul(q, repeat_heads(k, 4).transpose(2, 3))
                grp = torch.matmul(q.view(1, 8, 4 * m, 128), k.transpose(2, 3)).view(1, 32, m, n)
                out["grouped_product"].append({"dtype": str(dtype), "m": m, "n": n,
                                               "differ": int((rep != grp).sum())})
    print("grouped product:", sum(r["differ"] for r in out["grouped_product"]), "differing values in all", flush=True)

    for n in (2048, 6000):
        q = (args.scale * torch.randn(1, 32, n, 128, device=dev, generator=g)).to(torch.bfloat16)
        k = (args.scale * torch.randn(1, 8, n, 128, device=dev, generator=g)).to(torch.bfloat16)
        kr = repeat_heads(k, 4)
        for variant in ("causal", "reference_2024"):
            lit = literal(q, kr, 32, variant)
            chunked = accumulated_attention(q, kr, 32, variant, 256)
            fused = fused_triton(q, k, 32, variant)
            torch_passes = two_pass_torch(q, k, 32, variant, 256)
            row = {"n": n, "variant": variant, "scores": lit.numel()}
            for name, x in (("chunked", chunked), ("fused", fused), ("two_pass_torch", torch_passes)):
                row[f"{name}_vs_literal_differ"] = int((x != lit).sum())
                row[f"{name}_vs_literal_max_rel"] = float(((x.float() - lit.float()).abs()
                                                            / lit.float().abs().clamp_min(1e-6)).max())
                row[f"{name}_kept_differ_of_{32 * 480}"] = kept_differences(x, lit, 480)
            row["fused_vs_two_pass_torch_differ"] = int((fused != torch_passes).sum())
            out["fidelity"].append(row)
            print(json.dumps(row), flush=True)
            del lit
            torch.cuda.empty_cache()

    for n in (6000, 8192, 32768):
        q = torch.randn(1, 32, n, 128, device=dev, generator=g).to(torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device=dev, generator=g).to(torch.bfloat16)
        for variant in ("causal", "reference_2024"):
            row = {"n": n, "variant": variant}
            row["chunked_ms"] = timed(lambda: accumulated_attention(q, repeat_heads(k, 4), 32, variant, 256), 3)
            for bm, bn, in ((64, 64), (128, 64), (64, 128), (128, 128)):
                try:
                    row[f"fused_{bm}x{bn}_ms"] = timed(lambda: fused_triton(q, k, 32, variant, bm, bn))
                except Exception as error:  # noqa: BLE001 - a block shape the GPU cannot take
                    row[f"fused_{bm}x{bn}_ms"] = f"{type(error).__name__}: {str(error)[:120]}"
            row["sdpa_causal_forward_ms"] = timed(lambda: F.scaled_dot_product_attention(
                q, repeat_heads(k, 4), repeat_heads(k, 4), is_causal=True))
            out["speed"].append(row)
            print(json.dumps(row), flush=True)
    if args.tune:
        out["tune"] = []
        for n in (8192, 32768):
            q = torch.randn(1, 32, n, 128, device=dev, generator=g).to(torch.bfloat16)
            k = torch.randn(1, 8, n, 128, device=dev, generator=g).to(torch.bfloat16)
            for variant in ("causal", "reference_2024"):
                for bm, bn in ((64, 64), (128, 64)):
                    for warps in (4, 8):
                        for stages in (1, 2, 3, 4):
                            try:
                                ms = timed(lambda: fused_triton(q, k, 32, variant, bm, bn, warps, stages))
                            except Exception as error:  # noqa: BLE001 - a launch shape the GPU cannot take
                                ms = f"{type(error).__name__}"
                            out["tune"].append({"n": n, "variant": variant, "block": [bm, bn], "num_warps": warps,
                                                "num_stages": stages, "ms": ms})
                            print(json.dumps(out["tune"][-1]), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "h2o_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
