"""The paper-style LongBench table (harness.report.table), the published reference numbers
(results/reference/*.json), on hand-written run folders (the wandb logger: test_wandb.py)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from harness.longbench import metrics, score
from harness.report import common, table
from harness.run import results

from conftest import ROOT, SHARED

REFERENCE = ROOT / "results" / "reference"
PAPER, OFFICIAL = "Paper avg (mean of 16 datasets)", "Official avg (mean of 6 category means)"

# A complete run, chosen so that the averages are easy by hand:
#   category means: Single-Doc (20+30+40)/3 = 30, Multi-Doc (40+30+20)/3 = 30, Summarization
#   (25+20+15)/3 = 20, Few-shot (70+90+50)/3 = 70, Synthetic (5+75)/2 = 40, Code (60+50)/2 = 55
#   paper mean    = 640 / 16 = 40.00
#   official mean = (30+30+20+70+40+55) / 6 = 245 / 6 = 40.8333 -> 40.83
SNAP = dict(zip(metrics.ENGLISH_16, [20.0, 30.0, 40.0, 40.0, 30.0, 20.0, 25.0, 20.0, 15.0, 70.0, 90.0, 50.0, 5.0, 75.0,
                                 60.0, 50.0]))
# A partial run (3 of 16):
#   paper mean    = (25+30+60) / 3 = 38.33
#   official mean = (Single-Doc (25+30)/2 = 27.5, Few-shot 60) / 2 = 43.75
FULL_PARTIAL = {"narrativeqa": 25.0, "qasper": 30.0, "trec": 60.0}
# Published SnapKV 128 numbers for the diff rows: narrativeqa 20.5 (ours - published = -0.50), every
# other dataset ours - 1 (diff +1.00).
#   published paper mean = (640 - 15 + 0.5) / 16 = 39.09375, printed as 39.09 -> diff 40.00 - 39.09 = +0.91
#   published official   = (29.5 + 29 + 19 + 69 + 39 + 54) / 6 = 39.9167 -> diff 40.8333 - 39.9167 = +0.92
PUBLISHED_SNAP = {d: (20.5 if d == "narrativeqa" else v - 1.0) for d, v in SNAP.items()}


def longbench_runs(roots) -> list[Path]:
    """The LongBench run folders the table reads: ``result.json`` with a ``manifest.json``."""
    return results.find_runs(roots, table.RESULT, also=results.MANIFEST)


def make_run(root: Path, model: str, protocol: str, method: str, budget, scores: dict, name: str | None = None,
             samples: dict | None = None) -> Path:
    """A scored LongBench run: manifest.json, result.json and ``<dataset>.jsonl`` with ``samples[dataset]``
    lines (default: the dataset's whole test set, e.g. 200)."""
    folder = root / "longbench" / model / protocol / (name or (method if method == "fullkv" else f"{method}_b{budget}"))
    folder.mkdir(parents=True)
    manifest = {"method": {"name": method, "budget": budget, "window_size": 8},
                "config": {"model": {"name": model, "source": "hub"}, "protocol": {"name": protocol}}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "result.json").write_text(json.dumps(scores), encoding="utf-8")
    for dataset in scores:  # the per-dataset predictions a real run holds (the table counts their lines)
        count = (samples or {}).get(dataset, metrics.DATASET_SIZES.get(dataset, 1))
        (folder / f"{dataset}.jsonl").write_text("".join(
            json.dumps({"id": str(i), "pred": "x", "answers": ["x"], "all_classes": None, "length": 1}) + "\n"
            for i in range(count)))
    return folder


def write_reference(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "paper.json").write_text(json.dumps({"source": "test", "note": "hand-written", "entries": [
        {"model": "llama3", "method": "snapkv", "budget": 128, "scores": PUBLISHED_SNAP, "average": 39.09},
        {"model": "llama3", "method": "snapkv", "budget": 512, "scores": {}, "average": 41.0},   # no run: no row
        {"model": "mistral", "method": "snapkv", "budget": 128, "scores": {}, "average": 30.0},  # no run: no row
    ]}), encoding="utf-8")
    (path / "other.json").write_text(json.dumps({"source": "test", "note": "", "unofficial": True, "entries": [
        {"model": "llama3", "method": "fullkv", "budget": None, "scores": {}, "average": 41.95}]}), encoding="utf-8")
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "results"
    make_run(root, "llama3", "dynamickv_paper", "snapkv", 128, SNAP)
    make_run(root, "llama3", "dynamickv_paper", "fullkv", None, FULL_PARTIAL)
    # same method and budget under another protocol: its own row, not a duplicate
    make_run(root, "llama3", "longbench_official", "snapkv", 128, {"qasper": 10.0, "lcc": "not a number",
                                                                   "qasper_e": {"0-4k": 1.0}})
    return root


def _csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_table_values_and_files(runs, tmp_path, capsys):
    reference = write_reference(tmp_path / "ref")
    out = tmp_path / "out"
    longbench = runs / "longbench"
    # overlapping and repeated folder arguments: every run counts once
    snap_folder = longbench / "llama3" / "dynamickv_paper" / "snapkv_b128"
    table.main([str(longbench), str(longbench / "llama3"), str(snap_folder), str(longbench),
                "--out", str(out), "--reference", str(reference)])
    printed = capsys.readouterr().out
    assert printed.startswith("| Model | Protocol | Method | Budget | Row | NrtvQA | Qasper | MF-en |")
    assert (out / "table.md").read_text(encoding="utf-8").strip() == printed.strip()

    rows = _csv(out / "table.csv")
    assert list(rows[0])[5:21] == ["NrtvQA", "Qasper", "MF-en", "HotpotQA", "2WikiMQA", "Musique", "GovReport", "QMSum",
                                  "MultiNews", "TREC", "TriviaQA", "SAMSum", "PCount", "PRe", "Lcc", "RB-P"]
    assert list(rows[0])[21:] == [PAPER, OFFICIAL, "Source"]
    got = [(r["Protocol"], r["Method"], r["Budget"], r["Row"], r["Source"].split("/")[-1]) for r in rows]
    assert got == [
        ("dynamickv_paper", "FullKV", "full", "ours", "fullkv"),
        ("dynamickv_paper", "FullKV", "full", "published", "other (unofficial)"),
        ("dynamickv_paper", "FullKV", "full", "diff", "ours - other (unofficial)"),
        ("dynamickv_paper", "SnapKV", "128", "ours", "snapkv_b128"),
        ("dynamickv_paper", "SnapKV", "128", "published", "paper"),
        ("dynamickv_paper", "SnapKV", "128", "diff", "ours - paper"),
        ("longbench_official", "SnapKV", "128", "ours", "snapkv_b128"),
        ("longbench_official", "SnapKV", "128", "published", "paper"),
        ("longbench_official", "SnapKV", "128", "diff", "ours - paper"),
    ]
    full, full_pub, full_diff, snap, snap_pub, snap_diff, other, _, other_diff = rows
    # complete run: plain mean 40.00, category macro mean 40.83 (see SNAP)
    assert (snap["NrtvQA"], snap["RB-P"], snap[PAPER], snap[OFFICIAL]) == ("20.00", "50.00", "40.00", "40.83")
    # partial run: averages over the present datasets, marked with the count (see FULL_PARTIAL)
    assert (full[PAPER], full[OFFICIAL], full["HotpotQA"]) == ("38.33 (3/16)", "43.75 (3/16)", "")
    # published: the printed average; the official one computed from the per-dataset numbers
    assert (snap_pub["NrtvQA"], snap_pub["Qasper"], snap_pub[PAPER], snap_pub[OFFICIAL]) == \
        ("20.50", "29.00", "39.09", "39.92")
    assert (snap_diff["NrtvQA"], snap_diff["Qasper"], snap_diff["RB-P"]) == ("-0.50", "+1.00", "+1.00")
    assert (snap_diff[PAPER], snap_diff[OFFICIAL]) == ("+0.91", "+0.92")
    # average-only published entry; ours incomplete: no per-dataset or average diff
    assert (full_pub[PAPER], full_pub[OFFICIAL], full_pub["NrtvQA"]) == ("41.95", "", "")
    assert full_diff[PAPER] == "" and all(full_diff[h] == "" for h in ("NrtvQA", "Qasper", "TREC"))
    # the other protocol's run: 'lcc' was not a number and 'qasper_e' holds buckets: only qasper counts
    assert (other["Qasper"], other["Lcc"], other[PAPER], other[OFFICIAL]) == \
        ("10.00", "", "10.00 (1/16)", "10.00 (1/16)")
    assert (other_diff["Qasper"], other_diff["NrtvQA"], other_diff[PAPER]) == ("-19.00", "", "")

    tex = (out / "table.tex").read_text(encoding="utf-8")
    assert tex.startswith(r"\begin{tabular}{lllll" + "r" * 18 + "l}")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert tex.rstrip().endswith(r"\end{tabular}")
    assert r"dynamickv\_paper & SnapKV & 128 & ours & 20.00" in tex
    assert tex.count(r"\\") == len(rows) + 1  # header + one line per row

    data = json.loads((out / "table.json").read_text(encoding="utf-8"))
    assert data["header"] == list(rows[0]) and len(data["rows"]) == len(rows)
    assert data["rows"][3]["paper"] == pytest.approx(40.0) and data["rows"][3]["official"] == pytest.approx(245 / 6)


def test_find_runs_counts_each_folder_once(runs):
    longbench = runs / "longbench"
    snap = longbench / "llama3" / "dynamickv_paper" / "snapkv_b128"
    found = longbench_runs([longbench, snap, longbench / "llama3", longbench, snap / "." / ".." / "snapkv_b128"])
    assert len(found) == 3 and len(set(found)) == 3
    assert longbench_runs([snap]) == [snap.resolve()]  # a run folder itself
    (runs / "scored_only").mkdir()
    (runs / "scored_only" / "result.json").write_text("{}")  # no manifest: not a run
    assert len(longbench_runs([runs])) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        longbench_runs([runs / "missing"])


def test_duplicate_runs(runs, tmp_path, capsys, caplog):
    first = runs / "longbench" / "llama3" / "dynamickv_paper" / "snapkv_b128"
    second = make_run(runs, "llama3", "dynamickv_paper", "snapkv", 128, {**SNAP, "qasper": 99.0},
                      name="snapkv_b128_w8_k7_maxpool_qh")
    os.utime(first / "result.json", (1_000_000_000, 1_000_000_000))  # the older one
    with pytest.raises(table.DuplicateRunError) as err:
        table.table([runs], reference=None)
    message = str(err.value)
    assert str(first.resolve()) in message and str(second.resolve()) in message
    assert "model=llama3 method=snapkv budget=128 protocol=dynamickv_paper" in message and "--latest" in message
    with pytest.raises(SystemExit, match="same row"):
        table.main([str(runs), "--out", str(tmp_path / "o1"), "--no-reference"])

    caplog.clear()
    table.main([str(runs), "--out", str(tmp_path / "o2"), "--no-reference", "--latest"])
    assert [r.levelname for r in caplog.records if "ignored" in r.getMessage()] == ["WARNING"]
    snap = [r for r in _csv(tmp_path / "o2" / "table.csv") if r["Method"] == "SnapKV" and r["Budget"] == "128"
            and r["Protocol"] == "dynamickv_paper"]
    assert len(snap) == 1 and snap[0]["Qasper"] == "99.00"  # the newest result.json


def test_datasets_option_and_errors(runs, tmp_path, capsys):
    out = tmp_path / "out"
    table.main([str(runs), "--out", str(out), "--no-reference", "--datasets", "narrativeqa", "qasper", "trec"])
    rows = _csv(out / "table.csv")
    paper3, official2 = "Paper avg (mean of 3 datasets)", "Official avg (mean of 2 category means)"
    assert list(rows[0])[5:] == ["NrtvQA", "Qasper", "TREC", paper3, official2, "Source"]
    full = next(r for r in rows if r["Method"] == "FullKV")
    # all three present: no count mark; official = (Single-Doc 27.5 + Few-shot 60) / 2
    assert (full[paper3], full[official2]) == ("38.33", "43.75")
    assert all(r["Row"] == "ours" for r in rows)
    with pytest.raises(SystemExit):
        table.main([str(runs), "--out", str(out), "--datasets", "qasperr"])
    assert "unknown dataset(s) qasperr" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no LongBench runs"):
        table.main([str(empty), "--out", str(out)])


def test_budget_sweep_plot(tmp_path, capsys):
    root = tmp_path / "results"
    make_run(root, "llama3", "dynamickv_paper", "fullkv", None, SNAP)
    for budget, shift in ((64, -6.0), (128, -3.0), (512, -1.0)):
        for method in ("snapkv", "pyramidkv"):
            make_run(root, "llama3", "dynamickv_paper", method, budget, {d: v + shift for d, v in SNAP.items()})
    make_run(root, "mistral", "dynamickv_paper", "snapkv", 128, SNAP)  # a second panel
    paths = table.budget_sweep_plot(longbench_runs([root]), tmp_path / "plots" / "sweep")
    assert [p.name for p in paths] == ["sweep.png", "sweep.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    table.main([str(root), "--out", str(tmp_path / "out"), "--no-reference", "--sweep-plot"])
    assert (tmp_path / "out" / "budget_sweep.png").is_file() and (tmp_path / "out" / "budget_sweep.pdf").is_file()
    with pytest.raises(ValueError):
        table.budget_sweep_plot([], tmp_path / "none")


def test_shipped_reference_rows_in_table(tmp_path):
    root = tmp_path / "results"
    make_run(root, "llama3", "dynamickv_paper", "fullkv", None, SNAP)
    _, head, cells, _ = table.table([root], reference=REFERENCE)
    sources = [row[-1] for row in cells]
    assert sources[1:] == ["dynamickv_readme", "ours - dynamickv_readme", "pyramidkv_paper_table1",
                           "ours - pyramidkv_paper_table1", "third_party_512 (unofficial)",
                           "ours - third_party_512 (unofficial)"]
    pyramid = dict(zip(head, cells[3]))
    assert (pyramid["NrtvQA"], pyramid[PAPER]) == ("25.70", "41.46")
    assert dict(zip(head, cells[4]))[PAPER] == "-1.46"  # ours 40.00


# ------------------------------------------------------------------------------------------------
# results/reference/*.json
# ------------------------------------------------------------------------------------------------

REFERENCE_FILES = ("pyramidkv_paper_table1.json", "dynamickv_readme.json", "third_party_512.json")
MODELS = {"llama3", "mistral", "qwen2", "internlm2_5"}
# Rows of PyramidKV Table 1 whose printed Avg is not the mean of their printed per-dataset numbers
# (the spec's numbers, kept as published; each carries "inconsistent_average").
INCONSISTENT = {("mistral", "fullkv", None), ("mistral", "streamingllm", 128), ("mistral", "h2o", 128),
                ("mistral", "snapkv", 2048)}


def _entries(name: str) -> tuple[dict, list[dict]]:
    data = json.loads((REFERENCE / name).read_text(encoding="utf-8"))
    return data, data["entries"]


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reference_schema_and_means(name):
    data, entries = _entries(name)
    assert set(data) <= {"source", "note", "entries", "unofficial"}
    assert data["source"] and data["note"] and entries
    keys = set()
    for e in entries:
        assert set(e) <= {"model", "method", "budget", "scores", "average", "inconsistent_average"}
        assert e["model"] in MODELS and e["method"] in common.METHOD_NAMES
        assert (e["budget"] is None) == (e["method"] == "fullkv")
        assert e["budget"] is None or (isinstance(e["budget"], int) and e["budget"] > 0)
        assert isinstance(e["average"], float) and 0 < e["average"] < 100
        assert all(isinstance(v, float) and 0 <= v <= 100 for v in e["scores"].values())
        assert not e["scores"] or list(e["scores"]) == list(metrics.ENGLISH_16)
        key = (e["model"], e["method"], e["budget"])
        assert key not in keys
        keys.add(key)
        if e["scores"]:
            mean = sum(e["scores"].values()) / len(e["scores"])
            if "inconsistent_average" in e:  # flagged as published; the flag must not outlive a fix
                assert key in INCONSISTENT and abs(mean - e["average"]) > 0.01
            else:
                assert mean == pytest.approx(e["average"], abs=0.01 + 1e-9), key
    assert data.get("unofficial", False) == (name == "third_party_512.json")
    if name == "pyramidkv_paper_table1.json":
        assert {(e["model"], e["method"], e["budget"]) for e in entries if "inconsistent_average" in e} == INCONSISTENT
    assert table.load_reference(REFERENCE / name)  # the table reads it


def test_reference_contents():
    _, pyramid = _entries("pyramidkv_paper_table1.json")
    assert len(pyramid) == 18 and all(len(e["scores"]) == 16 for e in pyramid)
    by_key = {(e["model"], e["method"], e["budget"]): e for e in pyramid}
    assert by_key[("llama3", "fullkv", None)]["average"] == 41.46
    assert by_key[("llama3", "pyramidkv", 128)]["scores"]["trec"] == 66.5
    assert {k: e["average"] for k, e in by_key.items() if k[0] == "mistral"} == {
        ("mistral", "fullkv", None): 39.75, ("mistral", "snapkv", 128): 34.96, ("mistral", "streamingllm", 128): 27.57,
        ("mistral", "h2o", 128): 34.73, ("mistral", "pyramidkv", 128): 35.72, ("mistral", "snapkv", 2048): 40.55,
        ("mistral", "streamingllm", 2048): 32.35, ("mistral", "h2o", 2048): 39.95,
        ("mistral", "pyramidkv", 2048): 41.63}
    _, readme = _entries("dynamickv_readme.json")
    assert len(readme) == 24 and all(not e["scores"] and e["budget"] in (None, 512) for e in readme)
    assert {(e["model"], e["method"]): e["average"] for e in readme if e["method"] == "dynamickv"} == {
        ("llama3", "dynamickv"): 40.73, ("mistral", "dynamickv"): 40.90, ("qwen2", "dynamickv"): 39.16,
        ("internlm2_5", "dynamickv"): 38.39}
    _, third = _entries("third_party_512.json")
    assert {(e["method"], e["budget"]): e["average"] for e in third} == {
        ("fullkv", None): 41.94, ("snapkv", 512): 40.67, ("pyramidkv", 512): 40.09, ("h2o", 512): 39.32,
        ("streamingllm", 512): 35.80, ("snapkv", 1024): 41.08, ("pyramidkv", 1024): 41.04, ("h2o", 1024): 40.65,
        ("streamingllm", 1024): 37.29, ("snapkv", 2048): 41.47, ("pyramidkv", 2048): 41.35, ("h2o", 2048): 41.10,
        ("streamingllm", 2048): 39.58}


SPEC = SHARED / "spec"


@pytest.mark.skipif(not (SPEC / "reference-eval.md").is_file(), reason="needs ../shared/spec")
def test_reference_matches_spec_text():
    """Every per-dataset row, formatted as the spec prints it, occurs in the spec."""
    methods_md = (SPEC / "reference-methods.md").read_text(encoding="utf-8")
    eval_md = (SPEC / "reference-eval.md").read_text(encoding="utf-8")
    pretty = dict(common.METHOD_NAMES)
    for name, text, fmt in (
            ("pyramidkv_paper_table1.json", methods_md,
             lambda e: f"{pretty[e['method']]}{':' if e['budget'] is None else ''} "
             + " ".join(f"{v:.2f}" for v in e["scores"].values()) + f" | **{e['average']:.2f}**"),
            ("third_party_512.json", eval_md,
             lambda e: f"| {pretty[e['method']]} | " + " | ".join(f"{v:.2f}" for v in e["scores"].values())
             + f" | {e['average']:.2f} |")):
        for e in _entries(name)[1]:
            if e["scores"]:
                assert fmt(e) in text, (name, e["model"], e["method"], e["budget"])
    models = {"llama3": "Llama-3-8B-Instruct", "mistral": "Mistral-7B-Instruct-v0.2", "qwen2": "Qwen2-7B-Instruct",
              "internlm2_5": "InternLM-2.5-7B-Chat-1M"}
    for e in _entries("pyramidkv_paper_table1.json")[1]:  # the Llama-3 rows once more, from D.1's table
        if e["model"] == "llama3":
            label = pretty[e["method"]] + ("" if e["budget"] is None else f" {e['budget']}")
            assert f"| {label} | " + " | ".join(f"{v:.2f}" for v in e["scores"].values()) + " |" in eval_md
    readme = _entries("dynamickv_readme.json")[1]
    for model, label in models.items():
        row = [e["average"] for e in readme if e["model"] == model]
        assert f"| {label} | " + " | ".join(f"{v:.2f}" for v in row) + " |" in eval_md


def test_table_averages_are_the_scorer_averages(tmp_path):
    """The table's two averages are LongBench's paper and official averages of the same scores (hand
    values from the comments at SNAP and FULL_PARTIAL), unrounded in table.json."""
    root = tmp_path / "results"
    make_run(root, "llama3", "dynamickv_paper", "snapkv", 128, SNAP)
    make_run(root, "llama3", "dynamickv_paper", "fullkv", None, FULL_PARTIAL)
    _, head, cells, rows = table.table([root], reference=None)
    full, snap = (dict(zip(head, row)) for row in cells)
    assert [r["method"] for r in rows] == ["fullkv", "snapkv"]
    assert rows[1]["paper"] == pytest.approx(640 / 16) and rows[1]["official"] == pytest.approx(245 / 6)
    assert (snap[PAPER], snap[OFFICIAL]) == ("40.00", "40.83")
    assert metrics.paper_average(SNAP)["value"] == 40.0 and metrics.official_average(SNAP)["value"] == 40.83
    assert rows[0]["paper"] == pytest.approx(115 / 3) and rows[0]["official"] == pytest.approx((27.5 + 60) / 2)
    assert (full[PAPER], full[OFFICIAL]) == ("38.33 (3/16)", "43.75 (3/16)")
    assert metrics.paper_average(FULL_PARTIAL, strict=False)["value"] == 38.33
    assert metrics.official_average(FULL_PARTIAL, strict=False)["value"] == 43.75
    # a dataset without a LongBench category (only reachable through the API) counts in the plain mean only
    assert metrics.subset_averages({"qasper": 10.0, "other": 30.0}, ("qasper", "other")) == (20.0, 10.0, 2)
    assert metrics.subset_averages({}, ("qasper",)) == (None, None, 0)


def test_partial_datasets_show_their_sample_count(tmp_path, capsys):
    """A dataset scored on fewer samples than LongBench's test set has (a run with task.limit=2) is
    marked "(2/200)" in ours and the diff row, explained under the Markdown table; whole ones are not."""
    root = tmp_path / "results"
    make_run(root, "llama3", "dynamickv_paper", "snapkv", 128, SNAP,
             samples={"narrativeqa": 2, "multifieldqa_en": 150, "lcc": 499})
    reference = write_reference(tmp_path / "ref")
    out = tmp_path / "out"
    table.main([str(root), "--out", str(out), "--reference", str(reference)])
    printed = capsys.readouterr().out
    ours, published, diff = _csv(out / "table.csv")
    assert (ours["NrtvQA"], ours["MF-en"], ours["Lcc"], ours["Qasper"]) == (
        "20.00 (2/200)", "40.00", "60.00 (499/500)", "30.00")   # multifieldqa_en has 150 test samples
    assert (published["NrtvQA"], diff["NrtvQA"], diff["Lcc"]) == ("20.50", "-0.50 (2/200)", "+1.00 (499/500)")
    assert (ours[PAPER], ours[OFFICIAL]) == ("40.00", "40.83")   # the averages still include them
    note = "(n/N) after a dataset's score: it was scored on only n of its N test samples"
    assert printed.rstrip().splitlines()[-1].startswith(note)
    assert (out / "table.md").read_text(encoding="utf-8").strip() == printed.strip()
    data = json.loads((out / "table.json").read_text(encoding="utf-8"))
    assert data["rows"][0]["samples"]["narrativeqa"] == 2 and data["rows"][0]["samples"]["qasper"] == 200
    assert data["notes"] == [table.PARTIAL_NOTE]
    # whole datasets only: no mark, no note
    make_run(tmp_path / "whole", "llama3", "dynamickv_paper", "snapkv", 128, SNAP)
    _, head, cells, rows = table.table([tmp_path / "whole"], reference=None)
    assert "(" not in "".join(cells[0][5:21]) and table.footnotes(rows) == []


def test_longbench_scores_json_carries_both_averages_not_a_micro_average(tmp_path):
    """``scores.json`` of a LongBench run: the paper and official averages over the datasets present,
    named, with the datasets they cover; no "score" (a mean over all samples of all datasets)."""
    from harness.run import runner

    datasets = {**FULL_PARTIAL, "multifieldqa_zh": 40.0}
    counts = {"narrativeqa": 1, "qasper": 1, "trec": 6, "multifieldqa_zh": 2}
    for dataset, n in counts.items():   # the micro-average of these rows would be 100 * 6 / 10 = 60
        (tmp_path / f"{dataset}.jsonl").write_text("".join(
            json.dumps({"id": f"{dataset}{i}", "score": float(dataset == "trec")}) + "\n" for i in range(n)))
    summary = runner.summarize(tmp_path, "snapkv",
                               finalize=lambda folder: score.summary_fields(datasets, score.sample_counts(folder)))
    assert json.loads((tmp_path / "scores.json").read_text()) == summary
    assert "score" not in summary and summary["samples"] == 10 and summary["datasets"] == datasets
    # paper = (25 + 30 + 60) / 3; official = (Single-Doc (25 + 30) / 2, Few-shot 60) / 2 (see FULL_PARTIAL)
    assert (summary["paper_average"], summary["official_average"]) == (38.33, 43.75)
    assert summary["averages_cover"] == ["narrativeqa", "qasper", "trec"]
    assert summary["datasets_partial"] == {"narrativeqa": [1, 200], "qasper": [1, 200], "trec": [6, 200],
                                           "multifieldqa_zh": [2, 200]}   # LongBench's sizes (reference-eval.md A.1)
    assert len(summary["averages_missing"]) == 13 and "hotpotqa" in summary["averages_missing"]
    assert summary["official_average_categories"] == {"Single-Doc QA": 27.5, "Few-shot": 60.0}
    assert (summary["official_average_zh"], summary["official_average_zh_covers"]) == (40.0, ["multifieldqa_zh"])
    # English and code only: no Chinese average (lcc alone would make one); Chinese only: no English ones
    only_zh = score.summary_fields({"multifieldqa_zh": 40.0}, {})
    assert (only_zh["paper_average"], only_zh["official_average"], only_zh["averages_cover"]) == (None, None, [])
    english = score.summary_fields({"qasper": 10.0, "lcc": 50.0}, {"qasper": 200, "lcc": 500})
    assert "official_average_zh" not in english and english["official_average"] == 30.0
    assert english["datasets_partial"] == {}                    # complete datasets are not partial
    # other tasks: "score" = 100 x the mean per-sample score
    passkey = runner.summarize(tmp_path, "snapkv")
    assert passkey == {"method": "snapkv", "folder": str(tmp_path), "samples": 10, "score": 60.0}


def write_passkey_run(root: Path, name: str, scores: list[float]) -> Path:
    """A finished passkey-like run: manifest.json and one predictions.jsonl row per score (depths 0 and
    100, context length 400)."""
    folder = root / "passkey" / "tiny" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"method": {"name": name}}), encoding="utf-8")
    (folder / "predictions.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "score": s, "depth": 100.0 * (i % 2), "context_length": 400}) + "\n"
        for i, s in enumerate(scores)), encoding="utf-8")
    return folder


