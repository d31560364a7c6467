"""Greedy generation stops exactly where transformers' ``model.generate`` stops: ``min_new_tokens``
masks the stop ids, stop ids end generation, stop strings match as ``StopStringCriteria`` matches
(also across the prompt's end). Compared with ``model.generate`` itself: from scratch for FullKV,
and continuing from the same compressed cache for every method; the batched and shared paths must
give the same tokens as the plain one."""

import pytest
import torch

from harness.engine import hook
from harness.engine.cache import make_cache
from harness.engine.compat import cache_keyword
from harness.engine.generate import generate, prefill
from harness.engine.shared import generate_many
from harness.engine.stopping import Stopping
from methods import build

from conftest import random_ids

pytestmark = pytest.mark.integration

NEW = 24
ALL = [("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}), ("pyramidkv", {}), ("dynamickv", {}),
       ("dynamickv", {"variant": "fixed"})]


def transformers_generate(lm, input_ids, new, stops, stop_strings, min_new, **kwargs):
    out = lm.model.generate(input_ids, max_new_tokens=new, min_new_tokens=min_new, eos_token_id=list(stops) or None,
                            stop_strings=list(stop_strings) or None, tokenizer=lm.tokenizer, do_sample=False,
                            attention_mask=torch.ones_like(input_ids), pad_token_id=lm.tokenizer.pad_token_id or 1,
                            **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


def cases(lm, ids):
    """Stop settings built from the model's own free-running output, so that they bite: the first
    token as a stop id (min_new_tokens must move the argmax), a later one, and a stop string taken
    from the output's text, and one that starts in the prompt and ends in the first new token."""
    free = generate(lm.model, lm.tokenizer, ids, build("fullkv"), NEW, decode="plain").token_ids
    text = lm.tokenizer.decode(free)
    across = lm.tokenizer.decode([int(ids[0, -1]), free[0]])
    return [
        ([free[0]], (), 1),
        ([free[0]], (), 3),
        ([free[0], free[7]], (), 0),
        ([free[3]], (), 5),
        ([], (text[9:11],), 0),
        ([free[0]], (text[12:14],), 2),
        ([], (across,), 0),
    ]


@pytest.mark.parametrize("seed", range(8))
def test_fullkv_stops_where_model_generate_stops(tiny, seed):
    ids = random_ids(40 + 23 * seed, seed=100 + seed)
    for stops, strings, min_new in cases(tiny, ids):
        reference = transformers_generate(tiny, ids, NEW, stops, strings, min_new)
        for decode in ("plain", "batched"):
            ours = generate(tiny.model, tiny.tokenizer, ids, build("fullkv"), NEW, stops, strings, min_new, decode=decode)
            assert ours.token_ids == reference, (seed, stops, strings, min_new, decode)


def test_the_first_token_is_never_a_stop_token_under_min_new_tokens(tiny):
    """The issue's case: the first argmax token declared a stop token. transformers' min_length masks it,
    so the answer starts with the next best token instead of stopping (or merely not stopping)."""
    ids = random_ids(300, seed=4)
    first = generate(tiny.model, tiny.tokenizer, ids, build("fullkv"), 1).token_ids[0]
    for decode in ("plain", "batched"):
        out = generate(tiny.model, tiny.tokenizer, ids, build("fullkv"), 5, [first], (), 1, decode=decode)
        assert out.token_ids[0] != first
        assert out.token_ids == transformers_generate(tiny, ids, 5, [first], (), 1)


@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
@pytest.mark.parametrize("name, knobs", ALL)
def test_compressed_decoding_continues_as_model_generate_does(tiny, name, knobs, granularity):
    """The same compressed cache, continued by transformers' generate (the hook attached) and by the
    harness's plain, batched and shared paths."""
    compressor = build(name, budget=48, window_size=8, granularity=granularity, **knobs)
    for seed in (1, 2):
        ids = random_ids(180 + 40 * seed, seed=seed)
        for stops, strings, min_new in cases(tiny, ids):
            stopping = Stopping(tiny.tokenizer, stops, min_new, strings, ids[0].tolist())
            cache = make_cache(tiny.model)
            with hook.attach(tiny.model, compressor):
                first = prefill(tiny.model, ids, cache, stopping.suppressed(0))
                if stopping.reason([int(first)]):
                    reference = [int(first)]
                else:
                    reference = [int(first)] + transformers_generate(
                        tiny, torch.cat([ids, first], dim=1), NEW - 1, stops, strings, max(min_new - 1, 0),
                        **{cache_keyword(tiny.model): cache})
            for decode in ("plain", "batched"):
                ours = generate(tiny.model, tiny.tokenizer, ids, compressor, NEW, stops, strings, min_new, decode=decode)
                assert ours.token_ids == reference, (name, seed, stops, strings, min_new, decode)
            [shared] = generate_many(tiny.model, tiny.tokenizer, ids, [compressor], NEW, stops, strings, min_new)
            assert shared.token_ids == reference


def test_stop_strings_are_checked_on_the_last_tokens_only(tiny, monkeypatch):
    """Incremental: each step looks at a window of at most the criteria's maximum token length."""
    ids = random_ids(120, seed=9)
    lengths = []
    stopping = Stopping(tiny.tokenizer, (), 0, ("never appears \u2603",), ids[0].tolist())
    real = type(stopping.criteria).__call__

    def spy(self, input_ids, scores, **kwargs):
        lengths.append(input_ids.shape[1])
        return real(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(type(stopping.criteria), "__call__", spy)
    out = generate(tiny.model, tiny.tokenizer, ids, build("fullkv"), 40, (), ("never appears \u2603",), decode="plain")
    assert out.stopped_by == "max_new_tokens" and len(lengths) == 40
    assert max(lengths) == stopping.criteria.maximum_token_len
