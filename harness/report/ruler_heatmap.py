"""RULER task x length heatmaps from results folders, one panel per method.

    kvh ruler-heatmap results/ruler/llama3_1 [more roots...] --out figures/ruler_heatmap.png
        [--palette reference|cividis] [--max-cols N] [--title TEXT]

The runs are found, scored and grouped as ``kvh ruler-table`` does (``harness.report.ruler_table``: one
figure per model, protocol, generator version, compression scope and suite, never mixed). Each panel is
one run ("SnapKV @128", methods in the papers' order, budgets then ratios ascending): RULER's tasks in its
order as rows (those the group has), the context lengths as columns ("4K", "8K", ...), each cell the
task's score (0-100, string_match_all; QA string_match_part) written in it, on one colour scale 0-100
shared by every panel, with the needle heatmaps' colours (``heatmap.PALETTES``). A (task, length) the
run has no rows for is hatched grey. The panel title gives the run's Avg over its lengths.

With one group the figure is written to ``--out``; with several, one per group next to it, named
``<stem>__<model>__<protocol>__<generator>__<scope>__<suite><suffix>``. The written paths are printed.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from harness.report import ruler_table  # noqa: E402
from harness.report.heatmap import MISSING, PALETTES  # noqa: E402
from harness.run import results  # noqa: E402

log = logging.getLogger(__name__)

X_LABEL, Y_LABEL = "Context length (tokens)", "RULER task"
METRIC = "Score (0-100; string_match_all, QA: string_match_part)"


def cell_matrix(key: ruler_table.GroupKey, run: ruler_table.RulerRun, lengths: list[int]) -> np.ndarray:
    """[tasks of ``key``, ``lengths``] scores 0-100 of one run, NaN where it has no rows."""
    return np.array([[run.summary["tasks"].get(str(x), {}).get(task, np.nan) for x in lengths] for task in key.tasks],
                    dtype=float)


def panel_title(key: ruler_table.GroupKey, label: str, run: ruler_table.RulerRun) -> str:
    """"SnapKV @128: Avg 85.20"; over fewer lengths than the run has columns, the count ("(1/2 lengths)")."""
    over = ruler_table.overall(run, key)
    if over["avg"] is None:
        return f"{label}: no complete length"
    partial = "" if over["lengths"] == len(run.lengths) else f" ({over['lengths']}/{len(run.lengths)} lengths)"
    return f"{label}: Avg {over['avg']:.2f}{partial}"


def draw(key: ruler_table.GroupKey, members: list[tuple[str, ruler_table.RulerRun]], title: str | None = None,
         palette: str = "reference", max_cols: int = 4):
    """The figure of one group: one heatmap per ``(label, run)`` in the given order (at most ``max_cols``
    per row), tasks x lengths of the group, values written in the cells, one colorbar (0-100) shared by
    all; ``title`` above (default ``key.title``). Returns the matplotlib Figure. Raises ``ValueError``
    for no runs or an unknown palette."""
    if not members:
        raise ValueError("draw needs at least one run")
    if palette not in PALETTES:
        raise ValueError(f"palette {palette!r} is not one of {sorted(PALETTES)}")
    lengths = sorted({x for _, run in members for x in run.lengths})
    ncols = min(max_cols, len(members))
    nrows = -(-len(members) // ncols)
    width, height = 1.6 + 0.75 * len(lengths), 1.2 + 0.42 * len(key.tasks)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.5, height * nrows + 0.8), squeeze=False,
                             constrained_layout=True)
    for i, (label, run) in enumerate(members):
        ax, first = axes[i // ncols][i % ncols], i % ncols == 0   # tasks named once per row of panels
        ax.set_facecolor(MISSING)
        ax.patch.set_hatch("//")
        ax.patch.set_edgecolor("white")
        sns.heatmap(cell_matrix(key, run, lengths), vmin=0, vmax=100, cmap=PALETTES[palette], linewidths=0.5,
                    linecolor="grey", ax=ax, cbar=False, annot=True, fmt=".1f", annot_kws={"fontsize": 7},
                    xticklabels=[ruler_table.length_label(x) for x in lengths],
                    yticklabels=list(key.tasks) if first else False)
        ax.set_title(panel_title(key, label, run), fontsize="medium")
        ax.set_xlabel(X_LABEL)
        ax.set_ylabel(Y_LABEL if first else "")
        ax.tick_params(axis="x", labelrotation=0)
        ax.tick_params(axis="y", labelrotation=0)
    for j in range(len(members), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.colorbar(axes[0][0].collections[0], ax=axes.ravel().tolist(), label=METRIC, shrink=0.9 if nrows == 1 else 0.6)
    fig.suptitle(title or key.title)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def out_paths(out: Path, keys: list) -> list[Path]:
    """``out`` for a single group; else ``<stem>__<model>__<protocol>__<generator>__<scope>__<suite><suffix>``."""
    if len(keys) == 1:
        return [out]
    return [out.with_name("__".join([out.stem, *(_slug(v) for v in (k.model, k.protocol, k.generator_version,
                                                                     k.compression_scope, k.suite))]) + out.suffix)
            for k in keys]


def write(groups: dict, out, title: str | None = None, palette: str = "reference", max_cols: int = 4,
          dpi: int = 150) -> list[Path]:
    """One figure per group (``draw``) at ``out_paths(out, ...)`` (parent folders made, the format from
    the suffix: .png, .pdf, .svg); returns the paths."""
    out = Path(out)
    paths = out_paths(out, list(groups))
    for (key, members), path in zip(groups.items(), paths):
        fig = draw(key, members, title, palette, max_cols)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
        plt.close(fig)
    return paths


def main(argv=None) -> None:
    """``kvh ruler-heatmap``: one figure per group written at ``--out`` (``out_paths``), the paths printed.
    A root without RULER runs exits with one ``error:`` line (``results.run_cli``)."""
    parser = argparse.ArgumentParser(prog="kvh ruler-heatmap", description=__doc__,
                                     formatter_class=results.HelpFormatter)
    parser.add_argument("roots", nargs="+", help="results folders to search (e.g. results/ruler/llama3_1)")
    parser.add_argument("--out", type=Path, required=True, help="the figure file (.png; .pdf and .svg work too)")
    parser.add_argument("--palette", choices=sorted(PALETTES), default="reference",
                        help="reference: the needle heatmaps' red-yellow-green; cividis: readable with red-green "
                             "colour blindness and in greyscale")
    parser.add_argument("--max-cols", type=int, default=4, help="panels per row")
    parser.add_argument("--title", help="figure title (default: suite, model, protocol, generator, scope)")
    args = parser.parse_args(argv)
    if args.max_cols < 1:
        parser.error(f"--max-cols {args.max_cols} must be at least 1")
    groups = ruler_table.group_runs(ruler_table.load_runs(args.roots))
    for path in write(groups, args.out, args.title, args.palette, args.max_cols):
        print(path)


if __name__ == "__main__":
    results.run_cli(main)
