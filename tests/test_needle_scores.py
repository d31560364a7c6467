"""Needle-in-a-Haystack scores (hand-checked values) and heatmaps drawn from fake results folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgba

from harness.report import heatmap
from harness.tasks.needle_scores import (
    EXPECTED_ANSWER,
    KEY_PHRASE,
    NEEDLE,
    ORIGINAL_QUESTION,
    QUESTION,
    exact_match,
    needle_word_recall,
    rouge1,
    rouge1_f_times_10,
)

ROOT = Path(__file__).resolve().parents[1]

# The expected answer "eat a sandwich and sit in dolores park on a sunny day." splits into 12 words,
# 11 of them distinct ("a" twice): {eat, a, sandwich, and, sit, in, dolores, park, on, sunny, day.}.
# The reference denominator is len(set(expected)) = 11.
FULL = "Eat a sandwich and sit in Dolores Park on a sunny day."


def test_constants():
    assert NEEDLE == ("\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park"
                      " on a sunny day.\n")
    assert QUESTION == "The best thing to do in San Francisco is: "
    assert ORIGINAL_QUESTION == "What is the best thing to do in San Francisco?"
    assert EXPECTED_ANSWER == "eat a sandwich and sit in dolores park on a sunny day."
    assert KEY_PHRASE == "eat a sandwich and sit in dolores park on a sunny day"


@pytest.mark.parametrize("response, reference, normalized", [
    # Lower-cased, the response's words are exactly the 11 distinct expected words, "day." included
    # (the period matches the expected "day."): 11/11 either way.
    (FULL, 1.0, 1.0),
    # No final period: "day" != "day." under the reference semantics, so 10/11; normalized 11/11.
    (FULL[:-1], 10 / 11, 1.0),
    # "day!" is neither "day." nor "day": 10/11; normalized "day" matches: 11/11.
    (FULL[:-1] + "!", 10 / 11, 1.0),
    # The whole needle sentence contains every expected word: 11/11.
    (NEEDLE, 1.0, 1.0),
    # "sandwich," and "park." keep their punctuation: the reference counts eat, a, and, sit, in,
    # dolores = 6/11; normalized adds sandwich and park = 8/11 (on, sunny, day are absent).
    ("Eat a sandwich, and sit in Dolores Park.", 6 / 11, 8 / 11),
    # A repeated word counts once: only "a" -> 1/11.
    ("a a a a", 1 / 11, 1 / 11),
    # Case is ignored: "DAY." -> "day." -> 1/11 both ways.
    ("DAY.", 1 / 11, 1 / 11),
    # A refusal: of its words only "in" is expected -> 1/11.
    ("I cannot find it in the book.", 1 / 11, 1 / 11),
    ("", 0.0, 0.0),
])
def test_needle_word_recall(response, reference, normalized):
    assert needle_word_recall(response, EXPECTED_ANSWER) == pytest.approx(reference)
    assert needle_word_recall(response) == pytest.approx(reference)  # EXPECTED_ANSWER is the default
    assert needle_word_recall(response, EXPECTED_ANSWER, normalize=True) == pytest.approx(normalized)


def test_needle_word_recall_other_expected():
    # Expected text is lower-cased like the response: {"pass", "key", "42"} -> 2 of 3 found.
    assert needle_word_recall("The PASS key is 17", "pass key 42") == pytest.approx(2 / 3)
    # Normalization applies to the expected side too: "42." -> "42".
    assert needle_word_recall("it is 42", "42.") == 0.0
    assert needle_word_recall("it is 42", "42.", normalize=True) == 1.0
    with pytest.raises(ValueError):
        needle_word_recall("anything", "  ")
    with pytest.raises(ValueError):
        needle_word_recall("anything", "...", normalize=True)


# ROUGE-1 against the needle: rouge_score lower-cases, keeps [a-z0-9] tokens and stems both sides.
# The needle has 21 tokens: the best thing to do in san francisco is eat a sandwich and sit in
# dolores park on a sunny day ("in" twice, "a" twice).
@pytest.mark.parametrize("response, precision, recall, f", [
    # 12 response tokens (a twice, in once), all in the needle with clipped counts: 12 overlaps.
    # P = 12/12, R = 12/21 = 4/7, F = 2PR/(P+R) = (8/7)/(11/7) = 8/11.
    (FULL, 1.0, 4 / 7, 8 / 11),
    # Punctuation is not a token, so the same without the period.
    (FULL[:-1], 1.0, 4 / 7, 8 / 11),
    # 8 tokens, all in the needle: R = 8/21, F = (16/21)/(29/21) = 16/29.
    ("Eat a sandwich, and sit in Dolores Park.", 1.0, 8 / 21, 16 / 29),
    # The stemmer maps "sandwiches" to "sandwich": P = 1, R = 1/21, F = (2/21)/(22/21) = 1/11.
    ("Sandwiches", 1.0, 1 / 21, 1 / 11),
    # The whole needle: 1, 1, 1.
    (NEEDLE, 1.0, 1.0, 1.0),
    # Nothing in common (after stemming "walking" -> "walk"): all zero.
    ("Walking dogs", 0.0, 0.0, 0.0),
    ("", 0.0, 0.0, 0.0),
])
def test_rouge1(response, precision, recall, f):
    s = rouge1(response, NEEDLE)
    assert s == pytest.approx({"precision": precision, "recall": recall, "f": f})
    assert rouge1_f_times_10(response) == pytest.approx(10 * f)  # KVCache-Factory's stored score


def test_rouge1_order_is_target_then_prediction():
    # Response longer than the needle: "Dolores Park is nice" vs needle "Dolores Park": 2 overlaps,
    # P = 2/4 (response tokens), R = 2/2 (needle tokens); swapping the arguments would swap them.
    s = rouge1("Dolores Park is nice", "Dolores Park")
    assert (s["precision"], s["recall"]) == pytest.approx((0.5, 1.0))


@pytest.mark.parametrize("response, key, expected", [
    (FULL, KEY_PHRASE, 1.0),                                             # default key, period ignored
    ("Answer: EAT A SANDWICH AND SIT IN DOLORES PARK ON A SUNNY DAY!", KEY_PHRASE, 1.0),  # case
    ("eat a sandwich and sit in Dolores\nPark on a sunny day", KEY_PHRASE, 1.0),         # line break
    ("Eat a sandwich, and sit in Dolores Park on a sunny day.", KEY_PHRASE, 0.0),         # comma
    ("eat a sandwich in Dolores Park", KEY_PHRASE, 0.0),
    ("I love Dolores Park.", "dolores park", 1.0),
    ("", "dolores park", 0.0),
])
def test_exact_match(response, key, expected):
    assert exact_match(response, key) == expected


def test_exact_match_default_and_empty_key():
    assert exact_match(NEEDLE) == 1.0
    with pytest.raises(ValueError):
        exact_match("x", " ")


# ---------------------------------------------------------------------------------------------
# Heatmaps from fake results folders

LENGTHS = [1000, 2000, 3000]
DEPTHS = [0.0, 33.3, 66.7, 100.0]


def _score_pairs(method: str, length: int, depth: float) -> tuple[float, float]:
    """Two samples per cell with known scores; the cell mean is their average."""
    if method == "fullkv":
        return (1.0, 1.0) if depth < 100 else (1.0, 0.5)
    i, j = LENGTHS.index(length), DEPTHS.index(depth)
    return (j / 3, (i + j) / 5)   # all within [0, 1]


def _fake_run(root: Path, method: str, run_name: str, budget) -> Path:
    folder = root / "needle" / "tiny" / "default" / run_name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"method": {"name": method, "budget": budget}}))
    lines = []
    for length in LENGTHS:
        for depth in DEPTHS:
            for r, s in enumerate(_score_pairs(method, length, depth)):
                lines.append(json.dumps({"id": f"len{length}_depth{depth:g}_r{r}", "pred": FULL[:-1] if s < 1 else FULL,
                                         "answers": [EXPECTED_ANSWER], "context_length": length, "depth": depth,
                                         "score": s, "exact_match": float(s == 1.0)}))
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _expected_pivot(method: str) -> pd.DataFrame:
    return pd.DataFrame([[sum(_score_pairs(method, x, d)) / 2 for x in LENGTHS] for d in DEPTHS],
                        index=DEPTHS, columns=LENGTHS)


@pytest.fixture
def fake_results(tmp_path):
    root = tmp_path / "results"
    full = _fake_run(root, "fullkv", "fullkv", None)
    snap = _fake_run(root, "snapkv", "snapkv_b64_w32_k7_maxpool_qh", 64)
    return root, full, snap


def _check_files(paths):
    for p in paths:
        p = Path(p)
        assert p.exists(), p
        assert p.stat().st_size > (5000 if p.suffix == ".png" else 2000), (p, p.stat().st_size)
    png = Path(next(p for p in paths if str(p).endswith(".png"))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_colormap_is_the_papers():
    assert to_hex(heatmap.CMAP(0.0)) == "#f0496e"    # red at 0
    # yellow in the middle, to within the 256-entry lookup table's quantisation
    assert heatmap.CMAP(0.5) == pytest.approx(to_rgba("#EBB839"), abs=2 / 255)
    assert to_hex(heatmap.CMAP(1.0)) == "#0cd79f"    # green at 1


def test_load_cells_and_pivot(fake_results):
    _, full, snap = fake_results
    for folder, method in ((full, "fullkv"), (snap, "snapkv")):
        cells = heatmap.load_cells(folder)
        assert list(cells.columns) == ["context_length", "depth", "score"]
        assert len(cells) == len(LENGTHS) * len(DEPTHS) * 2
        table = heatmap.pivot(cells)
        assert list(table.index) == DEPTHS            # depth rows ascending: 0 % drawn at the top
        assert list(table.columns) == LENGTHS
        pd.testing.assert_frame_equal(table, _expected_pivot(method), check_names=False, check_dtype=False)
    # fullkv: 9 cells of (1, 1) and the 3 cells at depth 100 of (1, 0.5) -> mean (18 + 4.5) / 24.
    assert heatmap.load_cells(full)["score"].mean() == pytest.approx(22.5 / 24)
    assert heatmap.run_label(full) == "FullKV"
    assert heatmap.run_label(snap) == "SnapKV @64"


def test_load_cells_other_fields(fake_results):
    _, _, snap = fake_results
    # A stored field other than score.
    em = heatmap.pivot(heatmap.load_cells(snap, "exact_match"))
    assert em.loc[100.0, 3000] == 1.0     # scores (3/3, 5/5) = (1, 1): both exact
    assert em.loc[100.0, 1000] == 0.5     # scores (3/3, 3/5): one of two
    assert em.loc[0.0, 1000] == 0.0       # scores (0, 0)
    # A recomputed field: pred is FULL (recall 1) where score == 1, else FULL without its period (10/11).
    rec = heatmap.pivot(heatmap.load_cells(snap, "needle_word_recall"))
    assert rec.loc[100.0, 3000] == pytest.approx(1.0)      # scores (1, 1)
    assert rec.loc[0.0, 1000] == pytest.approx(10 / 11)    # scores (0, 0)
    assert heatmap.load_cells(snap, "needle_word_recall_normalized")["score"].min() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no 'nope' field"):
        heatmap.load_cells(snap, "nope")


def test_plot_functions(fake_results, tmp_path):
    _, full, snap = fake_results
    out = tmp_path / "figs"
    paths = heatmap.plot_heatmap(heatmap.load_cells(snap), "SnapKV b64", out / "snap")
    assert [p.name for p in paths] == ["snap.png", "snap.pdf"]
    _check_files(paths)
    runs = [(heatmap.run_label(f), heatmap.load_cells(f)) for f in (full, snap)]
    paths = heatmap.plot_panel(runs, out / "panel", "needle/tiny/default", pretrained_len=2000)
    _check_files(paths)


def test_cli(fake_results, tmp_path):
    root, _, _ = fake_results
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "harness.report.heatmap", str(root), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = [Path(line) for line in proc.stdout.split()]
    names = sorted(p.name for p in printed)
    assert names == sorted(["fullkv.png", "fullkv.pdf", "snapkv_b64_w32_k7_maxpool_qh.png",
                            "snapkv_b64_w32_k7_maxpool_qh.pdf", "panel.png", "panel.pdf"])
    _check_files(printed)
    assert all(p.parent == out for p in printed)


def test_cli_no_runs(tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        heatmap.main([str(tmp_path), "--out", str(tmp_path / "o")])
