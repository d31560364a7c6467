"""The K/V transform hook (harness/engine/transform.py): every token's pre-RoPE key and value at prefill
and at every decode step, full rate reproducing the model, removal on exit, and the layouts of k_proj and
k_norm models."""

import pytest
import torch

import methods
from harness.engine.generate import generate
from harness.engine.hook import all_attention_modules
from harness.engine.transform import record_states, transformed
from methods.lowrank import build_transform

from conftest import make_model, random_ids, tiny_config


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request):
    if request.param == "llama":
        return make_model(tiny_config())
    return make_model(tiny_config(model_type="gemma3_text", num_hidden_layers=4, head_dim=16, num_attention_heads=4,
                                  num_key_value_heads=2, sliding_window=32,
                                  layer_types=["sliding_attention", "full_attention"] * 2))


def fitted(lm, name, **knobs):
    states = record_states(lm.model, random_ids(256, seed=9))
    return {layer: {kind: build_transform(name, **knobs).fit(x) for kind, x in pair.items()}
            for layer, pair in states.items()}


def hooks(model):
    return sum(len(m._forward_hooks) for a in all_attention_modules(model).values()
               for m in (a.k_proj, a.v_proj, getattr(a, "k_norm", a.k_proj)))


def test_full_rate_reproduces_the_model_and_every_token_passes_the_hook(lm):
    ids = random_ids(40, seed=1)
    plain = lm.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    reference = lm.model(ids).logits
    transforms = fitted(lm, "pca_uniform", rate=1.0)
    with transformed(lm.model, transforms) as log:
        out = lm.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        logits = lm.model(ids).logits
    assert torch.equal(out, plain)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    layers = len(all_attention_modules(lm.model))
    for layer in range(layers):            # prefill 40 + 5 decode steps, then the 40-token forward
        assert log.tokens[(layer, "k")] == log.tokens[(layer, "v")] == 40 + 5 + 40
    assert log.retain_rate() == 1.0
    assert hooks(lm.model) == 0            # removed on exit


def test_a_low_rate_changes_the_model_and_is_what_the_log_reports(lm):
    ids = random_ids(40, seed=2)
    reference = lm.model(ids).logits
    with transformed(lm.model, fitted(lm, "pca_uniform", rate=0.25)) as log:
        logits = lm.model(ids).logits
    assert not torch.allclose(logits, reference, atol=1e-3)
    assert log.retain_rate() == 0.25 and log.retain_rate("k", layer=0) == 0.25
    with transformed(lm.model, fitted(lm, "energy", eta=0.9)) as log:
        lm.model(ids)
    assert 0 < log.retain_rate() < 1
    assert sum(log.histogram[(0, "k")].values()) == 40


def test_the_engine_decodes_through_the_transform_like_transformers(lm):
    ids = random_ids(50, seed=3)
    transforms = fitted(lm, "pca_uniform", rate=0.5)
    with transformed(lm.model, transforms):
        reference = lm.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 50:].tolist()
        for decode in ("plain", "batched"):
            ours = generate(lm.model, lm.tokenizer, ids, methods.build("fullkv"), 8, decode=decode)
            assert ours.token_ids == reference, decode


def test_calibration_states_are_the_joint_pre_rope_vectors(lm):
    ids = random_ids(12, seed=4)
    states = record_states(lm.model, ids)
    attention = all_attention_modules(lm.model)[0]
    hidden = []
    handle = attention.register_forward_pre_hook(lambda m, args, kwargs: hidden.append(kwargs["hidden_states"]),
                                                 with_kwargs=True)
    try:
        lm.model(ids)
    finally:
        handle.remove()
    keys = attention.k_proj(hidden[0])                          # [1, T, Hkv * hd]
    if hasattr(attention, "k_norm"):                             # Gemma 3: normalised per head, before RoPE
        b, t, _ = keys.shape
        keys = attention.k_norm(keys.view(b, t, -1, attention.head_dim)).flatten(-2)
    torch.testing.assert_close(states[0]["k"], keys[0].float())
    torch.testing.assert_close(states[0]["v"], attention.v_proj(hidden[0])[0].float())


def test_a_few_training_steps_lower_the_objective_and_move_the_rate_towards_its_target(lm):
    from harness.engine.posttrain import objective, post_train
    torch.manual_seed(0)
    transforms = fitted(lm, "dynakv", tau=0.1)
    batches = [random_ids(64, seed=s) for s in range(4)]
    before_loss, before = objective(lm.model, transforms, batches[0], alpha=2.0)
    assert before["rate"] > 0.99                    # the gates start by keeping every dimension
    history = post_train(lm.model, transforms, batches, alpha=2.0, steps=30, lr=0.05)
    _, after = objective(lm.model, transforms, batches[0], alpha=2.0)
    assert after["loss"] < before["loss"] and after["rate"] < before["rate"] - 0.05
    assert len(history) == 30 and all(p.requires_grad for p in lm.model.parameters())
    with transformed(lm.model, transforms) as log:   # inference: tau ranks follow the trained gates
        lm.model(batches[0])
    assert log.retain_rate() < 1.0
