"""Compression scope (the question appended uncompressed after the compressed context, kvpress's
query-agnostic mode) and budgets as ratios (kvpress's ``compression_ratio``), checked against
transformers' ``generate``, against token-by-token decoding, and against the cache's own record of
what it holds."""

import pytest
import torch

import methods
from harness.engine import compat, hook
from harness.engine.cache import CompressedLayer, full_attention_layers, make_cache
from harness.engine.generate import decode_one, extend, generate, prefill
from harness.engine.models import byte_tokenizer
from harness.engine.shared import generate_many
from harness.protocol.prompting import encode, encode_parts
from harness.run.results import run_name
from harness.tasks import Sample
from methods import ConfigError

from conftest import random_ids

N, C = 300, 240      # prompt tokens, of which the first C are compressed


def _methods():
    return [methods.build("snapkv", budget=64, window_size=8), methods.build("snapkv", budget=64, window_size=8,
                                                                              granularity="kv_head"),
            methods.build("pyramidkv", budget=64, window_size=8), methods.build("h2o", budget=64, window_size=8),
            methods.build("streamingllm", budget=64, window_size=8), methods.build("dynamickv", budget=64, window_size=8)]


@pytest.fixture(params=["tiny", "tiny_gemma"])
def lm(request):
    return request.getfixturevalue(request.param)


def test_fullkv_with_the_question_appended_equals_transformers_generate_on_the_whole_prompt(lm):
    ids = random_ids(N, seed=1)
    reference = lm.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, N:].tolist()
    for decode in ("plain", "batched"):
        out = generate(lm.model, lm.tokenizer, ids, methods.build("fullkv"), 12, decode=decode, compressed_tokens=C)
        assert out.token_ids == reference, decode
        assert out.prompt_length == N


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_appending_the_question_in_one_forward_equals_feeding_it_token_by_token(lm, backend):
    """All q positions' logits, not only the last one: a non-causal mask among the appended tokens would
    leave the last position right and every other one wrong."""
    model = lm.model
    original = model.config._attn_implementation
    model.set_attn_implementation(backend)
    try:
        ids = random_ids(N, seed=2)
        for compressor in _methods():
            chunk_cache, step_cache = make_cache(model), make_cache(model)
            with hook.attach(model, compressor) as controller:
                prefill(model, ids[:, :C], chunk_cache)
                controller.appending = True
                chunk = compat.forward_logits(model, ids[:, C:], torch.arange(C, N)[None], chunk_cache, last_only=False)
                controller.appending = False
                prefill(model, ids[:, :C], step_cache)
                steps = [compat.forward_logits(model, ids[:, i:i + 1], torch.tensor([[i]]), step_cache)
                         for i in range(C, N)]
            torch.testing.assert_close(chunk, torch.cat(steps, dim=1), rtol=1e-4, atol=1e-4,
                                       msg=f"{compressor.name} {compressor.granularity}")
    finally:
        model.set_attn_implementation(original)


