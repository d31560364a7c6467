"""Where a decode=continuous window's prefill phase goes (issue 18): per sample, one shared prefill and one
compression per method (``harness.engine.continuous.prompt_rows``).

    python3 scripts/gpu_profile_window.py [--tokens 6000] [--repeats 3]

On the random Llama-3-8B shape (bf16, budget 512, window 32) it times, for one prompt of ``--tokens`` tokens
(synchronised wall clock, median of ``--repeats`` after a warm-up): FullKV's prefill alone; ``prompt_rows`` with
FullKV and each method alone (the method's extra cost); and with all six, the sweep's per-sample prefill phase; ``--hold N``: that phase on N prompts in a row with
every row kept, as a window holds them.
"""

import argparse
import json
import statistics
import time

import torch
from omegaconf import OmegaConf

from harness import config
from harness.bench.speed import SIX, build
from harness.engine.continuous import prompt_rows
from harness.engine.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hold", type=int, default=0, help="also: prompt_rows of the six methods on this many "
                        "prompts in a row, every row kept (a window's prefill phase, its caches held)")
    parser.add_argument("--h2o-variant", default="causal", help="H2O's variant (the sweep's protocol, "
                        "dynamickv_paper, uses reference_2024)")
    args = parser.parse_args()
    cfg = OmegaConf.load(config.config_dir() / "model" / "llama3_8b_random.yaml")
    cfg.dtype = "bfloat16"
    lm = load_model(cfg)
    device = next(lm.model.parameters()).device
    ids = torch.randint(2, 30000, (1, args.tokens), device=device, generator=torch.Generator(device).manual_seed(0))

    def timed(names) -> float:
        compressors = [build(n, 512, 32, **({"variant": args.h2o_variant} if n == "h2o" else {})) for n in names]
        times = []
        for _ in range(args.repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            rows, _ = prompt_rows(lm.model, lm.tokenizer, ids, compressors, 64)
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
            del rows
        return statistics.median(times[1:])

    out = {"tokens": args.tokens, "h2o_variant": args.h2o_variant, "device": torch.cuda.get_device_name(device)}
    with torch.no_grad():
        out["fullkv_ms"] = timed(["fullkv"])
        for name in SIX[1:]:
            out[f"fullkv+{name}_ms"] = timed(["fullkv", name])
            print(name, round(out[f"fullkv+{name}_ms"] - out["fullkv_ms"], 1), "ms more than FullKV alone", flush=True)
        out["six_ms"] = timed(SIX)
        if args.hold:
            compressors = [build(n, 512, 32, **({"variant": args.h2o_variant} if n == "h2o" else {})) for n in SIX]
            held, times = [], []
            for _ in range(args.hold):
                torch.cuda.synchronize()
                start = time.perf_counter()
                held.append(prompt_rows(lm.model, lm.tokenizer, ids, compressors, 64)[0])
                torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - start))
            out["held_ms"] = times
            out["held_gib"] = torch.cuda.memory_allocated(device) / 2**30
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
