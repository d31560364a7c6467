"""DynaKV in the harness: the ``kvh dynakv`` commands, checkpoints, runs with a K/V transform (alone and stacked on
SnapKV with global token eviction), the row accounting and the configs. Independent references: perplexity
of the model with the transform folded into its projection weights (pca_uniform and svd_weights are linear
maps of the projection's output or input), the top-k of the head-averaged scores, and the accounting
recomputed from the ranks and kept positions by hand."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_perplexity import guide_perplexity

import harness.run.runner as runner
from harness.dynakv import accounting, checkpoint
from harness.dynakv import cli as dynakv_cli
from harness.engine.transform import TransformLog
from harness.run import identity, results
from methods import ConfigError, build
from methods.lowrank import Moments, pca_basis, prefix_mask
from methods.scoring import pool_scores, window_attention_mass

from conftest import ROOT, user_error

CONF = str(ROOT / "conf")
TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen liquor jugs.\n\n") * 6


def compose_run(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny_llama", f"results_dir={tmp_path / 'results'}",
                                                        "wandb=false", "progress=never", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A calibration checkpoint and a trained one of tiny_llama, made by the ``kvh dynakv`` commands."""
    folder = tmp_path_factory.mktemp("dynakv")
    text = folder / "text.txt"
    text.write_text(TEXT * 4)
    dynakv_cli.main(["calibrate", "--model", "tiny_llama", "--text", str(text), "--tokens", "2048", "--seq-len",
                     "128", "--out", str(folder / "pca.safetensors")])
    dynakv_cli.main(["train", "--model", "tiny_llama", "--init", str(folder / "pca.safetensors"), "--text", str(text),
                     "--tokens", "2048", "--seq-len", "128", "--alpha", "50", "--steps", "30", "--batch-size", "2",
                     "--lr", "0.05", "--eval-text", str(text), "--eval-tokens", "512", "--no-wandb",
                     "--out", str(folder / "trained.safetensors")])
    return folder


def test_streamed_moments_give_the_pca_basis_of_all_states():
    states = torch.randn(600, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64) + 0.5
    for centred in (False, True):
        moments = Moments(12)
        for chunk in states.split(97):
            moments.add(chunk)
        streamed, direct = moments.basis(centred), pca_basis(states, centred)
        assert torch.allclose(streamed.eigenvalues, direct.eigenvalues, rtol=1e-9)
        assert torch.allclose(streamed.vectors, direct.vectors, atol=1e-8)
        if centred:
            assert torch.allclose(streamed.mean, states.mean(0))


def test_layer_granularity_keeps_the_top_tokens_of_the_head_averaged_scores_in_every_head():
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    queries = torch.randn(1, 4, 40, 8, generator=g)
    snap = build("snapkv", budget=16, window_size=4, kernel_size=3, granularity="layer")
    [(k, v, positions)] = snap.compress_all([keys], [values], [queries])
    assert k.shape == (1, 2, 16, 8) and torch.equal(positions[:, 0], positions[:, 1])
    mass = window_attention_mass(queries[:, :, -4:], keys.repeat_interleave(2, dim=1), 4)   # [1, 4, 36]
    expected = pool_scores(mass.mean(dim=1, keepdim=True), 3, "maxpool").topk(12, dim=-1).indices
    assert sorted(positions[0, 0, :12].tolist()) == sorted(expected[0, 0].tolist())
    assert positions[0, 0, 12:].tolist() == list(range(36, 40))
    assert torch.equal(k[0, 1], keys[0, 1, positions[0, 1]])


def test_checkpoint_round_trip_and_its_errors(tmp_path, trained):
    bases, gates, manifest = checkpoint.load(trained / "trained.safetensors")
    assert manifest["trained"] and manifest["training"]["alpha"] == 50 and manifest["training"]["steps"] == 30
    measured = manifest["measured"]
    assert 0 < measured["retain_rate"] <= 1 and math.isclose(measured["perplexity"], math.exp(measured["ce"]))
    assert json.loads((trained / "trained.json").read_text()) == manifest
    assert sorted(bases) == [0, 1, 2, 3] and set(gates[0]) == {"k", "v"}
    calibrated, _, calib_manifest = checkpoint.load(trained / "pca.safetensors")
    assert torch.equal(calibrated[2]["v"].vectors, bases[2]["v"].vectors)          # training kept the PCA basis
    assert set(calib_manifest["energy_rate_by_eta"]) == {str(e) for e in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95,
                                                                         0.98, 0.99)}
    again = tmp_path / "again.safetensors"
    checkpoint.save(again, bases, {"note": 1}, gates)
    bases2, gates2, _ = checkpoint.load(again)
    assert torch.equal(bases2[1]["k"].vectors, bases[1]["k"].vectors)
    assert torch.equal(gates2[3]["v"].weight, gates[3]["v"].weight)
    with pytest.raises(ConfigError, match="no DynaKV checkpoint is shipped for model nosuch"):
        checkpoint.resolve("auto", "nosuch")
    with pytest.raises(ConfigError, match="is not a file"):
        checkpoint.resolve(str(tmp_path / "missing.safetensors"), "tiny_llama")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file of that kind")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        checkpoint.load(junk)


