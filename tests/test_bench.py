"""The benchmark's measurements on the CPU (values and invariants, not timings)."""

import importlib.util
import json
from pathlib import Path

import pytest

from harness.bench import speed as bench


def test_bench_methods_section(tmp_path):
    bench.main(["--model", "tiny_llama", "--sections", "methods", "--contexts", "300", "--budget", "64",
                "--window", "8", "--repeats", "1", "--decode-tokens", "3", "--methods", "fullkv", "snapkv", "h2o",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert set(rows) == {"fullkv", "snapkv", "h2o"}
    # tiny_llama: 4 layers, 2 KV heads, head dim 16, float32; FullKV keeps 300 tokens, the others 64 x 4 query heads
    assert rows["fullkv"]["kv_gib"] * 2**30 == 4 * 2 * (2 * 300 * 16 * 4)
    assert rows["snapkv"]["kv_gib"] * 2**30 == 4 * 2 * (4 * 64 * 16 * 4)
    assert all(r["prefill_ms"] > 0 and r["decode_plain_ms"] > 0 and r["decode_fast_ms"] > 0 for r in rows.values())
    assert rows["fullkv"]["overhead_pct"] == 0 and rows["snapkv"]["graph"] is False      # no graphs on the CPU
    assert "| 300 | snapkv | 64 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_batches_sweep_and_divergence_sections(tmp_path):
    bench.main(["--model", "tiny_llama", "--sections", "batches", "sweep", "divergence", "--budget", "64",
                "--window", "8", "--decode-tokens", "4", "--batches", "1", "4", "--batch-context", "200",
                "--sweep-samples", "3", "--sweep-max-input", "600", "--sweep-plain", "--divergence-prompts", "2",
                "--divergence-lengths", "150", "300", "--divergence-tokens", "8", "--divergence-baseline",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [(b["method"], b["batch"]) for b in data["batches"]] == [("fullkv", 1), ("fullkv", 4), ("snapkv", 1),
                                                                     ("snapkv", 4)]
    assert all(b["tokens_per_s"] > 0 for b in data["batches"])
    # the batch's buffers grow with the rows: 4 rows read 4x the KV of one
    by = {(b["method"], b["batch"]): b["kv_read_bytes"] for b in data["batches"]}
    assert by["snapkv", 4] == 4 * by["snapkv", 1]
    sweep = data["sweep"]
    assert [s["prompt_tokens"] <= 600 for s in sweep["samples"]] == [True] * 3
    assert sweep["sweep_over_fullkv"] > 0 and sweep["six_methods_one_at_a_time_plain_s"] > 0
    div = data["divergence"]
    assert div["rows"] == 12 and div["rows_differing"] == 0 and div["mean_identical_prefix"] == 1.0  # CPU: identical
    assert div["baseline_rows_differing"] == 0                  # float32 on the CPU: the backends agree too
    assert data["hardware"] == {}          # no GPU: no bandwidth floor
    text = (tmp_path / "bench.md").read_text()
    assert "| 200 | snapkv | 4 |" in text and "six methods, shared prefill" in text and "0 of 12 rows differ" in text


def test_longbench_workload_shape():
    work = bench.longbench_workload(32, 7950)
    assert len({d for d, _, _ in work}) == 16                     # every dataset appears
    assert all(0 < n <= 7950 for _, n, _ in work)
    assert {m for _, _, m in work} == {32, 64, 128, 512}
    assert sum(n == 7950 for _, n, _ in work) > len(work) / 3       # LongBench mostly exceeds an 8K model's limit


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
