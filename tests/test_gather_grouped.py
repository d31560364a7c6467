"""The grouped-query gather of the kept tokens (issue 18: prefill overhead) against the reference's layout, which
repeats every KV head to its query heads first (``repeat_kv``), bit for bit; and the session report's batched copy.

(A grouped-query *scorer*, multiplying each KV head with its stacked query heads, is not used: its products are
not always bit for bit the repeated keys' ones, e.g. float32 on the CPU with one or two query rows, where the
BLAS picks another kernel for the other shape.)"""

import pytest
import torch

import methods
from methods.base import gather_grouped, gather_tokens, repeat_heads


def test_gather_grouped_reads_each_query_heads_kv_head():
    k = torch.randn(2, 2, 130, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
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
