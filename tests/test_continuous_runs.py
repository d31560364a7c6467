"""Runs with ``decode=continuous`` (harness.run.windows): the same rows as ``decode=plain`` and ``decode=batched``
(prompts of several lengths, rows stopping at different steps, slots refilled, several windows), an interrupted
run resumed without writing a row twice, a K/V transform's accounting, and bad settings refused before the model
loads."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_dynakv_runs import TEXT, compose_run

import harness.run.runner as runner
from harness.dynakv import cli as dynakv_cli
from harness.engine import continuous
from harness.run import results, windows

from conftest import user_error

# prompts of 300-1500 tokens; the stop texts end tiny_llama's rows at different steps (and some at none)
COMMON = ["task=passkey", "task.context_lengths=[300,700,1500]", "task.depths=[20,80]", "task.max_new_tokens=16",
          "methods=[fullkv,snapkv,streamingllm]", "budgets=[64]",
          "protocol.stop_tokens={default: [eos, I, f, ';']}"]


def rows_of(summaries, drop=("seconds",)) -> dict:
    """Folder name -> its rows in file order, without ``drop``."""
    return {Path(s["folder"]).name: [{k: v for k, v in r.items() if k not in drop}
                                     for r in results.read_predictions(Path(s["folder"]))] for s in summaries}


@pytest.fixture
def small_slots(monkeypatch):
    """Three slots on the CPU (rows wait and refill slots), and the stats of every ``decode_rows`` call."""
    monkeypatch.setitem(continuous.DEFAULT_SLOTS, "cpu", 3)
    calls = []

    def recorded(*args, **kwargs):
        out = continuous.decode_rows(*args, **kwargs)
        calls.append(kwargs["stats"])
        return out
    monkeypatch.setattr(windows, "decode_rows", recorded)
    return calls


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The rows of the plain and the batched run."""
    folder = tmp_path_factory.mktemp("reference")
    return {mode: rows_of(runner.run(compose_run(folder / mode, *COMMON, f"decode={mode}")))
            for mode in ("plain", "batched")}


def test_continuous_rows_equal_the_plain_and_batched_rows(tmp_path, reference, small_slots):
    summaries = runner.run(compose_run(tmp_path, *COMMON, "decode=continuous", "decode_prompts=4"))
    got = rows_of(summaries)
    assert got == reference["plain"] == reference["batched"]
    rows = [r for folder in got.values() for r in folder]
    assert len(rows) == 18 and {r["stopped_by"] for r in rows} == {"stop_token", "max_new_tokens"}
    assert len({r["new_tokens"] for r in rows}) >= 3                  # rows end at different steps
    assert len(small_slots) == 2 and sum(s.refills for s in small_slots) > 0   # two windows, refilled slots
    for folder in got.values():                                       # back in sample order
        assert [r["id"] for r in folder] == [f"len{n}_depth{d}_r0" for n in (300, 700, 1500) for d in (20, 80)]
    assert all(r["seconds"] >= 0 for s in summaries for r in results.read_predictions(Path(s["folder"])))


def test_a_window_closes_early_at_the_memory_limit(tmp_path, reference, small_slots, monkeypatch):
    """The GPU's memory bound, simulated: every prefilled prompt 'allocates' 10 units (plus 1) and a window may add
    20, so each window of decode_prompts=4 stops after 2 prompts (the limit is checked before each prompt but the
    first) and hands the rest on; every row is still written once, equal to the plain path's."""
    prefills = []
    prompt_rows = windows.prompt_rows
    monkeypatch.setattr(windows, "prompt_rows", lambda *a, **k: prefills.append(1) or prompt_rows(*a, **k))
    base = [0]

    def limit(device, fraction):
        assert fraction == 0.25
        base[0] = len(prefills)
        return 10 * base[0] + 20
    monkeypatch.setattr(windows, "memory_limit", limit)
    monkeypatch.setattr(windows, "allocated_bytes", lambda device: 10 * len(prefills) + 1)
    summaries = runner.run(compose_run(tmp_path, *COMMON, "decode=continuous", "decode_prompts=4",
                                       "decode_window_memory=0.25"))
    assert rows_of(summaries) == reference["plain"]
    assert len(small_slots) == 3 and len(prefills) == 6           # windows of 2, 2 and 2 prompts (six samples)


def test_an_interrupted_continuous_run_resumes_without_writing_a_row_twice(tmp_path, reference, small_slots,
                                                                         monkeypatch):
    cfg = [*COMMON, "decode=continuous", "decode_prompts=4"]
    append, written = windows.append_row, []

    def failing(*args):
        if len(written) == 7:
            raise KeyboardInterrupt
        written.append(args[2].id)
        append(*args)
    monkeypatch.setattr(windows, "append_row", failing)
    with pytest.raises(KeyboardInterrupt):
        runner.run(compose_run(tmp_path, *cfg))
    monkeypatch.setattr(windows, "append_row", append)
    queued = []
    prompt_rows = windows.prompt_rows
    monkeypatch.setattr(windows, "prompt_rows", lambda *a, **k: queued.append(len(a[3])) or prompt_rows(*a, **k))
    summaries = runner.run(compose_run(tmp_path, *cfg))
    assert sum(queued) == 18 - 7                                      # only the rows not written are decoded again
    assert rows_of(summaries) == reference["plain"]
    for s in summaries:
        lines = (Path(s["folder"]) / results.PREDICTIONS).read_text().splitlines()
        ids = [json.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)) == 6


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pca")
    text = folder / "text.txt"
    text.write_text(TEXT * 4)
    dynakv_cli.main(["calibrate", "--model", "tiny_llama", "--text", str(text), "--tokens", "2048", "--seq-len",
                     "128", "--out", str(folder / "pca.safetensors")])
    return folder / "pca.safetensors"


