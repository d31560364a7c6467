"""H2O, PyramidKV and DynamicKV against hand-worked and direct computations."""

import math
import subprocess
import sys

import pytest
import torch
from test_methods import random_layers

from methods import build
from methods.base import Kept
from methods.h2o import accumulated_attention
from methods.pyramidkv import pyramid_counts


# ----------------------------------------------------------------------------- PyramidKV
def test_pyramid_schedule_matches_the_reference_numbers():
    assert pyramid_counts(128, 8, 32, 10_000) == [234 - 7 * l for l in range(32)]
    assert pyramid_counts(512, 8, 32, 10_000) == [983 - 30 * l for l in range(32)]
    assert pyramid_counts(1024, 8, 32, 10_000) == [1982 - 62 * l for l in range(32)]
    assert pyramid_counts(2048, 8, 32, 10_000)[::31] == [3978, 103]
    assert pyramid_counts(512, 8, 28, 10_000) == [983 - 35 * l for l in range(28)]   # Qwen2
    assert sum(pyramid_counts(128, 8, 32, 10_000)) / 32 == 125.5


@pytest.mark.parametrize("n, expected", [
    (128, "whole"),          # n <= budget: everything
    (200, [120] * 32),       # budget < n < 2 * base (240): uniform SnapKV with base tokens
    (239, [120] * 32),
    (240, [232 - 7 * l for l in range(32)]),   # pyramid, max_num capped at n - w = 232
    (300, [234 - 7 * l for l in range(32)]),
])
def test_pyramidkv_regimes(n, expected):
    compressor = build("pyramidkv", budget=128, window_size=8, kernel_size=7)
    keys, values, queries = random_layers(layers=32, hkv=1, hq=2, n=n, d=4)
    kept = compressor.compress_all(keys, values, queries)
    counts = [k.shape[2] - 8 for k, _, _ in kept]
    if expected == "whole":
        assert counts == [n - 8] * 32 and kept[0][2][0, 0].tolist() == list(range(n))
    else:
        assert counts == expected


def test_pyramidkv_single_layer_is_uniform():
    keys, values, queries = random_layers(layers=1, n=300)
    kept = build("pyramidkv", budget=64, window_size=8).compress_all(keys, values, queries)
    assert kept[0][0].shape[2] == 64


def test_pyramidkv_selects_like_snapkv_at_each_layer_count():
    keys, values, queries = random_layers(layers=4, n=400, seed=5)
    pyramid = build("pyramidkv", budget=64, window_size=8, kernel_size=7).compress_all(keys, values, queries)
    for layer, (_, _, pos) in enumerate(pyramid):
        count = pos.shape[-1]
        snap = build("snapkv", budget=count, window_size=8, kernel_size=7).compress_all(
            keys[layer:layer + 1], values[layer:layer + 1], queries[layer:layer + 1])[0][2]
        assert torch.equal(pos, snap)


