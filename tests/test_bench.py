"""The benchmark's measurements on the CPU (values and invariants, not timings)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from harness.bench import speed as bench
from harness.longbench.metrics import DATASET_SIZES, ENGLISH_16
from harness.run import results


def test_bench_methods_section(tmp_path):
    bench.main(["--model", "tiny_llama", "--sections", "methods", "--contexts", "300", "--budget", "64",
                "--window", "8", "--repeats", "1", "--decode-tokens", "3", "--methods", "fullkv", "snapkv", "h2o",
                "--h2o-scorers", "reference", "fused", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert [r["method"] for r in data["methods"]] == ["fullkv", "snapkv", "h2o", "h2o:fused"]
    fused = rows.pop("h2o:fused")      # a prefill-only row, with the same kept cache as the reference scorer's
    assert fused["kv_gib"] == rows["h2o"]["kv_gib"] and fused["prefill_ms"] > 0 and "decode_fast_ms" not in fused
    assert "| 300 | h2o:fused | 64 |" in (tmp_path / "bench.md").read_text()
    # tiny_llama: 4 layers, 2 KV heads, head dim 16, float32; FullKV keeps 300 tokens, the others 64 x 4 query heads
    assert rows["fullkv"]["kv_gib"] * 2**30 == 4 * 2 * (2 * 300 * 16 * 4)
    assert rows["snapkv"]["kv_gib"] * 2**30 == 4 * 2 * (4 * 64 * 16 * 4)
    assert all(r["prefill_ms"] > 0 and r["decode_plain_ms"] > 0 and r["decode_fast_ms"] > 0 for r in rows.values())
    assert rows["fullkv"]["overhead_pct"] == 0 and rows["snapkv"]["graph"] is False      # no graphs on the CPU
    assert "| 300 | snapkv | 64 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_batches_and_divergence_sections(tmp_path):
    bench.main(["--model", "tiny_llama", "--sections", "batches", "divergence", "--budget", "64",
                "--window", "8", "--decode-tokens", "4", "--batches", "1", "4", "--batch-context", "200",
                "--divergence-prompts", "2",
                "--divergence-lengths", "150", "300", "--divergence-tokens", "8", "--divergence-baseline",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [(b["method"], b["batch"]) for b in data["batches"]] == [("fullkv", 1), ("fullkv", 4), ("snapkv", 1),
                                                                     ("snapkv", 4)]
    assert all(b["tokens_per_s"] > 0 for b in data["batches"])
    # the batch's buffers grow with the rows: 4 rows read 4x the KV of one
    by = {(b["method"], b["batch"]): b["kv_read_bytes"] for b in data["batches"]}
    assert by["snapkv", 4] == 4 * by["snapkv", 1]
    div = data["divergence"]
    assert div["rows"] == 12 and div["rows_differing"] == 0 and div["mean_identical_prefix"] == 1.0  # CPU: identical
    assert div["baseline_rows_differing"] == 0                  # float32 on the CPU: the backends agree too
    assert data["hardware"] == {}          # no GPU: no bandwidth floor
    text = (tmp_path / "bench.md").read_text()
    assert "| 200 | snapkv | 4 |" in text and "0 of 12 rows differ" in text


@pytest.mark.skipif(importlib.util.find_spec("kvpress") is None and not Path(__file__).resolve().parents[1].joinpath(".kvsite").is_dir(),
                    reason="kvpress is not installed here (it pins transformers<5.3; the GPU bench carries its own)")
def test_kvpress_section_reports_or_explains(tmp_path):
    site = Path(__file__).resolve().parents[1] / ".kvsite"
    args = ["--kvpress-site", str(site)] if site.is_dir() else []
    bench.main(["--model", "tiny_llama", "--sections", "kvpress", "--contexts", "300", "--budget", "64", "--window", "8",
                "--repeats", "1", "--kvpress-tokens", "5", "--out", str(tmp_path), *args])
    data = json.loads((tmp_path / "bench.json").read_text())["kvpress"]
    assert "error" not in data, data.get("error")
    [theirs] = data["kvpress"]["rows"]
    assert theirs["snapkv_kept_tokens"] == 64 and theirs["fullkv_kept_tokens"] == 300
    assert data["ours"][0]["kv_head_end_to_end_ms"] > 0


# ---- sweep: the runner's LongBench path on synthetic data, projected to LongBench-16 ----------------------

def test_stratified_counts_follow_longbench16():
    sizes = bench.LONGBENCH16_SIZES
    assert sizes == {d: DATASET_SIZES[d] for d in ENGLISH_16} and bench.LONGBENCH16_TOTAL == 3750
    assert bench.stratified_counts(3750) == sizes                   # the full sweep: exactly the official sizes
    assert bench.stratified_counts(16) == {d: 1 for d in sizes}
    counts = bench.stratified_counts(128)
    assert sum(counts.values()) == 128 and list(counts) == list(sizes)
    for d, n in counts.items():                                     # each the floor or the ceiling of its quota
        assert math.floor(128 * sizes[d] / 3750) <= n <= math.ceil(128 * sizes[d] / 3750)
    assert counts["lcc"] == counts["repobench-p"] == 17 and counts["multifieldqa_en"] == 5
    assert sorted(counts[d] for d in sizes if sizes[d] == 200) == [6, 6] + [7] * 11
    for n in (17, 40, 1000):
        counts = bench.stratified_counts(n)
        assert sum(counts.values()) == n and min(counts.values()) >= 1
    with pytest.raises(ValueError, match="at least 16"):
        bench.stratified_counts(15)


@pytest.fixture
def short_answers(monkeypatch):
    """LongBench's answer lengths cut to 2-6 tokens (the CPU decodes the sweep in seconds)."""
    shape = {d: (2 + 2 * (i % 3), words) for i, (d, (_, words)) in enumerate(bench.LONGBENCH_SHAPE.items())}
    monkeypatch.setattr(bench, "LONGBENCH_SHAPE", shape)
    return {d: new for d, (new, _) in shape.items()}


