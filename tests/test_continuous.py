"""Continuous batching over many prompts (harness.engine.continuous) equals the plain per-token path of each
prompt and method alone, token for token (CPU, float32)."""

import pytest
import torch

import methods
from harness.engine.continuous import ContinuousStats, Row, apportion, decode_rows, plan_classes, prompt_rows
from harness.engine.generate import generate
from harness.engine.stopping import Stopping
from methods import build

from conftest import random_ids

pytestmark = pytest.mark.integration

METHODS = [("fullkv", {}), ("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}), ("pyramidkv", {}),
           ("dynamickv", {})]
PROMPTS = ((1, 300), (2, 35), (4, 129))       # (seed, length): compressed, kept whole, odd length


def plain(lm, ids, compressor, new, stops=(), min_new=0):
    out = generate(lm.model, lm.tokenizer, ids, compressor, new, stops, (), min_new, decode="plain")
    return out.token_ids, out.stopped_by


def rows_of(lm, prompts, compressors, new, stops=(), min_new=0):
    """Rows of every (prompt, method), prompt-major, with each row's plain reference alongside."""
    rows, expected = [], []
    for (seed, n), max_new, min_new_tokens in zip(prompts, new, min_new if isinstance(min_new, list) else
                                                  [min_new] * len(prompts)):
        ids = random_ids(n, seed=seed)
        built, _ = prompt_rows(lm.model, lm.tokenizer, ids, compressors, max_new, stops, (), min_new_tokens)
        rows += built
        expected += [plain(lm, ids, c, max_new, stops, min_new_tokens) for c in compressors]
    return rows, expected


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_rows_of_many_prompts_equal_plain_one_at_a_time(tiny, granularity):
    """Every method on prompts of very different lengths and max_new_tokens, fewer slots than rows."""
    compressors = [build(name, budget=40, window_size=8, granularity=granularity, **knobs) for name, knobs in METHODS]
    rows, expected = rows_of(tiny, PROMPTS, compressors, [20, 12, 16])
    stats = ContinuousStats()
    done = {}
    out = decode_rows(tiny.model, rows, slots=7, stats=stats, on_done=lambda i, t, r: done.setdefault(i, (t, r)))
    for i, (got, want) in enumerate(zip(out, expected)):
        assert got == want, (i, compressors[i % len(compressors)].name)
    assert done == dict(enumerate(out))                     # each row reported once, as it finished
    assert stats.refills > 0 and stats.allocations == 1 and sum(stats.segments[0]) == 7
    assert len(stats.segments[0]) >= 2                      # the long FullKV rows: a layout of their own


def test_rows_stop_at_different_steps_and_slots_are_refilled(tiny):
    """Per-row stop ids and min_new_tokens: rows end at different steps; freed slots take the waiting rows."""
    compressors = [build(name, budget=40, window_size=8, **knobs) for name, knobs in METHODS]
    free = [plain(tiny, random_ids(300, seed=1), c, 30)[0] for c in compressors]
    stops = [free[2][6], free[4][11]]              # met by some rows early, by others late or never
    prompts = ((1, 300), (2, 35), (1, 300))
    rows, expected = rows_of(tiny, prompts, compressors, [30, 24, 30], stops, [0, 3, 5])
    stats = ContinuousStats()
    out = decode_rows(tiny.model, rows, slots=4, stats=stats)
    assert out == expected
    assert len({len(tokens) for tokens, _ in out}) > 2 and {r for _, r in out} == {"stop_token", "max_new_tokens"}
    assert stats.refills >= len(rows) - 4 and stats.occupancy > 0.5


def test_rows_that_fit_no_segment_go_to_another_allocation(tiny):
    """A memory budget too small for every layout at once: several allocations, nothing dropped, same tokens."""
    compressors = [build("fullkv"), build("snapkv", budget=40, window_size=8)]
    rows, expected = rows_of(tiny, ((1, 300), (4, 129)), compressors, [10, 14])
    stats = ContinuousStats()
    out = decode_rows(tiny.model, rows, max_bytes=80_000, stats=stats)
    assert out == expected
    assert stats.allocations > 1


def test_sliding_window_model_across_the_window(tiny_gemma):
    """Gemma 3 shape: sliding layers (window 32), prompts longer and shorter than the window, refilled slots."""
    compressors = [build("fullkv"), build("snapkv", budget=24, window_size=8), build("pyramidkv", budget=24, window_size=8),
                   build("streamingllm", budget=24, sink_tokens=4)]
    rows, expected = rows_of(tiny_gemma, ((3, 150), (3, 20), (5, 90)), compressors, [40, 40, 24])
    stats = ContinuousStats()
    assert decode_rows(tiny_gemma.model, rows, slots=3, stats=stats) == expected
    assert stats.refills > 0


def test_rows_that_end_at_their_first_token_take_no_slot(tiny):
    ids = random_ids(60, seed=6)
    [row], _ = prompt_rows(tiny.model, tiny.tokenizer, ids, [build("fullkv")], 1)
    first = row.first_token
    stopped = Row(row.cache, first, 60, 5, Stopping(tiny.tokenizer, [first]))
    stats = ContinuousStats()
    assert decode_rows(tiny.model, [row, stopped], stats=stats) == [([first], "max_new_tokens"), ([first], "stop_token")]
    assert stats.immediate == 2 and stats.allocations == 0


def test_generated_ranks_of_transforms_per_row(tiny):
    """K/V transforms attached: every row's generated tokens' kept ranks equal the plain path's."""
    from harness.engine.shared import generate_many
    from harness.engine.transform import record_states, transformed
    from methods.lowrank import build_transform
    states = record_states(tiny.model, random_ids(256, seed=9))
    transforms = {layer: {kind: build_transform("energy", eta=0.8).fit(x) for kind, x in pair.items()}
                  for layer, pair in states.items()}
    compressors = [methods.build("fullkv"), methods.build("snapkv", budget=8, window_size=4, granularity="layer")]
    prompts = ((5, 60), (6, 40))
    with transformed(tiny.model, transforms):
        rows = [r for seed, n in prompts
                for r in prompt_rows(tiny.model, tiny.tokenizer, random_ids(n, seed=seed), compressors, 10)[0]]
    with transformed(tiny.model, transforms) as log:
        out = decode_rows(tiny.model, rows, slots=3)
    for p, (seed, n) in enumerate(prompts):
        with transformed(tiny.model, transforms) as plain_log:
            ref = generate_many(tiny.model, tiny.tokenizer, random_ids(n, seed=seed), compressors, 10, decode="plain")
        for r, o in enumerate(ref):
            i = p * len(compressors) + r
            assert out[i][0] == o.token_ids
            assert log.generated[i].keys() == plain_log.generated[r].keys()
            for key in plain_log.generated[r]:
                assert torch.equal(log.generated[i][key], plain_log.generated[r][key]), (i, key)


def test_planning_separates_long_rows_and_apportions_slots():
    from harness.engine.continuous import _Need
    short = _Need((4, 4), (60, 60), (16, 16), (None, None))
    long_ = _Need((2, 2), (2000, 2000), (16, 16), (None, None))
    needs = [long_, short, short, long_, short]
    classes = plan_classes(needs)
    assert classes == [[1, 2, 4], [0, 3]]
    assert apportion([3, 2], [10, 100], slots=3, max_bytes=10**6) == [2, 1]
    assert apportion([12, 2, 2], [10, 10, 10], slots=7, max_bytes=10**6) == [5, 1, 1]   # every class one first
    assert apportion([3, 2], [10, 100], slots=8, max_bytes=10**6) == [3, 2]
    assert apportion([3, 2], [10, 100], slots=8, max_bytes=50) == [3, 0]
    assert apportion([3, 2, 4], [10, 10, 10], slots=2, max_bytes=10**6) == [1, 1, 0]
    assert apportion([3, 2], [10**9, 100], slots=8, max_bytes=50) == [1, 0]  # nothing fits: one slot anyway
    assert apportion([4, 4], [10, 10], slots=5, max_bytes=10**6, work=[4 * 10, 4 * 100]) == [1, 4]  # by steps to come


def test_bad_input_names_the_value(tiny):
    assert decode_rows(tiny.model, []) == []
    [row], _ = prompt_rows(tiny.model, tiny.tokenizer, random_ids(30), [build("fullkv")], 4)
    bad = Row(row.cache, row.first_token, row.prompt_length, 0, row.stopping)
    with pytest.raises(ValueError, match=r"rows\[1\].max_new_tokens=0 must be an integer >= 1"):
        decode_rows(tiny.model, [row, bad])
    with pytest.raises(ValueError, match="slots=0 must be a positive integer"):
        decode_rows(tiny.model, [row], slots=0)
    with pytest.raises(ValueError, match="max_bytes=-1 must be a positive integer"):
        decode_rows(tiny.model, [row], max_bytes=-1)
    with pytest.raises(ValueError, match=r"rows\[0\].first_token must be one token id"):
        decode_rows(tiny.model, [Row(row.cache, torch.tensor([3, 4]), 30, 4, row.stopping)])


def test_a_slot_left_idle_at_its_full_capacity_stays_in_bounds(tiny):
    """bucket=1: a row fills its segment to the last slot and ends while another row decodes on; its idle slot
    must not write past its buffer."""
    long_row, long_ref = rows_of(tiny, ((1, 300),), [build("fullkv")], [5])
    short_row, short_ref = rows_of(tiny, ((2, 120),), [build("snapkv", budget=40, window_size=8)], [20])
    stats = ContinuousStats()
    assert decode_rows(tiny.model, long_row + short_row, bucket=1, stats=stats) == long_ref + short_ref
    assert stats.segments == [[1, 1]] and stats.capacities[0][1] == (304, 304, 304)
    # 3 layers x (K, V) x float32 x head 16 x (SnapKV's 4 query heads x 59 slots + FullKV's 2 KV heads x 304)
    assert stats.capacities[0][0] == (59, 59, 59) and stats.buffer_bytes == [3 * 2 * 4 * 16 * (4 * 59 + 2 * 304)]
