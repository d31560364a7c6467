"""Training DynaKV's basis U with the gates (reference-dynakv.md section 2.1: PCA-initialised, then trained):
``basis="train"`` with each ``reconstruction`` (``inverse``: a free U and ``torch.linalg.inv``; ``transpose``: an
orthogonal U), ``basis="frozen"`` leaving U bit-identical, the checkpoint round trip (the trained U and the
reconstruction it was trained with), and ``kvh dynakv train --basis/--reconstruction``. Tiny random models; every
check is a value: the objective, U's movement, ``U^T U``, the model reproduced at full rate, equal outputs."""

import json

import pytest
import torch

from harness.dynakv import checkpoint
from harness.dynakv import cli as dynakv_cli
from harness.dynakv.train import calibrate, fresh_transforms, train
from harness.engine.posttrain import objective, post_train
from harness.engine.transform import transformed
from methods import ConfigError
from methods.lowrank import TokenGate

from conftest import make_model, random_ids, tiny_config

TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen liquor jugs.\n\n") * 24


@pytest.fixture(scope="module")
def lm():
    return make_model(tiny_config())


@pytest.fixture(scope="module")
def bases(lm):
    windows = torch.cat([random_ids(128, seed=s) for s in range(4)])
    return calibrate(lm.model, windows)


def vectors_of(transforms):
    return {(layer, kind): t.basis.vectors.clone() for layer, pair in transforms.items() for kind, t in pair.items()}


@pytest.mark.parametrize("reconstruction", ["inverse", "transpose"])
def test_training_the_basis_lowers_the_objective_moves_u_and_still_reproduces_the_model_at_full_rate(
        lm, bases, reconstruction):
    transforms = fresh_transforms(bases, reconstruction=reconstruction)
    pca = vectors_of(transforms)
    calibration = {(layer, kind): b.vectors.clone() for layer, pair in bases.items() for kind, b in pair.items()}
    batches = [random_ids(64, seed=10 + s) for s in range(4)]
    _, before = objective(lm.model, transforms, batches[0], alpha=2.0)
    history = post_train(lm.model, transforms, batches, alpha=2.0, steps=15, lr=0.05, basis="train", basis_lr=0.01)
    _, after = objective(lm.model, transforms, batches[0], alpha=2.0)
    assert after["loss"] < before["loss"] - 0.05 and len(history) == 15
    eye = torch.eye(32)
    for key, u in vectors_of(transforms).items():
        assert (u - pca[key]).abs().max() > 1e-3, key                     # U moved from its PCA init
        assert torch.equal(bases[key[0]][key[1]].vectors, calibration[key])  # the calibration's bases untouched
        off = (u.T @ u - eye).abs().max()
        assert off < 1e-5 if reconstruction == "transpose" else off > 1e-3, (key, float(off))
        t = transforms[key[0]][key[1]]
        assert t.learned_basis is None and not u.requires_grad and t.reconstruction == reconstruction
        if reconstruction == "inverse":                                 # the trained U's inverse, not a stale one
            assert torch.equal(t._inverse(), torch.linalg.inv(t.basis.vectors))
    for pair in transforms.values():                                       # gates that keep every dimension
        for t in pair.values():
            t.gate = TokenGate(32)
    ids = random_ids(48, seed=3)
    reference = lm.model(ids).logits
    with transformed(lm.model, transforms) as log:
        logits = lm.model(ids).logits
    assert log.retain_rate() == 1.0
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)   # x U U^-1 = x: the model itself
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    out, ranks = transforms[1]["v"].apply(x)
    assert (ranks == 32).all()
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_a_frozen_basis_stays_bit_identical(lm, bases):
    windows = torch.cat([random_ids(64, seed=20 + s) for s in range(4)])
    for run in (lambda t: post_train(lm.model, t, list(windows.split(2)), alpha=2.0, steps=3, lr=0.05),
                lambda t: train(lm.model, t, windows, alpha=2.0, steps=3, batch_size=2, lr=0.05, basis="frozen")):
        transforms = fresh_transforms(bases)
        pca = vectors_of(transforms)
        gate = transforms[0]["k"].gate.weight.clone()
        history = run(transforms)
        assert "basis_lr" not in history[-1]
        assert not torch.equal(transforms[0]["k"].gate.weight, gate)      # the gates did train
        for (layer, kind), u in pca.items():
            assert torch.equal(transforms[layer][kind].basis.vectors, u), (layer, kind)
    with pytest.raises(ValueError, match=r"basis='bogus' is not one of \('frozen', 'train'\)"):
        train(lm.model, fresh_transforms(bases), windows, alpha=1.0, steps=1, basis="bogus")


