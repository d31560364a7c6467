"""On a GPU: the fast decode path (CUDA graphs) against the plain path on tiny random models, and
the eager attention backend against sdpa.

    python scripts/gpu_check_graphs.py

float32 (where the two paths should agree token for token, as on the CPU) and bfloat16 (where
near-ties may flip); a Llama shape and a Gemma 3 shape (sliding-window layers). Prints one line per
case: rows identical, graphs captured and reused, and any reason capture fell back to eager steps;
each prompt runs once without stop ids and once with stop ids under min_new_tokens=3 (the logit bias
the captured step reads).
Then, float32, both shapes: every method through the hook on attn_implementation=eager against sdpa
(tokens and kept positions), which must agree row for row; and K/V transforms (DynaKV's hooks) captured in
the step's graph: tokens and every generated token's kept ranks equal the plain path's.
"""

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.engine.batched import DecodeStats  # noqa: E402
from harness.engine.generate import generate  # noqa: E402
from harness.engine.models import load_model  # noqa: E402
from harness.engine.shared import generate_many  # noqa: E402
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

failures = 0
for shape, config in SHAPES.items():
    for dtype in ("float32", "bfloat16"):
        cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": 0, "tokenizer": "bytes", "dtype": dtype,
                                "device": "cuda", "attn_implementation": "sdpa", "config": config})
        lm = load_model(cfg)
        compressors = [build(name, budget=40, window_size=8, **knobs) for name, knobs in METHODS]
        same = total = 0
        stats = DecodeStats()
        for seed, n in ((1, 300), (2, 35), (3, 300)):
            ids = random_ids(n, seed=seed).cuda()
            free = generate(lm.model, lm.tokenizer, ids, compressors[0], 8, [], decode="plain").token_ids
            # no stops; then the first free tokens as stop ids under min_new_tokens=3 (the bias in the graph)
            for stops, min_new in (([], 0), (free[:3], 3)):
                fast = generate_many(lm.model, lm.tokenizer, ids, compressors, 40, stops, (), min_new, stats=stats)
                for c, f in zip(compressors, fast):
                    slow = generate(lm.model, lm.tokenizer, ids, c, 40, stops, (), min_new, decode="plain")
                    total += 1
                    same += f.token_ids == slow.token_ids
        print(f"{shape} {dtype}: {same}/{total} rows identical; batches {stats.groups}, graphs {stats.graphs}, "
              f"reused {stats.reused}, eager reason {stats.eager_reason}", flush=True)
        if dtype == "float32" and same != total or stats.graphs == 0:
            failures += 1

for shape, config in SHAPES.items():
    models = {}
    for backend in ("sdpa", "eager"):
        cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": 0, "tokenizer": "bytes", "dtype": "float32",
                                "device": "cuda", "attn_implementation": backend, "config": config})
        models[backend] = load_model(cfg)
    same = total = 0
    for name, knobs in METHODS:
        for granularity in ("query_head", "kv_head"):
            compressor = build(name, budget=40, window_size=8, granularity=granularity, **knobs)
            ids = random_ids(300, seed=4).cuda()
            a, b = (generate(lm.model, lm.tokenizer, ids, compressor, 24, [], decode="plain") for lm in models.values())
            positions = [[None if e["positions"] is None else e["positions"].tolist() for e in out.report["layers"]]
                         if out.report else None for out in (a, b)]
            total += 1
            same += a.token_ids == b.token_ids and positions[0] == positions[1]
    print(f"{shape} float32 eager vs sdpa: {same}/{total} method rows identical (tokens and kept positions)", flush=True)
    failures += same != total

# K/V transforms (DynaKV's hooks) inside the captured step: float32, both shapes, a token-adaptive transform; every
# row's tokens and every generated token's kept ranks equal the plain path's, and the graph was captured.
from harness.engine.transform import record_states, transformed  # noqa: E402
from methods.lowrank import build_transform  # noqa: E402

for shape, config in SHAPES.items():
    cfg = OmegaConf.create({"name": "tiny", "source": "random", "seed": 0, "tokenizer": "bytes", "dtype": "float32",
                            "device": "cuda", "attn_implementation": "sdpa", "config": config})
    lm = load_model(cfg)
    states = record_states(lm.model, random_ids(256, seed=9).cuda())
    transforms = {layer: {kind: build_transform("energy", eta=0.8).fit(x) for kind, x in pair.items()}
                  for layer, pair in states.items()}
    compressors = [build("fullkv"), build("snapkv", budget=40, window_size=8, granularity="layer")]
    same = total = 0
    stats = DecodeStats()
    for seed, n in ((1, 300), (2, 35), (3, 300)):
        ids = random_ids(n, seed=seed).cuda()
        runs = []
        for decode in ("batched", "plain"):
            with transformed(lm.model, transforms) as log:
                outs = generate_many(lm.model, lm.tokenizer, ids, compressors, 40, decode=decode,
                                     stats=stats if decode == "batched" else None)
            runs.append((outs, log))
        (fast, fast_log), (slow, slow_log) = runs
        for row, (f, s_) in enumerate(zip(fast, slow)):
            total += 1
            same += f.token_ids == s_.token_ids and all(
                torch.equal(fast_log.generated[row][key], slow_log.generated[row][key]) for key in slow_log.generated[row])
    print(f"{shape} float32 transforms in the graph: {same}/{total} rows identical (tokens and generated ranks); "
          f"graphs {stats.graphs}, reused {stats.reused}, eager reason {stats.eager_reason}", flush=True)
    failures += same != total or stats.graphs == 0
sys.exit(1 if failures else 0)