def test_the_question_tokens_stay_uncompressed_and_only_the_context_is_compressed(tiny):
    model = tiny.model
    ids = random_ids(N, seed=3)
    full = make_cache(model)
    prefill(model, ids, full)
    for compressor in _methods():
        cache = make_cache(model)
        with hook.attach(model, compressor) as controller:
            prefill(model, ids[:, :C], cache)
            extend(model, ids[:, C:], cache, C)
            report = controller.report
        for entry in report["layers"]:
            layer = cache.layers[entry["model_layer"]]
            assert isinstance(layer, CompressedLayer) and layer.compressed
            kept = entry["positions"]
            assert int(kept.max()) < C                                 # kept positions: context only
            assert layer.stored_length == kept.shape[-1] + (N - C)      # + every question token
            assert layer.virtual_length == N
        first = full_attention_layers(model.config)[0]    # layer 0's keys depend on the tokens alone
        heads = cache.layers[first].keys.shape[1]
        expected = methods.base.repeat_heads(full.layers[first].keys[:, :, C:], heads // full.layers[first].keys.shape[1])
        torch.testing.assert_close(cache.layers[first].keys[:, :, -(N - C):], expected)


def test_a_compressor_without_appending_still_refuses_a_multi_token_forward_on_its_cache(tiny):
    ids = random_ids(N, seed=4)
    cache = make_cache(tiny.model)
    with hook.attach(tiny.model, methods.build("snapkv", budget=64, window_size=8)):
        prefill(tiny.model, ids[:, :C], cache)
        with pytest.raises(NotImplementedError, match="chunked prefill"):
            compat.forward_logits(tiny.model, ids[:, C:], torch.arange(C, N)[None], cache)


@pytest.mark.parametrize("decode", ["plain", "batched"])
def test_shared_prefill_with_the_question_appended_equals_each_method_alone(lm, decode):
    ids = random_ids(N, seed=5)
    compressors = [methods.build("fullkv"), *_methods()]
    many = generate_many(lm.model, lm.tokenizer, ids, compressors, 10, decode=decode, compressed_tokens=C)
    for compressor, out in zip(compressors, many):
        alone = generate(lm.model, lm.tokenizer, ids, compressor, 10, decode="plain", compressed_tokens=C)
        assert out.token_ids == alone.token_ids, compressor.name
    tokens = {tuple(out.token_ids) for out in many}
    assert len(tokens) > 1          # the variants really differ (the comparison is not vacuous)


def test_extend_appends_at_the_positions_after_the_compressed_part(tiny):
    """Token-by-token decoding of the question through the plain decode path gives the same next token."""
    ids = random_ids(N, seed=6)
    compressor = methods.build("snapkv", budget=64, window_size=8)
    a, b = make_cache(tiny.model), make_cache(tiny.model)
    with hook.attach(tiny.model, compressor):
        prefill(tiny.model, ids[:, :C], a)
        chunk_next = extend(tiny.model, ids[:, C:], a, C)
        prefill(tiny.model, ids[:, :C], b)
        for i in range(C, N):
            step_next = decode_one(tiny.model, ids[:, i:i + 1], b, i)
    assert int(chunk_next) == int(step_next)


# ---- budgets as ratios -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o", "streamingllm", "dynamickv"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_a_ratio_resolves_to_the_equivalent_token_budget_and_keeps_the_same_tokens(name, ratio):
    torch.manual_seed(0)
    n = 203
    layers = 3
    keys = [torch.randn(1, 2, n, 16) for _ in range(layers)]
    values = [torch.randn(1, 2, n, 16) for _ in range(layers)]
    queries = [torch.randn(1, 4, n, 16) for _ in range(layers)]
    by_ratio = methods.build(name, window_size=8, compression_ratio=ratio)
    budget = int(n * (1 - ratio))                       # kvpress: n_kept = int(q_len * (1 - compression_ratio))
    assert by_ratio.budget_for(n) == budget
    by_budget = methods.build(name, window_size=8, budget=budget)
    resolved = by_ratio.resolved(n)
    assert resolved.budget == budget and resolved.compression_ratio is None
    for (_, _, p1), (_, _, p2) in zip(resolved.compress_all(keys, values, queries),
                                      by_budget.compress_all(keys, values, queries)):
        assert torch.equal(p1, p2)


def test_ratio_knob_checks_and_names():
    with pytest.raises(ConfigError, match=r"compression_ratio=1.5 must be a number in \[0, 1\)"):
        methods.build("snapkv", compression_ratio=1.5)
    with pytest.raises(ConfigError, match="compression_ratio"):
        methods.build("snapkv", compression_ratio="half")
    # int(100 * (1 - 0.9)) is 9 in floating point, as in kvpress
    with pytest.raises(ConfigError, match="leaves a budget of 9 of 100 prompt tokens.*must be larger than window_size"):
        methods.build("snapkv", window_size=32, compression_ratio=0.9).resolved(100)
    snap = methods.build("snapkv", window_size=32, compression_ratio=0.5)
    assert run_name({"name": "snapkv", **snap.knobs()}) == "snapkv_r0.5_w32_k7_maxpool_qh"
    sink = methods.build("streamingllm", sink_tokens=4, compression_ratio=0.75)
    assert run_name({"name": "streamingllm", **sink.knobs()}) == "streamingllm_r0.75_sink4_qh"
    assert sink.resolved(400).window_size == 100 - 4          # budget int(400 * 0.25) = 100: 4 sinks + 96 recent
    budget = methods.build("snapkv", budget=256)
    assert run_name({"name": "snapkv", **budget.knobs()}) == "snapkv_b256_w32_k7_maxpool_qh"
    assert budget.resolved(5000) is budget


def test_generate_with_a_ratio_equals_generate_with_the_resolved_budget_of_the_compressed_part(tiny):
    ids = random_ids(N, seed=7)
    by_ratio = generate(tiny.model, tiny.tokenizer, ids, methods.build("snapkv", window_size=8, compression_ratio=0.7),
                        8, compressed_tokens=C)
    by_budget = generate(tiny.model, tiny.tokenizer, ids, methods.build("snapkv", window_size=8,
                                                                        budget=int(C * 0.3)), 8, compressed_tokens=C)
    assert by_ratio.token_ids == by_budget.token_ids
    assert [e["kept"] for e in by_ratio.report["layers"]] == [e["kept"] for e in by_budget.report["layers"]]


# ---- where the prompt is split -----------------------------------------------------------------

def test_encode_parts_splits_a_raw_prompt_at_the_question():
    tok = byte_tokenizer()
    s = Sample(id="x", prompt="Some context here. Question: what?", answers=[], max_new_tokens=1,
               answer_prefix=" Answer:", question_start=len("Some context here. "))
    whole, n = encode_parts(s, tok, False, "cpu")
    assert n == whole.shape[1] and torch.equal(whole, encode(s, tok, False, "cpu"))
    ids, c = encode_parts(s, tok, False, "cpu", scope="context")
    assert ids[0, :c].tolist() == tok("Some context here. ").input_ids            # BOS + the context
    assert tok.decode(ids[0, c:]) == "Question: what? Answer:"
    ids, c = encode_parts(s, tok, False, "cpu", scope="context_and_question")
    assert tok.decode(ids[0, c:]) == " Answer:"
    no_split = Sample(id="y", prompt="text", answers=[], max_new_tokens=1)
    with pytest.raises(ValueError, match="compression_scope=context needs the question"):
        encode_parts(no_split, tok, False, "cpu", scope="context")


def test_encode_parts_splits_a_chat_prompt_before_the_question_and_before_the_end_of_turn():
    tok = byte_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n\n{{ m['content'] | trim }}"
                         "{{ eos_token }}{% endfor %}<assistant>\n\n")
    s = Sample(id="x", prompt="  The context.\nWhat is it?  ", answers=[], max_new_tokens=1, answer_prefix=" It is",
               question_start=len("  The context.\n"))
    whole = encode(s, tok, True, "cpu")
    ids, c = encode_parts(s, tok, True, "cpu", scope="context")
    assert torch.equal(ids, whole)                   # byte tokens: the split changes no id
    assert tok.decode(ids[0, :c], skip_special_tokens=True).endswith("<user>\n\nThe context.\n")
    assert tok.decode(ids[0, c:], skip_special_tokens=True).startswith("What is it?<assistant>")
    ids, c = encode_parts(s, tok, True, "cpu", scope="context_and_question")
    assert tok.decode(ids[0, :c], skip_special_tokens=True).endswith("What is it?")
    assert ids[0, c] == tok.eos_token_id            # the end of turn is appended, not compressed


def test_parse_mode_encodes_the_whole_text_even_where_the_template_depends_on_the_content():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['content'] | length > 40 %}<long>{% endif %}"
                         "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    s = Sample(id="x", prompt="A context that is longer than forty characters. Q?", answers=[], max_new_tokens=1,
               question_start=len("A context that is longer than forty characters. "))
    ids, n = encode_parts(s, tok, True, "cpu", "parse")
    assert n == ids.shape[1] and tok.decode(ids[0]).startswith("<long><user>A context")
    with pytest.raises(ValueError, match="fix: protocol.compression_scope=prompt"):
        encode_parts(s, tok, True, "cpu", "parse", scope="context")
