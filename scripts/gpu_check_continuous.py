"""On a GPU: continuous batching over many prompts (harness.engine.continuous.decode_rows, CUDA graphs) against
the plain path, one prompt and one method at a time, on tiny random models in float32.

    python scripts/gpu_check_continuous.py [PROMPTS]

(``PROMPTS``: how many of the five prompts to use, default all.)
Cases: a Llama shape at both granularities and a Gemma 3 shape (sliding-window layers), each on prompts of
very different lengths, once without stop ids and once with per-prompt stop ids and min_new_tokens (rows end at
different steps), with fewer slots than rows (slots are refilled between graph replays). Prints one line per
case: rows identical, allocations, steps, refills, occupancy, graphs replayed and any reason capture fell back
to eager steps. Exits 1 when a float32 case differs or no graph was replayed.
"""

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.engine.continuous import ContinuousStats, decode_rows, prompt_rows  # noqa: E402
from harness.engine.generate import generate  # noqa: E402
from harness.engine.models import load_model  # noqa: E402
from methods import build  # noqa: E402


def tiny_config(**overrides) -> dict:
    """A small random Llama (the test suite's shape), with ``overrides``."""
    return {"model_type": "llama", "vocab_size": 258, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, **overrides}


def random_ids(length: int, seed: int = 0, vocab: int = 258) -> torch.Tensor:
    """``[1, length]`` int64 token ids in ``[2, vocab)`` from a seeded generator."""
    return torch.randint(2, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


SHAPES = {
    "llama": tiny_config(),
    "gemma3": tiny_config(model_type="gemma3_text", num_hidden_layers=6, head_dim=16, num_attention_heads=4,
                          num_key_value_heads=1, sliding_window=32,
                          layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2
                          + ["full_attention"]),
}
METHODS = [("fullkv", {}), ("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}), ("pyramidkv", {}),
           ("dynamickv", {})]
PROMPTS = [(1, 300), (2, 35), (3, 129), (4, 600), (5, 20)]     # (seed, tokens)
NEW = [40, 24, 32, 16, 40]                                       # max_new_tokens per prompt
COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else len(PROMPTS)
PROMPTS, NEW = PROMPTS[:COUNT], NEW[:COUNT]

failures = 0
for shape, config in SHAPES.items():
    cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": 0, "tokenizer": "bytes", "dtype": "float32",
                            "device": "cuda", "attn_implementation": "sdpa", "config": config})
    lm = load_model(cfg)
    for granularity in ("query_head", "kv_head") if shape == "llama" else ("query_head",):
        compressors = [build(name, budget=40, window_size=8, granularity=granularity, **knobs)
                       for name, knobs in METHODS]
        for stopped in (False, True):
            rows, expected = [], []
            for p, ((seed, n), new) in enumerate(zip(PROMPTS, NEW)):
                ids = random_ids(n, seed=seed).cuda()
                stops, min_new = [], 0
                if stopped:     # stop ids from a free run: some rows stop early, some late; min_new_tokens on some
                    free = generate(lm.model, lm.tokenizer, ids, compressors[2], new, [], decode="plain").token_ids
                    stops, min_new = [free[3 + p], free[-2]], 2 * (p % 2)
                built, _ = prompt_rows(lm.model, lm.tokenizer, ids, compressors, new, stops, (), min_new)
                rows += built
                for c in compressors:
                    slow = generate(lm.model, lm.tokenizer, ids, c, new, stops, (), min_new, decode="plain")
                    expected.append((slow.token_ids, slow.stopped_by))
            stats = ContinuousStats()
            fast = decode_rows(lm.model, rows, slots=8, stats=stats)
            same = sum(f == e for f, e in zip(fast, expected))
            print(f"{shape} {granularity} {'stops' if stopped else 'free'} float32: {same}/{len(rows)} rows identical; "
                  f"allocations {stats.segments}, steps {stats.steps}, refills {stats.refills}, "
                  f"occupancy {stats.occupancy:.2f}, graphs {stats.graphs}, eager reason {stats.eager_reason}",
                  flush=True)
            if same != len(rows) or stats.graphs == 0:
                failures += 1

sys.exit(1 if failures else 0)
