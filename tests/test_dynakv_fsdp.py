"""FSDP for DynaKV's training (reference-dynakv.md section 10: an 8B backbone sharded over GPUs): two gloo ranks
on the CPU, the frozen backbone sharded by ``shard_backbone`` (FSDP2), train the same gates as the same two ranks
with the backbone copied on each (the data-parallel path), while each rank holds half the weights."""

import pytest
import torch

from harness.dynakv.train import calibrate, fresh_transforms, shard_backbone, train

from conftest import make_model, random_ids, tiny_config


def _worker(rank: int, world: int, rendezvous: str, out: str, fsdp: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        lm = make_model(tiny_config())
        transforms = fresh_transforms(calibrate(lm.model, torch.cat([random_ids(128, seed=s) for s in range(4)])))
        weight = lm.model.model.layers[0].mlp.gate_proj.weight
        full_rows = weight.shape[0]
        if fsdp:
            assert shard_backbone(lm.model) == len(lm.model.model.layers)
            weight = lm.model.model.layers[0].mlp.gate_proj.weight
            assert weight.to_local().shape[0] == full_rows // world        # each rank holds its half
        windows = torch.cat([random_ids(64, seed=40 + s) for s in range(8)])
        history = train(lm.model, transforms, windows, alpha=2.0, steps=4, batch_size=2, lr=0.05,
                        checkpointing=fsdp)
        torch.save({"gates": {(layer, kind): t.gate.weight.detach().clone() for layer, pair in transforms.items()
                              for kind, t in pair.items()}, "loss": [h["loss"] for h in history]},
                   f"{out}/{'fsdp' if fsdp else 'ddp'}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_a_sharded_backbone_trains_the_same_gates_as_a_copied_one(tmp_path):
    import torch.multiprocessing as mp
    for fsdp in (False, True):
        mp.spawn(_worker, args=(2, str(tmp_path / f"rendezvous{fsdp}"), str(tmp_path), fsdp), nprocs=2)
    runs = {name: torch.load(tmp_path / f"{name}.pt") for name in ("ddp0", "ddp1", "fsdp0", "fsdp1")}
    assert runs["fsdp0"]["loss"] == pytest.approx(runs["ddp0"]["loss"], rel=1e-5)
    for key, gate in runs["ddp0"]["gates"].items():
        torch.testing.assert_close(runs["fsdp0"]["gates"][key], gate, rtol=1e-4, atol=1e-5)
        assert torch.equal(runs["fsdp0"]["gates"][key], runs["fsdp1"]["gates"][key])   # ranks agree
        assert not torch.equal(gate, torch.zeros_like(gate))                            # the gates learnt



def test_kvh_dynakv_train_fsdp_under_torchrun_saves_and_measures_with_every_rank(tmp_path):
    """The command as a user runs it: torchrun with 2 CPU ranks, --fsdp and --eval-text (every rank takes part in
    the measuring forwards of the sharded model, rank 0 writes): the checkpoint records FSDP, 2 ranks and the
    measured rate, and its gates equal those of the same command without --fsdp (the data-parallel path)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from harness.dynakv import checkpoint
    from harness.dynakv import cli as dynakv_cli
    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen jugs.\n") * 40)
    dynakv_cli.main(["calibrate", "--model", "tiny_llama", "--text", str(text), "--tokens", "2048", "--seq-len", "128",
                     "--out", str(tmp_path / "pca.safetensors")])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    gates = {}
    for port, fsdp in ((29300 + os.getpid() % 500, True), (29900 + os.getpid() % 500, False)):
        out = tmp_path / f"g{int(fsdp)}.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "harness", "dynakv", "train", "--model", "tiny_llama", "--init", str(tmp_path / "pca.safetensors"),
               "--text", str(text), "--tokens", "2048", "--seq-len", "128", "--alpha", "5", "--steps", "3",
               "--batch-size", "2", "--lr", "0.05", "--eval-text", str(text), "--eval-tokens", "512", "--no-wandb",
               "--out", str(out), *(["--fsdp"] if fsdp else [])]
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        manifest = json.loads(out.with_suffix(".json").read_text())
        assert manifest["training"]["fsdp"] is fsdp and manifest["training"]["world_size"] == 2
        assert 0 < manifest["measured"]["retain_rate"] <= 1 and manifest["measured"]["tokens"] == 512
        gates[fsdp] = checkpoint.load(out)[1]
    for layer, pair in gates[False].items():
        for kind, gate in pair.items():
            for name, tensor in gate.state_dict().items():
                torch.testing.assert_close(gates[True][layer][kind].state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