def test_bench_sweep_runs_the_longbench_runner_and_projects(tmp_path, short_answers, monkeypatch):
    from harness.run import runner
    monkeypatch.setattr(runner, "_cached_model", lambda *a, **k: pytest.fail("the runner loaded a second model"))
    bench.main(["--model", "tiny_llama", "--sections", "sweep", "--budget", "32", "--window", "8",
                "--sweep-samples", "16", "--sweep-max-input", "160", "--sweep-decode", "continuous", "batched",
                "--sweep-plain", "--sweep-plain-tokens", "2", "--out", str(tmp_path)])
    sweep = json.loads((tmp_path / "bench.json").read_text())["sweep"]
    assert sweep["counts"] == {d: 1 for d in bench.LONGBENCH16_SIZES} and sweep["samples"] == 16
    assert sweep["methods"] == bench.SIX and sweep["protocol"] == "dynamickv_paper"
    preds = {}
    for decode in ("continuous", "batched"):
        run = sweep["runs"][decode]
        assert run["rows"] == 16 * 6 and run["warmup_seconds"] > 0
        assert run["projected_longbench16_s"] == run["seconds"] * 3750 / 16
        assert run["projected_longbench16_min"] == run["projected_longbench16_s"] / 60
        folders = sorted((tmp_path / "sweep" / f"run_{decode}" / "longbench" / "tiny_llama").glob("*/*"))
        assert len(folders) == 6 and not (tmp_path / "sweep" / f"warmup_{decode}").exists()
        for folder in folders:      # the runner's own files: a row per sample, each its dataset's answer length
            rows = results.read_predictions(folder)
            assert sorted(r["dataset"] for r in rows) == sorted(bench.LONGBENCH16_SIZES)
            assert all(r["new_tokens"] == short_answers[r["dataset"]] and r["prompt_tokens"] <= 160 for r in rows)
            assert json.loads((folder / "manifest.json").read_text())["config"]["decode"] == decode
            preds[decode, folder.name] = {r["id"]: r["pred"] for r in rows}
    assert {k[1]: v for k, v in preds.items() if k[0] == "batched"} == \
        {k[1]: v for k, v in preds.items() if k[0] == "continuous"}          # the CPU: the same tokens either way
    plain = sweep["plain"]
    assert len(plain["measurements"]) == 16 * 6 and sweep["runs"]["continuous"]["plain_over"] > 0
    assert plain["repeats"] == 3 and plain["negative_per_token"] == sum(m["per_token_s"] < 0 for m in plain["measurements"])
    per_sample = {}
    for m in plain["measurements"]:
        per_token = (m["t_2k_s"] - m["t_k_s"]) / 2
        assert m["per_token_s"] == pytest.approx(per_token) and m["fixed_s"] == pytest.approx(m["t_k_s"] - 2 * per_token)
        per_sample[m["dataset"]] = per_sample.get(m["dataset"], 0) + m["fixed_s"] + short_answers[m["dataset"]] * per_token
    expected = sum(bench.LONGBENCH16_SIZES[d] * v for d, v in per_sample.items())
    assert plain["projected_longbench16_s"] == pytest.approx(expected, rel=1e-9)
    assert plain["measured_s"] == pytest.approx(sum(m["t_k_s"] + m["t_2k_s"] for m in plain["measurements"]))
    text = (tmp_path / "bench.md").read_text()
    assert "| runner, decode=continuous | " in text and "one sample and one method at a time, plain" in text
    assert "Target: a full six-method LongBench-16 sweep in 30 min; decode=continuous projects" in text


