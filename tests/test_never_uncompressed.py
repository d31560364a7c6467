"""A run is never silently uncompressed: the hook does not depend on how transformers names its
arguments, every bypass raises, and every supported attention backend compresses the same way.

Each bypass below is simulated on a real (tiny, random) transformers model; the harness must raise
``CompressionNotApplied`` (naming the layer or the method and the transformers version), never go on
with a full cache.
"""

import contextlib
import importlib.util
import inspect
import re

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache

from harness.engine import batched, hook
from harness.engine.cache import CompressedLayer, make_cache
from harness.engine.compat import IntegrationError
from harness.engine.generate import decode_loop, generate, prefill
from harness.engine.hook import CompressionNotApplied
from harness.engine.shared import compressed_cache, generate_many, prefill_once
from harness.engine.stopping import Stopping
from methods import ConfigError, build

from conftest import make_model, random_ids, tiny_config

pytestmark = pytest.mark.integration

ALL = [("fullkv", {}), ("streamingllm", {"sink_tokens": 4}), ("snapkv", {}), ("h2o", {}), ("h2o", {"variant": "window"}),
       ("pyramidkv", {}), ("dynamickv", {}), ("dynamickv", {"variant": "fixed"})]
VERSION = f"transformers {transformers.__version__}"


def model_cache_keyword(module) -> str:
    parameters = inspect.signature(type(module).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@contextlib.contextmanager
def attention_calls_with(model, pre_hook):
    """``pre_hook(kwargs, keyword)`` edits the keyword arguments of every full-attention call."""
    modules = hook.attention_modules(model).values()
    keyword = model_cache_keyword(next(iter(modules)))

    def edit(module, args, kwargs):
        pre_hook(kwargs, keyword)
        return args, kwargs

    handles = [m.register_forward_pre_hook(edit, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def cache_keyword_renamed(model, new_name="kv_store_v9"):
    """The cache reaches the attention modules under a keyword nobody has heard of (as 5.24 renamed
    ``past_key_values`` to ``cache``), and the modules still write into it."""
    cls = type(next(iter(hook.attention_modules(model).values())))
    original, keyword = cls.forward, model_cache_keyword(next(iter(hook.attention_modules(model).values())))

    def forward(self, *args, **kwargs):
        if new_name in kwargs:
            kwargs[keyword] = kwargs.pop(new_name)
        return original(self, *args, **kwargs)

    def rename(kwargs, keyword):
        if keyword in kwargs:
            kwargs[new_name] = kwargs.pop(keyword)

    cls.forward = forward
    try:
        with attention_calls_with(model, rename):
            yield
    finally:
        cls.forward = original


def kept(out):
    return [entry["kept"] for entry in out.report["layers"]]


@pytest.mark.parametrize("decode", ["plain", "batched"])
def test_the_issue_example_compresses(tiny, decode):
    ids = random_ids(300, seed=1)
    out = generate(tiny.model, tiny.tokenizer, ids, build("snapkv", budget=64, window_size=8), 8, decode=decode)
    assert kept(out) == [64, 64, 64]
    [shared] = generate_many(tiny.model, tiny.tokenizer, ids, [build("snapkv", budget=64, window_size=8)], 8,
                             decode=decode)
    assert kept(shared) == [64, 64, 64] and shared.token_ids == out.token_ids


def test_a_cache_under_a_renamed_keyword_is_still_compressed(tiny):
    ids = random_ids(300, seed=2)
    compressor = build("pyramidkv", budget=64, window_size=8)
    plain = generate(tiny.model, tiny.tokenizer, ids, compressor, 10, decode="plain")
    with cache_keyword_renamed(tiny.model):
        renamed = generate(tiny.model, tiny.tokenizer, ids, compressor, 10, decode="plain")
        # without harness.engine.generate.prefill binding the cache: the hook finds it by its type
        cache = make_cache(tiny.model)
        with hook.attach(tiny.model, compressor) as controller, torch.no_grad():
            keyword = model_cache_keyword(tiny.model)
            tiny.model(input_ids=ids, position_ids=torch.arange(300)[None], use_cache=True, **{keyword: cache})
            controller.verify(cache, 300, 0)
            report = controller.report
    assert renamed.token_ids == plain.token_ids and kept(renamed) == kept(plain)
    assert [e["kept"] for e in report["layers"]] == kept(plain) and all(layer.compressed for layer in cache.layers)


def test_a_hook_that_finds_no_cache_and_returns_quietly_is_caught(tiny, monkeypatch):
    """The transformers 5.24 failure: the hook looked for ``past_key_values``, found nothing and
    returned; every run kept the full cache. Now the prefill's invariant check raises."""
    monkeypatch.setattr(hook.Controller, "after_attention", lambda self, module, args, kwargs, output: None)
    ids = random_ids(300, seed=3)
    for decode in ("plain", "batched"):
        with pytest.raises(CompressionNotApplied, match="method 'snapkv'.*left uncompressed.*" + VERSION):
            generate(tiny.model, tiny.tokenizer, ids, build("snapkv", budget=64, window_size=8), 4, decode=decode)


def test_the_model_writing_another_cache_is_caught(tiny):
    """A cache of another class reaches the attention modules (transformers building its own)."""
    def swap(kwargs, keyword):
        kwargs[keyword] = DynamicCache(config=tiny.model.config)

    ids = random_ids(200, seed=4)
    with attention_calls_with(tiny.model, swap):
        with pytest.raises(CompressionNotApplied, match=r"layer 0, method 'h2o'.*received 0.*" + VERSION):
            generate(tiny.model, tiny.tokenizer, ids, build("h2o", budget=64, window_size=8), 4)
        with pytest.raises(CompressionNotApplied, match="did not write this cache"):
            generate(tiny.model, tiny.tokenizer, ids, build("fullkv"), 4)      # FullKV's cache is checked too
        with pytest.raises(CompressionNotApplied, match="did not write this cache"):
            prefill_once(tiny.model, ids, [build("snapkv", budget=64, window_size=8)])


def test_a_layer_that_was_not_compressed_is_named(tiny):
    ids = random_ids(200, seed=5)
    with hook.attach(tiny.model, build("snapkv", budget=40, window_size=8)):
        hook.attention_modules(tiny.model)[1]._forward_hooks.clear()     # layer 1's hook is gone
        with pytest.raises(CompressionNotApplied, match=r"method 'snapkv': layers \[1\] should have been compressed"):
            prefill(tiny.model, ids, make_cache(tiny.model))


def test_attention_that_does_not_go_through_the_wrapper_is_caught(tiny):
    ids = random_ids(200, seed=6)
    with hook.attach(tiny.model, build("snapkv", budget=40, window_size=8)):
        hook._CONTROLLERS.pop(id(hook.attention_modules(tiny.model)[2]))
        with pytest.raises(CompressionNotApplied, match="layer 2.*never called"):
            prefill(tiny.model, ids, make_cache(tiny.model))


@pytest.mark.parametrize("path", ["hook", "shared"])
def test_a_cache_that_does_not_hold_what_the_compressor_returned_is_caught(tiny, monkeypatch, path):
    monkeypatch.setattr(CompressedLayer, "replace", lambda self, keys, values, positions: None)
    ids = random_ids(200, seed=7)
    compressor = build("dynamickv", budget=40, window_size=8)
    with pytest.raises(CompressionNotApplied, match=r"layer 0, method 'dynamickv': the cache holds 200 stored tokens"):
        if path == "hook":
            generate(tiny.model, tiny.tokenizer, ids, compressor, 4)
        else:
            compressed_cache(prefill_once(tiny.model, ids, [compressor]), compressor)


def test_plain_decoding_into_another_cache_is_caught(tiny):
    ids = random_ids(120, seed=8)
    for compressor in (build("fullkv"), build("snapkv", budget=40, window_size=8)):
        cache = make_cache(tiny.model)
        with hook.attach(tiny.model, compressor):
            first = prefill(tiny.model, ids, cache)

            def swap(kwargs, keyword):
                kwargs[keyword] = DynamicCache(config=tiny.model.config)

            with attention_calls_with(tiny.model, swap), pytest.raises(CompressionNotApplied):
                decode_loop(tiny.model, first, cache, 120, 5, Stopping(tiny.tokenizer))


@pytest.mark.parametrize("pooled", [False, True])
def test_batched_decoding_that_bypasses_the_slot_attention_is_caught(tiny, monkeypatch, pooled):
    """Also when the decoder (buffers, and on a GPU the graph) comes from the pool of an earlier call."""
    compressors = [build("fullkv"), build("snapkv", budget=40, window_size=8)]
    ids = random_ids(200, seed=9)
    batched.clear_pools()
    if pooled:
        generate_many(tiny.model, tiny.tokenizer, ids, compressors, 6, cuda_graphs=False)
    real = hook.set_attention
    monkeypatch.setattr(hook, "set_attention", lambda model, name: None if name == batched.SLOT_ATTENTION
                        else real(model, name))
    with pytest.raises(IntegrationError, match="bypassed the slot cache"):
        generate_many(tiny.model, tiny.tokenizer, ids, compressors, 6, cuda_graphs=False)
    batched.clear_pools()


@pytest.mark.parametrize("config", [
    tiny_config(model_type="gemma3_text", num_hidden_layers=2, head_dim=16, num_attention_heads=4,
                num_key_value_heads=1, sliding_window=32),                         # every layer slides
    tiny_config(model_type="mistral", sliding_window=32),                         # Mistral-7B-v0.1 style
], ids=["gemma3-all-sliding", "mistral-sliding-window"])
def test_a_model_with_no_full_attention_layer_refuses_a_compressor(config):
    lm = make_model(config)
    ids = random_ids(100, seed=15)
    assert len(generate(lm.model, lm.tokenizer, ids, build("fullkv"), 4).token_ids) == 4      # FullKV runs
    compressor = build("snapkv", budget=64, window_size=8)
    with pytest.raises(ConfigError, match="method 'snapkv'.*no full-attention layer.*method=fullkv"):
        generate(lm.model, lm.tokenizer, ids, compressor, 4)
    with pytest.raises(ConfigError, match="no full-attention layer"):
        generate_many(lm.model, lm.tokenizer, ids, [build("fullkv"), compressor], 4)


# ---------------------------------------------------------------- every attention backend

def other_backends():
    out = [pytest.param("eager")]
    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    out.append(pytest.param("flash_attention_2", marks=pytest.mark.skipif(
        not flash, reason="flash_attention_2 needs the flash-attn package and a CUDA GPU (neither is here)")))
    return out


@pytest.mark.parametrize("backend", other_backends())
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
def test_every_method_compresses_the_same_on_every_backend(tiny, backend, granularity):
    """float32 on the CPU: the same tokens and the same kept positions as on sdpa, every method, both
    decode paths and the shared prefill."""
    other = make_model(tiny_config(), attn_implementation=backend)
    assert other.model.config._attn_implementation == backend
    ids = random_ids(260, seed=13)
    compressors = [build(name, budget=48, window_size=8, granularity=granularity, **knobs) for name, knobs in ALL]
    for compressor in compressors:
        reference = generate(tiny.model, tiny.tokenizer, ids, compressor, 12, decode="plain")
        for decode in ("plain", "batched"):
            out = generate(other.model, other.tokenizer, ids, compressor, 12, decode=decode)
            assert out.token_ids == reference.token_ids, (compressor.name, compressor.knobs(), decode)
            if not compressor.is_noop:
                assert kept(out) == kept(reference)
                for a, b in zip(out.report["layers"], reference.report["layers"]):
                    assert (a["positions"] is None) == (b["positions"] is None)
                    assert a["positions"] is None or torch.equal(a["positions"], b["positions"])
    shared = generate_many(other.model, other.tokenizer, ids, compressors, 12)
    for compressor, out in zip(compressors, shared):
        assert out.token_ids == generate(tiny.model, tiny.tokenizer, ids, compressor, 12).token_ids
    assert other.model.config._attn_implementation == backend        # the hook switched it back


def test_eager_on_a_model_with_sliding_window_layers(tiny_gemma):
    eager = make_model(tiny_config(model_type="gemma3_text", num_hidden_layers=6, head_dim=16, num_attention_heads=4,
                                   num_key_value_heads=1, sliding_window=32,
                                   layer_types=["sliding_attention"] * 2 + ["full_attention"]
                                   + ["sliding_attention"] * 2 + ["full_attention"]), attn_implementation="eager")
    ids = random_ids(150, seed=3)
    for compressor in (build("fullkv"), build("snapkv", budget=24, window_size=8), build("h2o", budget=24, window_size=8)):
        a = generate(tiny_gemma.model, tiny_gemma.tokenizer, ids, compressor, 8, decode="plain")
        b = generate(eager.model, eager.tokenizer, ids, compressor, 8, decode="plain")
        assert a.token_ids == b.token_ids
        assert compressor.is_noop or [e["model_layer"] for e in b.report["layers"]] == [2, 5]


@pytest.mark.parametrize("backend, message", [
    ("flex_attention", r"model.attn_implementation='flex_attention' is not one of \[sdpa, eager, flash_attention_2\]"),
    ("paged|eager", r"model.attn_implementation='paged\|eager' is not one of \[sdpa, eager, flash_attention_2\]"),
])
def test_unsupported_backends_fail_before_the_model_loads(tmp_path, backend, message, monkeypatch):
    from hydra import compose, initialize_config_dir

    import harness.run.runner as runner

    from conftest import ROOT, user_error

    def no_model(*args):
        raise AssertionError("the model was loaded")

    def compose_and_run():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["model=tiny_llama", f"results_dir={tmp_path}",
                                                           "wandb=false", f"model.attn_implementation={backend}"])
        runner.run(cfg)

    monkeypatch.setattr(runner, "_cached_model", no_model)
    assert re.search(message, user_error(compose_and_run))          # at composition, by the typed schema
    with pytest.raises(ConfigError, match=message.replace("=", ": Invalid value ").split(" is not")[0]):
        make_model(tiny_config(), attn_implementation=backend)      # a model config given to the engine directly


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_fails_with_the_fix():
    with pytest.raises(ConfigError, match=r"needs the flash-attn package.*pip install 'kv-harness\[flash\]'"):
        make_model(tiny_config(), attn_implementation="flash_attention_2")


def test_crop_follows_both_signatures_and_refuses_the_compressed_prompt():
    x = torch.arange(10.0).view(1, 1, 5, 2)
    layer = CompressedLayer()
    layer.update(x, x)
    layer.crop(-2)                                       # 5.18+: remove two tokens
    assert (layer.virtual_length, layer.stored_length) == (3, 3) and torch.equal(layer.keys, x[:, :, :3])
    layer.crop(2)                                        # the older crop(max_length): keep the first two
    assert (layer.virtual_length, layer.stored_length) == (2, 2)
    layer.crop(5)                                        # longer than held: nothing to do
    assert layer.stored_length == 2
    layer.replace(x[:, :, :1], x[:, :, :1], torch.tensor([[[1]]]))
    layer.update(x[:, :, :2], x[:, :, :2])
    assert (layer.virtual_length, layer.stored_length, layer.appended) == (4, 3, 2)
    layer.crop(-2)
    assert (layer.virtual_length, layer.stored_length) == (2, 1)
    with pytest.raises(ValueError, match="compressed prompt cannot be cropped"):
        layer.crop(-1)


@contextlib.contextmanager
def host_copies_recorded(calls: list):
    """Records every tensor -> Python conversion (a host sync on a GPU) made inside the block."""
    names = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def spy(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return saved[name](self, *args, **kwargs)
        return method

    for name in names:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("name", ["fullkv", "streamingllm", "snapkv", "h2o", "pyramidkv"])
def test_the_prefill_and_its_check_make_no_host_copy(tiny, name):
    """The invariant check costs no GPU sync (one per layer cost an 8B model 12% of its 8K prefill on an
    H200: the report's positions were copied to the CPU inside the check). DynamicKV's re-allocation
    is host arithmetic by design (the reference's float32/float64 shares) and is left out."""
    compressor = build("fullkv") if name == "fullkv" else build(name, budget=40, window_size=8)
    calls = []
    with hook.attach(tiny.model, compressor):
        cache = make_cache(tiny.model)
        with host_copies_recorded(calls):
            prefill(tiny.model, random_ids(200, seed=14), cache)
    assert calls == []


@pytest.mark.parametrize("key, value, message", [
    ("dtype", "fp16", r"model.dtype: Invalid value 'fp16', expected one of \[auto, float32, float16, bfloat16\]; fix"),
    ("source", "hf", r"model.source: Invalid value 'hf', expected one of \[auto, hub, gguf, package, random\]; fix"),
    ("device", "gpu", r"model.device='gpu' is not a device .*fix: model.device=auto, cpu, cuda"),
])
def test_bad_model_settings_fail_before_loading_with_the_fix(key, value, message):
    from omegaconf import OmegaConf

    from harness.engine.models import check_model_config
    cfg = OmegaConf.create({"source": "random", "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"})
    cfg[key] = value
    with pytest.raises(ConfigError, match=message):
        check_model_config(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_cuda_device_without_cuda_fails_before_loading():
    from omegaconf import OmegaConf

    from harness.engine.models import check_model_config
    with pytest.raises(ConfigError, match="sees no CUDA device here; fix: model.device=cpu"):
        check_model_config(OmegaConf.create({"source": "random", "device": "cuda"}))


def test_an_unset_backend_means_sdpa():
    lm = make_model(tiny_config(), attn_implementation=None)
    assert lm.info["attn_implementation"] == "sdpa" and lm.model.config._attn_implementation == "sdpa"


def test_dense_copies_are_pruned_least_recently_used_first(tmp_path, monkeypatch):
    import os
    import time

    from harness.engine import models
    monkeypatch.setenv("KV_HARNESS_CACHE", str(tmp_path))
    root = tmp_path / "dense"
    now = time.time()
    ages = [0, 600, 1200, 5000, 9000]                                     # seconds since last use
    for i, age in enumerate(ages):
        (root / f"model-{i}").mkdir(parents=True)
        os.utime(root / f"model-{i}", (now - age, now - age))             # model-0 most recent
    (root / "model-x.tmp123").mkdir()                                    # a save killed long ago
    os.utime(root / "model-x.tmp123", (now - 7200, now - 7200))
    (root / "model-y.tmp456").mkdir()                                    # a save in progress
    models.prune_dense_copies(keep=2)
    # the two most recent stay; model-2 too, used within the hour (another run may be loading it)
    assert sorted(p.name for p in root.iterdir()) == ["model-0", "model-1", "model-2", "model-y.tmp456"]
