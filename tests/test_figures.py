"""Figures a researcher reads at a glance: the needle heatmaps (order, labels, axes, the score's name,
cell values, palettes, incomplete grids) and the kept-tokens plot (overlapping lines told apart),
drawn from hand-written results folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb

from harness.report import heatmap, kept_plot
from harness.run import results

LENGTHS = [1000, 2000, 3000]
DEPTHS = [0.0, 50.0]
GREEN, RED = to_rgb("#0CD79F"), to_rgb("#F0496E")   # the reference colormap's ends (reference-eval.md B.1)


def write_run(root: Path, folder: str, method: str, budget, cells: dict, task: str = "needle", **knobs) -> Path:
    """A needle-style run: manifest.json (method, task) and one predictions.jsonl row per score, ``cells``
    mapping (context_length, depth) -> list of scores."""
    run = root / task / "tiny" / "default" / folder
    run.mkdir(parents=True)
    manifest = {"method": {"name": method, "budget": budget, **knobs},
                "config": {"task": {"name": task}, "model": {"name": "tiny"}, "protocol": {"name": "default"}}}
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    rows = [{"id": f"len{x}_depth{d:g}_r{r}", "score": s, "pred": "x", "answers": ["x"], "context_length": x,
             "depth": d} for (x, d), scores in cells.items() for r, s in enumerate(scores)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return run


def full_grid(score: float, samples: int = 1) -> dict:
    return {(x, d): [score] * samples for x in LENGTHS for d in DEPTHS}


@pytest.fixture
def figures(monkeypatch):
    """Every figure heatmap.main / kept_plot.main saves, by file stem (still inspectable after closing)."""
    saved = {}

    def keep(fig, path_stem, dpi=150):
        saved[Path(path_stem).name] = fig
        return original(fig, path_stem, dpi)

    original = heatmap.save_figure
    monkeypatch.setattr(heatmap, "save_figure", keep)
    monkeypatch.setattr(kept_plot, "save_figure", keep)
    return saved


def heatmap_axes(fig) -> list:
    """The heatmap axes of a figure (those drawn with the axis labels), in drawing order."""
    return [ax for ax in fig.axes if ax.get_xlabel() == heatmap.X_LABEL]


def render(fig) -> np.ndarray:
    """The figure as an [height, width, 3] RGB array in 0-1 (a fresh Agg canvas: saving closed the figure)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255


def pixels(fig, ax, column: int, row: int, half: int = 0) -> np.ndarray:
    """[n, 3] RGB (0-1) of the rendered figure around the centre of heatmap cell (column, row), row 0
    at the top: the centre pixel (``half`` 0) or the (2 half) x (2 half) block around it."""
    image = render(fig)
    x, y = ax.transData.transform((column + 0.5, row + 0.5))
    top, left = int(round(image.shape[0] - y)), int(round(x))
    return image[top - half: top + half + 1, left - half: left + half + 1].reshape(-1, 3)


def pixel(fig, ax, column: int, row: int) -> tuple:
    return tuple(pixels(fig, ax, column, row)[0])


# ------------------------------------------------------------------------------------------------
# Heatmaps
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def eight_methods(tmp_path):
    """Eight runs whose folder names sort alphabetically in another order than the papers'."""
    root = tmp_path / "results"
    for folder, method, budget, score in (("a_snapkv_b128", "snapkv", 128, 0.75), ("b_pyramidkv", "pyramidkv", 128, 0.5),
                                          ("c_custom", "mymethod", 32, 0.25), ("d_h2o", "h2o", 128, 0.5),
                                          ("e_dynamickv", "dynamickv", 128, 0.5), ("f_snapkv_b64", "snapkv", 64, 0.5),
                                          ("g_streaming", "streamingllm", 128, 0.0), ("z_fullkv", "fullkv", None, 1.0)):
        write_run(root, folder, method, budget, full_grid(score))
    return root


