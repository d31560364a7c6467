"""Needle-in-a-Haystack heatmaps drawn the way the papers draw them, from results folders only.

    kvh heatmap results/needle/llama3 --out figures/needle [--score-field score] [--annotate]
        [--palette reference|cividis] [--pretrained-len N] [--title TEXT]

Every folder below the given ones that holds a ``predictions.jsonl`` is a run. Each run becomes one
heatmap (``<out>/<run>.png`` and ``.pdf``) and the runs of one task, model and protocol together one
side-by-side panel (``<out>/panel.png`` and ``.pdf``; runs of several such folders: one
``panel_<task>_<model>_<protocol>`` each, every panel on its own grid), in the papers' order: FullKV first, then StreamingLLM, H2O,
SnapKV, PyramidKV, DynamicKV, any other method, each by budget ascending; the written paths are
printed. Runs are labelled "SnapKV @128" (method and budget, from the run's ``manifest.json``).

The look follows gkamradt's ``viz/CreateVizFromLLMTesting.ipynb`` and KVCache-Factory's
``scripts/scripts_needle/visualize.py`` (reference-eval.md B.1/B.2, reference-methods.md section 5):
mean score pivoted over depth (rows, 0 % at the top) x context length (columns), ``seaborn.heatmap``
with vmin 0 / vmax 1, by default the three-stop colormap #F0496E (red, 0) -> #EBB839 (yellow) ->
#0CD79F (green, 1), grey grid lines, and the overall mean (over samples, as ``visualize.py`` prints
it) in the title. The axes say what they are ("Context length (tokens)", "Needle depth (%)", the
reference's "Token Limit" / "Depth Percent") and the colorbar names the score ("Needle word recall"
for the needle task's ``score``; ``harness.report.common.SCORE_NAMES``) instead of "Score".
``--palette cividis`` swaps the red-green map for one readable with colour-vision deficiency and in
greyscale; ``--annotate`` writes each cell's mean in it. ``--pretrained-len`` draws
KVCache-Factory's dashed white line after the last length within the pretraining length. The figure
size scales with the grid instead of the fixed 38 x 8 inches of the reference.

Every run is drawn on the union grid of the runs drawn (all their context lengths x all their
depths). A run with cells missing from it, or with fewer samples in a cell than the most any cell
has, is named in a warning and its title says so ("incomplete: 3 of 50 cells missing"); missing
cells are hatched grey, and its mean is over the finished cells only.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from harness.report.common import distinct_labels, run_info, save_figure, score_label  # noqa: E402
from harness.run import results  # noqa: E402
from harness.tasks.needle_scores import RECOMPUTABLE  # noqa: E402

log = logging.getLogger(__name__)

COLORS = ("#F0496E", "#EBB839", "#0CD79F")
CMAP = LinearSegmentedColormap.from_list("needle_red_yellow_green", list(COLORS))
#: --palette: the reference look (gkamradt's red -> yellow -> green), or matplotlib's cividis
#: (Nuñez et al. 2018: uniform for deuteranomaly and in greyscale).
PALETTES = {"reference": CMAP, "cividis": "cividis"}
COLUMNS = ["context_length", "depth", "score"]
X_LABEL, Y_LABEL = "Context length (tokens)", "Needle depth (%)"
MISSING = "#d0d0d0"   # the axes behind a heatmap: what shows through (hatched) where a cell has no sample


def load_cells(run_folder, score_field: str = "score") -> pd.DataFrame:
    """One row per finished sample of a run: ``context_length`` (int, tokens), ``depth`` (float,
    percent), ``score`` (the row's ``score_field``). Where a row lacks ``score_field`` and the field is
    one of ``needle_scores.RECOMPUTABLE`` (``needle_word_recall``, ...), it is recomputed from the row's
    ``pred`` and ``answers``. ``attrs["metric"]`` names the score (``common.score_label``, from the
    field and the manifest's task). Raises ValueError when the run has no scored needle rows."""
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
    frame = pd.DataFrame(cells, columns=COLUMNS)
    frame.attrs["metric"] = score_label(score_field, run_info(run_folder).task)
    return frame


def grid_of(frames) -> tuple[list[int], list[float]]:
    """The union grid of some runs' cells: every context length and every depth any of them has,
    ascending (context lengths in tokens, depths in percent)."""
    frames = list(frames)
    return (sorted({int(x) for f in frames for x in f["context_length"]}),
            sorted({float(d) for f in frames for d in f["depth"]}))


def pivot(cells: pd.DataFrame, grid: tuple[list, list] | None = None) -> pd.DataFrame:
    """Mean score per (depth, context length): depths ascending as rows (drawn 0 % at the top),
    context lengths ascending as columns; with ``grid`` (context lengths, depths) exactly those. A
    combination without samples is NaN (drawn hatched grey)."""
    table = cells.pivot_table(index="depth", columns="context_length", values="score", aggfunc="mean")
    table = table.sort_index(axis=0).sort_index(axis=1)
    if grid is not None:
        table = table.reindex(index=grid[1], columns=grid[0])
    return table


@dataclass(frozen=True)
class Completeness:
    """How much of the union grid a run has: ``cells`` in the grid, ``missing`` without a sample,
    ``short`` with fewer samples than ``per_cell`` (the most any drawn cell has)."""

    cells: int
    missing: int
    short: int
    per_cell: int

    @property
    def complete(self) -> bool:
        return not self.missing and not self.short

    @property
    def note(self) -> str:
        """"" when complete, else e.g. "incomplete: 3 of 50 cells missing, 2 with fewer than 2 samples"."""
        parts = [f"{self.missing} of {self.cells} cells missing"] if self.missing else []
        if self.short:
            parts.append(f"{self.short} {'with' if parts else 'of ' + str(self.cells) + ' cells with'} fewer than "
                         f"{self.per_cell} samples")
        return "incomplete: " + ", ".join(parts) if parts else ""


def completeness(frames) -> list[Completeness]:
    """For each run's cells (``load_cells``), how complete it is on the union grid of all of them
    (``grid_of``), one ``Completeness`` per frame in the given order."""
    frames = list(frames)
    lengths, depths = grid_of(frames)
    counts = [f.groupby(["depth", "context_length"]).size() for f in frames]
    per_cell = max(int(c.max()) for c in counts)
    out = []
    for count in counts:
        have = count.reindex(pd.MultiIndex.from_product([depths, lengths]), fill_value=0)
        out.append(Completeness(len(have), int((have == 0).sum()), int(((have > 0) & (have < per_cell)).sum()),
                                per_cell))
    return out


def run_label(run_folder) -> str:
    """"SnapKV @64" from the run's ``manifest.json`` (``method.name``, ``method.budget``); FullKV
    has no budget. Falls back to the folder name."""
    return run_info(run_folder).label or Path(run_folder).name


def _tick(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _grid_size(table: pd.DataFrame) -> tuple[float, float]:
    """Inches for one heatmap: about half an inch per column (71 columns -> about 38 inches, the
    reference width) and 0.6 per row, within sensible bounds."""
    return min(38.0, max(5.0, 2.5 + 0.5 * table.shape[1])), min(8.0, max(3.0, 1.5 + 0.6 * table.shape[0]))


def _title(label: str, cells: pd.DataFrame, check: Completeness | None) -> str:
    mean = cells["score"].mean()
    if check is None or check.complete:
        return f"{label}: mean {mean:.2f}"
    finished = check.cells - check.missing
    return f"{label}: mean {mean:.2f} over the {finished} finished cells\n{check.note}"


def _draw(ax, table: pd.DataFrame, cbar: bool, pretrained_len: int | None, xticks="auto", *,
          cmap=CMAP, annotate: bool = False, metric: str = "Score"):
    shown = table.copy()
    shown.index = [_tick(d) for d in shown.index]
    shown.columns = [_tick(c) for c in shown.columns]
    ax.set_facecolor(MISSING)
    ax.patch.set_hatch("//")
    ax.patch.set_edgecolor("white")
    sns.heatmap(shown, vmin=0, vmax=1, cmap=cmap, linewidths=0.5, linecolor="grey", ax=ax,
                cbar=cbar, cbar_kws={"label": metric} if cbar else None, xticklabels=xticks, yticklabels=True,
                annot=annotate, fmt=".2f", annot_kws={"fontsize": 7 if table.shape[1] <= 20 else 5})
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    if pretrained_len is not None:
        inside = sum(1 for c in table.columns if c <= pretrained_len)
        if 0 < inside < table.shape[1]:
            ax.axvline(x=inside, color="white", linestyle="--", linewidth=3)


def _check_range(cells: pd.DataFrame, what: str) -> None:
    if len(cells) and (cells["score"].min() < 0 or cells["score"].max() > 1):
        log.warning("%s: scores outside [0, 1] (min %g, max %g) are clipped by the 0..1 colour scale; ROUGE x 10 "
                    "is not a heatmap score, use needle_word_recall", what, cells["score"].min(), cells["score"].max())


def _cmap(palette: str):
    if palette not in PALETTES:
        raise ValueError(f"palette {palette!r} is not one of {sorted(PALETTES)}")
    return PALETTES[palette]


def draw_heatmap(cells: pd.DataFrame, title: str, pretrained_len: int | None = None, *,
                 grid: tuple[list, list] | None = None, check: Completeness | None = None,
                 palette: str = "reference", annotate: bool = False, metric: str | None = None):
    """The figure of one heatmap: title "<title>: mean <m>" (and the ``check``'s note when the run is
    incomplete; default: ``completeness`` of the run on its own grid), the cells on ``grid`` (default:
    the run's own), the colorbar labelled ``metric`` (default ``cells.attrs["metric"]``, else "Score").
    Returns the matplotlib Figure."""
    _check_range(cells, title)
    check = check or completeness([cells])[0]
    table = pivot(cells, grid)
    fig, ax = plt.subplots(figsize=_grid_size(table))
    _draw(ax, table, cbar=True, pretrained_len=pretrained_len, xticks=True if table.shape[1] <= 80 else "auto",
          cmap=_cmap(palette), annotate=annotate, metric=metric or cells.attrs.get("metric", "Score"))
    ax.set_title(_title(title, cells, check))
    return fig


def plot_heatmap(cells: pd.DataFrame, title: str, path_stem, pretrained_len: int | None = None,
                 dpi: int = 150, **options) -> list[Path]:
    """``draw_heatmap`` (``options``: grid, check, palette, annotate, metric) written to
    ``<path_stem>.png`` and ``.pdf``; returns the two paths."""
    return save_figure(draw_heatmap(cells, title, pretrained_len, **options), path_stem, dpi)


def draw_panel(runs: list[tuple[str, pd.DataFrame]], title: str, max_cols: int = 3,
               pretrained_len: int | None = None, *, palette: str = "reference", annotate: bool = False,
               metric: str | None = None):
    """Side-by-side heatmaps, one per ``(label, cells)`` in the given order (at most ``max_cols`` per
    row, then the next row), all on the union grid of the runs, each titled "<label>: mean <m>" (plus
    "incomplete: ..." where ``completeness`` finds cells missing or short), with one shared colorbar
    labelled ``metric`` (default: the first run's ``attrs["metric"]``) and ``title`` above. Returns the
    matplotlib Figure."""
    if not runs:
        raise ValueError("plot_panel needs at least one run")
    grid = grid_of(cells for _, cells in runs)
    checks = completeness(cells for _, cells in runs)
    tables = [pivot(cells, grid) for _, cells in runs]
    metric = metric or runs[0][1].attrs.get("metric", "Score")
    ncols = min(max_cols, len(runs))
    nrows = -(-len(runs) // ncols)
    width, height = _grid_size(tables[0])
    width = min(width, max(5.0, 24.0 / ncols))  # keep the panel printable: long grids get thinned ticks
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.2, height * nrows + 0.6),
                             squeeze=False, constrained_layout=True)
    for i, ((label, cells), table, check) in enumerate(zip(runs, tables, checks)):
        _check_range(cells, label)
        ax = axes[i // ncols][i % ncols]
        _draw(ax, table, cbar=False, pretrained_len=pretrained_len, cmap=_cmap(palette), annotate=annotate)
        ax.set_title(_title(label, cells, check))
        if i % ncols:
            ax.set_ylabel("")
    for j in range(len(runs), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    mesh = axes[0][0].collections[0]
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label=metric, shrink=0.9 if nrows == 1 else 0.5)
    fig.suptitle(title)
    return fig


def plot_panel(runs: list[tuple[str, pd.DataFrame]], path_stem, title: str, max_cols: int = 3,
               pretrained_len: int | None = None, dpi: int = 120, **options) -> list[Path]:
    """``draw_panel`` (``options``: palette, annotate, metric) written to ``<path_stem>.png`` and
    ``.pdf``; returns the two paths."""
    return save_figure(draw_panel(runs, title, max_cols, pretrained_len, **options), path_stem, dpi)


def _stems(runs: list[Path]) -> dict[Path, str]:
    """File names for the runs: their path below the deepest folder common to all of them
    (``fullkv``; ``llama3__default__fullkv`` when several models are drawn), or the folder name."""
    if len(runs) == 1:
        return {runs[0]: runs[0].name}
    common = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return {r: "__".join(r.resolve().relative_to(common).parts) or r.name for r in runs}


def load_runs(runs: list[Path], score_field: str = "score") -> list[tuple[Path, str, pd.DataFrame]]:
    """``(run, label, cells)`` for each run with needle rows, in the papers' order (FullKV first, then
    ``common.METHOD_NAMES``, any other method, each by budget ascending), labelled by
    ``common.distinct_labels`` ("SnapKV @128"). A run without rows is skipped with a warning; none
    left: SystemExit."""
    infos = {run: run_info(run) for run in runs}
    loaded = []
    for run in sorted(runs, key=lambda r: infos[r].order):
        try:
            loaded.append((run, load_cells(run, score_field)))
        except ValueError as e:
            log.warning("skipped: %s", e)
    if not loaded:
        raise SystemExit("no run has needle rows to draw")
    labels = distinct_labels([infos[run] for run, _ in loaded])
    return [(run, label, cells) for (run, cells), label in zip(loaded, labels)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvh heatmap", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", required=True, help="folder for <run>.png/.pdf and panel.png/.pdf")
    parser.add_argument("--score-field", default="score",
                        help=f"field of predictions.jsonl to plot (default score; {', '.join(sorted(RECOMPUTABLE))} "
                             "are recomputed from pred/answers where absent)")
    parser.add_argument("--title", help="panel title (default: the folder common to the runs and the score's name)")
    parser.add_argument("--pretrained-len", type=int, help="dashed white line after this context length")
    parser.add_argument("--annotate", action="store_true", help="write each cell's mean score in the cell")
    parser.add_argument("--palette", choices=sorted(PALETTES), default="reference",
                        help="reference: gkamradt's red-yellow-green (reference-eval.md B.1); cividis: readable "
                             "with red-green colour blindness and in greyscale")
    parser.add_argument("--wandb", action="store_true", help="also log the PNGs to W&B (offline without an API key)")
    args = parser.parse_args(argv)
    runs = results.find_runs(args.folders, results.PREDICTIONS)
    if not runs:
        raise SystemExit(f"no runs (folders with {results.PREDICTIONS}) under {args.folders}")
    out = Path(args.out)
    stems = _stems(runs)
    loaded = load_runs(runs, args.score_field)
    groups: dict[Path, list] = {}   # one panel per <task>/<model>/<protocol> folder: grids of one kind together
    for entry in loaded:
        groups.setdefault(entry[0].parent, []).append(entry)
    options = {"palette": args.palette, "annotate": args.annotate}
    written, panels = [], []
    for parent, members in groups.items():
        if len(groups) > 1:   # labels tell apart the runs of one panel
            labels = distinct_labels([run_info(run) for run, _, _ in members])
            members = [(run, label, cells) for (run, _, cells), label in zip(members, labels)]
        metrics = {cells.attrs["metric"] for _, _, cells in members}
        metric = metrics.pop() if len(metrics) == 1 else score_label(args.score_field)
        grid = grid_of(cells for _, _, cells in members)
        checks = completeness(cells for _, _, cells in members)
        for (run, label, cells), check in zip(members, checks):
            if not check.complete:
                log.warning("%s (%s): %s on the grid drawn (%d context lengths x %d depths); its mean is over the "
                            "finished cells only", run, label, check.note.removeprefix("incomplete: "), len(grid[0]),
                            len(grid[1]))
            written += plot_heatmap(cells, label, out / stems[run], pretrained_len=args.pretrained_len, grid=grid,
                                    check=check, metric=metric, **options)
        where = "/".join(parent.parts[-3:])
        title = args.title or (f"{where}: {metric}" + ("" if metric == args.score_field else f" ({args.score_field})"))
        stem = "panel" if len(groups) == 1 else "panel_" + "_".join(parent.parts[-3:])
        written += plot_panel([(label, cells) for _, label, cells in members], out / stem, title,
                              pretrained_len=args.pretrained_len, metric=metric, **options)
        panels.append((members, out / f"{stem}.png", where))
    if len(groups) > 1:
        log.info("%d kinds of run (task/model/protocol): one panel each", len(groups))
    for p in written:
        print(p)
    if args.wandb:   # each run's heatmap into its folder's W&B run, each panel into a figures run of their group
        from harness.report.wandb_runs import log_heatmaps
        key = "heatmap" if args.score_field == "score" else f"heatmap/{args.score_field}"
        for members, panel, where in panels:
            for run_dir in log_heatmaps({run: out / f"{stems[run]}.png" for run, _, _ in members}, panel, out, where,
                                        key):
                print(f"wandb: {run_dir}")


if __name__ == "__main__":
    results.run_cli(main)
