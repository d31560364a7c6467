"""Scores that cannot overflow, reference numerics kept bit for bit, and rows of a batch compressed
independently: methods only, no model."""

import math

import pytest
import torch
import torch.nn.functional as F

from methods import build
from methods.h2o import accumulated_attention
from methods.scoring import window_attention_mass


def reference_window_mass(q, k, w):
    """The reference scorer written out literally (reference-methods.md section 1): matmul in the
    model dtype, divide by sqrt(d), finfo.min above the diagonal of the window block, float32 softmax
    cast back, sum over the window queries. q: [B, H, >=w, d], k: [B, H, n, d]."""
    n, d = k.shape[2], k.shape[3]
    attn = torch.matmul(q[:, :, -w:], k.transpose(2, 3)) / math.sqrt(d)
    mask = torch.full((w, w), torch.finfo(attn.dtype).min, dtype=attn.dtype)
    mask = torch.triu(mask, diagonal=1)
    attn[:, :, :, -w:] += mask
    attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    return attn[:, :, :, : n - w].sum(dim=2)


def layers_with(dtype, seed=0, b=1, h=4, n=90, d=64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, h, n, d, generator=g)).to(dtype)
    k = (scale * torch.randn(b, h, n, d, generator=g)).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_window_scores_are_the_reference_bit_for_bit_where_it_is_finite(dtype):
    for seed in range(5):
        q, k = layers_with(dtype, seed=seed, scale=2.0)
        ours, ref = window_attention_mass(q, k, 16), reference_window_mass(q, k, 16)
        assert torch.isfinite(ref).all()
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)


IMPORTANT = list(range(3, 99, 4))       # 24 tokens every window query favours


def dominant_key_case(seed=0, b=1, h=2, n=120, d=64, w=16):
    """Queries and keys whose ranking is clear in float32 (24 favoured tokens, then one dominant key),
    where the dominant key overflows float16's q.k (> 65504 before the division by sqrt(d)) for two
    of the window's queries only."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * 0.5
    k = torch.randn(b, h, n, d, generator=g) * 0.5
    dominant, favoured = torch.zeros(d), torch.zeros(d)
    dominant[:8] = 1.0
    favoured[8:16] = 1.0
    k[:, :, IMPORTANT] += favoured
    q[:, :, n - w:] += 2.0 * favoured
    k[:, :, 40] = dominant * 100.0                 # the dominant key
    q[:, :, n - 3] = dominant * 100.0             # two window queries that see it: q.k = 80000
    q[:, :, n - 2] = dominant * 95.0
    return q.half(), k.half(), w


def test_float16_overflow_gives_finite_scores_and_the_float32_selection():
    q, k, w = dominant_key_case()
    assert torch.isinf(torch.matmul(q[:, :, -w:], k.transpose(2, 3))).any()     # the reference overflows here
    assert torch.isnan(reference_window_mass(q, k, w)).all()                    # and every score turns NaN
    scores16 = window_attention_mass(q, k, w)
    scores32 = window_attention_mass(q.float(), k.float(), w)
    assert torch.isfinite(scores16).all()
    torch.testing.assert_close(scores16.float(), scores32, rtol=2e-3, atol=2e-3)
    # the selection, where the float32 ranking has a clear gap at the boundary
    keep = len(IMPORTANT) + 1
    top = scores32.topk(keep + 1, dim=-1).values
    assert (top[..., keep - 1] - top[..., keep] > 1e-2).all(), "the case must not be a near-tie"
    for name in ("snapkv", "pyramidkv", "h2o", "dynamickv"):
        knobs = {"h2o": {"variant": "window"}, "dynamickv": {"variant": "fixed"}}.get(name, {})
        c16 = build(name, budget=keep + w, window_size=w, kernel_size=1, **knobs)
        kept16 = c16.compress_all([k], [k], [q])[0][2]
        kept32 = c16.compress_all([k.float()], [k.float()], [q.float()])[0][2]
        assert torch.equal(kept16.sort(-1).values, kept32.sort(-1).values), name
        assert set(kept16[0, 0].tolist()) >= set(IMPORTANT) | {40}


def test_float16_overflow_in_h2o_accumulated_attention():
    q, k, w = dominant_key_case(n=100)
    for variant in ("causal", "reference_2024"):
        mass16 = accumulated_attention(q, k, w, variant, query_chunk=32)
        mass32 = accumulated_attention(q.float(), k.float(), w, variant, query_chunk=32)
        assert torch.isfinite(mass16).all()
        torch.testing.assert_close(mass16.float(), mass32, rtol=5e-3, atol=5e-3)


def test_float16_rows_that_underflow_to_minus_inf_are_recomputed_too():
    """Keys sharing a large offset and a query pointing the other way: every logit of that row is -inf
    in float16, its softmax NaN."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 60, 16, generator=g), torch.randn(1, 2, 60, 16, generator=g)
    k[..., 0] += 300.0
    q[0, 0, -1, 0] = -300.0
    q16, k16 = q.half(), k.half()
    assert torch.isnan(reference_window_mass(q16, k16, 8)).any()
    ours = window_attention_mass(q16, k16, 8)
    assert torch.isfinite(ours).all()
    # float16 rounds logits of magnitude ~75 to 0.06 in the rows kept as the reference computes them
    torch.testing.assert_close(ours.float(), window_attention_mass(q16.float(), k16.float(), 8), rtol=0.1, atol=0.02)
    for variant in ("causal", "reference_2024"):
        assert torch.isfinite(accumulated_attention(q16, k16, 8, variant, query_chunk=16)).all()


