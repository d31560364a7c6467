"""Batched fixed-shape decoding (harness.engine.batched) equals the plain per-token path, token for token."""

import pytest
import torch

from harness.engine import batched
from harness.engine.batched import DecodeStats, group_rows
from harness.engine.cache import make_cache
from harness.engine.compat import cache_keyword
from harness.engine.generate import generate, prefill
from harness.engine.hook import attach
from harness.engine.shared import compressed_cache, generate_many, prefill_once
from methods import build

from conftest import random_ids

pytestmark = pytest.mark.integration

ALL = [("fullkv", {}), ("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}), ("h2o", {"variant": "window"}),
       ("pyramidkv", {}), ("dynamickv", {}), ("dynamickv", {"variant": "fixed"})]


def plain(lm, ids, compressor, new, stops=(), stop_strings=(), min_new=0):
    return generate(lm.model, lm.tokenizer, ids, compressor, new, stops, stop_strings, min_new, decode="plain")


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_batched_variants_equal_plain_one_at_a_time(tiny, granularity):
    compressors = [build(name, budget=40, window_size=8, granularity=granularity, **knobs) for name, knobs in ALL]
    for seed, n in ((1, 300), (2, 35), (4, 129)):          # compressed, short (kept whole), odd length
        ids = random_ids(n, seed=seed)
        stats = DecodeStats()
        together = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 24, [], stats=stats)
        assert stats.groups == [len(compressors)]                    # one forward per step for all
        if n == 300:
            assert stats.segments[0] >= 2                            # the long FullKV row: a layout of its own
        if n == 35:
            assert stats.segments[0] == 1                            # every row kept the whole prompt
        for compressor, out in zip(compressors, together):
            alone = plain(tiny, ids, compressor, 24)
            assert out.token_ids == alone.token_ids, (compressor.name, seed)
            assert out.stopped_by == alone.stopped_by == "max_new_tokens"


def test_rows_stop_on_their_own(tiny):
    """Stop tokens met at different steps by different rows; each row ends as it would alone."""
    compressors = [build(name, budget=40, window_size=8, **knobs) for name, knobs in ALL]
    ids = random_ids(300, seed=1)
    free = [plain(tiny, ids, c, 30).token_ids for c in compressors]
    # a stop token from the middle of one row's output and another from a different row
    stops = [free[2][7], free[5][12]]
    together = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 30, stops, min_new_tokens=3)
    ended = set()
    for compressor, out in zip(compressors, together):
        alone = plain(tiny, ids, compressor, 30, stops, min_new=3)
        assert (out.token_ids, out.stopped_by) == (alone.token_ids, alone.stopped_by), compressor.name
        ended.add(len(out.token_ids))
    assert len(ended) > 1  # the rows really stopped at different steps


def test_stop_strings_per_row(tiny):
    compressors = [build("fullkv"), build("snapkv", budget=40, window_size=8), build("streamingllm", budget=40)]
    ids = random_ids(300, seed=5)
    free = [plain(tiny, ids, c, 20) for c in compressors]
    stop = free[1].text[3:5]
    together = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 20, [], [stop])
    for compressor, out in zip(compressors, together):
        alone = plain(tiny, ids, compressor, 20, (), [stop])
        assert (out.token_ids, out.stopped_by, out.text) == (alone.token_ids, alone.stopped_by, alone.text)
    assert together[1].stopped_by == "stop_string"


def test_sliding_window_model_across_the_window(tiny_gemma):
    """Gemma 3 shape: sliding layers (window 32) decode past their window in the fixed-shape slots."""
    compressors = [build("fullkv"), build("snapkv", budget=24, window_size=8), build("pyramidkv", budget=24, window_size=8),
                   build("streamingllm", budget=24, sink_tokens=4)]
    for n in (150, 20):  # prompt longer than the window, and shorter (the window fills while decoding)
        ids = random_ids(n, seed=3)
        together = generate_many(tiny_gemma.model, tiny_gemma.tokenizer, ids, compressors, 40, [])
        for compressor, out in zip(compressors, together):
            assert out.token_ids == plain(tiny_gemma, ids, compressor, 40).token_ids, (compressor.name, n)