@pytest.mark.parametrize("args", [["--sweep-samples", "0"], ["--sweep-samples", "15"], ["--sweep-plain-tokens", "0"]])
def test_bad_sweep_settings_are_refused(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--model", "tiny_llama", "--sections", "sweep", *args, "--out", str(tmp_path)])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert args[0] in error and ("at least 16" in error if args[0] == "--sweep-samples" else "at least 1" in error)


@pytest.mark.parametrize("item, message", [
    ("decode_prompts=0", "decode_prompts=0 must be a positive integer"),
    ("decode=batched", "the sweep sets 'decode' itself"),
    ("budgets=[64]", "the sweep sets 'budgets' itself"),
    ("protocol.window_size.snapkv=8", "the sweep sets 'protocol.window_size.snapkv' itself"),
    ("decode_prompts", "not KEY=VALUE"),
    ("protocol=default", "the sweep sets 'protocol' itself"),
    ("protocol.h2o_scorer=fast", "protocol.h2o_scorer='fast' is not one of [reference, fused]"),
])
def test_bad_sweep_run_settings_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, item, message):
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit:
        bench.main(["--model", "tiny_llama", "--sections", "sweep", "--sweep-samples", "16", "--sweep-set", item,
                    "--out", str(tmp_path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("items, extra, message", [
    (["protocol.h2o_scorer=fused", "protocol.h2o_variant=window"], [], "variant='window'"),
    (["protocol.h2o_scorer=fused"], ["--dtype", "float16"], "scorer=fused does not take a float16 model"),
])
def test_bad_sweep_method_settings_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, items, extra,
                                                                       message):
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit:
        bench.main(["--model", "tiny_llama", "--sections", "sweep", "--sweep-samples", "16", *extra, "--sweep-set",
                    *items, "--out", str(tmp_path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_the_sweep_takes_the_fused_h2o_scorer(tmp_path, short_answers):
    bench.main(["--model", "tiny_llama", "--sections", "sweep", "--budget", "32", "--window", "8",
                "--sweep-samples", "16", "--sweep-max-input", "160", "--sweep-set", "protocol.h2o_scorer=fused",
                "--out", str(tmp_path)])
    sweep = json.loads((tmp_path / "bench.json").read_text())["sweep"]
    assert sweep["run_overrides"] == ["protocol.h2o_scorer=fused"] and sweep["runs"]["continuous"]["rows"] == 96
    folders = [f.name for f in (tmp_path / "sweep" / "run_continuous" / "longbench" / "tiny_llama").glob("*/*")]
    assert [f for f in folders if f.startswith("h2o")] == ["h2o_b32_w8_k7_maxpool_qh_scorerfused_variantreference2024"]


def test_a_run_on_a_given_model_still_checks_its_dtype(tmp_path):
    from omegaconf import OmegaConf

    from harness import config
    from harness.engine.models import load_model
    from harness.run import runner
    lm = load_model(OmegaConf.load(config.config_dir() / "model" / "tiny_llama.yaml"))      # float32
    cfg = config.compose(["model=tiny_llama", "model.dtype=bfloat16", "task=passkey", "task.context_lengths=[400]",
                          "task.depths=[50]", "method=fullkv", f"results_dir={tmp_path}", "wandb=false",
                          "progress=never"])
    with pytest.raises(RuntimeError, match="loaded in float32, not the bfloat16"):
        runner.run(cfg, lm=lm)


def test_sweep_contexts_are_sized_in_the_models_own_tokens():
    import random
    from types import SimpleNamespace

    from harness.engine.models import byte_tokenizer
    tok = byte_tokenizer()
    for n in (1, 37, 900):                                  # the random models' byte tokenizer: exact
        text = bench.sized_text(random.Random(n), n, tok)
        assert len(tok(text, add_special_tokens=False).input_ids) == n

    class Pairs:                                            # a tokenizer of two characters per token
        def __call__(self, text, add_special_tokens=False):
            return SimpleNamespace(input_ids=[text[i:i + 2] for i in range(0, len(text), 2)])

        def decode(self, ids):
            return "".join(ids)
    text = bench.sized_text(random.Random(0), 50, Pairs())
    assert len(text) == 100 and len(Pairs()(text).input_ids) == 50