def _folded_perplexity(lm, fold, ids, context, stride) -> float:
    """The guide's perplexity of a copy of the model whose K/V projections are replaced by ``fold(layer, kind,
    weight)``: the transform applied as a weight change, no hook."""
    import copy
    model = copy.deepcopy(lm.model)
    for layer, block in enumerate(model.model.layers):
        attention = block.self_attn
        for kind, proj in (("k", attention.k_proj), ("v", attention.v_proj)):
            with torch.no_grad():
                proj.weight.copy_(fold(layer, kind, proj.weight.double()).to(proj.weight.dtype))
    return guide_perplexity(model, ids, context, stride)


def test_transforms_in_a_perplexity_run_equal_the_weights_they_stand_for(tmp_path, trained):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    task = ["task=perplexity", f"task.text_path={text}", "task.context_length=160", "task.stride=64", "task.bos=false"]
    [pca] = runner.run(compose_run(tmp_path, *task, "method=pca_uniform", "method.transform_rate=0.25",
                                   f"method.transform_checkpoint={trained / 'pca.safetensors'}"))
    [svd] = runner.run(compose_run(tmp_path, *task, "method=svd_weights", "method.transform_rate=0.5"))
    [full] = runner.run(compose_run(tmp_path, *task, "method=fullkv"))
    lm = runner._MODEL[next(iter(runner._MODEL))]
    ids = lm.tokenizer(TEXT, add_special_tokens=False).input_ids
    bases, _, _ = checkpoint.load(trained / "pca.safetensors")

    def pca_fold(layer, kind, weight):      # x^ = x U P U^-1, so W' = (U P U^-1)^T W
        u = bases[layer][kind].vectors.double()
        return (u @ torch.diag(prefix_mask(torch.tensor(8), 32, torch.float64)) @ torch.linalg.inv(u)).T @ weight

    def svd_fold(layer, kind, weight):      # the best rank-16 approximation of W
        left, s, right = torch.linalg.svd(weight, full_matrices=False)
        return left[:, :16] @ torch.diag(s[:16]) @ right[:16]

    assert math.isclose(pca["perplexity"], _folded_perplexity(lm, pca_fold, ids, 160, 64), rel_tol=1e-4)
    assert math.isclose(svd["perplexity"], _folded_perplexity(lm, svd_fold, ids, 160, 64), rel_tol=1e-4)
    assert pca["kv_retain_rate"] == 0.25 and svd["kv_retain_rate"] == 0.5 and pca["perplexity"] != full["perplexity"]
    assert "kv_retain_rate" not in full


def test_snapkv_plus_dynakv_keeps_one_token_set_per_layer_and_accounts_for_both(tmp_path, trained):
    ckpt = trained / "trained.safetensors"
    cfg = compose_run(tmp_path, "task=passkey", "task.context_lengths=[400]", "task.depths=[50]", "limit=1",
                      "methods=[dynakv,snapkv+dynakv]", "budgets=[64]", "save_kept_positions=true",
                      f"++method_overrides={{transform_checkpoint: '{ckpt}'}}")
    alone, stacked = runner.run(cfg)
    assert Path(stacked["folder"]).name == "snapkv_b64_w32_k7_maxpool_layer+dynakv_tau0.1_trained"
    [a] = results.read_predictions(Path(alone["folder"]))
    [s] = results.read_predictions(Path(stacked["folder"]))
    assert a["kv_retain_rate"] == s["kv_retain_rate"] < 1            # the same transform on the same prompt
    assert a["kv_combined_rate"] == a["kv_retain_rate"] and a["kv_bytes_latent"] < a["kv_bytes_full"]
    kept = torch.load(runner.kept_file(Path(stacked["folder"]), s["id"]))
    n = s["prompt_tokens"]
    for positions in kept.values():
        assert all(torch.equal(positions[0, 0], positions[0, h]) for h in range(positions.shape[1]))
        assert positions.shape[-1] == 64
    # the stored share is at most the kept tokens' share, and the latent bytes follow it
    assert 0 < s["kv_combined_rate"] <= 64 / n + 1e-9
    assert s["kv_bytes_latent"] == round(s["kv_combined_rate"] * s["kv_bytes_full"])
    assert s["kv_bytes_rank_metadata"] == 64 * 4 * 2 * accounting.RANK_BYTES   # 64 tokens, 4 layers, K and V
    assert sum(sum(h.values()) for h in s["kv_rank_histogram"].values()) == 2 * 4 * n