@pytest.mark.parametrize("reconstruction", ["inverse", "transpose"])
def test_a_saved_trained_basis_loads_to_the_same_ranks_and_outputs(lm, bases, tmp_path, reconstruction):
    transforms = fresh_transforms(bases, reconstruction=reconstruction)
    windows = torch.cat([random_ids(64, seed=30 + s) for s in range(4)])
    history = train(lm.model, transforms, windows, alpha=20.0, steps=40, batch_size=2, lr=0.05, basis="train",
                    basis_lr=0.005)
    assert history[0]["basis_lr"] == 0.0025 and history[-1]["basis_lr"] == 0.005   # warmed up (2 steps) as the gates
    trained_bases = {layer: {kind: t.basis for kind, t in pair.items()} for layer, pair in transforms.items()}
    gates = {layer: {kind: t.gate for kind, t in pair.items()} for layer, pair in transforms.items()}
    path = checkpoint.save(tmp_path / "trained.safetensors", trained_bases,
                           {"basis": "trained", "reconstruction": reconstruction}, gates)
    knobs = {"transform": "dynakv", "transform_tau": 0.1}
    loaded = checkpoint.transforms_for(knobs, lm.model, path)
    ids = random_ids(80, seed=5)
    runs = []
    for ts in (transforms, loaded):
        with transformed(lm.model, ts) as log:
            runs.append((lm.model(ids).logits, log))
    (memory, memory_log), (disk, disk_log) = runs
    assert set(memory_log.calls) == set(disk_log.calls) and 0 < disk_log.retain_rate() < 1
    for key in memory_log.calls:
        assert torch.equal(torch.cat(memory_log.calls[key]), torch.cat(disk_log.calls[key])), key
    assert torch.equal(memory, disk)
    for layer, pair in loaded.items():
        for kind, t in pair.items():
            assert t.reconstruction == reconstruction
            assert torch.equal(t.basis.vectors, transforms[layer][kind].basis.vectors)
            assert torch.equal(t.basis.eigenvalues, bases[layer][kind].eigenvalues.float())   # the calibration's
    other = "inverse" if reconstruction == "transpose" else "transpose"
    with pytest.raises(ConfigError, match=f"transform_reconstruction='{other}', but .* was trained with "
                                          f"reconstruction='{reconstruction}'.*fix: transform_reconstruction="):
        checkpoint.transforms_for({**knobs, "transform_reconstruction": other}, lm.model, path)
    assert checkpoint.transforms_for({"transform": "pca_uniform", "transform_rate": 0.5}, lm.model,
                                     path)[0]["k"].reconstruction == reconstruction


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("basis")
    (folder / "text.txt").write_text(TEXT)
    dynakv_cli.main(["calibrate", "--model", "tiny_llama", "--text", str(folder / "text.txt"), "--tokens", "1024",
                     "--seq-len", "128", "--out", str(folder / "pca.safetensors")])
    return folder


def test_kvh_dynakv_train_basis_train_records_and_saves_the_trained_basis(calibrated, capsys):
    folder = calibrated
    dynakv_cli.main(["train", "--model", "tiny_llama", "--init", str(folder / "pca.safetensors"), "--text",
                     str(folder / "text.txt"), "--tokens", "1024", "--seq-len", "128", "--alpha", "20", "--steps", "8",
                     "--batch-size", "2", "--lr", "0.05", "--basis", "train", "--basis-lr", "0.002",
                     "--reconstruction", "transpose", "--eval-text", str(folder / "text.txt"), "--eval-tokens", "256",
                     "--no-wandb", "--out", str(folder / "trained.safetensors")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bases, gates, manifest = checkpoint.load(folder / "trained.safetensors")
    pca, _, _ = checkpoint.load(folder / "pca.safetensors")
    assert manifest["basis"] == "trained" and manifest["reconstruction"] == "transpose"
    assert manifest["training"]["basis"] == "trained (from --init's)" and manifest["training"]["basis_lr"] == 0.002
    assert printed["last"]["basis_lr"] == 0.002 and 0 < manifest["measured"]["retain_rate"] <= 1
    for layer in pca:
        for kind in ("k", "v"):
            u = bases[layer][kind].vectors
            assert (u - pca[layer][kind].vectors).abs().max() > 1e-4                 # trained ...
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[0]), rtol=0, atol=1e-5)   # ... and orthogonal
            assert torch.equal(bases[layer][kind].eigenvalues, pca[layer][kind].eigenvalues)
    with pytest.raises(ConfigError, match="holds a basis trained with reconstruction 'transpose', not "
                                          "--reconstruction inverse; fix: --reconstruction transpose"):
        dynakv_cli.main(["train", "--model", "tiny_llama", "--init", str(folder / "trained.safetensors"), "--text",
                         str(folder / "text.txt"), "--alpha", "1", "--out", str(folder / "again.safetensors")])


def test_kvh_dynakv_train_refuses_a_bad_basis_option_in_one_line_before_the_model_loads(calibrated, capsys,
                                                                                          monkeypatch):
    from harness import cli
    from harness.engine import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    common = ["dynakv", "train", "--model", "tiny_llama", "--init", str(calibrated / "pca.safetensors"), "--text",
              str(calibrated / "text.txt"), "--alpha", "1", "--out", "x.safetensors"]
    cases = [(["--basis", "bogus"], "error: kvh dynakv train: argument --basis: invalid choice: 'bogus' (choose from "
                                    "'frozen', 'train')"),
             (["--reconstruction", "pinv"], "argument --reconstruction: invalid choice: 'pinv'"),
             (["--basis", "train", "--basis-lr", "0"], "error: --basis-lr 0.0 must be > 0")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main([*common, *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_.value.code == 2 and len(err) == 1 and message in err[0], (extra, err)


def _data_parallel_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        lm = make_model(tiny_config())
        transforms = fresh_transforms(calibrate(lm.model, torch.cat([random_ids(128, seed=s) for s in range(4)])))
        windows = torch.cat([random_ids(64, seed=40 + s) for s in range(8)])
        train(lm.model, transforms, windows, alpha=2.0, steps=4, batch_size=2, lr=0.05, basis="train", basis_lr=0.01)
        torch.save({"bases": vectors_of(transforms), "gate": transforms[2]["v"].gate.weight.detach()},
                   f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_under_data_parallelism_every_rank_trains_the_same_basis(lm, bases, tmp_path):
    """Two gloo ranks, each on its own share of the windows: U (and the gates) stay identical on both, which they
    do only if U's gradients are averaged too; and U moved."""
    import torch.multiprocessing as mp
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["gate"], ranks[1]["gate"])
    pca = vectors_of(fresh_transforms(bases))
    for key, u in ranks[0]["bases"].items():
        assert torch.equal(u, ranks[1]["bases"][key]), key
        assert (u - pca[key]).abs().max() > 1e-3, key
