"""Passkey retrieval on the two real small models (CPU, float32), over the Paul Graham essays.

Needs the model packages (installed by `make setup`) and the essays under ../shared/data; skipped,
saying why, where either is absent.
"""

import pytest
from omegaconf import OmegaConf

from harness.engine.generate import generate
from harness.protocol.prompting import encode, use_chat_template
from harness.run.runner import task_samples
from harness.tasks import passkey
from methods import build

from conftest import ESSAYS, ROOT, real_model, task_config

pytestmark = [pytest.mark.real_model, pytest.mark.integration]

METHODS = {
    "fullkv": build("fullkv"),
    "snapkv": build("snapkv", budget=256, window_size=32),
    "streamingllm": build("streamingllm", budget=256, sink_tokens=4),
}


@pytest.fixture(scope="module", params=["smollm2_135m", "gemma3_270m"])
def passkey_results(request):
    if not ESSAYS.is_dir():
        pytest.skip(f"the Paul Graham essays are not at {ESSAYS} (../shared/data exists only on the dev machines)")
    lm = real_model(request.param)
    chat = use_chat_template("auto", lm.chat_template, lm.tokenizer)
    task = task_config("passkey", {"context_lengths": [2048], "depths": [10, 50, 90], "haystack": "essays",
                             "haystack_dir": str(ESSAYS), "max_new_tokens": 8, "seed": 0})
    samples = task_samples(passkey.TASK, task, lm, chat)
    found = {}
    for name, compressor in METHODS.items():
        for sample in samples:
            ids = encode(sample, lm.tokenizer, chat, "cpu")
            assert abs(ids.shape[1] - 2048) <= 2
            out = generate(lm.model, lm.tokenizer, ids, compressor, sample.max_new_tokens, lm.stop_token_ids)
            found[name, sample.meta["depth"]] = passkey.score(out.text, sample.answers)
            if name != "fullkv":
                assert out.report is not None
    return request.param, found


def test_fullkv_and_snapkv_retrieve_at_every_depth(passkey_results):
    model, found = passkey_results
    for depth in (10, 50, 90):
        assert found["fullkv", depth] == 1.0, (model, "fullkv", depth)
        assert found["snapkv", depth] == 1.0, (model, "snapkv", depth)


def test_streamingllm_misses_needles_outside_its_window(passkey_results):
    model, found = passkey_results
    assert found["streamingllm", 10] == 0.0 and found["streamingllm", 50] == 0.0, model


def test_gemma3_compresses_only_its_full_attention_layers():
    lm = real_model("gemma3_270m")
    ids = lm.tokenizer("word " * 700, return_tensors="pt").input_ids
    out = generate(lm.model, lm.tokenizer, ids, build("snapkv", budget=128, window_size=32), 2, [])
    assert [e["model_layer"] for e in out.report["layers"]] == [5, 11, 17]
    assert all(e["kept"] == 128 for e in out.report["layers"])


def test_all_six_methods_on_smollm2_and_their_per_layer_allocations():
    """SmolLM2 (30 layers), passkey at ~2K tokens: every method runs (one shared prefill) and the
    per-layer report shows PyramidKV's and DynamicKV's different allocations."""
    from harness.engine.shared import generate_many
    from harness.tasks.haystack import load_haystack  # noqa: F401  (synthetic haystack: no data needed)
    lm = real_model("smollm2_135m")
    chat = use_chat_template("auto", lm.chat_template, lm.tokenizer)
    task = task_config("passkey", {"context_lengths": [2048], "depths": [50], "haystack": "synthetic",
                             "max_new_tokens": 8, "seed": 1})
    sample = task_samples(passkey.TASK, task, lm, chat)[0]
    ids = encode(sample, lm.tokenizer, chat, "cpu")
    names = ["fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv"]
    compressors = [build(name, budget=128, window_size=32) for name in names]
    outs = dict(zip(names, generate_many(lm.model, lm.tokenizer, ids, compressors, 8, lm.stop_token_ids)))
    assert passkey.score(outs["fullkv"].text, sample.answers) == 1.0
    kept = {name: [e["kept"] for e in out.report["layers"]] for name, out in outs.items() if out.report}
    assert all(len(k) == 30 for k in kept.values())
    assert kept["snapkv"] == [128] * 30 and kept["h2o"] == [128] * 30 and kept["streamingllm"] == [128] * 30
    pyramid = kept["pyramidkv"]
    assert pyramid[0] > pyramid[-1] and all(a >= b for a, b in zip(pyramid, pyramid[1:]))
    dynamic = kept["dynamickv"]
    assert len(set(dynamic)) > 3 and dynamic != pyramid


@pytest.mark.parametrize("model_name", ["smollm2_135m", "gemma3_270m"])
def test_batched_decode_equals_plain_on_real_models(model_name):
    """The fast path (one shared prefill, every variant decoded together in fixed-shape slots) against
    the plain path (each method alone, one model call per token): the same tokens, row by row, with
    the model's own stop tokens, on a synthetic-haystack passkey prompt (Gemma 3: past its 512-token
    sliding window)."""
    from harness.engine.shared import generate_many
    lm = real_model(model_name)
    chat = use_chat_template("auto", lm.chat_template, lm.tokenizer)
    task = task_config("passkey", {"context_lengths": [1200], "depths": [30], "haystack": "synthetic",
                             "max_new_tokens": 20, "seed": 2})
    sample = task_samples(passkey.TASK, task, lm, chat)[0]
    ids = encode(sample, lm.tokenizer, chat, "cpu")
    compressors = [build("fullkv")] + [build(name, budget=128, window_size=16)
                                       for name in ("streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv")]
    fast = generate_many(lm.model, lm.tokenizer, ids, compressors, 20, lm.stop_token_ids)
    for compressor, out in zip(compressors, fast):
        alone = generate(lm.model, lm.tokenizer, ids, compressor, 20, lm.stop_token_ids, decode="plain")
        assert (out.token_ids, out.stopped_by) == (alone.token_ids, alone.stopped_by), (model_name, compressor.knobs())
    assert sum(len(out.token_ids) for out in fast) > 2 * len(fast)  # real answers, not only a stop token


@pytest.mark.parametrize("model_name", ["smollm2_135m", "gemma3_270m"])
def test_the_tokenizer_adds_bos_exactly_when_the_gguf_file_says_so(model_name):
    """Read from the GGUF header itself (transformers 5.18-5.22 lose Gemma 3's add_bos_token)."""
    import gguf

    from harness.engine.models import package_file
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{model_name}.yaml")
    field = gguf.GGUFReader(str(package_file(cfg.package, cfg.get("file")))).fields["tokenizer.ggml.add_bos_token"]
    wanted = bool(field.parts[field.data[0]][0])
    assert wanted == (model_name == "gemma3_270m")
    lm = real_model(model_name)
    ids = lm.tokenizer("The passkey is 12345.").input_ids
    assert (ids[0] == lm.tokenizer.bos_token_id) == wanted