def test_row_accounting_recomputed_by_hand():
    log = TransformLog()
    g = torch.Generator().manual_seed(0)
    ranks = {(layer, kind): torch.randint(1, 9, (1, 10), generator=g) for layer in (0, 1) for kind in ("k", "v")}
    decode = {key: torch.randint(1, 9, (1, 1), generator=g) for key in ranks}
    for key in ranks:
        log.add(*key, ranks[key], 8)
    log.set_generated(0, {key: r.reshape(-1) for key, r in decode.items()})   # row 0: one generated token fed back
    keep = {0: torch.tensor([[[0, 3, 9], [3, 5, 9]]]), 1: None}     # layer 0: two heads, union {0, 3, 5, 9}
    report = {"layers": [{"layer": 0, "positions": keep[0]}, {"layer": 1, "positions": None}]}
    fields = accounting.row_fields(log, report, 10, 10, 2)
    union = [0, 3, 5, 9]
    stored = sum(int(ranks[(0, k)][0, union].sum()) for k in "kv") + sum(int(ranks[(1, k)].sum()) for k in "kv")
    assert fields["kv_combined_rate"] == round(stored / (2 * 10 * 16), 6)
    assert fields["kv_retain_rate"] == round(sum(int(r.sum()) for r in ranks.values()) / (2 * 10 * 16), 6)
    assert fields["kv_retain_rate_generated"] == round(sum(int(r.sum()) for r in decode.values()) / (4 * 8), 6)
    assert fields["kv_bytes_full"] == 2 * 10 * 16 * 2 and fields["kv_bytes_latent"] == stored * 2
    assert fields["kv_bytes_rank_metadata"] == (4 + 10) * 2 * accounting.RANK_BYTES
    assert accounting.row_fields(log, report, 10, 10, 2, row=1)["kv_retain_rate_generated"] is None  # no such row
    assert accounting.row_fields(log, report, 10, 10, 2, generated_tokens=1)["kv_retain_rate_generated"] > 0
    with pytest.raises(RuntimeError, match="generated tokens of layer 0 .k., not 2: a decode step bypassed it"):
        accounting.row_fields(log, report, 10, 10, 2, generated_tokens=2)
    assert accounting.row_fields(log, report, 10, 10, 2, per_token_ranks=False)["kv_bytes_rank_metadata"] == 0
    # layer 1 slides over a window of 5 (its cache holds the last 4 tokens), as Gemma 3's local layers do
    slid = accounting.row_fields(log, report, 10, 10, 2, sliding={1: 4})
    stored_slid = sum(int(ranks[(0, k)][0, union].sum()) + int(ranks[(1, k)][0, 6:].sum()) for k in "kv")
    assert slid["kv_combined_rate"] == round(stored_slid / (2 * 10 * 8 + 2 * 4 * 8), 6)
    assert slid["kv_bytes_full"] == (2 * 10 * 8 + 2 * 4 * 8) * 2 and slid["kv_retain_rate"] == fields["kv_retain_rate"]
    with pytest.raises(RuntimeError, match="not applied to the whole prompt"):
        accounting.row_fields(log, report, 12, 12, 2)


