"""The RULER reporters (``kvh ruler-table``, ``kvh ruler-heatmap``) on hand-written results folders: each
folder's rows, manifest and ``scores.json`` (made by ``harness.ruler.score.summary`` from those rows, as
the runner makes it). Expected numbers are computed here from the rows with RULER's metric written out
again (string_match_all / string_match_part, reference-ruler.md section 3), not through the harness."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

import pytest

from harness import cli
from harness.report import ruler_heatmap, ruler_table
from harness.ruler import metrics, score

LENGTHS = (4096, 8192)
NO_QA = tuple(t for t in metrics.TASKS if t not in metrics.QA_TASKS)
GOLD = ["alpha 1111111", "beta 2222222", "gamma 3333333", "delta 4444444"]   # four gold strings per sample
SAMPLES = 2


def prediction(found: int) -> str:
    """A prediction holding the first ``found`` gold strings, upper-cased (the metric ignores case)."""
    return "The answer: " + ", ".join(g.upper() for g in GOLD[:found])


def found(quality: int, task_index: int, length: int, sample: int) -> int:
    """How many of the four gold strings a sample's prediction holds: falls with the length and varies
    by task and sample, so that cells, means and weighted means all differ."""
    return max(0, min(4, quality - (length // 4096 - 1) - (task_index + sample) % 3))


def write_run(root: Path, method: str, quality: int, *, budget=None, ratio=None, model="llama3_1",
              model_id="meta-llama/Llama-3.1-8B-Instruct", protocol="default", scope="context",
              version="ruler_head", tasks=NO_QA, lengths=LENGTHS, folder=None, drop=(), **knobs) -> Path:
    """A finished RULER run folder. ``drop``: (task, length) pairs without rows."""
    if folder is None:
        folder = "fullkv" if method == "fullkv" else (f"{method}_r{ratio:g}_w32" if ratio is not None
                                                      else f"{method}_b{budget}_w32")
    run = root / "ruler" / model / protocol / folder
    run.mkdir(parents=True)
    rows = []
    for length in lengths:
        for t, task in enumerate(tasks):
            if (task, length) in drop:
                continue
            for i in range(SAMPLES):
                row = {"id": f"{task}_{length}_{i}", "task": task, "context_length": length,
                       "pred": prediction(found(quality, t, length, i)), "answers": GOLD, "score": 0.0,
                       "compression_scope": scope, "compressed_tokens": length - 50}
                if method != "fullkv":
                    row["budget"] = budget if ratio is None else int((length - 50) * (1 - ratio))
                if ratio is not None:
                    row["compression_ratio"] = ratio
                rows.append(row)
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    knob = {"name": method, "budget": 128 if budget is None else budget, "window_size": 32, **knobs}
    if ratio is not None:
        knob["compression_ratio"] = ratio
    manifest = {"method": knob, "config": {
        "task": {"name": "ruler", "generator_version": version, "context_lengths": list(lengths)},
        "model": {"name": model, "name_or_path": model_id},
        "protocol": {"name": protocol, "compression_scope": scope}}}
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    summary = {"method": method, "folder": str(run), "samples": len(rows), **score.summary(rows)}
    (run / "scores.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


# ------------------------------------------------------------------------------------------------
# RULER's metric, written out again from reference-ruler.md section 3
# ------------------------------------------------------------------------------------------------

def expected_cell(run: Path, task: str, length: int) -> float:
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["task"] == task and r["context_length"] == length]
    values = []
    for r in rows:
        pred = r["pred"].strip().lower()
        hits = [gold.lower() in pred for gold in r["answers"]]
        values.append(float(any(hits)) if task in ("qa_1", "qa_2") else sum(hits) / len(hits))
    return round(100 * sum(values) / len(values), 2)


def expected_means(run: Path, tasks=NO_QA, lengths=LENGTHS) -> dict[int, float]:
    return {x: sum(expected_cell(run, t, x) for t in tasks) / len(tasks) for x in lengths}


# ------------------------------------------------------------------------------------------------
# Reading the Markdown back
# ------------------------------------------------------------------------------------------------

def md_tables(text: str) -> list[tuple[str, list[dict]]]:
    """Every Markdown table with the paragraph above it: ``(heading, [row dict by header])``."""
    out, heading, table = [], "", []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("|"):
            header = [c.strip() for c in lines[0].strip("|").split("|")]
            table = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
            out.append((heading, table))
        elif lines:
            heading = block.strip()
    return out


def table_after(text: str, prefix: str) -> list[dict]:
    hits = [rows for heading, rows in md_tables(text) if heading.startswith(prefix)]
    assert len(hits) == 1, (prefix, [h for h, _ in md_tables(text)])
    return hits[0]


@pytest.fixture
def sweep(tmp_path):
    """Six methods of one group (written in another order than the papers'), RULER-11 at 4K and 8K."""
    root = tmp_path / "results"
    runs = {"SnapKV @r0.5": write_run(root, "snapkv", 3, ratio=0.5),
            "SnapKV @128": write_run(root, "snapkv", 4, budget=128),
            "H2O @128": write_run(root, "h2o", 3, budget=128),
            "FullKV": write_run(root, "fullkv", 6),
            "SnapKV @64": write_run(root, "snapkv", 2, budget=64),
            "StreamingLLM @128": write_run(root, "streamingllm", 1, budget=128)}
    return root, runs


ORDER = ["FullKV", "StreamingLLM @128", "H2O @128", "SnapKV @64", "SnapKV @128", "SnapKV @r0.5"]


def test_summary_in_the_papers_order_with_means_averages_and_effective_length(sweep):
    root, runs = sweep
    text = ruler_table.report([root])
    assert text.count("\n### ") + text.startswith("### ") == 1
    title = "### RULER-11: llama3_1, protocol default, generator ruler_head, compression scope context"
    assert text.startswith(title)
    summary = table_after(text, title)
    assert [r["Method"] for r in summary] == ORDER
    for row in summary:
        means = expected_means(runs[row["Method"]])
        assert (row["4K"], row["8K"]) == (f"{means[4096]:.2f}", f"{means[8192]:.2f}"), row["Method"]
        # over the unrounded per-length means, weights 1, 2 increasing with the length (RULER's README)
        assert row["Avg"] == f"{(means[4096] + means[8192]) / 2:.2f}"
        assert row["wAvg inc"] == f"{(means[4096] + 2 * means[8192]) / 3:.2f}"
        assert row["wAvg dec"] == f"{(2 * means[4096] + means[8192]) / 3:.2f}"
        passing = [x for x in LENGTHS if means[x] > 85.6]
        assert row["Effective length"] == (f"{max(passing) // 1024}K" if passing else "<4K"), row["Method"]
        assert row["Samples/task"] == str(SAMPLES) and row["Folder"] == runs[row["Method"]].name
    # the numbers above span the threshold, so the effective length is tested both ways
    assert {r["Effective length"] for r in summary} >= {"<4K", "8K"}


def test_task_tables_hold_the_cells_of_the_rows_and_the_suite_mean(sweep):
    root, runs = sweep
    text = ruler_table.report([root])
    for label, run in runs.items():
        rows = table_after(text, f"#### {label} ({run.name}): per task, RULER-11, {SAMPLES} samples")
        assert [r["Task"] for r in rows] == [*NO_QA, "Mean (RULER-11)"]
        for r in rows[:-1]:
            assert (r["4K"], r["8K"]) == tuple(f"{expected_cell(run, r['Task'], x):.2f}" for x in LENGTHS)
        means = expected_means(run)
        assert (rows[-1]["4K"], rows[-1]["8K"]) == (f"{means[4096]:.2f}", f"{means[8192]:.2f}")
        # GPT-4-1106's 4K row side by side, labelled with its source
        gpt4 = "Published: GPT-4-1106 at 4K (RULER issue #63, maintainer)"
        assert [r[gpt4] for r in rows[:3]] == ["100.00"] * 3 and rows[10][gpt4] == "98.00"   # fwe
        assert rows[-1][gpt4] == f"{(7 * 100 + 99.5 + 100 + 100 + 98.0) / 11:.2f}"


def test_ruler_13_scores_qa_with_string_match_part_and_means_over_13(tmp_path):
    root = tmp_path / "results"
    run = write_run(root, "fullkv", 2, tasks=metrics.TASKS, lengths=(4096,))
    text = ruler_table.report([root])
    rows = table_after(text, "#### FullKV (fullkv): per task, RULER-13")
    qa = {r["Task"]: r["4K"] for r in rows if r["Task"] in metrics.QA_TASKS}
    assert qa == {t: f"{expected_cell(run, t, 4096):.2f}" for t in metrics.QA_TASKS}
    # string_match_part: a sample counts fully once any gold string is found; its two samples find 0 and 2 of
    # the 4 gold strings: 50 (string_match_all would give 25)
    assert qa["qa_1"] == "50.00"
    mean = sum(expected_cell(run, t, 4096) for t in metrics.TASKS) / 13
    assert rows[-1]["Task"] == "Mean (RULER-13)" and rows[-1]["4K"] == f"{mean:.2f}"
    assert "Published (RULER README, RULER-13, same suite and model" in text


def test_published_anchors_are_labelled_and_only_for_the_lengths_shown(sweep, tmp_path):
    root, _ = sweep
    text = ruler_table.report([root])
    heading = "Published (RULER README, RULER-13, not the same suite)"
    readme = table_after(text, heading)
    assert list(readme[0]) == ["Source", "Model", "4K", "8K", "Avg (4K-128K)", "wAvg inc", "wAvg dec"]
    assert readme[0] == {"Source": "RULER README (github:NVIDIA/RULER)", "Model": "Llama-3.1-8B-Instruct",
                         "4K": "95.5", "8K": "93.8", "Avg (4K-128K)": "88.3", "wAvg inc": "85.4", "wAvg dec": "91.3"}
    assert readme[1]["Model"] == "Llama-2-7B-chat (effective-length threshold)" and readme[1]["4K"] == "85.6"
    assert len(readme) == 2   # the runs' model only, and the threshold
    kvpress = table_after(text, "Published (kvpress, RULER-13 at 4K, not the same method or data): NVIDIA/kvpress PR #93")
    assert [(r["Method"], r["4K"]) for r in kvpress] == [("No compression", "95.7"), ("KVzip @r0.1-0.6", "95.5"),
                                                         ("KVzip @r0.7", "95.3"), ("KVzip @r0.8", "94.9"),
                                                         ("KVzip @r0.9", "90.5")]
    assert all(r["Source"].startswith("NVIDIA/kvpress PR #93") for r in kvpress)
    # our rows never carry a published number
    assert "Llama-3.1-8B-Instruct" not in [r["Method"] for r in table_after(text, "### RULER-11")]

    # another model: every README row, self-reported ones so labelled; no ratio run: no kvpress block
    other = tmp_path / "other"
    write_run(other, "fullkv", 5, model="qwen2", model_id="Qwen/Qwen2-7B-Instruct", lengths=(4096, 16384))
    text = ruler_table.report([other])
    readme = table_after(text, "Published (RULER README, RULER-13, not the same suite or model)")
    assert [r["Model"] for r in readme][:8] == [e["model"] for e in json.loads(
        ruler_table.DEFAULT_REFERENCE.read_text())["entries"]]
    assert list(readme[0])[2:4] == ["4K", "16K"] and readme[0]["16K"] == "91.6"
    assert readme[3]["Source"] == "RULER README, reported by the model's authors" and readme[3]["wAvg inc"] == "–"
    assert "kvpress" not in text
    assert "Published" not in ruler_table.report([other], reference_path=None)


def test_protocols_scopes_and_generator_versions_get_tables_of_their_own(tmp_path):
    root = tmp_path / "results"
    write_run(root, "fullkv", 5)
    write_run(root, "snapkv", 4, budget=128)
    write_run(root, "snapkv", 3, budget=128, protocol="longbench_official")
    write_run(root, "snapkv", 2, budget=128, scope="prompt", folder="snapkv_b128_prompt")
    write_run(root, "snapkv", 1, budget=128, version="ruler_2024", folder="snapkv_b128_2024")
    text = ruler_table.report([root])
    titles = re.findall(r"^### (.*)$", text, flags=re.M)
    assert titles == ["RULER-11: llama3_1, protocol default, generator ruler_2024, compression scope context",
                      "RULER-11: llama3_1, protocol default, generator ruler_head, compression scope context",
                      "RULER-11: llama3_1, protocol default, generator ruler_head, compression scope prompt",
                      "RULER-11: llama3_1, protocol longbench_official, generator ruler_head, compression scope context"]
    methods = [[r["Method"] for r in table_after(text, f"### {t}")] for t in titles]
    assert methods == [["SnapKV @128"], ["FullKV", "SnapKV @128"], ["SnapKV @128"], ["SnapKV @128"]]


def test_partial_runs_and_subsets_say_so(tmp_path, caplog):
    root = tmp_path / "results"
    write_run(root, "fullkv", 5)
    write_run(root, "snapkv", 4, budget=128, drop=[("cwe", 8192)])   # 8K incomplete: no RULER-11 mean there
    write_run(root, "h2o", 4, budget=128, tasks=NO_QA[:3], folder="h2o_niah_only")
    text = ruler_table.report([root])
    suite = table_after(text, "### RULER-11")
    assert suite[1]["Method"] == "SnapKV @128" and suite[1]["8K"] == "" and suite[1]["Avg"].endswith("(1/2 lengths)")
    subset = table_after(text, "### RULER subset (3 tasks): niah_single_1, niah_single_2, niah_single_3")
    run = root / "ruler" / "llama3_1" / "default" / "h2o_niah_only"
    assert subset[0]["4K"] == f"{expected_means(run, NO_QA[:3])[4096]:.2f}" and subset[0]["Effective length"] == ""
    assert "not RULER's score" in text
    # a scores.json older than the rows: scored from the rows, with a warning
    stale = root / "ruler" / "llama3_1" / "default" / "fullkv" / "scores.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "samples": 3, "tasks": {"4096": {}}}))
    with caplog.at_level(logging.WARNING, logger="harness.report.ruler_table"):
        text = ruler_table.report([root])
    assert any("scores.json counts 3 samples" in r.getMessage() for r in caplog.records)
    assert table_after(text, "### RULER-11")[0]["4K"] == f"{expected_means(stale.parent)[4096]:.2f}"


def test_csv_parses_with_our_rows_task_rows_and_labelled_anchors(sweep, tmp_path, capsys):
    root, runs = sweep
    out = tmp_path / "tables" / "ruler.csv"
    ruler_table.main([str(root), "--format", "csv", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    ours = [r for r in rows if r["kind"] == "ours"]
    assert [r["method"] for r in ours] == ORDER
    snap = runs["SnapKV @128"]
    row = next(r for r in ours if r["method"] == "SnapKV @128")
    assert (row["4096"], row["suite"], row["compression_scope"]) == (f"{expected_means(snap)[4096]:.2f}", "RULER-11",
                                                                    "context")
    cells = {(r["task"], x): r[str(x)] for r in rows if r["kind"] == "task" and r["method"] == "SnapKV @128"
             for x in LENGTHS}
    assert cells == {(t, x): f"{expected_cell(snap, t, x):.2f}" for t in NO_QA for x in LENGTHS}
    published = [r for r in rows if r["kind"] == "published"]
    assert all(r["source"] for r in published) and {r["method"] for r in published} >= {"Llama-3.1-8B-Instruct",
                                                                                          "No compression"}
    assert {r["source"] for r in rows if r["kind"] == "published_task"} == {"RULER issue #63, maintainer"}


# ------------------------------------------------------------------------------------------------
# Heatmap
# ------------------------------------------------------------------------------------------------

def heatmap_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_xlabel() == ruler_heatmap.X_LABEL]


def test_heatmap_one_panel_per_method_on_one_scale(sweep, tmp_path, capsys):
    root, runs = sweep
    groups = ruler_table.group_runs(ruler_table.load_runs([root]))
    (key, members), = groups.items()
    fig = ruler_heatmap.draw(key, members)
    panels = heatmap_axes(fig)
    assert len(panels) == len(runs)
    assert [ax.get_title().split(":")[0] for ax in panels] == ORDER
    for ax, (label, _) in zip(panels, members):
        mesh = ax.collections[0]
        assert mesh.get_array().size == len(NO_QA) * len(LENGTHS)
        assert mesh.get_clim() == (0, 100)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["4K", "8K"]
        # tasks in RULER's order, named on the first panel of each row of panels (4 panels a row)
        assert [t.get_text() for t in ax.get_yticklabels()] == (list(NO_QA) if ax in (panels[0], panels[4]) else [])
        texts = [t.get_text() for t in ax.texts]   # row by row: each task at 4K, then 8K
        run = runs[label]
        assert texts == [f"{expected_cell(run, t, x):.1f}" for t in NO_QA for x in LENGTHS]
    assert fig.axes[-1].get_ylabel() == ruler_heatmap.METRIC   # the one shared colorbar
    out = tmp_path / "figures" / "ruler.png"
    ruler_heatmap.main([str(root), "--out", str(out)])
    assert capsys.readouterr().out.split() == [str(out)]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_leaves_missing_cells_blank_and_splits_groups_into_files(tmp_path, capsys):
    root = tmp_path / "results"
    write_run(root, "snapkv", 4, budget=128, drop=[("cwe", 8192)])
    write_run(root, "snapkv", 4, budget=128, protocol="longbench_official")
    groups = ruler_table.group_runs(ruler_table.load_runs([root]))
    key, members = next(iter(groups.items()))
    ax, = heatmap_axes(ruler_heatmap.draw(key, members))
    assert len(ax.texts) == len(NO_QA) * len(LENGTHS) - 1 and ax.collections[0].get_array().mask.sum() == 1
    ruler_heatmap.main([str(root), "--out", str(tmp_path / "fig.png")])
    printed = [Path(p).name for p in capsys.readouterr().out.split()]
    assert printed == ["fig__llama3_1__default__ruler_head__context__RULER-11.png",
                       "fig__llama3_1__longbench_official__ruler_head__context__RULER-11.png"]
    assert all((tmp_path / name).is_file() for name in printed)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def test_cli_a_root_without_ruler_runs_is_one_error_line_naming_it_and_the_fix(sweep, tmp_path, capsys):
    root, _ = sweep
    needle = tmp_path / "needle_only" / "needle" / "m" / "default" / "fullkv"
    needle.mkdir(parents=True)
    (needle / "manifest.json").write_text(json.dumps({"method": {"name": "fullkv"},
                                                      "config": {"task": {"name": "needle"}}}))
    (needle / "predictions.jsonl").write_text(json.dumps({"id": "a", "score": 1.0}) + "\n")
    for command in ("ruler-table", "ruler-heatmap"):
        extra = ["--out", str(tmp_path / "x.png")] if command == "ruler-heatmap" else []
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, str(root), str(tmp_path / "needle_only"), *extra])
        assert exit_.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: no RULER runs under {tmp_path / 'needle_only'} ")
        assert "make ruler" in err[0] and "kvh run task=ruler" in err[0]
    cli.main(["ruler-table", str(root)])
    assert capsys.readouterr().out.startswith("### RULER-11: llama3_1")


def test_duplicate_labels_say_what_differs(tmp_path):
    root = tmp_path / "results"
    write_run(root, "snapkv", 4, budget=128, folder="snapkv_b128_w8", window_size=8)
    write_run(root, "snapkv", 3, budget=128, folder="snapkv_b128_w32")
    (key, members), = ruler_table.group_runs(ruler_table.load_runs([root])).items()
    assert sorted(label for label, _ in members) == ["SnapKV @128 (window_size=32)", "SnapKV @128 (window_size=8)"]
