"""W&B logging (harness.report.wandb_log and wandb_runs, the runner's log_to_wandb, ``kvh heatmap --wandb``), offline, read back
from the ``.wandb`` files wandb writes: groups, job types, tags, config, one run per results folder across re-runs,
the results artifact, figures in their own run, one wandb directory, and never failing a run."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import harness.run.runner as runner
from harness import cli
from harness.report import heatmap, wandb_log, wandb_runs
from harness.run import results

from conftest import ROOT

CONF = str(ROOT / "conf")
NEEDLE = ["task=needle", "task.context_lengths=[600]", "task.depths=[0,100]", "task.max_new_tokens=3"]
PASSKEY = ["task=passkey", "task.context_lengths=[400]", "task.depths=[50]", "task.max_new_tokens=3"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline W&B with its home folders in ``tmp_path``, no WANDB_DIR, the working directory ``tmp_path``."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config(results_dir: Path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny_llama", f"results_dir={results_dir}", "wandb=true",
                                                        *overrides])


# ------------------------------------------------------------------------------------------------
# reading an offline run back: the .wandb file is a LevelDB-style log of protobuf records
# ------------------------------------------------------------------------------------------------

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def records(path: Path):
    """The ``wandb_internal_pb2.Record``s of a ``.wandb`` file (wandb's datastore format: a 7-byte file header
    ``:W&B``, then 32 KiB blocks of chunks, each with a 7-byte header: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2
    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:   # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        pos += HEADER
        if kind == 0 and length == 0:
            pos += left - HEADER
            continue
        chunks += data[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def finished_records(run_dir: Path, wait_s: float = 30.0) -> list:
    """The records of a finished run's ``.wandb`` file; wandb's service writes it in the background, so this
    waits (up to ``wait_s``) for the run's exit record."""
    (path,) = Path(run_dir).glob("*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def read_run(run_dir: Path) -> dict:
    """One offline run: its run record, config, history keys (with the fields of a logged media value),
    summary keys and ``results`` artifacts."""
    out = {"config": {}, "history": {}, "summary": set(), "artifacts": [], "dir": Path(run_dir)}
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or item.nested_key[0]
                out["history"].setdefault(key, {})
                if item.nested_key[1:]:
                    out["history"][key][".".join(item.nested_key[1:])] = json.loads(item.value_json)
        elif kind == "summary":
            out["summary"] |= {item.key or item.nested_key[0] for item in record.summary.update}
        elif kind == "artifact" and record.artifact.type == "results":   # not the tables' own artifacts
            out["artifacts"].append(record.artifact)
    return out


def offline_runs(results_dir: Path) -> list[dict]:
    """Every offline run under ``<results_dir>/wandb`` (the default wandb_dir), oldest first."""
    return [read_run(d) for d in sorted((results_dir / "wandb").glob("offline-run-*"))]


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


# ------------------------------------------------------------------------------------------------
# through the runner
# ------------------------------------------------------------------------------------------------

def test_a_job_logs_one_grouped_run_per_folder_with_artifact_and_heatmap(offline):
    results_dir = offline / "results"
    summaries = runner.run(config(results_dir, *NEEDLE, "methods=[fullkv,snapkv]", "budgets=[64]", "wandb_tags=[mine]"))
    folders = {Path(s["folder"]).name: Path(s["folder"]) for s in summaries}
    runs = offline_runs(results_dir)
    assert len(runs) == 2 and not list(offline.glob("wandb")) and not list(folders["fullkv"].glob("wandb"))
    by_name = {r["run"].display_name: r for r in runs}
    assert set(by_name) == {"tiny_llama/fullkv", "tiny_llama/snapkv_b64_w32_k7_maxpool_qh"}
    groups = {r["run"].run_group for r in runs}
    assert len(groups) == 1 and groups != {""}                 # both methods of the job: one group
    group = groups.pop()

    snap = by_name["tiny_llama/snapkv_b64_w32_k7_maxpool_qh"]
    folder = folders["snapkv_b64_w32_k7_maxpool_qh"]
    assert snap["run"].job_type == "needle" and snap["run"].project == "kv-harness"
    assert set(snap["run"].tags) == {"tiny_llama", "snapkv", "budget:64", "protocol:default", "decode:batched", "mine"}
    assert set(by_name["tiny_llama/fullkv"]["run"].tags) == {"tiny_llama", "fullkv", "protocol:default",
                                                             "decode:batched", "mine"}
    cfg = snap["config"]
    assert cfg["folder"] == str(folder) and cfg["wandb_group"] == group and cfg["wandb_tags"] == ["mine"]
    assert cfg["method"]["name"] == "snapkv" and cfg["method"]["budget"] == 64
    assert cfg["model"]["name"] == "tiny_llama" and cfg["task"]["name"] == "needle"
    assert cfg["wandb_dir"] == str(results_dir)
    assert "score/needle" in snap["summary"]

    (artifact,) = snap["artifacts"]
    assert artifact.type == "results" and artifact.name == "needle-tiny_llama-default-snapkv_b64_w32_k7_maxpool_qh"
    contents = {c.path: c.digest for c in artifact.manifest.contents}
    assert set(contents) == {"predictions.jsonl", "scores.json", "manifest.json"}
    assert all(digest == md5_b64(folder / name) for name, digest in contents.items())

    assert snap["history"]["heatmap"]["_type"] == "image-file"        # the run's own figure, in its run
    assert (folder / "figures" / "heatmap.png").stat().st_size > 5_000
    assert {"predictions", "scores", "summary_table"} <= set(snap["history"])
    stored = wandb_runs.stored_run(folder)
    assert stored["id"] == snap["run"].run_id and stored["group"] == group


def test_a_rerun_resumes_the_folders_run_and_kvh_heatmap_logs_into_it(offline, capsys):
    results_dir = offline / "results"
    overrides = [*PASSKEY, "task.depths=[10,50]", "methods=[fullkv,snapkv]", "budgets=[64]"]
    first = runner.run(config(results_dir, *overrides, "wandb_group=first", "limit=1"))
    ids = {s["folder"]: wandb_runs.stored_run(Path(s["folder"]))["id"] for s in first}
    runner.run(config(results_dir, *overrides, "wandb_group=again"))   # the rest of the samples: logged again
    runner.run(config(results_dir, *overrides, "wandb_group=third"))   # nothing new: the W&B runs are left alone
    runs = offline_runs(results_dir)
    assert len(runs) == 4 and len({r["dir"] for r in runs}) == 4 and all(r["run"].resume for r in runs)
    sessions = {run_id: sorted(r["run"].run_group for r in runs if r["run"].run_id == run_id) for run_id in ids.values()}
    assert sessions == {run_id: ["again", "first"] for run_id in ids.values()}   # each folder: one run, logged twice
    assert all(r["config"]["wandb_group"] == r["run"].run_group for r in runs)

    capsys.readouterr()
    heatmap.main([str(results_dir / "passkey"), "--out", str(offline / "figures"), "--wandb"])
    printed = [line.removeprefix("wandb: ") for line in capsys.readouterr().out.splitlines() if line.startswith("wandb:")]
    logged = [read_run(Path(d)) for d in printed]
    assert len(logged) == 3
    per_folder, panel = logged[:2], logged[2]
    assert sorted(r["run"].run_id for r in per_folder) == sorted(ids.values())   # into each folder's own run
    assert all("heatmap" in r["history"] and r["run"].run_group == "again" for r in per_folder)
    assert {r["run"].job_type for r in per_folder} == {"passkey"}
    assert panel["run"].job_type == "figures" and panel["run"].run_group == "again"
    assert "panel" in panel["history"] and panel["run"].run_id not in ids.values()
    assert all(Path(d).parent == results_dir / "wandb" for d in printed)


def test_a_multirun_shares_one_group_named_after_its_sweep_folder(offline, monkeypatch):
    results_dir = offline / "results"
    monkeypatch.setattr(sys, "argv", ["kvh"])   # run_app sets sys.argv for Hydra; restored afterwards
    cli.main(["run", "-m", "model=tiny_llama", f"results_dir={results_dir}", "wandb=true", *PASSKEY,
              "method=fullkv,streamingllm", "method.budget=64", "hydra/job_logging=none", "hydra/hydra_logging=none"])
    runs = offline_runs(results_dir)
    assert len(runs) == 2
    (sweep,) = (results_dir / "hydra").glob("multirun_*")
    assert {r["run"].run_group for r in runs} == {sweep.name}
    assert {r["config"]["wandb_group"] for r in runs} == {sweep.name}


def test_a_failing_wandb_is_one_warning_and_the_results_stand(offline, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken)
    with caplog.at_level(logging.WARNING, logger="harness.report.wandb_runs"):
        (summary,) = runner.run(config(offline / "results", *PASSKEY, "method=snapkv", "method.budget=64"))
    warned = [r for r in caplog.records if r.name == "harness.report.wandb_runs"]
    assert len(warned) == 1 and "no wandb today" in warned[0].getMessage()
    folder = Path(summary["folder"])
    assert summary["samples"] == 1 and len(results.read_predictions(folder)) == 1
    assert results.read_json(folder / results.SCORES)["samples"] == 1
    assert not (folder / wandb_runs.RUN_FILE).exists()


def test_wandb_false_logs_nothing(offline):
    (summary,) = runner.run(config(offline / "results", *PASSKEY, "method=fullkv", "wandb=false"))
    assert not (offline / "results" / "wandb").exists()
    assert not (Path(summary["folder"]) / wandb_runs.RUN_FILE).exists()


# ------------------------------------------------------------------------------------------------
# the logger on hand-written folders
# ------------------------------------------------------------------------------------------------

def test_a_longbench_folder_logs_its_dataset_files_and_result_json(offline):
    folder = offline / "results" / "longbench" / "llama3" / "dynamickv_paper" / "snapkv_b128+x"
    folder.mkdir(parents=True)
    for name, text in (("qasper.jsonl", '{"id": "a", "score": 1.0}\n'), ("trec.jsonl", '{"id": "b", "score": 0.0}\n'),
                       ("result.json", '{"qasper": 100.0, "trec": 0.0}'), ("scores.json", "{}"),
                       ("manifest.json", "{}"), ("trec.jsonl.rank1.part", "")):
        (folder / name).write_text(text)
    run_dir = wandb_log.log_run(folder, {"method": {"name": "snapkv"}}, {"qasper": 100.0, "trec": 0.0},
                                table_rows=[{"method": "SnapKV", "qasper": 100.0, "trec": 0.0}],
                                predictions=[{"id": "a", "dataset": "qasper", "pred": "x", "answers": ["x"]}],
                                wandb_dir=offline / "elsewhere")
    assert Path(run_dir).parent == offline / "elsewhere" / "wandb"
    run = read_run(Path(run_dir))
    (artifact,) = run["artifacts"]
    assert artifact.name == "longbench-llama3-dynamickv_paper-snapkv_b128_x"   # W&B's allowed characters only
    assert [c.path for c in artifact.manifest.contents] == ["manifest.json", "qasper.jsonl", "result.json",
                                                            "scores.json", "trec.jsonl"]
    assert "heatmap" not in run["history"] and not (folder / "figures").exists()   # no grid: no figure, quietly
    assert run["run"].display_name == "llama3/snapkv_b128+x" and {"score/qasper", "score/trec"} <= run["summary"]
    assert {"scores", "summary_table", "predictions"} <= set(run["history"])


def test_wandb_dir_in_the_environment_wins(offline, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(offline / "env_dir"))
    run_dir = wandb_runs.log_images(offline / "out", {}, name="x", wandb_dir=offline / "setting")
    assert Path(run_dir).parent == offline / "env_dir" / "wandb" and not (offline / "setting").exists()


def test_log_images_resumes_the_folders_run(offline):
    import matplotlib.pyplot as plt
    fig = plt.figure()
    fig.savefig(offline / "panel.png")
    plt.close(fig)
    first = wandb_runs.log_images(offline / "out", {"panel": offline / "panel.png"}, name="heatmaps/test", group="g",
                                 wandb_dir=offline / "w")
    second = wandb_runs.log_images(offline / "out", {"panel": offline / "panel.png"}, wandb_dir=offline / "w")
    one, two = read_run(Path(first)), read_run(Path(second))
    assert one["run"].run_id == two["run"].run_id and first != second
    assert two["run"].run_group == "g" and two["run"].job_type == "figures" and two["run"].display_name == "heatmaps/test"
    assert one["history"]["panel"]["_type"] == "image-file" and "panel" in two["history"]
    assert wandb_runs.stored_run(offline / "out")["step"] == 2


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_runs.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_runs.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_runs.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_log.log_run(Path("unused"), {}, {}) is None
    assert wandb_runs.log_images(Path("unused"), {}, name="x") is None
    assert not Path("unused").exists()


def test_disabled_logging_touches_nothing(offline):
    assert wandb_log.log_run(offline / "off", {}, {"qasper": 1.0}, enabled=False) is None
    assert not (offline / "off").exists()



def test_scores_reach_wandb_once_they_change_and_after_a_failed_logging(offline, monkeypatch):
    results_dir = offline / "results"
    overrides = [*PASSKEY, "task.depths=[10,50]", "method=fullkv"]
    runner.run(config(results_dir, *overrides, "limit=1"))
    runner.run(config(results_dir, *overrides, "wandb=false"))       # the second sample, not logged
    runner.run(config(results_dir, *overrides))                      # nothing new, but W&B has samples=1: logged
    assert len(offline_runs(results_dir)) == 2
    runner.run(config(results_dir, *overrides))                      # W&B has these scores: left alone
    assert len(offline_runs(results_dir)) == 2

    import wandb
    other = offline / "other"
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no wandb today")))
    runner.run(config(other, *overrides))                            # logging fails: one warning, nothing marked
    monkeypatch.setattr(wandb, "init", real_init)
    runner.run(config(other, *overrides))                            # nothing new, but never logged: logged now
    assert len(offline_runs(other)) == 1
