"""The benchmark's measurements on the CPU (values, not timings)."""

import json

from harness import bench


def test_bench_measures_every_method(tmp_path):
    bench.main(["--model", "tiny_llama", "--contexts", "300", "--budget", "64", "--window", "8", "--repeats", "1",
                "--decode-tokens", "3", "--methods", "fullkv", "snapkv", "h2o", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"fullkv", "snapkv", "h2o"}
    # tiny_llama: 4 layers, 2 KV heads, head dim 16, float32; FullKV keeps 300 tokens, the others 64 x 4 query heads
    assert rows["fullkv"]["kv_gib"] * 2**30 == 4 * 2 * (2 * 300 * 16 * 4)
    assert rows["snapkv"]["kv_gib"] * 2**30 == 4 * 2 * (4 * 64 * 16 * 4)
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in rows.values())
    assert "| 300 | snapkv | 64 |" in (tmp_path / "bench.md").read_text()


def test_batched_decode_throughput_on_cpu(tmp_path):
    bench.main(["--model", "tiny_llama", "--contexts", "200", "--budget", "64", "--window", "8", "--repeats", "1",
                "--decode-tokens", "3", "--methods", "fullkv", "snapkv", "--batches", "1", "4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    for row in data["rows"]:
        assert [b["batch"] for b in row["batched_decode"]] == [1, 4]
        assert all(b["tokens_per_s"] > 0 for b in row["batched_decode"])
    assert data["hardware"] == {}          # no GPU: no bandwidth floor
    assert "| 200 | snapkv | 4 |" in (tmp_path / "bench.md").read_text()