def test_transform_settings_fail_before_the_model_loads(tmp_path, trained):
    plan = lambda *o: runner.plan(compose_run(tmp_path, "task=passkey", *o))   # noqa: E731
    assert "choose from" in user_error(lambda: plan("methods=[snapkv+nosuch]"))
    assert "is not a K/V transform" in user_error(lambda: plan("methods=[snapkv+h2o]"))
    assert "is not an eviction method" in user_error(lambda: plan("methods=[fullkv+dynakv]"))
    assert "no DynaKV checkpoint is shipped for model tiny_llama" in user_error(lambda: plan("method=dynakv"))
    assert "transform_rate=1.5" in user_error(lambda: plan("method=pca_uniform", "method.transform_rate=1.5",
                                                           f"method.transform_checkpoint={trained / 'pca.safetensors'}"))
    assert "reads no checkpoint" in user_error(lambda: plan("method=svd_weights", "method.transform_checkpoint=x.safetensors"))
    assert "is not one of" in user_error(lambda: plan("method=snapkv", "method.transform=bogus"))
    assert "needs trained gates" in str(pytest.raises(ConfigError, lambda: checkpoint.transforms_for(
        {"transform": "dynakv", "transform_tau": 0.1}, runner._MODEL[next(iter(runner._MODEL))].model,
        trained / "pca.safetensors")).value) if runner._MODEL else True
    assert "runs FullKV or a K/V transform alone" in user_error(lambda: plan(
        "task=perplexity", f"task.text_path={ROOT / 'README.md'}", "methods=[snapkv+dynakv]"))


def test_identities_stored_before_the_transform_knobs_still_resume():
    stored = {"method": {"name": "snapkv", "budget": 64}}
    current = {"method": {"name": "snapkv", "budget": 64, "transform": None, "transform_rate": None,
                          "transform_eta": None, "transform_tau": None, "transform_checkpoint": None}}
    assert identity.differences(stored, current) == []
    assert identity.differences(stored, {**current, "method": {**current["method"], "transform": "dynakv"}})


def test_the_shipped_checkpoint_is_a_trained_smollm2_one_with_its_record():
    path = checkpoint.resolve("auto", "smollm2_135m")
    bases, gates, manifest = checkpoint.load(path)
    assert sorted(bases) == list(range(30)) and sorted(gates) == list(range(30))
    assert bases[0]["k"].vectors.shape == (192, 192) and manifest["dtype"] == "float16"
    assert manifest["model"]["name"] == "smollm2_135m" and manifest["training"]["alpha"] == 1.0
    assert 0.45 < manifest["measured"]["retain_rate"] < 0.55     # docs/DYNAKV.md: 51.3 % on WikiText-2
    assert json.loads(path.with_suffix(".json").read_text()) == manifest


def test_checkpointed_training_gives_the_gradients_of_plain_training(trained):
    """Gates and, with a trained basis (each reconstruction), U: the same gradients with and without gradient
    checkpointing (its recomputation sees the step's U and U^-1)."""
    from harness.dynakv.train import fresh_transforms
    from harness.engine.posttrain import gate_parameters, learning_bases, objective
    from methods.lowrank import TokenGate
    bases, _, _ = checkpoint.load(trained / "pca.safetensors")
    lm = runner._MODEL.get(next(iter(runner._MODEL), None)) if runner._MODEL else None
    if lm is None or lm.name != "tiny_llama":
        from omegaconf import OmegaConf

        from harness import config
        from harness.engine.models import load_model
        lm = load_model(OmegaConf.create(OmegaConf.to_container(config.compose(["model=tiny_llama"]).model,
                                                                  resolve=True)))
    ids = torch.randint(2, 258, (2, 64), generator=torch.Generator().manual_seed(1))
    for basis, reconstruction in (("frozen", "inverse"), ("train", "inverse"), ("train", "transpose")):
        grads = []
        for checkpointing in (False, True):
            transforms = fresh_transforms(bases, reconstruction=reconstruction)
            for pair in transforms.values():
                for t in pair.values():
                    with torch.no_grad():
                        t.gate.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
            if checkpointing:
                lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                lm.model.train()
            lm.model.requires_grad_(False)
            try:
                with learning_bases(transforms, basis) as basis_params:
                    objective(lm.model, transforms, ids, alpha=3.0, backward=True)
                    grads.append([p.grad.clone() for p in gate_parameters(transforms) + basis_params])
            finally:
                lm.model.gradient_checkpointing_disable()
                lm.model.eval()
                lm.model.requires_grad_(True)
        assert len(grads[0]) == 4 * 2 * (2 if basis == "frozen" else 3), basis     # 4 layers, K and V
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads)), (basis, reconstruction)
        assert all(g.abs().sum() > 0 for g in grads[0]), (basis, reconstruction)      # every gate and U learns
    assert isinstance(fresh_transforms(bases)[0]["k"].gate, TokenGate)