def test_float16_rows_without_overflow_keep_the_reference_values():
    """Only the overflowing query rows change: the other rows' probabilities are the reference's."""
    q, k, w = dominant_key_case()
    clean = q.clone()
    clean[:, :, -3:-1] = q[:, :, -5:-3]           # the same case without the two overflowing queries
    assert torch.equal(window_attention_mass(clean, k, w), reference_window_mass(clean, k, w))


ALL = [("fullkv", {}), ("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}),
       ("h2o", {"variant": "reference_2024"}), ("h2o", {"variant": "window"}), ("pyramidkv", {}),
       ("dynamickv", {}), ("dynamickv", {"variant": "fixed"})]


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
@pytest.mark.parametrize("name, knobs", ALL)
def test_each_row_of_a_batch_equals_that_row_compressed_alone(name, knobs, granularity):
    layers, batch, n = 8, 3, 70
    g = torch.Generator().manual_seed(11)
    keys = [torch.randn(batch, 2, n, 8, generator=g) for _ in range(layers)]
    values = [torch.randn(batch, 2, n, 8, generator=g) for _ in range(layers)]
    queries = [torch.randn(batch, 6, n, 8, generator=g) for _ in range(layers)]
    compressor = build(name, budget=24, window_size=6, granularity=granularity, **knobs)
    together = compressor.compress_all(keys, values, queries)
    padded = False
    for b in range(batch):
        alone = compressor.compress_all([x[b:b + 1] for x in keys], [x[b:b + 1] for x in values],
                                        [x[b:b + 1] for x in queries])
        for (k, v, pos), (k1, v1, pos1) in zip(together, alone):
            count = pos1.shape[-1]
            assert torch.equal(pos[b:b + 1, :, :count], pos1), (name, b)
            assert torch.equal(k[b:b + 1, :, :count], k1) and torch.equal(v[b:b + 1, :, :count], v1)
            assert (pos[b, :, count:] == -1).all() and (k[b, :, count:] == 0).all()   # padding, marked
            padded |= pos.shape[-1] > count
    if name == "dynamickv":
        assert padded, "rows were expected to get different per-layer allocations"
    else:
        assert not padded


def test_a_dynamickv_session_refuses_a_batch():
    compressor = build("dynamickv", budget=24, window_size=6)
    session = compressor.new_session(2)
    keys = torch.randn(2, 2, 40, 8)
    with pytest.raises(ValueError, match="batch of 1"):
        session.add_layer(0, keys, keys, torch.randn(2, 6, 6, 8))
