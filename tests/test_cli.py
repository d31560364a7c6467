"""Hydra composition, the runner's results folders, resume, and CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import harness.run.runner as runner
from harness import config as harness_config
from harness.engine.models import byte_tokenizer
from harness.run import results
from harness.tasks import passkey

from conftest import ROOT

CONF = str(ROOT / "conf")
SMALL_TASK = ["task.context_lengths=[400,500]", "task.depths=[0,50,100]", "task.max_new_tokens=3"]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=["model=tiny_llama", f"results_dir={tmp_path}", "wandb=false",
                                                        *SMALL_TASK, *overrides])


@pytest.mark.parametrize("model", ["llama3", "llama3_1", "mistral", "qwen2", "internlm2_5", "smollm2_135m",
                                   "gemma3_270m", "tiny_llama", "llama3_8b_random"])
@pytest.mark.parametrize("protocol", ["default", "dynamickv_paper", "longbench_official"])
def test_every_model_and_protocol_composes(tmp_path, model, protocol):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = harness_config.plain(compose(config_name="config", overrides=[f"model={model}", f"protocol={protocol}"]))
    assert cfg.model.name == model
    assert cfg.model.dtype in ("auto", "bfloat16", "float32")
    assert cfg.method.window_size == cfg.protocol.window_size.snapkv


def test_protocol_sets_method_windows(tmp_path):
    assert config(tmp_path, "protocol=dynamickv_paper", "method=streamingllm").method.window_size == 32
    assert config(tmp_path, "protocol=default", "method=streamingllm").method.sink_tokens == 4
    assert config(tmp_path, "protocol=longbench_official").method.window_size == 8
    assert config(tmp_path, "method.window_size=16").method.window_size == 16   # explicit override wins


def test_run_writes_results_and_resumes(tmp_path, monkeypatch):
    calls = []
    real_generate = runner.generate
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    first = runner.run(config(tmp_path, "method=snapkv", "method.budget=64", "method.window_size=8", "limit=2"))[0]
    folder = Path(first["folder"])
    assert folder == tmp_path / "passkey" / "tiny_llama" / "default" / "snapkv_b64_w8_k7_maxpool_qh"
    assert len(calls) == 2 and first["samples"] == 2
    before = (folder / results.PREDICTIONS).read_text().splitlines()
    # an interruption mid-write leaves a partial line: it is dropped and that sample runs again
    with (folder / results.PREDICTIONS).open("a") as f:
        f.write('{"id": "len500_depth0_r0", "pre')
    summary = runner.run(config(tmp_path, "method=snapkv", "method.budget=64", "method.window_size=8"))[0]
    after = (folder / results.PREDICTIONS).read_text().splitlines()
    assert len(calls) == 6 and summary["samples"] == 6          # only the 4 unfinished samples ran
    assert after[:2] == before and len(after) == 6
    assert sorted(json.loads(line)["id"] for line in after) == sorted(
        f"len{n}_depth{d}_r0" for n in (400, 500) for d in (0, 50, 100))
    manifest = json.loads((folder / results.MANIFEST).read_text())
    assert manifest["method"] == {"name": "snapkv", "budget": 64, "window_size": 8, "kernel_size": 7,
                                  "pooling": "maxpool", "granularity": "query_head", "compression_ratio": None}
    assert manifest["config"]["model"]["name"] == "tiny_llama" and manifest["environment"]["packages"]["torch"]
    row = json.loads(after[0])
    assert row["prompt_tokens"] == row["context_length"] and len(row["kept"]) == 4


def test_report_builds_a_table(tmp_path):
    for method in ("fullkv", "streamingllm"):
        runner.run(config(tmp_path, f"method={method}", "method.budget=64", "limit=2"))
    from harness.report.summary import find_runs, passkey_table
    header, rows = passkey_table(find_runs([tmp_path]))
    assert header[:2] == ["method", "run"] and header[-2:] == ["mean", "samples"]
    assert [r[0] for r in rows] == ["FullKV", "StreamingLLM @64"]                  # the papers' order, readable
    assert [r[1].split("/")[-1] for r in rows] == ["fullkv", "streamingllm_b64_sink4_qh"]
    assert all(r[-1] == 2 for r in rows)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_unknown_method_lists_choices(tmp_path):
    out = cli("method=snapk", f"results_dir={tmp_path}")
    assert out.returncode != 0
    assert "snapk" in out.stderr and "snapkv" in out.stderr and "streamingllm" in out.stderr


def test_cli_impossible_budget_fails_with_reason(tmp_path):
    out = cli("model=tiny_llama", "method=snapkv", "method.budget=16", "method.window_size=32", f"results_dir={tmp_path}")
    assert out.returncode == 2
    assert "budget=16 must be larger than window_size=32" in out.stderr
    assert not (tmp_path / "passkey").exists()   # nothing was started


def test_passkey_prompt_has_exact_length_and_needle_at_a_sentence_start():
    tok = byte_tokenizer()
    from harness.tasks.haystack import load_haystack
    hay = tok(load_haystack("synthetic", None, 5000), add_special_tokens=False).input_ids
    def count(text):
        return len(tok(text + passkey.ANSWER_PREFIX).input_ids)
    for length in (1500, 2101):
        for depth in (0, 25, 50, 100):
            text = passkey.build_prompt(tok, hay, length, depth, "12345", count)
            assert count(text) == length
            body = text[len(passkey.INSTRUCTION):]
            before = body[: body.index(passkey.NEEDLE.format(key="12345"))]
            if depth < 100:                             # 100%: appended at the very end, as the original
                assert before == "" or before.rstrip().endswith(".")  # inserted after a full sentence
            haystack_len = len(body) - len(passkey.NEEDLE.format(key="12345")) - len(passkey.QUESTION)
            target = haystack_len * depth / 100        # bytes = tokens for this tokenizer
            if 0 < depth < 100:                         # moved back by at most one filler sentence
                assert target - 25 <= len(before) <= target


def test_methods_list_runs_all_with_one_shared_prefill_and_resumes(tmp_path, monkeypatch):
    calls = []
    real = runner.generate_many
    monkeypatch.setattr(runner, "generate_many", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    overrides = ["methods=[fullkv,snapkv,pyramidkv]", "budgets=[48,64]", "limit=2"]
    summaries = runner.run(config(tmp_path, *overrides))
    names = [Path(s["folder"]).name for s in summaries]
    assert names == ["fullkv", "snapkv_b48_w32_k7_maxpool_qh", "snapkv_b64_w32_k7_maxpool_qh",
                     "pyramidkv_b48_w32_k7_maxpool_qh_beta20", "pyramidkv_b64_w32_k7_maxpool_qh_beta20"]
    assert calls == [5, 5] and all(s["samples"] == 2 for s in summaries)
    # one method's folder lost: only it runs again, alone
    import shutil
    shutil.rmtree(summaries[1]["folder"])
    calls.clear()
    again = runner.run(config(tmp_path, *overrides))
    assert calls == [] and [s["samples"] for s in again] == [2] * 5
    # the solo path wrote the same predictions as the shared one did
    solo = runner.run(config(tmp_path / "solo", "method=snapkv", "method.budget=48", "limit=2"))[0]
    assert results.read_predictions(Path(solo["folder"]))[0]["pred"] == \
        results.read_predictions(Path(again[1]["folder"]))[0]["pred"]


def test_unknown_name_in_methods_list(tmp_path):
    from methods import ConfigError
    with pytest.raises(ConfigError, match=r"unknown method 'snap'; choose from \['dynakv', 'dynamickv', 'energy', 'fullkv', 'h2o'"):
        runner.run(config(tmp_path, "methods=[fullkv,snap]"))


def test_unknown_decode_mode_fails_before_the_model_loads(tmp_path):
    out = cli("model=tiny_llama", "decode=fast", f"results_dir={tmp_path}")
    assert out.returncode == 2
    assert "decode='fast' is not one of [batched, plain, continuous]" in out.stderr
    assert not (tmp_path / "passkey").exists()


def test_plain_and_batched_decode_write_the_same_predictions(tmp_path):
    from harness.run import results
    rows = {}
    for mode in ("plain", "batched"):
        folder = tmp_path / mode
        runner.run(config(folder, "model=tiny_llama", "methods=[fullkv,snapkv,pyramidkv]", "method.budget=64",
                          "limit=2", "task.max_new_tokens=12", f"decode={mode}"))
        rows[mode] = sorted((str(p.parent.relative_to(folder)), r["id"], r["pred"], r["stopped_by"])
                            for p in folder.rglob("manifest.json") for r in results.read_predictions(p.parent))
    assert rows["plain"] == rows["batched"] and len(rows["plain"]) == 6


@pytest.mark.parametrize("value", ["0", "-2", "true"])
def test_bad_decode_batch_fails_before_the_model_loads(tmp_path, value):
    out = cli("model=tiny_llama", f"decode_batch={value}", f"results_dir={tmp_path}")
    assert out.returncode == 2
    assert "decode_batch=" in out.stderr
    assert ("must be a positive integer" if value != "true" else "must be an integer") in out.stderr
    assert not (tmp_path / "passkey").exists()


def test_kvh_subcommands_give_one_line_and_exit_2_on_bad_input(tmp_path, capsys):
    """Reporters on a folder with nothing to report: one ``error:`` line, exit 2 (kept-plot raised a
    ValueError traceback before)."""
    from harness import cli
    for argv in (["kept-plot", str(tmp_path), "--out", str(tmp_path / "k")], ["table", str(tmp_path / "none")],
                 ["nope"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)


def test_every_subcommand_help_lists_defaults(capsys):
    from harness import cli
    for command in cli.TOOLS:
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: kvh {command}"), command
        if command == "dynakv":   # options live on its own subcommands
            for sub in ("calibrate", "train", "ranks", "table"):
                with pytest.raises(SystemExit):
                    cli.main([command, sub, "--help"])
                assert "(default:" in capsys.readouterr().out, sub
        elif command != "score":
            assert "(default:" in text, command


@pytest.mark.parametrize("override, message", [
    ("method_overrides=abc", "method_overrides='abc' must map knobs to values"),
    ("method_overrides={budget: abc}", "snapkv: budget='abc' must be an integer"),
])
def test_method_overrides_are_checked(tmp_path, override, message):
    from methods import ConfigError
    with pytest.raises(ConfigError, match=message):
        runner.plan(config(tmp_path, "methods=[snapkv]", override))


@pytest.mark.parametrize("override", ["budgets=[64]", "method_overrides={window_size: 8}"])
def test_sweep_settings_without_methods_are_refused_not_ignored(tmp_path, override):
    from methods import ConfigError
    with pytest.raises(ConfigError, match=r"applies to the methods of methods=\[\.\.\.\].*fix: methods=\[snapkv\]"):
        runner.plan(config(tmp_path, override))
