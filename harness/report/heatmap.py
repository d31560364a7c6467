"""Needle-in-a-Haystack heatmaps drawn the way the papers draw them, from results folders only.

    kvh heatmap results/needle/llama3 --out figures/needle [--score-field score]

Every folder below the given ones that holds a ``predictions.jsonl`` is a run. Each run becomes one
heatmap (``<out>/<run>.png`` and ``.pdf``) and all runs together one side-by-side panel
(``<out>/panel.png`` and ``.pdf``); the written paths are printed.

The look follows gkamradt's ``viz/CreateVizFromLLMTesting.ipynb`` and KVCache-Factory's
``scripts/scripts_needle/visualize.py`` (reference-eval.md B.1/B.2, reference-methods.md section 5):
mean score pivoted over depth (rows, 0 % at the top) x context length (columns), ``seaborn.heatmap``
with vmin 0 / vmax 1, the three-stop colormap #F0496E (red, 0) -> #EBB839 (yellow) -> #0CD79F
(green, 1), grey grid lines, "Token Limit" / "Depth Percent" axes, a "Score" colorbar, and the
overall mean (over samples, as ``visualize.py`` prints it) in the title. ``--pretrained-len``
draws KVCache-Factory's dashed white line after the last length within the pretraining length.
The figure size scales with the grid instead of the fixed 38 x 8 inches of the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from harness.report.common import method_label, save_figure  # noqa: E402
from harness.run import results  # noqa: E402
from harness.tasks.needle_scores import RECOMPUTABLE  # noqa: E402

COLORS = ("#F0496E", "#EBB839", "#0CD79F")
CMAP = LinearSegmentedColormap.from_list("needle_red_yellow_green", list(COLORS))
COLUMNS = ["context_length", "depth", "score"]


def load_cells(run_folder, score_field: str = "score") -> pd.DataFrame:
    """One row per finished sample of a run: ``context_length`` (int), ``depth`` (float, percent),
    ``score`` (the row's ``score_field``). Where a row lacks ``score_field`` and the field is one
    of ``needle_scores.RECOMPUTABLE`` (``needle_word_recall``, ...), it is recomputed from the
    row's ``pred`` and ``answers``. Raises ValueError when the run has no scored needle rows."""
    rows = results.read_predictions(Path(run_folder))
    cells = []
    for r in rows:
        if r.get("context_length") is None or r.get("depth") is None:
            continue
        if score_field in r:
            value = r[score_field]
        elif score_field in RECOMPUTABLE and "pred" in r:
            value = RECOMPUTABLE[score_field](r["pred"], r.get("answers") or [])
        else:
            raise ValueError(f"{run_folder}: sample {r.get('id')!r} has no {score_field!r} field "
                             f"(fields: {sorted(r)}; recomputable: {sorted(RECOMPUTABLE)})")
        cells.append((int(r["context_length"]), float(r["depth"]), float(value)))
    if not cells:
        raise ValueError(f"{run_folder}: no rows with context_length and depth in {results.PREDICTIONS}")
    return pd.DataFrame(cells, columns=COLUMNS)


def pivot(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean score per (depth, context length): depths ascending as rows (drawn 0 % at the top),
    context lengths ascending as columns; a missing combination is NaN (drawn blank)."""
    table = cells.pivot_table(index="depth", columns="context_length", values="score", aggfunc="mean")
    return table.sort_index(axis=0).sort_index(axis=1)


def run_label(run_folder) -> str:
    """"SnapKV b64" from the run's ``manifest.json`` (``method.name``, ``method.budget``); FullKV
    has no budget. Falls back to the folder name."""
    run_folder = Path(run_folder)
    try:
        method = results.read_json(run_folder / results.MANIFEST)["method"]
        name = method["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return run_folder.name
    label = method_label(name)
    budget = method.get("budget")
    return label if name == "fullkv" or budget is None else f"{label} b{budget}"


def _tick(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _grid_size(table: pd.DataFrame) -> tuple[float, float]:
    """Inches for one heatmap: about half an inch per column (71 columns -> about 38 inches, the
    reference width) and 0.6 per row, within sensible bounds."""
    return min(38.0, max(5.0, 2.5 + 0.5 * table.shape[1])), min(8.0, max(3.0, 1.5 + 0.6 * table.shape[0]))


def _draw(ax, table: pd.DataFrame, cbar: bool, pretrained_len: int | None, xticks="auto"):
    shown = table.copy()
    shown.index = [_tick(d) for d in shown.index]
    shown.columns = [_tick(c) for c in shown.columns]
    sns.heatmap(shown, vmin=0, vmax=1, cmap=CMAP, linewidths=0.5, linecolor="grey", ax=ax,
                cbar=cbar, cbar_kws={"label": "Score"} if cbar else None, xticklabels=xticks, yticklabels=True)
    ax.set_xlabel("Token Limit")
    ax.set_ylabel("Depth Percent")
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    if pretrained_len is not None:
        inside = sum(1 for c in table.columns if c <= pretrained_len)
        if 0 < inside < table.shape[1]:
            ax.axvline(x=inside, color="white", linestyle="--", linewidth=3)


def _check_range(cells: pd.DataFrame, what: str) -> None:
    if len(cells) and (cells["score"].min() < 0 or cells["score"].max() > 1):
        print(f"warning: {what}: scores outside [0, 1] (min {cells['score'].min():g}, max "
              f"{cells['score'].max():g}) are clipped by the 0..1 colour scale; ROUGE x 10 is not a "
              "heatmap score, use needle_word_recall", file=sys.stderr)


def plot_heatmap(cells: pd.DataFrame, title: str, path_stem, pretrained_len: int | None = None,
                 dpi: int = 150) -> list[Path]:
    """One heatmap titled "<title>: mean <overall mean>", written to ``<path_stem>.png`` and ``.pdf``;
    returns the two paths."""
    _check_range(cells, title)
    table = pivot(cells)
    fig, ax = plt.subplots(figsize=_grid_size(table))
    _draw(ax, table, cbar=True, pretrained_len=pretrained_len, xticks=True if table.shape[1] <= 80 else "auto")
    ax.set_title(f"{title}: mean {cells['score'].mean():.2f}")
    return save_figure(fig, path_stem, dpi)


def plot_panel(runs: list[tuple[str, pd.DataFrame]], path_stem, title: str, max_cols: int = 3,
               pretrained_len: int | None = None, dpi: int = 120) -> list[Path]:
    """Side-by-side heatmaps, one per ``(label, cells)`` (at most ``max_cols`` per row, then the
    next row), each titled "<label>: mean <m>", with one shared colorbar and ``title`` above;
    written to ``<path_stem>.png`` and ``.pdf``; returns the two paths."""
    if not runs:
        raise ValueError("plot_panel needs at least one run")
    tables = [pivot(cells) for _, cells in runs]
    ncols = min(max_cols, len(runs))
    nrows = -(-len(runs) // ncols)
    width, height = max(_grid_size(t)[0] for t in tables), max(_grid_size(t)[1] for t in tables)
    width = min(width, max(5.0, 24.0 / ncols))  # keep the panel printable: long grids get thinned ticks
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.2, height * nrows + 0.6),
                             squeeze=False, constrained_layout=True)
    for i, ((label, cells), table) in enumerate(zip(runs, tables)):
        _check_range(cells, label)
        ax = axes[i // ncols][i % ncols]
        _draw(ax, table, cbar=False, pretrained_len=pretrained_len)
        ax.set_title(f"{label}: mean {cells['score'].mean():.2f}")
        if i % ncols:
            ax.set_ylabel("")
    for j in range(len(runs), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    mesh = axes[0][0].collections[0]
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label="Score", shrink=0.9 if nrows == 1 else 0.5)
    fig.suptitle(title)
    return save_figure(fig, path_stem, dpi)


def _stems(runs: list[Path]) -> dict[Path, str]:
    """File names for the runs: their path below the deepest folder common to all of them
    (``fullkv``; ``llama3__default__fullkv`` when several models are drawn), or the folder name."""
    if len(runs) == 1:
        return {runs[0]: runs[0].name}
    common = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return {r: "__".join(r.resolve().relative_to(common).parts) or r.name for r in runs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvh heatmap", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", required=True, help="folder for <run>.png/.pdf and panel.png/.pdf")
    parser.add_argument("--score-field", default="score",
                        help=f"field of predictions.jsonl to plot (default score; {', '.join(sorted(RECOMPUTABLE))} "
                             "are recomputed from pred/answers where absent)")
    parser.add_argument("--title", help="panel title (default: the folder common to the runs and the score field)")
    parser.add_argument("--pretrained-len", type=int, help="dashed white line after this context length")
    parser.add_argument("--wandb", action="store_true", help="also log the PNGs to W&B (offline without an API key)")
    args = parser.parse_args(argv)
    runs = results.find_runs(args.folders, results.PREDICTIONS)
    if not runs:
        raise SystemExit(f"no runs (folders with {results.PREDICTIONS}) under {args.folders}")
    out = Path(args.out)
    stems = _stems(runs)
    loaded = []
    for run in runs:
        try:
            cells = load_cells(run, args.score_field)
        except ValueError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        loaded.append((run, run_label(run), cells))
    if not loaded:
        raise SystemExit("no run has needle rows to draw")
    labels = [label for _, label, _ in loaded]
    written = []
    panel = []
    for run, label, cells in loaded:
        if labels.count(label) > 1:  # same method in several models/protocols: say which
            label = stems[run]
        written += plot_heatmap(cells, label, out / stems[run], pretrained_len=args.pretrained_len)
        panel.append((label, cells))
    common = Path(os.path.commonpath([str(r) for r, _, _ in loaded]))
    title = args.title or (f"{'/'.join(common.parts[-3:]) if len(loaded) > 1 else stems[loaded[0][0]]}"
                           f" ({args.score_field})")
    written += plot_panel(panel, out / "panel", title, pretrained_len=args.pretrained_len)
    for p in written:
        print(p)
    if args.wandb:
        from harness.report.wandb_log import log_images
        pngs = {p.stem: p for p in written if p.suffix == ".png"}
        run_dir = log_images(out, pngs, name=f"heatmaps/{'/'.join(common.parts[-3:])}")
        if run_dir:
            print(f"wandb: {run_dir}")


if __name__ == "__main__":
    results.run_cli(main)
