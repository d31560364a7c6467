"""Shared prefill + per-method decoding equals running each method alone, token for token."""

import pytest
import torch

from harness.engine.generate import generate
from harness.engine.shared import generate_many
from methods import build

from conftest import random_ids

pytestmark = pytest.mark.integration

def same_report(a, b) -> bool:
    if a is None or b is None:
        return a is b
    for x, y in zip(a["layers"], b["layers"]):
        px, py = x.pop("positions"), y.pop("positions")
        if (px is None) != (py is None) or (px is not None and not torch.equal(px, py)):
            return False
    return a == b


ALL = [("fullkv", {}), ("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}), ("h2o", {"variant": "window"}),
       ("pyramidkv", {}), ("dynamickv", {}), ("dynamickv", {"variant": "fixed"})]


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_shared_prefill_equals_one_at_a_time(tiny, granularity):
    compressors = [build(name, budget=40, window_size=8, granularity=granularity, **knobs) for name, knobs in ALL]
    for seed, n in ((1, 300), (2, 35)):          # compressed and short (kept whole) prompts
        ids = random_ids(n, seed=seed)
        shared = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 10, [])
        for compressor, together in zip(compressors, shared):
            alone = generate(tiny.model, tiny.tokenizer, ids, compressor, 10, [])
            assert together.token_ids == alone.token_ids, compressor.name
            assert same_report(together.report, alone.report)


def test_shared_prefill_on_sliding_window_model(tiny_gemma):
    compressors = [build("fullkv"), build("snapkv", budget=24, window_size=8), build("pyramidkv", budget=24, window_size=8)]
    ids = random_ids(150, seed=3)
    for compressor, together in zip(compressors, generate_many(tiny_gemma.model, tiny_gemma.tokenizer, ids, compressors, 8, [])):
        assert together.token_ids == generate(tiny_gemma.model, tiny_gemma.tokenizer, ids, compressor, 8, []).token_ids


def test_shared_generation_refuses_what_generate_refuses(tiny):
    """Zero new tokens or a batch of prompts: the same ValueError as ``generate``, before any prefill."""
    snap = build("snapkv", budget=64, window_size=8)
    for ids, new in ((random_ids(100), 0), (torch.cat([random_ids(100), random_ids(100, seed=1)]), 3)):
        for run in (lambda: generate(tiny.model, tiny.tokenizer, ids, snap, new),
                    lambda: generate_many(tiny.model, tiny.tokenizer, ids, [snap], new)):
            with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1|one prompt at a time"):
                run()
