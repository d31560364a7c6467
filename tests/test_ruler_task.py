"""``task=ruler`` end to end on SmolLM2-135M-Instruct (the tasks that need no data files): samples
generated with the model's tokenizer and cached, the question appended uncompressed under
``compression_scope=context`` (checked on the kept positions), RULER's scores in ``scores.json``, the
generation record in the manifest, checks before the model loads, and resume."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import harness.run.runner as runner
from harness.ruler import tasks as ruler_tasks
from harness.run import results
from methods import ConfigError

from conftest import ROOT, real_model, user_error

CONF = str(ROOT / "conf")
TASKS = "[niah_single_1,vt]"


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=smollm2_135m", "model.dtype=float32", "task=ruler", f"task.tasks={TASKS}",
            "task.context_lengths=[1024]", "task.samples_per_task=2", "task.haystack_dir=null",
            "task.squad_path=null", "task.hotpotqa_path=null", f"results_dir={tmp_path / 'results'}", "wandb=false",
            "progress=never", *overrides])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ruler"


def test_ruler_runs_with_the_question_uncompressed_and_scores_as_ruler(tmp_path, cache):
    real_model("smollm2_135m")       # skips where the model package is not installed
    cfg = config(tmp_path, "methods=[fullkv,snapkv]", "budgets=[96]", "method_overrides={window_size: 8}",
                 "protocol.compression_scope=context", "save_kept_positions=true")
    summaries = {s["method"]: s for s in runner.run(cfg)}
    assert sorted(p.name.split("_1024_")[0] for p in cache.glob("*.json")) == ["niah_single_1", "vt"]
    folder = results.find_runs([tmp_path / "results"])
    assert len(folder) == 2
    for summary in summaries.values():
        rows = list(results.finished(summary["folder"]).values())
        assert len(rows) == 4 and {r["task"] for r in rows} == {"niah_single_1", "vt"}
        # scores.json: RULER's metric over the rows, recomputed here independently
        for task in ("niah_single_1", "vt"):
            task_rows = [r for r in rows if r["task"] == task]
            found = [sum(a.lower() in r["pred"].strip().lower() for a in r["answers"]) / len(r["answers"])
                     for r in task_rows]
            assert summary["tasks"]["1024"][task] == round(100 * sum(found) / len(found), 2)
        assert summary["suite"] == "RULER subset (2 tasks)" and summary["avg"] is None
        for row in rows:
            assert row["compression_scope"] == "context"
            assert 0 < row["compressed_tokens"] < row["prompt_tokens"]
            assert row["prompt_tokens"] + ruler_tasks.TASKS[row["task"]].max_new_tokens <= 1024   # RULER's fitting rule
    snap = next(s for m, s in summaries.items() if m == "snapkv")
    for row in results.finished(snap["folder"]).values():
        assert row["budget"] == 96
        kept = torch.load(runner.kept_file(snap["folder"], row["id"]))
        for positions in kept.values():
            assert positions is not None and int(positions.max()) < row["compressed_tokens"]   # question uncompressed
    manifest = json.loads((results.find_runs([tmp_path / "results"])[0] / results.MANIFEST).read_text())
    generated = manifest["generated"]
    assert set(generated) == {"niah_single_1/1024", "vt/1024"}
    for record in generated.values():
        assert record["sha256"] == results.file_sha256(cache / record["file"])
    assert manifest["identity"]["protocol"]["compression_scope"] == "context"
    again = runner.run(cfg)                  # resume: nothing left to do, the same scores
    assert [s["tasks"] for s in again] == [summaries[s["method"]]["tasks"] for s in again]


def test_a_ratio_is_resolved_per_prompt_and_recorded_per_row(tmp_path, cache):
    real_model("smollm2_135m")
    cfg = config(tmp_path, "methods=[snapkv]", "compression_ratios=[0.75]", "method_overrides={window_size: 8}",
                 "task.tasks=[niah_single_1]", "task.samples_per_task=1")
    [summary] = runner.run(cfg)
    assert summary["folder"].endswith("snapkv_r0.75_w8_k7_maxpool_qh")
    [row] = results.finished(summary["folder"]).values()
    assert row["compression_ratio"] == 0.75 and row["compressed_tokens"] == row["prompt_tokens"]   # scope: prompt
    assert row["budget"] == int(row["prompt_tokens"] * 0.25)
    assert all(k == row["budget"] for k in row["kept"])


def test_ruler_settings_fail_before_the_model_loads(tmp_path, cache):
    assert "task.tasks=['niah_single_9']: unknown" in user_error(lambda: runner.plan(config(
        tmp_path, "task.tasks=[niah_single_9]")))
    assert "needs the essays" in user_error(lambda: runner.plan(config(tmp_path, "task.tasks=[niah_single_2]")))
    assert "task.squad_path='/nope.json' is not a file" in user_error(lambda: runner.plan(config(
        tmp_path, "task.squad_path=/nope.json", "task.tasks=[qa_1]")))
    assert "is not one of" in user_error(lambda: runner.plan(config(tmp_path, "task.generator_version=ruler_2023")))
    with pytest.raises(ConfigError, match="leaves a budget of"):
        real_model("smollm2_135m")
        runner.run(config(tmp_path, "method=snapkv", "method.compression_ratio=0.99", "task.tasks=[vt]",
                          "task.samples_per_task=1"))


def test_a_length_counts_only_when_every_task_has_all_its_samples():
    from harness.ruler import score
    rows = [{"id": f"{t}_{i}", "task": t, "context_length": 4096, "pred": "x", "answers": ["x"]}
            for t in ruler_tasks.RULER_11 for i in range(3 if t != "fwe" else 1)]
    loose = score.summary(rows)                                   # no expectations: every task has rows
    assert loose["suite"] == "RULER-11" and loose["lengths"] == {"4096": 100.0}
    strict = score.summary(rows, expected_tasks=ruler_tasks.RULER_11, samples_per_task=3)
    assert strict["lengths"] == {} and strict["avg"] is None and strict["incomplete"] == {"4096": {"fwe": 1}}
    cut = score.summary([r for r in rows if r["task"] != "cwe"], expected_tasks=ruler_tasks.RULER_13, samples_per_task=1)
    assert cut["suite"] == "RULER-13" and cut["avg"] is None     # qa and cwe missing: no RULER-13 score
