"""The model-free contract: methods.build(...).compress_all(keys, values, queries)."""

import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods import ConfigError, build


def random_layers(layers=3, b=1, hkv=2, hq=6, n=60, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(b, hkv, n, d, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(b, hkv, n, d, generator=g).to(dtype) for _ in range(layers)]
    queries = [torch.randn(b, hq, n, d, generator=g).to(dtype) for _ in range(layers)]
    return keys, values, queries


def direct_window_scores(q, k, w, kernel, pooling):
    """An independent, loop-based computation of SnapKV's pooled window scores for one head:
    q [n, d], k [n, d] -> [n - w]."""
    n, d = k.shape
    total = torch.zeros(n - w)
    for i in range(n - w, n):               # each window query
        logits = (k[: i + 1] @ q[i]) / math.sqrt(d)   # causal: keys up to i
        probs = torch.softmax(logits, dim=0)
        total += probs[: n - w]
    pad = kernel // 2
    if pooling == "maxpool":
        padded = F.pad(total, (pad, pad), value=-math.inf)
        return torch.stack([padded[j:j + kernel].max() for j in range(n - w)])
    padded = F.pad(total, (pad, pad), value=0.0)
    return torch.stack([padded[j:j + kernel].sum() / kernel for j in range(n - w)])


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_snapkv_keeps_exactly_the_top_scored_tokens(pooling, granularity):
    budget, w, kernel = 24, 6, 5
    keys, values, queries = random_layers(layers=2, n=70, seed=1)
    kept = build("snapkv", budget=budget, window_size=w, kernel_size=kernel, pooling=pooling,
                 granularity=granularity).compress_all(keys, values, queries)
    for (k_kept, v_kept, pos), k, v, q in zip(kept, keys, values, queries):
        hq, hkv, n = q.shape[1], k.shape[1], k.shape[2]
        heads = hq if granularity == "query_head" else hkv
        assert k_kept.shape == (1, heads, budget, 8) and pos.shape == (1, heads, budget)
        for h in range(heads):
            kv_head = h // (hq // hkv) if granularity == "query_head" else h
            # the window is always kept, last
            assert pos[0, h, -w:].tolist() == list(range(n - w, n))
            if granularity == "query_head":
                scores = direct_window_scores(q[0, h], k[0, kv_head], w, kernel, pooling)
            else:  # mean over the group of the summed window mass, then pooled
                group = range(h * (hq // hkv), (h + 1) * (hq // hkv))
                raw = torch.stack([direct_window_scores(q[0, g], k[0, kv_head], w, 1, "avgpool") for g in group]).mean(0)
                scores = direct_window_scores_pool(raw, kernel, pooling)
            selected = pos[0, h, :-w]
            assert len(set(selected.tolist())) == budget - w
            threshold = scores.topk(budget - w).values.min()
            assert scores[selected].min() >= threshold - 1e-6      # every kept token is a top scorer
            # kept tensors are the original tokens at those positions
            torch.testing.assert_close(k_kept[0, h], k[0, kv_head, pos[0, h]])
            torch.testing.assert_close(v_kept[0, h], v[0, kv_head, pos[0, h]])


def direct_window_scores_pool(raw, kernel, pooling):
    pad = kernel // 2
    if pooling == "maxpool":
        padded = F.pad(raw, (pad, pad), value=-math.inf)
        return torch.stack([padded[j:j + kernel].max() for j in range(raw.shape[0])])
    padded = F.pad(raw, (pad, pad), value=0.0)
    return torch.stack([padded[j:j + kernel].sum() / kernel for j in range(raw.shape[0])])


def test_streamingllm_keeps_sinks_and_recent_window():
    keys, values, queries = random_layers(n=50)
    kept = build("streamingllm", budget=20, sink_tokens=4).compress_all(keys, values, queries)
    for _, _, pos in kept:
        assert pos.shape == (1, 6, 20)
        assert pos[0, 0].tolist() == [0, 1, 2, 3] + list(range(34, 50))
    # without sink_tokens: budget - window initial tokens (DynamicKV's runner, window 32)
    kept = build("streamingllm", budget=40, window_size=32).compress_all(keys, values, queries)
    assert kept[0][2][0, 0].tolist() == list(range(8)) + list(range(18, 50))


@pytest.mark.parametrize("name", ["snapkv", "streamingllm", "fullkv"])
def test_short_prompt_is_kept_whole(name):
    keys, values, queries = random_layers(n=30)
    for budget in (30, 64):
        kept = build(name, budget=budget, window_size=8).compress_all(keys, values, queries)
        for (k, v, pos), k0, v0 in zip(kept, keys, values):
            assert pos.shape == (1, 6, 30)
            assert pos[0, 0].tolist() == list(range(30))
            torch.testing.assert_close(k, k0.repeat_interleave(3, dim=1))


def test_query_head_and_kv_head_shapes():
    keys, values, queries = random_layers(n=64)
    qh = build("snapkv", budget=16, window_size=4, kernel_size=3).compress_all(keys, values, queries)
    kvh = build("snapkv", budget=16, window_size=4, kernel_size=3, granularity="kv_head").compress_all(keys, values, queries)
    assert qh[0][0].shape == (1, 6, 16, 8)
    assert kvh[0][0].shape == (1, 2, 16, 8)


def test_batch_dimension_is_independent():
    keys, values, queries = random_layers(b=2, n=64, seed=3)
    compressor = build("snapkv", budget=16, window_size=4, kernel_size=3)
    both = compressor.compress_all(keys, values, queries)
    second = compressor.compress_all([k[1:] for k in keys], [v[1:] for v in values], [q[1:] for q in queries])
    for (kb, _, pb), (k1, _, p1) in zip(both, second):
        assert torch.equal(pb[1:], p1)
        torch.testing.assert_close(kb[1:], k1)


def test_bfloat16_runs_and_keeps_budget():
    keys, values, queries = random_layers(n=80, dtype=torch.bfloat16)
    kept = build("snapkv", budget=32, window_size=8).compress_all(keys, values, queries)
    assert all(k.dtype == torch.bfloat16 and k.shape[2] == 32 for k, _, _ in kept)


@pytest.mark.parametrize("knobs, message", [
    ({"budget": 32, "window_size": 32}, "budget=32 must be larger than window_size=32"),
    ({"budget": 32, "window_size": 0}, "window_size=0 must be > 0"),
    ({"budget": 64, "window_size": 8, "kernel_size": 4}, "kernel_size=4 must be a positive odd number"),
    ({"budget": 64, "window_size": 8, "pooling": "sum"}, "pooling='sum' is not one of"),
    ({"budget": 64, "window_size": 8, "granularity": "head"}, "granularity='head' is not one of"),
    ({"budget": 64, "window_size": 8, "kernel": 7}, "unknown knob(s) ['kernel']"),
])
def test_impossible_settings_fail_with_the_reason(knobs, message):
    with pytest.raises(ConfigError) as error:
        build("snapkv", **knobs)
    assert message in str(error.value)


def test_unknown_method_lists_the_choices():
    with pytest.raises(ConfigError) as error:
        build("snapkvv")
    assert "fullkv" in str(error.value) and "snapkv" in str(error.value)


def test_streamingllm_sink_tokens_validation():
    with pytest.raises(ConfigError, match="sink_tokens=64 must be smaller than budget=64"):
        build("streamingllm", budget=64, sink_tokens=64)
    assert build("streamingllm", budget=64, sink_tokens=4).window_size == 60


def test_registry_names():
    assert {"fullkv", "streamingllm", "snapkv"} <= set(methods.REGISTRY)


def test_sessions_are_independent():
    compressor = build("snapkv", budget=16, window_size=4, kernel_size=3)
    a = compressor.new_session(2)
    b = compressor.new_session(2)
    keys, values, queries = random_layers(layers=1, n=40)
    a.add_layer(0, keys[0], values[0], queries[0][:, :, -4:])
    assert a.kept_positions and not b.kept_positions


@pytest.mark.parametrize("beta", [0, -3, True, 2.5])
def test_pyramidkv_beta_must_be_a_positive_integer(beta):
    """beta divides the budget in the pyramid schedule: 0 would divide by zero at the first long prompt."""
    with pytest.raises(ConfigError, match=f"beta={beta!r} must be a positive integer"):
        build("pyramidkv", budget=128, window_size=8, beta=beta)