def test_method_overrides_of_transform_knobs_leave_methods_without_one_alone(tmp_path, trained):
    job = runner.plan(compose_run(tmp_path, "task=passkey", "methods=[fullkv,snapkv,snapkv+dynakv]", "budgets=[64]",
                                  f"++method_overrides={{transform_tau: 0.2, transform_checkpoint: "
                                  f"'{trained / 'trained.safetensors'}'}}"))
    names = sorted(c.method_name for c in job.compressors)
    assert names == ["fullkv", "snapkv", "snapkv+dynakv"]
    stacked = next(c for c in job.compressors if c.transform)
    assert stacked.transform_tau == 0.2 and stacked.granularity == "layer"
    assert all(c.transform is None for c in job.compressors if c is not stacked)


def test_under_a_split_scope_each_stacked_method_accounts_for_its_own_appended_question(tmp_path, trained):
    common = ["task=passkey", "task.context_lengths=[400]", "task.depths=[50]", "limit=1",
              "protocol.compression_scope=context", "methods=[snapkv+energy]",
              f"++method_overrides={{transform_eta: 0.9, transform_checkpoint: '{trained / 'pca.safetensors'}', "
              "window_size: 8}"]
    together = runner.run(compose_run(tmp_path / "together", *common, "budgets=[16,128]"))
    alone = [runner.run(compose_run(tmp_path / f"alone{b}", *common, f"budgets=[{b}]"))[0] for b in (16, 128)]
    for shared, single in zip(together, alone):
        [a] = results.read_predictions(Path(shared["folder"]))
        [b] = results.read_predictions(Path(single["folder"]))
        assert a["compressed_tokens"] < a["prompt_tokens"]
        for key in ("kv_retain_rate", "kv_combined_rate", "kv_bytes_latent", "kv_rank_histogram"):
            assert a[key] == b[key], key


def test_attaching_transforms_hands_the_decoder_their_log_and_detaches_on_exit(tiny):
    from harness.engine.batched import TRANSFORMS_ATTACHED, transform_log
    from harness.engine.transform import transformed
    with transformed(tiny.model, {}) as log:
        assert transform_log(tiny.model) is log
    assert not hasattr(tiny.model, TRANSFORMS_ATTACHED) and transform_log(tiny.model) is None


def test_kvh_dynakv_refuses_bad_input_in_one_line_before_the_model_loads(tmp_path, trained, capsys, monkeypatch):
    from harness import cli
    from harness.engine import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    text = str(trained / "text.txt")
    cases = [
        (["calibrate", "--model", "tiny_llama", "--text", str(tmp_path / "nope.txt"), "--out", "x.safetensors"],
         "no such file or folder"),
        (["calibrate", "--model", "tiny_llama", "--text", text, "--tokens", "0", "--out", "x.safetensors"],
         "--tokens 0 must be >= 1"),
        (["train", "--model", "tiny_llama", "--init", str(trained / "pca.safetensors"), "--text", text,
          "--alpha", "-1", "--out", "x.safetensors"], "--alpha -1.0 must be >= 0"),
        (["train", "--model", "tiny_llama", "--init", str(trained / "pca.safetensors"), "--text", text,
          "--alpha", "1", "--lr", "0", "--out", "x.safetensors"], "--lr 0.0 must be > 0"),
        (["train", "--model", "tiny_llama", "--init", str(trained / "pca.safetensors"), "--text", text,
          "--alpha", "1", "--fsdp", "--out", "x.safetensors"], "--fsdp shards the backbone over torchrun ranks"),
        (["train", "--model", "tiny_llama", "--init", "auto", "--text", text, "--alpha", "1",
          "--out", "x.safetensors"], "--init=auto: no DynaKV checkpoint is shipped for model tiny_llama"),
        (["train", "--model", "tiny_llama", "--init", str(checkpoint.shipped("smollm2_135m")), "--text", text,
          "--alpha", "1", "--out", "x.safetensors"], "was made from other weights"),
        (["ranks", "--model", "tiny_llama", "--checkpoint", str(trained / "pca.safetensors"), "--text", text,
          "--out", "x.png"], "holds only PCA bases"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["dynakv", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err