def test_single_method_generate_batched_equals_plain(tiny):
    ids = random_ids(200, seed=7)
    for name, knobs in ALL:
        compressor = build(name, budget=32, window_size=8, **knobs)
        fast = generate(tiny.model, tiny.tokenizer, ids, compressor, 16, [])
        assert fast.token_ids == plain(tiny, ids, compressor, 16).token_ids, name


def test_decode_step_logits_match_plain_step(tiny):
    """One slot-attention step against the plain cache's step: same logits to float32 rounding."""
    ids = random_ids(200, seed=8)
    compressors = [build("snapkv", budget=32, window_size=8), build("pyramidkv", budget=32, window_size=8),
                   build("fullkv")]
    shared = prefill_once(tiny.model, ids, compressors)
    caches = [compressed_cache(shared, c)[0] for c in compressors]
    rows = [batched.row_layers(c) for c in caches]
    shape = batched.layout(rows, [[0, 1], [2]], 4, 64)       # two compressed rows, then FullKV's own segment
    slot = batched.allocate(shape, torch.float32, torch.device("cpu"))
    batched.load(slot, rows, 200)
    token = shared.first_token.repeat(len(rows), 1)
    position = torch.full((len(rows), 1), 200)
    with torch.no_grad(), batched.slot_routing(tiny.model, slot):
        fast = tiny.model(input_ids=token, position_ids=position, **{cache_keyword(tiny.model): slot}, use_cache=True).logits[:, -1]
    for b, (compressor, cache) in enumerate(zip(compressors, caches)):
        with torch.no_grad(), attach(tiny.model, compressor):
            ref = tiny.model(input_ids=token[:1], position_ids=position[:1], **{cache_keyword(tiny.model): cache}, use_cache=True)
        torch.testing.assert_close(fast[b], ref.logits[0, -1], rtol=1e-5, atol=1e-5)
    # the step wrote each row's new key right after its kept tokens, in its own segment's layout
    for layer, layer_rows in zip(slot.layers, zip(*rows)):
        assert [seg.keys.shape[0] for seg in layer.segments] == [2, 1]
        assert layer.segments[1].keys.shape[1] == 2 and layer.segments[0].keys.shape[1] == 4  # KV heads / query heads
        for seg in layer.segments:
            for b in range(seg.start, seg.stop):
                n = layer_rows[b].keys.shape[2]
                assert seg.fill[b - seg.start] == n
                assert seg.keys[b - seg.start, :, n].abs().sum() > 0 and seg.keys[b - seg.start, :, n + 1:].abs().sum() == 0


def test_slot_mask_windows():
    keys = torch.zeros(2, 1, 10, 4)
    fills = torch.tensor([3, 7])
    full = batched.Segment(keys, keys.clone(), fills, None, 0).mask()[:, 0, 0]
    assert full.tolist() == [[i <= 3 for i in range(10)], [i <= 7 for i in range(10)]]
    sliding = batched.Segment(keys, keys.clone(), fills, 4, 0).mask()[:, 0, 0]
    assert sliding.tolist() == [[0 <= i <= 3 for i in range(10)], [4 <= i <= 7 for i in range(10)]]


def test_group_rows_bounds_padding_and_batch():
    costs = [(100, 100), (110, 90), (4000, 4000), (105, 100), (3900, 4100)]
    [batch] = group_rows(costs, max_batch=16)      # one forward, two buffer layouts
    assert {frozenset(seg) for seg in batch} == {frozenset({0, 1, 3}), frozenset({2, 4})}
    small = group_rows(costs, max_batch=2)
    assert all(sum(len(seg) for seg in b) <= 2 for b in small)
    assert sorted(i for b in small for seg in b for i in seg) == [0, 1, 2, 3, 4]
    for b in small:                                 # a segment never mixes the short and the long rows
        for seg in b:
            assert len({costs[i][0] > 1000 for i in seg}) == 1