def test_panel_in_the_papers_order_with_method_labels_and_named_axes(eight_methods, tmp_path, figures, capsys):
    heatmap.main([str(eight_methods), "--out", str(tmp_path / "fig")])
    panel = figures["panel"]
    assert [ax.get_title() for ax in heatmap_axes(panel)] == [
        "FullKV: mean 1.00", "StreamingLLM @128: mean 0.00", "H2O @128: mean 0.50", "SnapKV @64: mean 0.50",
        "SnapKV @128: mean 0.75", "PyramidKV @128: mean 0.50", "DynamicKV @128: mean 0.50", "mymethod @32: mean 0.25"]
    first = heatmap_axes(panel)[0]
    assert (first.get_xlabel(), first.get_ylabel()) == ("Context length (tokens)", "Needle depth (%)")
    assert [t.get_text() for t in first.get_xticklabels()] == ["1000", "2000", "3000"]
    assert [t.get_text() for t in first.get_yticklabels()] == ["0", "50"]
    # the score is named on the colorbar (the needle task's "score" is word recall) and in the title
    assert "Needle word recall" in [ax.get_ylabel() for ax in panel.axes if ax not in heatmap_axes(panel)]
    assert panel._suptitle.get_text() == "needle/tiny/default: Needle word recall (score)"
    single = figures["z_fullkv"]
    assert heatmap_axes(single)[0].get_title() == "FullKV: mean 1.00"
    assert "Needle word recall" in [ax.get_ylabel() for ax in single.axes]
    # stdout: the written paths only (per-run files keep their folder names)
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(
        [f"{name}.{ext}" for name in ("a_snapkv_b128", "b_pyramidkv", "c_custom", "d_h2o", "e_dynamickv",
                                      "f_snapkv_b64", "g_streaming", "z_fullkv", "panel") for ext in ("png", "pdf")])


def test_cells_drawn_in_the_reference_colours_by_default_and_cividis_on_request(tmp_path, figures):
    root = tmp_path / "results"
    write_run(root, "fullkv", "fullkv", None, full_grid(1.0))
    write_run(root, "streamingllm", "streamingllm", 128, full_grid(0.0))
    heatmap.main([str(root), "--out", str(tmp_path / "ref")])
    full, streaming = heatmap_axes(figures["panel"])
    assert pixel(figures["panel"], full, 0, 0) == pytest.approx(GREEN, abs=3 / 255)      # 1.0: green
    assert pixel(figures["panel"], streaming, 2, 1) == pytest.approx(RED, abs=3 / 255)   # 0.0: red
    heatmap.main([str(root), "--out", str(tmp_path / "cvd"), "--palette", "cividis"])
    full, streaming = heatmap_axes(figures["panel"])
    cividis = matplotlib.colormaps["cividis"]
    assert pixel(figures["panel"], full, 0, 0) == pytest.approx(cividis(1.0)[:3], abs=3 / 255)
    assert pixel(figures["panel"], streaming, 0, 0) == pytest.approx(cividis(0.0)[:3], abs=3 / 255)
    with pytest.raises(SystemExit):
        heatmap.main([str(root), "--out", str(tmp_path / "x"), "--palette", "rainbow"])


def test_annotate_writes_each_cells_mean(tmp_path, figures):
    root = tmp_path / "results"
    cells = {(x, d): [0.25 * i, 0.25 * i + 0.5] for i, (x, d) in enumerate((x, d) for d in DEPTHS for x in LENGTHS[:2])}
    write_run(root, "snapkv", "snapkv", 128, cells)   # cell means 0.25, 0.50, 0.75, 1.00 (2 samples each)
    heatmap.main([str(root), "--out", str(tmp_path / "plain")])
    assert list(heatmap_axes(figures["panel"])[0].texts) == []
    heatmap.main([str(root), "--out", str(tmp_path / "annotated"), "--annotate"])
    for name in ("panel", "snapkv"):
        texts = [t.get_text() for t in heatmap_axes(figures[name])[0].texts]
        assert texts == ["0.25", "0.50", "0.75", "1.00"], name   # row by row: depth 0, then 50


