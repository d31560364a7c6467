"""Data-parallel runs: torchrun with 2 CPU processes (gloo) equals one process; parts resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.run import distributed, results

from conftest import ROOT

ARGS = ["model=tiny_llama", "task=passkey", "task.context_lengths=[400,500]", "task.depths=[0,50,100]",
        "task.max_new_tokens=4", "methods=[fullkv,snapkv]", "budgets=[64]", "wandb=false", "threads=1"]


def harness(results_dir, nproc: int):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
              str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*prefix, "-m", "harness", *ARGS, f"results_dir={results_dir}",
                          f"hydra.run.dir={results_dir}/hydra"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def lines(folder: Path) -> list[str]:
    return (folder / results.PREDICTIONS).read_text().splitlines()


def strip_timing(line: str) -> dict:
    row = json.loads(line)
    row.pop("seconds")
    return row


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    harness(tmp_path / "one", 1)
    harness(tmp_path / "two", 2)
    for run in ("fullkv", "snapkv_b64_w32_k7_maxpool_qh"):
        one = tmp_path / "one" / "passkey" / "tiny_llama" / "default" / run
        two = tmp_path / "two" / "passkey" / "tiny_llama" / "default" / run
        assert [strip_timing(x) for x in lines(one)] == [strip_timing(x) for x in lines(two)]   # same order too
        assert not list(two.glob("*.part"))
        assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
        assert json.loads((two / "scores.json").read_text())["samples"] == 6


def test_parts_of_a_killed_rank_count_as_done_and_merge(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [{"id": f"s{i}", "pred": str(i), "score": 1.0} for i in range(5)]
    (folder / "predictions.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (folder / "predictions.jsonl.rank1.part").write_text(
        json.dumps(rows[3]) + "\n" + json.dumps(rows[1]) + "\n" + '{"id": "s4", "pr')   # killed mid-write
    (folder / "predictions.jsonl.rank0.part").write_text(json.dumps(rows[2]) + "\n" + json.dumps(rows[0]) + "\n")
    done = {r["id"] for r in results.read_predictions(folder) + distributed.read_parts(folder)}
    assert done == {"s0", "s1", "s2", "s3"}                      # s4 was cut short: it runs again
    assert set(results.finished(folder)) == {(None, f"s{i}") for i in range(4)}
    distributed.merge(folder, {(None, f"s{i}"): i for i in range(5)})
    assert [json.loads(x)["id"] for x in lines(folder)] == ["s0", "s1", "s2", "s3"]   # sorted, s0 once
    assert not list(folder.glob("*.part"))


def test_world_defaults_to_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world() == (0, 1)


def test_multirun_two_methods_by_two_budgets_gives_four_runs_and_one_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "-m", "model=tiny_llama", "method=snapkv,streamingllm",
                          "method.budget=48,64", "task.context_lengths=[400]", "task.depths=[50]",
                          "task.max_new_tokens=3", "wandb=false", f"results_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from harness.report.summary import find_runs, passkey_table
    runs = find_runs([tmp_path / "passkey", tmp_path / "passkey" / "tiny_llama"])   # overlapping roots: counted once
    assert sorted(r.name for r in runs) == ["snapkv_b48_w32_k7_maxpool_qh", "snapkv_b64_w32_k7_maxpool_qh",
                                            "streamingllm_b48_sink4_qh",
                                            "streamingllm_b64_sink4_qh"]
    header, rows = passkey_table(runs)
    assert len(rows) == 4 and all(row[-1] == 1 for row in rows)


def test_slurm_launcher_config_composes_without_a_cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    out = subprocess.run([sys.executable, "-m", "harness", "hydra/launcher=slurm", "model=llama3", "task=longbench",
                          "--cfg", "hydra"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SlurmLauncher" in out.stdout and "gpus_per_node: 1" in out.stdout


def test_ray_launcher_config_composes_without_a_cluster():
    pytest.importorskip("hydra_plugins.hydra_ray_launcher",
                        reason="hydra-ray-launcher not installed (pip install 'kv-harness[ray]': it brings ray)")
    out = subprocess.run([sys.executable, "-m", "harness", "hydra/launcher=ray_cluster", "--cfg", "hydra"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "RayLauncher" in out.stdout


@pytest.mark.slow
def test_rerun_after_a_killed_rank_keeps_its_finished_samples(tmp_path):
    """A previous torchrun left rank 1's part file with two finished samples (and a line cut by the
    kill); the next torchrun does only the rest and merges everything in sample order."""
    harness(tmp_path, 1)
    folder = tmp_path / "passkey" / "tiny_llama" / "default" / "fullkv"
    finished = {json.loads(x)["id"]: json.loads(x) for x in lines(folder)}
    (folder / "predictions.jsonl").unlink()
    (folder / "scores.json").unlink()
    kept = [finished["len400_depth50_r0"] | {"pred": "FROM THE KILLED RUN"},
            finished["len500_depth0_r0"] | {"pred": "FROM THE KILLED RUN"}]
    (folder / "predictions.jsonl.rank1.part").write_text(
        "".join(json.dumps(r) + "\n" for r in kept) + '{"id": "len500_depth100_r0", "pr')
    harness(tmp_path, 2)
    rows = [json.loads(x) for x in lines(folder)]
    assert [r["id"] for r in rows] == [f"len{n}_depth{d}_r0" for n in (400, 500) for d in (0, 50, 100)]
    assert [r["id"] for r in rows if r["pred"] == "FROM THE KILLED RUN"] == [k["id"] for k in kept]
    assert not list(folder.glob("*.part"))
    assert (folder / "predictions.jsonl.rank1.part.bad").read_text() == '{"id": "len500_depth100_r0", "pr\n'
    assert len(json.loads((folder / "manifest.json").read_text())["sessions"]) == 2
