"""The grouped-query scorer and gather (issue 18: prefill overhead) against the reference's layout, which
repeats every KV head to its query heads first (``repeat_kv``): bit for bit, on random inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods.base import gather_grouped, gather_tokens, repeat_heads
from methods.h2o import accumulated_attention
from methods.scoring import attention_logits, window_attention_mass


def reference_window_mass(q, k, w):
    """The reference scorer on keys repeated to the query heads (reference-methods.md section 1)."""
    k = repeat_heads(k, q.shape[1] // k.shape[1])
    n, d = k.shape[2], k.shape[3]
    attn = torch.matmul(q[:, :, -w:], k.transpose(2, 3)) / math.sqrt(d)
    attn[:, :, :, -w:] += torch.triu(torch.full((w, w), torch.finfo(attn.dtype).min, dtype=attn.dtype), diagonal=1)
    attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    return attn[:, :, :, : n - w].sum(dim=2)


def grouped_inputs(dtype, seed, b=2, hkv=2, groups=4, n=130, d=64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, hkv * groups, n, d, generator=g)).to(dtype)
    k = (scale * torch.randn(b, hkv, n, d, generator=g)).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_logits_equal_the_repeated_keys_product_bit_for_bit(dtype):
    for seed, groups in [(0, 4), (1, 3), (2, 1), (3, 8)]:
        q, k, _ = grouped_inputs(dtype, seed, groups=groups)
        ours = attention_logits(q[:, :, -16:], k)
        ref = torch.matmul(q[:, :, -16:], repeat_heads(k, groups).transpose(2, 3)) / math.sqrt(q.shape[-1])
        assert ours.shape == ref.shape == (2, 2 * groups, 16, 130)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_window_mass_is_the_reference_bit_for_bit(dtype):
    for seed in range(4):
        q, k, _ = grouped_inputs(dtype, seed, scale=2.0)
        ours, ref = window_attention_mass(q, k, 16), reference_window_mass(q, k, 16)
        assert torch.isfinite(ref).all() and torch.equal(ours, ref)


def test_grouped_accumulated_attention_equals_the_repeated_keys():
    for variant in ("causal", "reference_2024"):
        q, k, _ = grouped_inputs(torch.bfloat16, 5, n=70)
        ours = accumulated_attention(q, k, 8, variant, 16)
        ref = accumulated_attention(q, repeat_heads(k, 4), 8, variant, 16)
        assert ours.shape == (2, 8, 62) and torch.equal(ours, ref)


def test_mismatched_heads_are_refused():
    q, k, _ = grouped_inputs(torch.float32, 0, hkv=3, groups=1)
    with pytest.raises(ValueError, match="multiple of key heads"):
        attention_logits(q[:, :2], k)


def test_gather_grouped_reads_each_query_heads_kv_head():
    _, k, _ = grouped_inputs(torch.bfloat16, 6)
    index = torch.randint(0, 130, (2, 8, 40), generator=torch.Generator().manual_seed(1))
    ours = gather_grouped(k, index)
    assert torch.equal(ours, gather_tokens(repeat_heads(k, 4), index))
    assert ours[1, 5, 7].equal(k[1, 5 // 4, index[1, 5, 7]])      # head 5 reads KV head 1
    assert torch.equal(gather_grouped(k, index[:, :2]), gather_tokens(k, index[:, :2]))   # H == Hkv


@pytest.mark.parametrize("name,knobs", [
    ("snapkv", {}), ("pyramidkv", {}), ("dynamickv", {}), ("h2o", {}), ("h2o", {"variant": "window"}),
    ("streamingllm", {}),
])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_methods_keep_what_they_keep_on_repeated_keys(name, knobs, granularity):
    """Each method on grouped-query keys keeps the same tokens and vectors, bit for bit, as on the same keys
    repeated to the query heads beforehand (the reference's layout; the method then has nothing to group).
    ``kv_head`` on repeated keys would be another problem (a token set per query head), so there only the kept
    vectors are checked against the original tokens (tests/test_methods.py checks the kv_head scores)."""
    layers = 4
    g = torch.Generator().manual_seed(7)
    keys = [torch.randn(1, 2, 200, 32, generator=g).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(1, 2, 200, 32, generator=g).to(torch.bfloat16) for _ in range(layers)]
    queries = [torch.randn(1, 8, 200, 32, generator=g).to(torch.bfloat16) for _ in range(layers)]
    if name == "streamingllm":
        knobs = {"sink_tokens": 4}
    c = methods.build(name, budget=48, window_size=8, granularity=granularity, **knobs)
    ours = c.compress_all(keys, values, queries)
    if granularity == "query_head":
        again = methods.build(name, budget=48, window_size=8, granularity=granularity, **knobs)
        ref = again.compress_all([repeat_heads(k, 4) for k in keys], [repeat_heads(v, 4) for v in values], queries)
        for (k1, v1, p1), (k2, v2, p2) in zip(ours, ref):
            assert torch.equal(p1, p2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    for (k1, v1, p1), k, v in zip(ours, keys, values):       # every kept vector is the original token's
        heads = k1.shape[1]
        for h in range(heads):
            kv = h // (heads // 2)
            assert torch.equal(k1[0, h], k[0, kv, p1[0, h]]) and torch.equal(v1[0, h], v[0, kv, p1[0, h]])


def test_the_report_counts_distinct_tokens_as_sets_do_and_copies_once():
    """``distinct_per_head`` against Python sets (duplicates, as DynamicKV's reference variant stores them, and an
    empty selection), and ``host_positions`` keeps every layer's values and shape in its one copy."""
    from methods.base import distinct_per_head, host_positions
    g = torch.Generator().manual_seed(3)
    for k in (0, 1, 5, 40):
        positions = torch.randint(0, 30, (6, k), generator=g)
        assert distinct_per_head(positions) == [len(set(row.tolist())) for row in positions]
    kept = {0: torch.randint(0, 99, (1, 4, 7), generator=g), 1: None, 2: torch.randint(0, 99, (1, 4, 3), generator=g)}
    copied = host_positions(kept)
    assert copied[1] is None and set(copied) == {0, 1, 2}
    assert all(torch.equal(copied[i], kept[i]) for i in (0, 2))


def test_a_session_report_is_unchanged_by_the_batched_copy():
    """A DynamicKV session's report (different kept counts per layer, duplicates in the reference variant) against
    the per-layer set-based count it replaced."""
    keys = [torch.randn(1, 2, 120, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    queries = [torch.randn(1, 8, 120, 16, generator=torch.Generator().manual_seed(10 + i)) for i in range(8)]
    c = methods.build("dynamickv", budget=24, window_size=4)
    session = c.new_session(8)
    for layer in range(8):
        session.add_layer(layer, keys[layer], keys[layer], queries[layer])
    session.finish()
    report = session.report()
    counts = set()
    for entry in report["layers"]:
        positions = session.kept_positions[entry["layer"]]
        assert torch.equal(entry["positions"], positions.cpu())
        assert entry["distinct_per_head"] == [len(set(p.tolist())) for p in positions[0]]
        counts.add(entry["kept"])
    assert len(counts) > 1                                  # the layers kept different counts