def test_incomplete_grid_is_warned_titled_and_averaged_over_finished_cells(tmp_path, figures, caplog):
    root = tmp_path / "results"
    write_run(root, "fullkv", "fullkv", None, full_grid(1.0, samples=2))
    partial = {k: v for k, v in full_grid(0.5, samples=2).items() if k[0] != 3000}   # 2 of 6 cells never ran
    partial[(1000, 0.0)] = [0.25, 0.75]
    short = write_run(root, "h2o", "h2o", 128, {**full_grid(0.0, samples=2), (2000, 50.0): [0.0]})
    gap = write_run(root, "snapkv", "snapkv", 128, partial)
    with caplog.at_level(logging.WARNING, logger="harness.report.heatmap"):
        heatmap.main([str(root), "--out", str(tmp_path / "fig")])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2
    assert str(gap) in warned[1] and "SnapKV @128" in warned[1] and "2 of 6 cells missing" in warned[1]
    assert str(short) in warned[0] and "1 of 6 cells with fewer than 2 samples" in warned[0]
    titles = [ax.get_title() for ax in heatmap_axes(figures["panel"])]
    assert titles == ["FullKV: mean 1.00",
                      "H2O @128: mean 0.00 over the 6 finished cells\nincomplete: 1 of 6 cells with fewer than 2 samples",
                      "SnapKV @128: mean 0.50 over the 4 finished cells\nincomplete: 2 of 6 cells missing"]
    assert heatmap_axes(figures["snapkv"])[0].get_title() == titles[2]
    # the incomplete run is drawn on the union grid: the 3000-token column is there, hatched grey, not coloured
    snap = heatmap_axes(figures["panel"])[2]
    assert [t.get_text() for t in snap.get_xticklabels()] == ["1000", "2000", "3000"]
    block = pixels(figures["panel"], snap, 2, 0, half=4)
    grey = np.isclose(block, to_rgb(heatmap.MISSING), atol=3 / 255).all(axis=1)
    achromatic = np.ptp(block, axis=1) < 3 / 255   # grey hatched with white lines, no colour of the scale
    assert grey.mean() > 0.5 and achromatic.all() and (block.min(axis=1) >= to_rgb(heatmap.MISSING)[0] - 3 / 255).all()


def test_a_single_heatmap_flags_a_hole_in_its_own_grid(tmp_path):
    cells = {k: v for k, v in full_grid(1.0).items() if k != (2000, 50.0)}
    run = write_run(tmp_path / "results", "snapkv", "snapkv", 128, cells)
    fig = heatmap.draw_heatmap(heatmap.load_cells(run), heatmap.run_label(run))
    assert heatmap_axes(fig)[0].get_title() == ("SnapKV @128: mean 1.00 over the 5 finished cells\n"
                                                "incomplete: 1 of 6 cells missing")


def test_complete_runs_give_no_warning_and_duplicate_labels_say_what_differs(tmp_path, figures, caplog):
    root = tmp_path / "results"
    write_run(root, "snapkv_b128_w8", "snapkv", 128, full_grid(0.5), window_size=8)
    write_run(root, "snapkv_b128_w32", "snapkv", 128, full_grid(1.0), window_size=32)
    with caplog.at_level(logging.WARNING, logger="harness.report.heatmap"):
        heatmap.main([str(root), "--out", str(tmp_path / "fig"), "--score-field", "exact_match"])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(ax.get_title() for ax in heatmap_axes(figures["panel"])) == [
        "SnapKV @128 (window_size=32): mean 1.00", "SnapKV @128 (window_size=8): mean 1.00"]  # pred "x" == answer
    assert figures["panel"]._suptitle.get_text() == "needle/tiny/default: Key phrase exact match (exact_match)"