def test_table_without_arguments_reads_results_and_writes_results_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "results", "llama3", "dynamickv_paper", "snapkv", 128, SNAP)
    write_passkey_run(tmp_path / "results", "fullkv", [1.0, 0.0])   # other tasks: not in the LongBench table
    table.main([])
    printed = capsys.readouterr().out
    assert printed.startswith("| Model | Protocol | Method | Budget | Row | NrtvQA |")
    out = tmp_path / "results" / "tables"
    assert (out / "table.md").read_text(encoding="utf-8").strip() == printed.strip()
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "table.tex", "table.json"}
    ours = [r for r in _csv(out / "table.csv") if r["Row"] == "ours"]
    assert [(r["Method"], r[PAPER], r[OFFICIAL]) for r in ours] == [("SnapKV", "40.00", "40.83")]


def test_table_of_other_tasks_when_no_longbench_run(tmp_path, monkeypatch, capsys, caplog):
    from harness.report import summary

    monkeypatch.chdir(tmp_path)
    write_passkey_run(tmp_path / "results", "fullkv", [1.0, 1.0, 1.0, 0.0])
    write_passkey_run(tmp_path / "results", "snapkv_b64", [0.0, 1.0])
    table.main(["--sweep-plot"])
    captured = capsys.readouterr()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no LongBench runs" in m for m in warned) and any("budget_sweep" in m for m in warned)
    head = ["method", "run", "depth 0%", "depth 100%", "400 tok", "mean", "samples"]
    expected = [["FullKV", "passkey/tiny/fullkv", 100.0, 50.0, 75.0, 75.0, 4],     # no manifest: from the folder name
                ["snapkv_b64", "passkey/tiny/snapkv_b64", 0.0, 100.0, 50.0, 50.0, 2]]
    out = tmp_path / "results" / "tables"
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "table.json"}
    assert json.loads((out / "table.json").read_text(encoding="utf-8")) == {"header": head, "rows": expected}
    assert captured.out.splitlines() == (out / "table.md").read_text(encoding="utf-8").splitlines()
    assert captured.out.splitlines()[2] == "| FullKV | passkey/tiny/fullkv | 100.0 | 50.0 | 75.0 | 75.0 | 4 |"
    assert _csv(out / "table.csv")[1]["mean"] == "50.0"
    # the same table and files as `kvh report --out`
    summary.main([str(tmp_path / "results"), "--out", str(tmp_path / "report")])
    assert capsys.readouterr().out == captured.out
    for name in ("table.md", "table.csv", "table.json"):
        assert (tmp_path / "report" / name).read_bytes() == (out / name).read_bytes()
    # no run of any task: the LongBench error, nothing written
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no LongBench runs"):
        table.main([str(tmp_path / "empty"), "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


def test_report_rows_in_the_papers_method_order(tmp_path):
    from harness.report import summary

    for name in ("dynamickv", "fullkv", "h2o"):   # alphabetical on disk
        write_passkey_run(tmp_path / "results", name, [1.0, 0.0])
    _, rows = summary.passkey_table(results.find_runs([tmp_path / "results"], results.PREDICTIONS))
    assert [row[1] for row in rows] == ["passkey/tiny/fullkv", "passkey/tiny/h2o", "passkey/tiny/dynamickv"]
