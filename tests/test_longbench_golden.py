"""The harness's LongBench scorer against golden cases scored by the official code.

``tests/data/longbench_golden.json`` was written once by ``scripts/make_longbench_golden.py``, which
ran THUDM/LongBench's own metrics.py and eval.py at commit 2e00731 outside this repository: per
sample (eval.py's per-prediction rule with the official metric functions) and per dataset (eval.py
itself, and ``eval.py --e`` for the LongBench-E length buckets). Every number must come out the same.
"""

import json
import math

import pytest

from harness.longbench import metrics, score

from conftest import ROOT

GOLDEN = json.loads((ROOT / "tests" / "data" / "longbench_golden.json").read_text(encoding="utf-8"))


def test_the_golden_file_covers_every_dataset():
    assert "2e00731" in GOLDEN["source"]
    assert {row["dataset"] for row in GOLDEN["rows"]} == set(metrics.DATASET_METRIC) == set(GOLDEN["eval"])
    assert len(GOLDEN["rows"]) >= 150


@pytest.mark.parametrize("dataset", sorted(metrics.DATASET_METRIC))
def test_every_sample_scores_as_the_official_code_scores_it(dataset):
    rows = [row for row in GOLDEN["rows"] if row["dataset"] == dataset]
    for row in rows:
        ours = metrics.sample_score(dataset, row["pred"], row["answers"], row["all_classes"])
        assert ours == row["score"], (dataset, row["pred"], row["answers"])


def write_predictions(folder):
    by_dataset = {}
    for row in GOLDEN["rows"]:
        by_dataset.setdefault(row["dataset"], []).append(
            {k: row[k] for k in ("pred", "answers", "all_classes", "length")})
    folder.mkdir()
    for dataset, rows in by_dataset.items():
        (folder / f"{dataset}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                           encoding="utf-8")


def test_every_dataset_score_equals_eval_py(tmp_path):
    write_predictions(tmp_path / "pred")
    assert score.score_dir(tmp_path / "pred") == GOLDEN["eval"]


def test_longbench_e_buckets_equal_eval_py_e(tmp_path):
    """eval.py --e buckets every file of pred_e/, named after the base dataset."""
    write_predictions(tmp_path / "pred_e")
    ours = score.score_dir(tmp_path / "pred_e", longbench_e=True)
    for dataset, buckets in GOLDEN["eval_e"].items():
        mine = ours[dataset]
        assert set(mine) == set(buckets)
        for bucket, value in buckets.items():
            assert (math.isnan(mine[bucket]) and math.isnan(value)) or mine[bucket] == value, (dataset, bucket)
