"""The compressor attached to real transformers models (tiny random ones built from configs)."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from harness.engine import hook
from harness.engine.cache import CompressedLayer, make_cache
from harness.engine.compat import cache_keyword
from harness.engine.generate import decode_one, generate, prefill
from methods import build

from conftest import random_ids

pytestmark = pytest.mark.integration


def run(lm, ids, compressor, new=12):
    return generate(lm.model, lm.tokenizer, ids, compressor, new, stop_token_ids=[]).token_ids


def test_fullkv_equals_model_generate(tiny):
    ids = random_ids(120, seed=1)
    ours = run(tiny, ids, build("fullkv"), new=16)
    reference = tiny.model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                    attention_mask=torch.ones_like(ids))
    assert ours == reference[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name, knobs", [("snapkv", {"window_size": 8}), ("streamingllm", {"sink_tokens": 4}),
                                         ("snapkv", {"window_size": 8, "granularity": "kv_head"})])
def test_budget_at_least_prompt_length_equals_fullkv(tiny, name, knobs):
    ids = random_ids(100, seed=2)
    full = run(tiny, ids, build("fullkv"))
    for budget in (100, 150):
        assert run(tiny, ids, build(name, budget=budget, **knobs)) == full


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_first_token_equals_fullkv_and_later_tokens_change(tiny, granularity):
    ids = random_ids(300, seed=3)
    full = run(tiny, ids, build("fullkv"), new=20)
    compressed = run(tiny, ids, build("snapkv", budget=24, window_size=8, granularity=granularity), new=20)
    assert compressed[0] == full[0]
    assert compressed != full  # 24 of 300 tokens kept: the cache really is compressed


def prefill_with(lm, ids, compressor):
    cache = make_cache(lm.model)
    with hook.attach(lm.model, compressor) as controller:
        prefill(lm.model, ids, cache)
    return cache, controller


@pytest.mark.parametrize("granularity, heads", [("query_head", 4), ("kv_head", 2)])
def test_every_layer_holds_budget_tokens_with_the_window(tiny, granularity, heads):
    ids = random_ids(200, seed=4)
    budget, window = 40, 8
    cache, controller = prefill_with(tiny, ids, build("snapkv", budget=budget, window_size=window,
                                                      granularity=granularity))
    report = controller.report
    for layer, entry in zip(cache.layers, report["layers"]):
        assert isinstance(layer, CompressedLayer) and layer.compressed
        assert layer.keys.shape == (1, heads, budget, 16)
        assert layer.get_seq_length() == 200      # the virtual length: tokens seen
        assert entry["kept"] == budget and entry["distinct_per_head"] == [budget] * heads
    # the last window of the prompt is among the kept keys, exactly (compare with a FullKV prefill)
    full = DynamicCache(config=tiny.model.config)
    prefill(tiny.model, ids, full)
    for layer, full_layer in zip(cache.layers, full.layers):
        expected = full_layer.keys[:, :, -window:]
        if granularity == "query_head":
            expected = expected.repeat_interleave(2, dim=1)
        torch.testing.assert_close(layer.keys[:, :, -window:], expected)


def test_snapkv_in_the_model_keeps_the_top_scored_tokens(tiny):
    """The tokens stored in the cache are those methods.build(...).compress_all picks from the same
    keys and queries, captured independently with output hooks on the projections."""
    ids = random_ids(150, seed=5)
    compressor = build("snapkv", budget=32, window_size=8, kernel_size=5)
    full = DynamicCache(config=tiny.model.config)
    captured = {}

    def grab(layer_idx):
        def fn(module, args, kwargs, output):
            captured[layer_idx] = kwargs
        return fn
    handles = [layer.self_attn.register_forward_hook(grab(i), with_kwargs=True)
               for i, layer in enumerate(tiny.model.model.layers)]
    try:
        prefill(tiny.model, ids, full)
    finally:
        for h in handles:
            h.remove()
    keys, values, queries = [], [], []
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    for i, layer in enumerate(tiny.model.model.layers):
        attn = layer.self_attn
        hidden = captured[i]["hidden_states"]
        cos, sin = captured[i]["position_embeddings"]
        q = attn.q_proj(hidden).view(1, 150, -1, 16).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        keys.append(full.layers[i].keys)
        values.append(full.layers[i].values)
        queries.append(q)
    expected = compressor.compress_all(keys, values, queries)
    cache, controller = prefill_with(tiny, ids, compressor)
    for (k, v, pos), layer in zip(expected, cache.layers):
        torch.testing.assert_close(layer.keys, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, v, rtol=1e-5, atol=1e-5)


def test_decoding_uses_original_positions(tiny):
    """StreamingLLM keeps the same tokens in every layer and head, so decoding with its compressed
    cache must equal decoding with the full cache and those tokens masked out, at position n. A
    decode that took positions from the compressed cache length would rotate the query differently."""
    ids = random_ids(120, seed=6)
    n, budget, sinks = 120, 24, 4
    compressor = build("streamingllm", budget=budget, sink_tokens=sinks)
    cache, _ = prefill_with(tiny, ids, compressor)
    token = torch.tensor([[7]])
    with hook.attach(tiny.model, compressor):
        out = tiny.model(input_ids=token, **{cache_keyword(tiny.model): cache}, use_cache=True)  # positions from the cache
    assert cache.get_seq_length() == n + 1

    full = DynamicCache(config=tiny.model.config)
    prefill(tiny.model, ids, full)
    mask = torch.full((1, 1, 1, n + 1), float("-inf"))
    keep = list(range(sinks)) + list(range(n - (budget - sinks), n + 1))
    mask[..., keep] = 0.0
    reference = tiny.model(input_ids=token, **{cache_keyword(tiny.model): full}, attention_mask=mask,
                           position_ids=torch.tensor([[n]]), use_cache=True)
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-4, atol=1e-4)
    wrong = tiny.model(input_ids=token, **{cache_keyword(tiny.model): prefill_with(tiny, ids, compressor)[0]},
                       position_ids=torch.tensor([[budget]]), use_cache=True)
    assert not torch.allclose(wrong.logits, reference.logits, atol=1e-3)


def test_no_stale_state_between_samples(tiny):
    a, b = random_ids(200, seed=7), random_ids(180, seed=8)
    compressor = build("snapkv", budget=32, window_size=8)
    alone = generate(tiny.model, tiny.tokenizer, b, compressor, 12, [])
    run(tiny, a, compressor)
    after_a = generate(tiny.model, tiny.tokenizer, b, compressor, 12, [])
    assert after_a.token_ids == alone.token_ids
    assert after_a.report["prompt_length"] == 180
    assert all(entry["kept"] == 32 for entry in after_a.report["layers"])  # B really was compressed
    assert after_a.token_ids != run(tiny, b, build("fullkv"))


def attention_state(model):
    modules = hook.attention_modules(model).values()
    return ([len(m._forward_hooks) for m in modules], model.config._attn_implementation,
            sum(id(m) in hook._CONTROLLERS for m in modules))


def test_hooks_are_removed_on_exit_and_on_error(tiny):
    before = attention_state(tiny.model)
    with hook.attach(tiny.model, build("snapkv", budget=32, window_size=8)):
        assert hook.is_attached(tiny.model)
    assert attention_state(tiny.model) == before and not hook.is_attached(tiny.model)
    with pytest.raises(RuntimeError, match="boom"):
        with hook.attach(tiny.model, build("snapkv", budget=32, window_size=8)):
            raise RuntimeError("boom")
    assert attention_state(tiny.model) == before and not hook.is_attached(tiny.model)
    # and the model computes exactly as before
    ids = random_ids(50, seed=9)
    with torch.no_grad():
        plain = tiny.model(ids).logits
    with hook.attach(tiny.model, build("snapkv", budget=16, window_size=4)), torch.no_grad():
        pass
    with torch.no_grad():
        torch.testing.assert_close(tiny.model(ids).logits, plain)


def test_plain_cache_is_rejected_with_a_clear_message(tiny):
    ids = random_ids(80, seed=10)
    with hook.attach(tiny.model, build("snapkv", budget=32, window_size=8)):
        with pytest.raises(TypeError, match="make_cache"):
            prefill(tiny.model, ids, DynamicCache(config=tiny.model.config))


def test_sliding_window_layers_are_left_alone(tiny_gemma):
    lm = tiny_gemma
    ids = random_ids(120, seed=11)
    cache, controller = prefill_with(lm, ids, build("snapkv", budget=24, window_size=8))
    assert [e["model_layer"] for e in controller.report["layers"]] == [2, 5]
    for i, layer in enumerate(cache.layers):
        if i in (2, 5):
            assert isinstance(layer, CompressedLayer) and layer.keys.shape[2] == 24
        else:
            assert isinstance(layer, DynamicSlidingWindowLayer) and not isinstance(layer, CompressedLayer)
    # budget >= prompt length: identical to FullKV on a model with sliding layers too
    assert run(lm, ids, build("snapkv", budget=200, window_size=8)) == run(lm, ids, build("fullkv"))
    compressed = run(lm, ids, build("snapkv", budget=24, window_size=8), new=8)
    assert compressed[0] == run(lm, ids, build("fullkv"), new=8)[0]


def test_decode_one_continues_from_given_position(tiny):
    ids = random_ids(60, seed=12)
    cache = make_cache(tiny.model)
    first = prefill(tiny.model, ids, cache)
    second = decode_one(tiny.model, first, cache, 60)
    reference = tiny.model.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))
    assert [int(first), int(second)] == reference[0, 60:].tolist()


@pytest.mark.parametrize("name", ["fullkv", "streamingllm", "snapkv", "h2o", "pyramidkv", "dynamickv"])
@pytest.mark.parametrize("granularity, heads", [("query_head", 4), ("kv_head", 2)])
def test_all_six_methods_run_through_the_hook(tiny, name, granularity, heads):
    ids = random_ids(260, seed=13)
    compressor = build(name, budget=48, window_size=8, granularity=granularity)
    cache, controller = prefill_with(tiny, ids, compressor)
    full_first = run(tiny, ids, build("fullkv"), new=1)
    assert run(tiny, ids, compressor, new=1) == full_first
    if name == "fullkv":
        assert controller.report is None and all(layer.keys.shape[1] == 2 for layer in cache.layers)
        return
    report = controller.report
    for layer, entry in zip(cache.layers, report["layers"]):
        assert layer.keys.shape[1] == heads and layer.keys.shape[2] == entry["kept"]
        assert layer.get_seq_length() == 260
    kept = [entry["kept"] for entry in report["layers"]]
    layers = len(cache.layers)
    if name == "pyramidkv":   # 3 layers, base 40: 2 * 40 - 2 = 78 down to 2, plus the window
        assert kept == [8 + 78 - 38 * l for l in range(layers)]
    elif name == "dynamickv":
        assert all(8 <= k <= 260 for k in kept)
    else:
        assert kept == [48] * layers
    out = generate(tiny.model, tiny.tokenizer, ids, compressor, 5, [])
    assert len(out.token_ids) == 5