def test_max_batch_and_buffer_reuse(tiny):
    """Smaller groups give the same tokens; a second prompt of the same shapes reuses the buffers."""
    compressors = [build(name, budget=40, window_size=8, **knobs) for name, knobs in ALL[1:]]
    ids = random_ids(300, seed=9)
    wide = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 12, [])
    stats = DecodeStats()
    narrow = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 12, [], max_batch=2, stats=stats)
    assert [o.token_ids for o in wide] == [o.token_ids for o in narrow]
    assert max(stats.groups) <= 2
    again = DecodeStats()
    other = random_ids(300, seed=10)
    out = generate_many(tiny.model, tiny.tokenizer, other, compressors, 12, [], max_batch=2, stats=again)
    assert again.reused >= 1
    for compressor, o in zip(compressors, out):
        assert o.token_ids == plain(tiny, other, compressor, 12).token_ids


def test_bad_decode_mode(tiny):
    with pytest.raises(ValueError, match="decode='fast'.*batched.*plain"):
        generate(tiny.model, tiny.tokenizer, random_ids(20), build("fullkv"), 4, [], decode="fast")


def test_one_new_token_needs_no_decode(tiny):
    ids = random_ids(100, seed=11)
    outs = generate_many(tiny.model, tiny.tokenizer, ids, [build("fullkv"), build("snapkv", budget=32, window_size=8)], 1, [])
    cache = make_cache(tiny.model)
    first = int(prefill(tiny.model, ids, cache))
    assert [o.token_ids for o in outs] == [[first], [first]]


def test_compiled_decode_step_equals_plain(tiny):
    """decode_compile: the step's forward through torch.compile gives the same tokens (CPU, float32)."""
    compressors = [build(name, budget=40, window_size=8, **knobs) for name, knobs in ALL[:4]]
    ids = random_ids(300, seed=12)
    outs = generate_many(tiny.model, tiny.tokenizer, ids, compressors, 12, [], compile=True)
    for compressor, out in zip(compressors, outs):
        assert out.token_ids == plain(tiny, ids, compressor, 12).token_ids, compressor.name


def test_long_buffer_attention_path_equals_plain(tiny, monkeypatch):
    """The two-matmul attention used for long buffers (FullKV's) gives the plain path's tokens too."""
    monkeypatch.setattr(batched, "LONG_BUFFER", 0)          # every segment takes the long-buffer path
    compressors = [build(name, budget=40, window_size=8, **knobs) for name, knobs in ALL]
    ids = random_ids(300, seed=13)
    for compressor, out in zip(compressors, generate_many(tiny.model, tiny.tokenizer, ids, compressors, 16, [])):
        assert out.token_ids == plain(tiny, ids, compressor, 16).token_ids, compressor.name


def test_sliding_window_long_buffer_path(tiny_gemma, monkeypatch):
    monkeypatch.setattr(batched, "LONG_BUFFER", 0)
    compressors = [build("fullkv"), build("snapkv", budget=24, window_size=8)]
    ids = random_ids(150, seed=3)
    for compressor, out in zip(compressors, generate_many(tiny_gemma.model, tiny_gemma.tokenizer, ids, compressors, 40, [])):
        assert out.token_ids == plain(tiny_gemma, ids, compressor, 40).token_ids


def test_caches_split_over_devices_take_the_plain_path():
    from types import SimpleNamespace
    layer = lambda device: SimpleNamespace(keys=torch.zeros(1, 1, 2, 2, device=device))  # noqa: E731
    assert batched.spans_devices(SimpleNamespace(layers=[layer("cpu"), layer("meta")]))
    assert not batched.spans_devices(SimpleNamespace(layers=[layer("cpu"), layer("cpu")]))


def test_bad_decode_batch_names_the_value(tiny):
    with pytest.raises(ValueError, match="decode_batch=0 must be a positive integer"):
        generate_many(tiny.model, tiny.tokenizer, random_ids(50), [build("fullkv")], 4, [], max_batch=0)