@pytest.mark.parametrize("scope", ["prompt", "context"])
def test_transform_rows_under_continuous_decoding_equal_the_batched_ones(tmp_path, calibrated, small_slots, scope):
    common = ["task=passkey", "task.context_lengths=[300,700]", "task.depths=[50]", "task.max_new_tokens=10",
              "methods=[fullkv,pca_uniform,snapkv+pca_uniform]", "budgets=[64]", "decode_prompts=2",
              f"protocol.compression_scope={scope}",
              f"++method_overrides={{transform_checkpoint: '{calibrated}', window_size: 8}}"]
    got = {mode: rows_of(runner.run(compose_run(tmp_path / mode, *common, f"decode={mode}")))
           for mode in ("batched", "continuous")}
    assert got["continuous"] == got["batched"] and small_slots                # decoded by decode_rows
    transformed = [r for name, rows in got["continuous"].items() if "pca" in name for r in rows]
    assert len(transformed) == 4 and all(0 < r["kv_retain_rate_generated"] < 1 for r in transformed)
    assert all(r["compressed_tokens"] < r["prompt_tokens"] for r in transformed) == (scope == "context")


def test_the_memory_limit_cuts_a_later_transform_group_too(tmp_path, calibrated, small_slots, monkeypatch):
    """The limit is checked in every transform group: here the first group (FullKV) fits two prompts and the K/V
    transform group only one, so the second sample keeps its transform methods for the next window; the rows equal
    decode=batched's, each written once."""
    common = ["task=passkey", "task.context_lengths=[300,700,1500]", "task.depths=[50]", "task.max_new_tokens=10",
              "methods=[fullkv,pca_uniform,snapkv+pca_uniform]", "budgets=[64]",
              f"++method_overrides={{transform_checkpoint: '{calibrated}', window_size: 8}}"]
    batched = rows_of(runner.run(compose_run(tmp_path / "batched", *common, "decode=batched")))
    prefills, cuts = [], []
    prompt_rows = windows.prompt_rows
    monkeypatch.setattr(windows, "prompt_rows", lambda *a, **k: prefills.append(len(a[3])) or prompt_rows(*a, **k))
    monkeypatch.setattr(windows, "memory_limit", lambda device, fraction: 10 * len(prefills) + 15)
    monkeypatch.setattr(windows, "allocated_bytes", lambda device: 10 * len(prefills) + 1)
    info = windows.log.info
    monkeypatch.setattr(windows.log, "info", lambda msg, *a: (cuts.append(a) if "memory limit" in msg else None)
                        or info(msg, *a))
    got = rows_of(runner.run(compose_run(tmp_path / "continuous", *common, "decode=continuous", "decode_prompts=2")))
    assert got == batched
    assert any(a[2] for a in cuts)                                  # a cut in the K/V transform group
    assert sum(prefills) == 9                                        # 3 samples x 3 methods, none prefilled twice


def test_a_model_over_several_devices_runs_the_per_sample_path(tmp_path, reference, small_slots, monkeypatch):
    import torch
    spread = SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta")))
    assert not windows.usable(spread)
    monkeypatch.setattr(windows, "usable", lambda lm: False)
    summaries = runner.run(compose_run(tmp_path, *COMMON, "decode=continuous"))
    assert rows_of(summaries) == reference["plain"] and not small_slots


@pytest.mark.parametrize(("setting", "message"), [
    ("decode=fast", "decode"),
    ("decode_prompts=0", "decode_prompts=0 must be a positive integer"),
    ("decode_prompts=-3", "decode_prompts=-3 must be a positive integer"),
    ("decode_window_memory=1.5", "decode_window_memory=1.5 must be a number between 0 and 1"),
    ("decode_window_memory=0", "decode_window_memory=0.0 must be a number between 0 and 1"),
    ("decode_prompts=many", "decode_prompts"),
])
def test_bad_continuous_settings_are_refused_before_the_model_loads(tmp_path, monkeypatch, setting, message):
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    runner._MODEL.clear()
    text = user_error(lambda: runner.run(compose_run(tmp_path, "task=passkey", setting)))
    assert message in text and "\n" not in text.strip()
    if setting == "decode=fast":
        assert "continuous" in text


def test_a_task_scored_without_generating_keeps_its_path(tmp_path, small_slots):
    from test_perplexity import config
    rows = {}
    for mode in ("batched", "continuous"):
        (tmp_path / mode).mkdir()
        rows[mode] = rows_of(runner.run(config(tmp_path / mode, f"decode={mode}")))
    assert rows["continuous"] == rows["batched"] and not small_slots
