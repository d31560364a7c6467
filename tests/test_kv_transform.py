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


def test_each_rows_generated_ranks_are_recorded_as_transformers_generate_sees_them(lm):
    """The batched decoder records every generated token's kept ranks per row in place (what a CUDA graph
    replays); row 0 (FullKV) equals the ranks the hooks log under transformers' ``generate``, one call per token,
    and every row equals the plain path's, also for rows that stop at different steps."""
    from harness.engine.shared import generate_many
    ids = random_ids(60, seed=5)
    transforms = fitted(lm, "energy", eta=0.8)          # token-adaptive: the ranks differ token to token
    with transformed(lm.model, transforms) as log:
        reference = lm.model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, 60:].tolist()
    expected = {key: torch.cat([c.reshape(-1) for c in calls[1:]]) for key, calls in log.calls.items()}  # after prefill
    assert all(r.numel() == 9 for r in expected.values()) and len({int(r.max()) for r in expected.values()}) > 1
    compressors = [methods.build("fullkv"), methods.build("snapkv", budget=8, window_size=4, granularity="layer")]
    with transformed(lm.model, transforms):
        free = generate_many(lm.model, lm.tokenizer, ids, compressors, 10)
    stop = next(t for t in free[1].token_ids[2:] if t not in free[0].token_ids)   # row 1 stops early, row 0 not
    runs = {}
    for decode in ("batched", "plain"):
        with transformed(lm.model, transforms) as log:
            outs = generate_many(lm.model, lm.tokenizer, ids, compressors, 10, [stop], decode=decode)
        runs[decode] = (outs, log)
        assert outs[0].token_ids == reference and len(outs[1].token_ids) < 10
        assert set(log.generated) == {0, 1} and log.tokens[(0, "k")] == 60   # calls: the prompt only
        for row, out in enumerate(outs):
            assert {key: r.numel() for key, r in log.generated[row].items()} == \
                {key: len(out.token_ids) - 1 for key in expected}
        for key in expected:
            assert torch.equal(log.generated[0][key], expected[key]), (decode, key)
    for row in (0, 1):
        assert runs["batched"][0][row].token_ids == runs["plain"][0][row].token_ids
        for key in expected:
            assert torch.equal(runs["batched"][1].generated[row][key], runs["plain"][1].generated[row][key])


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


def step_in_place(param):
    with torch.no_grad():       # as an optimizer step updates it
        param.add_(1.0)


def test_the_decoders_key_changes_with_what_a_captured_step_reads_and_attachments_do_not_nest(lm):
    """A captured step bakes in the transforms' scalars (tau) and tensor addresses: their key (the log's identity)
    changes when tau changes or a gate is updated in place, and stays for the same transforms; and a second
    attachment inside the first is refused (the decoder keys its graphs by the one set attached)."""
    transforms = fitted(lm, "dynakv", tau=0.1)
    identities = []
    for change in (lambda: None, lambda: None, lambda: setattr(transforms[0]["k"], "tau", 0.2),
                   lambda: step_in_place(transforms[1]["v"].gate.bias)):
        change()
        with transformed(lm.model, transforms) as log:
            identities.append(log.identity)
    assert identities[0] == identities[1] and len(set(identities[1:])) == 3
    with transformed(lm.model, transforms):
        with pytest.raises(RuntimeError, match="does not nest"):
            with transformed(lm.model, transforms):
                pass
    assert hooks(lm.model) == 0


def test_a_decode_step_that_bypassed_the_transform_is_refused_not_read_from_the_last_prompt(lm, monkeypatch):
    """The decoder's rank buffers are reused by the next prompt of the same shapes: entries its steps did not
    write are -1, so a hook that did not record fails the row instead of showing the previous prompt's ranks."""
    from harness.engine import batched
    transforms = fitted(lm, "energy", eta=0.8)
    with transformed(lm.model, transforms) as log:
        generate(lm.model, lm.tokenizer, random_ids(60, seed=5), methods.build("fullkv"), 8)
    assert log.generated[0][(0, "k")].numel() == 7 and int(log.generated[0][(0, "k")].min()) >= 1
    write = batched.RankRecorder.write
    monkeypatch.setattr(batched.RankRecorder, "write",
                        lambda self, key, ranks: None if key == (0, "k") else write(self, key, ranks))
    with transformed(lm.model, transforms) as log:     # the same shapes: the pooled decoder and its buffers
        generate(lm.model, lm.tokenizer, random_ids(60, seed=6), methods.build("fullkv"), 8)
    with pytest.raises(RuntimeError, match="layer 0 .k. recorded no kept rank .* bypassed the K/V transform"):
        log.generated
