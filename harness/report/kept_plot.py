"""What each method kept, per layer: the figure that shows DynamicKV's task-adaptive allocation.

    kvh kept-plot FOLDER [FOLDER...] --out DIR [--by run|sample]

Reads the ``kept`` (tokens per head, per compressed layer) and ``kept_layers`` fields that runs
store in their predictions; draws (1) mean kept tokens per layer, one line per run (or sample), and
(2) a heatmap of rows = runs (or samples) x columns = layers. PNG and PDF.

Runs are listed in the papers' order (StreamingLLM, H2O, SnapKV, PyramidKV, DynamicKV, any other
method; each by budget ascending) and labelled "SnapKV @128" from their ``manifest.json``. Methods
with a uniform allocation keep exactly the budget in every layer, so their lines coincide (five
lines on 128): each line has its own marker and line style, lines drawn later are thinner with
smaller markers so the ones below stay visible, and lines with identical values are spread by a few
hundredths of a layer sideways (said in the legend's title), so every run can be seen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.report.common import distinct_labels, run_info, save_figure  # noqa: E402
from harness.run import results  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
SPREAD = 0.12   # layers: how far apart sideways lines with identical values are drawn


def _fallback(run: Path) -> str:
    return f"{run.parent.parent.name}/{run.name}"


def allocation_rows(runs: list[Path], by: str = "run") -> tuple[list[str], list[int], np.ndarray]:
    """Labels, model layer indices and a [rows, layers] matrix of mean kept tokens per head. Rows in
    the papers' method order, budget ascending (runs without a manifest after them, as given),
    labelled "SnapKV @128" (``common.distinct_labels``; without a manifest "<model>/<folder>"), with
    ": <sample id>" per sample for ``by="sample"``. Raises ValueError when no run reports kept tokens
    or two runs have different layers."""
    infos = sorted((run_info(run) for run in runs), key=lambda info: info.order[:3])   # stable: as given otherwise
    labels, matrix, layers = [], [], None
    for info, name in zip(infos, distinct_labels(infos, fallback=_fallback)):
        rows = [r for r in results.read_predictions(info.folder) if r.get("kept")]
        if not rows:
            continue
        layers = layers or rows[0].get("kept_layers") or list(range(len(rows[0]["kept"])))
        if len(rows[0]["kept"]) != len(layers):
            raise ValueError(f"{info.folder}: {len(rows[0]['kept'])} layers, other runs have {len(layers)}; "
                             "plot runs of one model together")
        if by == "sample":
            for r in rows:
                labels.append(f"{name}: {r['id']}")
                matrix.append(r["kept"])
        else:
            labels.append(name)
            matrix.append(np.mean([r["kept"] for r in rows], axis=0))
    if not matrix:
        raise ValueError("no run with kept-token reports (FullKV keeps everything and reports nothing)")
    return labels, layers, np.asarray(matrix, dtype=float)


def offsets(matrix: np.ndarray) -> np.ndarray:
    """Sideways offsets (layers), one per row: 0 for a row whose values no other row has, else the
    rows with identical values spread evenly over ``SPREAD`` x (their count - 1), centred on 0."""
    shift = np.zeros(len(matrix))
    groups: dict[bytes, list[int]] = {}
    for i, row in enumerate(np.round(matrix, 6)):
        groups.setdefault(row.tobytes(), []).append(i)
    for members in groups.values():
        for k, i in enumerate(members):
            shift[i] = SPREAD * (k - (len(members) - 1) / 2)
    return shift


def draw(labels, layers, matrix, title: str = ""):
    """The figure: mean kept tokens per layer (one line per label, each with its own marker and line
    style, later lines thinner, identical lines spread sideways by ``offsets``) above a labels x
    layers heatmap of the same numbers. Returns the matplotlib Figure."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(layers) + 4), 4 + 0.35 * len(labels) + 4))
    shift = offsets(matrix)
    x = np.asarray(layers, dtype=float)
    for i, (label, row) in enumerate(zip(labels, matrix)):   # 20 distinct (line style, marker) pairs
        top.plot(x + shift[i], row, linestyle=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)],
                 label=label, zorder=2 + i, linewidth=max(0.8, 2.4 - 0.3 * i), markersize=max(3.0, 8.0 - 1.0 * i),
                 markerfacecolor="none" if i % 2 else None)
    top.set_xticks(layers, [str(layer) for layer in layers])
    top.set_xlabel("layer")
    top.set_ylabel("kept tokens per head (mean)")
    spread = bool(shift.any())
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title_fontsize=7,
               title=f"identical lines drawn {SPREAD:g} layer apart" if spread else None)
    image = bottom.imshow(matrix, aspect="auto", cmap="viridis")
    bottom.set_xticks(range(len(layers)), layers, fontsize=7)
    bottom.set_yticks(range(len(labels)), labels, fontsize=7)
    bottom.set_xlabel("layer")
    fig.colorbar(image, ax=bottom, label="kept tokens per head")
    fig.suptitle(title or "KV cache kept per layer")
    fig.tight_layout()
    return fig


def plot(labels, layers, matrix, path_stem: Path, title: str = "") -> list[Path]:
    """``draw`` written to ``<path_stem>.png`` and ``.pdf``; returns the two paths."""
    return save_figure(draw(labels, layers, matrix, title), path_stem, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvh kept-plot", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("folders", nargs="+", help="results folders; every run below them is read")
    parser.add_argument("--out", required=True, help="folder for kept_per_layer_by_<by>.png/.pdf")
    parser.add_argument("--by", choices=("run", "sample"), default="run",
                        help="one row per run (mean over its samples) or per sample")
    args = parser.parse_args(argv)
    try:
        labels, layers, matrix = allocation_rows(results.find_runs(args.folders, results.PREDICTIONS), args.by)
    except ValueError as error:
        raise SystemExit(f"{error} under {args.folders}") from None
    for path in plot(labels, layers, matrix, Path(args.out) / f"kept_per_layer_by_{args.by}"):
        print(path)


if __name__ == "__main__":
    results.run_cli(main)