# ----------------------------------------------------------------------------- H2O
def direct_h2o_scores(q, k, window, variant):
    """Unchunked [n, n] computation with explicit loops over heads: q, k [H, n, d] -> [H, n - w]."""
    n, d = k.shape[1], k.shape[2]
    out = []
    for h in range(q.shape[0]):
        logits = q[h] @ k[h].T / math.sqrt(d)
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)          # future keys
        if variant == "reference_2024":
            keep_visible = torch.ones(n, n, dtype=torch.bool)
            keep_visible[n - window:, n - window:] = False
            mask &= ~keep_visible
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
        out.append(torch.softmax(logits, dim=-1)[:, : n - window].sum(dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["causal", "reference_2024"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 1000])
def test_h2o_chunked_equals_direct(variant, chunk):
    _, _, queries = random_layers(layers=1, hq=3, n=50, seed=2)
    keys = random_layers(layers=1, hkv=3, n=50, seed=3)[0]
    q, k = queries[0], keys[0]
    ours = accumulated_attention(q, k, 6, variant, chunk)[0]
    torch.testing.assert_close(ours, direct_h2o_scores(q[0], k[0], 6, variant), rtol=1e-5, atol=1e-6)


def test_h2o_variants_keep_the_top_scored_tokens():
    keys, values, queries = random_layers(layers=1, n=80, seed=4)
    for variant in ("causal", "reference_2024"):
        kept = build("h2o", budget=24, window_size=6, variant=variant, query_chunk=13).compress_all(keys, values, queries)
        pos = kept[0][2][0]
        for h in range(6):
            scores = direct_h2o_scores(queries[0][0, h:h + 1], keys[0][0, h // 3:h // 3 + 1], 6, variant)[0]
            assert set(pos[h, :-6].tolist()) == set(scores.topk(18).indices.tolist())
    # window variant = SnapKV without pooling
    window = build("h2o", budget=24, window_size=6, variant="window").compress_all(keys, values, queries)
    snap = build("snapkv", budget=24, window_size=6, kernel_size=1).compress_all(keys, values, queries)
    assert torch.equal(window[0][2], snap[0][2])


def test_h2o_causal_differs_from_reference_2024():
    keys, values, queries = random_layers(layers=1, n=120, seed=6)
    a = build("h2o", budget=30, window_size=8, variant="causal").compress_all(keys, values, queries)[0][2]
    b = build("h2o", budget=30, window_size=8, variant="reference_2024").compress_all(keys, values, queries)[0][2]
    assert not torch.equal(a, b)


PEAK = """
import resource, sys, torch
from methods.h2o import accumulated_attention
n = int(sys.argv[1]); torch.manual_seed(0)
q = torch.randn(1, 4, n, 32); k = torch.randn(1, 4, n, 32)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
accumulated_attention(q, k, 32, "causal", 128)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_h2o_peak_memory_grows_linearly():
    """Extra peak RSS (KiB) of the score computation at n and 2n: a full [H, n, n] float32 softmax
    would take 4 * 4 * n^2 bytes (1 GiB at n = 8192); the chunked one holds a few [4, 128, n] tensors."""
    def extra(n):
        out = subprocess.run([sys.executable, "-c", PEAK, str(n)], capture_output=True, text=True, timeout=120,
                             cwd=__file__.rsplit("/tests/", 1)[0])
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip().splitlines()[-1])
    small, large = extra(4096), extra(8192)
    quadratic_small, quadratic_large = (4 * 4 * n ** 2 // 1024 for n in (4096, 8192))   # KiB of one [4, n, n]
    assert large < quadratic_large / 4, (small, large)
    assert large - small < (quadratic_large - quadratic_small) / 4, (small, large)      # not n^2


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name, knobs", [("snapkv", {}), ("streamingllm", {}), ("h2o", {}), ("pyramidkv", {}),
                                         ("dynamickv", {"variant": "fixed"}), ("fullkv", {})])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_budget_at_least_prompt_is_fullkv(name, knobs, granularity):
    keys, values, queries = random_layers(layers=4, n=40)
    for budget in (40, 100):
        kept = build(name, budget=budget, window_size=8, granularity=granularity, **knobs).compress_all(keys, values, queries)
        for k, v, pos in kept:
            assert pos[0, 0].tolist() == list(range(40))


def test_dynamickv_reference_short_prompt_reproduces_the_reference_allocation():
    """reference-methods.md section 9, item 3: n=50, budget 64, w=8, L=32, H=4: layers 0-30 keep only
    the window, layer 31 keeps all 50; with L=8 (which divides 4 * 42) every layer keeps everything."""
    for layers, expected in ((32, [8] * 31 + [50]), (8, [50] * 8)):
        keys, values, queries = random_layers(layers=layers, hkv=4, hq=4, n=50)
        kept = build("dynamickv", budget=64, window_size=8).compress_all(keys, values, queries)
        assert [k.shape[2] for k, _, _ in kept] == expected


# ----------------------------------------------------------------------------- DynamicKV
@pytest.mark.parametrize("layers, hq, hkv, n, budget", [(32, 8, 2, 600, 64), (30, 9, 3, 500, 64), (6, 4, 4, 300, 40),
                                                         (12, 4, 1, 2000, 128)])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_dynamickv_fixed_sums_to_the_whole_model_budget_without_duplicates(layers, hq, hkv, n, budget, granularity):
    keys, values, queries = random_layers(layers=layers, hq=hq, hkv=hkv, n=n, d=4, seed=layers)
    kept = build("dynamickv", budget=budget, window_size=8, kernel_size=7, variant="fixed", radio_max=2.0,
                 granularity=granularity).compress_all(keys, values, queries)
    assert sum(k.shape[2] - 8 for k, _, _ in kept) == (budget - 8) * layers
    for _, _, pos in kept:
        for head in pos[0]:
            assert len(set(head.tolist())) == head.shape[0]       # no token twice
            assert head[-8:].tolist() == list(range(n - 8, n))    # window last


def test_dynamickv_reference_leaves_trailing_layers_unallocated():
    keys, values, queries = random_layers(layers=30, hq=9, hkv=3, n=500, d=4)
    session = build("dynamickv", budget=64, window_size=8, kernel_size=7).new_session(30)
    for layer in range(30):
        session.add_layer(layer, keys[layer], values[layer], queries[layer][:, :, -8:])
    assert "layers 28..29 were never re-allocated" in session.notes[0]
    kept = build("dynamickv", budget=64, window_size=8, kernel_size=7).compress_all(keys, values, queries)
    assert [k.shape[2] - 8 for k, _, _ in kept[-2:]] == [492, 492]     # budget_size = min(10 * 56, 492)
    assert sum(k.shape[2] - 8 for k, _, _ in kept[:28]) <= 56 * 30


def test_dynamickv_reference_duplicates_the_window_when_a_layer_gets_more_than_it_stores():
    """radio_max = 1 stores only `base` tokens per layer; the first re-allocation gives the layers with
    the most top scores more than that, and the reference slice runs into the stored window."""
    keys, values, queries = random_layers(layers=4, hq=2, hkv=2, n=200, d=4, seed=11)
    queries[0] = queries[0] * 6          # sharper attention in layer 0: it wins most top scores
    kept = build("dynamickv", budget=24, window_size=4, kernel_size=1, radio_max=1.0).compress_all(keys, values, queries)
    positions = [pos[0, 0].tolist() for _, _, pos in kept]
    duplicated = [p for p in positions if len(set(p)) < len(p)]
    assert duplicated, positions
    window = list(range(196, 200))
    assert any(p.count(196) == 2 and p[-4:] == window for p in duplicated)
    fixed = build("dynamickv", budget=24, window_size=4, kernel_size=1, radio_max=1.0,
                  variant="fixed").compress_all(keys, values, queries)
    assert all(len(set(p[0, 0].tolist())) == p.shape[-1] for _, _, p in fixed)


def test_dynamickv_hand_worked_reallocation():
    """L=4, H=1, B=1, budget 6, window 2 (base 4), n=12 (prefix 10), radio_max 10 -> budget_size 10.
    Scores: layer 0 holds 8 of the global top 16 (= base * H * k), layers 1 and 2 hold 4 each, layer 3
    none. counts // 4 = [2, 1, 1, 0]; final step: sum 4 != 10 -> last += 16 // 4 - 4 = 0.
    shares [.5, .25, .25, 0] -> int(10 * share) = [5, 2, 2, 0]; ratio = 9 / 16 = 0.5625;
    f // ratio = [8, 3, 3, 0] (sum 14) -> last += 16 - 14 -> [8, 3, 3, 2]."""
    c = build("dynamickv", budget=6, window_size=2, kernel_size=1)
    session = c.new_session(4)
    session.budget_size = 10
    high = torch.tensor([[[9.0] * 8 + [0.01, 0.02]]])
    mid = torch.tensor([[[5.0] * 4 + [0.03] * 6]])
    low = torch.tensor([[[0.001 * (i + 1) for i in range(10)]]])
    session.scores = [high, mid, mid.clone(), low]
    session.kept = []
    for scores in session.scores:
        order = scores.topk(10, dim=-1).indices                        # selection in score order
        positions = torch.cat([order, torch.tensor([[[10, 11]]])], dim=2)
        session.kept.append(Kept(positions[..., None].float(), positions[..., None].float(), positions))
    counts = session._layer_counts(final=True)
    assert counts.tolist() == [2, 1, 1, 0]
    assert session._shares(counts) == [8, 3, 3, 2]
    updates = session._reallocate(final=True)
    assert [u.count for u in updates.values()] == [10, 5, 5, 4]
    assert updates[3].positions[0, 0].tolist() == [9, 8, 10, 11]       # top-2 of layer 3 + window


def test_dynamickv_shares_are_the_references_per_layer_arithmetic():
    """The shares of a re-allocation, computed as one tensor, equal the reference's per-layer form
    (``[int(budget_size * (t / total)) for t in counts]``, each ``t`` a 0-d int64 tensor) and the rest of its
    arithmetic (ratio, floor division, the last layer's remainder), on random counts."""
    c = build("dynamickv", budget=96, window_size=8)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        layers = int(torch.randint(1, 40, (1,), generator=g))
        session = c.new_session(layers)
        session.budget_size = int(torch.randint(1, 5000, (1,), generator=g))
        counts = torch.randint(0, 3000, (layers,), generator=g)
        if int(counts.sum()) == 0:
            continue
        total = int(counts.sum())
        fix = [int((session.budget_size * (t / total)).item()) for t in counts]
        need = c.base * layers
        ratio = sum(fix) / need
        if ratio == 0:
            continue
        fix = [int(f // ratio) for f in fix]
        fix[-1] += need - sum(fix)
        assert session._shares(counts) == fix


def test_dynamickv_crash_cases_keep_the_whole_prompt_and_say_so():
    # ZeroDivisionError in the reference: n - w = 18 < layers seen at the layer-19 step
    keys, values, queries = random_layers(layers=32, hq=4, hkv=4, n=50, d=4)
    session = build("dynamickv", budget=64, window_size=32, kernel_size=7).new_session(32)
    for layer in range(32):
        session.add_layer(layer, keys[layer], values[layer], queries[layer][:, :, -32:])
    assert session.notes and "division by zero" in session.notes[0]
    assert all(entry["whole"] for entry in session.report()["layers"])
    # NaN shares in the reference: H * (n - w) < layers seen
    keys, values, queries = random_layers(layers=32, hq=1, hkv=1, n=28, d=4)
    kept = build("dynamickv", budget=40, window_size=8, kernel_size=7).compress_all(keys, values, queries)
    assert all(pos.shape[-1] == 28 for _, _, pos in kept)
    # prompt no longer than the window: the reference returns None
    session = build("dynamickv", budget=64, window_size=8).new_session(4)
    keys, values, queries = random_layers(layers=4, n=8)
    for layer in range(4):
        session.add_layer(layer, keys[layer], values[layer], queries[layer])
    assert "outside the reference's domain" in session.notes[0]


def test_dynamickv_allocation_is_not_uniform():
    keys, values, queries = random_layers(layers=8, hq=4, hkv=2, n=400, d=8, seed=3)
    for i in range(8):
        queries[i] = queries[i] * (1 + i)          # layers differ in how peaked their attention is
    kept = build("dynamickv", budget=40, window_size=8, variant="fixed").compress_all(keys, values, queries)
    counts = [k.shape[2] for k, _, _ in kept]
    assert len(set(counts)) > 2 and sum(c - 8 for c in counts) == 32 * 8
