"""kvpress, timed on the benchmark's model and prompts: run by ``harness.bench.speed`` in a subprocess.

kvpress (NVIDIA, pip package ``kvpress``) pins ``transformers<5.3``, older than the harness needs, so
``kvh bench --kvpress-site DIR`` runs this file with ``DIR`` (kvpress and its
transformers) first on the path. It imports nothing from the harness.

What it measures, per context length, with kvpress's own code paths (kvpress 0.5.5
``kvpress/pipeline.py``, ``KVPressTextGenerationPipeline._forward``):

* FullKV prefill: ``model.model(context_ids, past_key_values=DynamicCache())``, the pipeline's
  prefill (no LM head);
* SnapKV prefill + compression: the same inside ``with SnapKVPress(...)(model)``, with
  ``compression_ratio = 1 - budget / n`` so that ``budget`` tokens stay per layer;
* peak GPU memory of each;
* end to end: the pipeline's ``_forward`` (prefill with the press on the first ``n - 1`` tokens,
  the last token as the "question", then its greedy loop, one model call per token) for
  ``new_tokens`` tokens, EOS never stopping it (random weights).

Synchronised wall-clock around each measurement after a warm-up, median of ``repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _sync_ms(fn) -> float:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


class _Silent:
    """Stands in for the pipeline's tokenizer: the benchmark needs no text."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON file: the model config as a dict")
    parser.add_argument("--contexts", type=int, nargs="+", required=True)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import kvpress
    import transformers
    from kvpress import SnapKVPress
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    with open(args.config) as f:
        config_dict = json.load(f)
    config = AutoConfig.for_model(**config_dict)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"           # the CPU only for the harness's own tests of this script
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = [-1]          # never stop early (random weights)

    pipe = object.__new__(KVPressTextGenerationPipeline)  # its _forward and generate_answer, no tokenizer
    pipe.model, pipe.tokenizer = model, _Silent()

    rows = []
    for n in args.contexts:
        ids = torch.randint(2, min(30000, config.vocab_size), (1, n), device=device)
        press = SnapKVPress(compression_ratio=1 - args.budget / n, window_size=args.window, kernel_size=args.kernel)
        row = {"context": n, "budget": args.budget}
        with torch.no_grad():
            for name, use_press in (("fullkv", False), ("snapkv", True)):
                times, peak = [], 0.0
                for _ in range(args.repeats + 1):
                    cache = DynamicCache()
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()

                    def prefill(cache=cache):
                        if use_press:
                            with press(model):
                                model.model(input_ids=ids, past_key_values=cache)
                        else:
                            model.model(input_ids=ids, past_key_values=cache)
                    times.append(_sync_ms(prefill))
                    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                    kept = cache.get_seq_length()
                    del cache
                row[f"{name}_prefill_ms"] = statistics.median(times[1:])
                row[f"{name}_peak_gib"] = peak
                row[f"{name}_kept_tokens"] = kept
            e2e = []
            for _ in range(args.repeats + 1):
                inputs = {"context_ids": ids[:, :-1], "questions_ids": [ids[:, -1:]]}
                e2e.append(_sync_ms(lambda: pipe._forward(inputs, max_new_tokens=args.new_tokens, press=press)))
            row["snapkv_end_to_end_ms"] = statistics.median(e2e[1:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _version("kvpress"),
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "new_tokens": args.new_tokens, "window": args.window, "kernel": args.kernel, "rows": rows}, f, indent=1)


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