def test_scores_outside_the_colour_scale_are_a_logged_warning(tmp_path, figures, caplog, capsys):
    root = tmp_path / "results"
    write_run(root, "fullkv", "fullkv", None, full_grid(7.5))   # ROUGE x 10, as KVCache-Factory stores it
    with caplog.at_level(logging.WARNING, logger="harness.report.heatmap"):
        heatmap.main([str(root), "--out", str(tmp_path / "fig")])
    assert any("outside [0, 1]" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(line.endswith((".png", ".pdf")) for line in capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------------
# Kept tokens per layer
# ------------------------------------------------------------------------------------------------

def write_kept_run(root: Path, method: str, budget: int, kept: list[int]) -> Path:
    run = root / "needle" / "m" / "default" / f"{method}_b{budget}"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"method": {"name": method, "budget": budget}}), encoding="utf-8")
    (run / "predictions.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "score": 1.0, "kept": kept, "kept_layers": [0, 1, 2, 3]}) + "\n" for i in range(2)))
    return run


def test_kept_plot_tells_overlapping_lines_apart(tmp_path, figures):
    root = tmp_path / "results"
    for method in ("dynamickv", "h2o", "pyramidkv", "snapkv", "streamingllm"):   # alphabetical on disk
        write_kept_run(root, method, 128, {"pyramidkv": [200, 150, 100, 62], "dynamickv": [90, 160, 140, 122]}
                       .get(method, [128, 128, 128, 128]))
    kept_plot.main([str(root), "--out", str(tmp_path / "fig")])
    fig = figures["kept_per_layer_by_run"]
    top = fig.axes[0]
    legend = top.get_legend()
    labels = ["StreamingLLM @128", "H2O @128", "SnapKV @128", "PyramidKV @128", "DynamicKV @128"]
    assert [t.get_text() for t in legend.get_texts()] == labels
    assert "identical lines drawn 0.12 layer apart" in legend.get_title().get_text()
    lines = top.get_lines()
    assert [line.get_label() for line in lines] == labels
    uniform = lines[:3]   # the three runs that keep 128 in every layer
    assert all(list(line.get_ydata()) == [128] * 4 for line in uniform)
    starts = sorted(line.get_xdata()[0] for line in uniform)
    assert starts == pytest.approx([-0.12, 0.0, 0.12])   # spread sideways, centred on the layer
    assert [line.get_xdata()[0] for line in lines[3:]] == [0.0, 0.0]   # lines of their own stay on the layer
    assert len({line.get_marker() for line in lines}) == len(lines)
    assert len({line.get_linestyle() for line in uniform}) == len(uniform)
    widths = [line.get_linewidth() for line in lines]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)   # later lines thinner
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == labels   # the heatmap rows, same order
    assert fig.axes[1].images[0].get_array().tolist()[3] == [200, 150, 100, 62]


def test_kept_plot_without_identical_lines_spreads_nothing(tmp_path, figures):
    root = tmp_path / "results"
    write_kept_run(root, "pyramidkv", 64, [100, 60, 20, 10])
    write_kept_run(root, "snapkv", 64, [64, 64, 64, 64])
    labels, layers, matrix = kept_plot.allocation_rows(results.find_runs([root], results.PREDICTIONS))
    assert labels == ["SnapKV @64", "PyramidKV @64"] and layers == [0, 1, 2, 3]
    assert kept_plot.offsets(matrix).tolist() == [0.0, 0.0]
    legend = kept_plot.draw(labels, layers, matrix).axes[0].get_legend()
    assert legend.get_title().get_text() == ""


def test_runs_of_several_tasks_get_one_panel_each_on_their_own_grid(tmp_path, figures, caplog):
    root = tmp_path / "results"
    write_run(root, "fullkv", "fullkv", None, full_grid(1.0))
    write_run(root, "snapkv", "snapkv", 128, full_grid(0.5))
    write_run(root, "fullkv", "fullkv", None, {(500, 10.0): [1.0], (500, 90.0): [0.0]}, task="passkey")
    with caplog.at_level(logging.WARNING, logger="harness.report.heatmap"):
        heatmap.main([str(root), "--out", str(tmp_path / "fig")])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]   # no grid is "incomplete" against another's
    assert {"panel_needle_tiny_default", "panel_passkey_tiny_default"} <= set(figures) and "panel" not in figures
    needle = heatmap_axes(figures["panel_needle_tiny_default"])
    assert [ax.get_title() for ax in needle] == ["FullKV: mean 1.00", "SnapKV @128: mean 0.50"]
    (passkey,) = heatmap_axes(figures["panel_passkey_tiny_default"])
    assert [t.get_text() for t in passkey.get_xticklabels()] == ["500"]
    assert "Passkey found" in figures["panel_passkey_tiny_default"]._suptitle.get_text()
