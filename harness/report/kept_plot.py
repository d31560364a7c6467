"""What each method kept, per layer: the figure that shows DynamicKV's task-adaptive allocation.

    kvh kept-plot FOLDER [FOLDER...] --out DIR [--by run|sample]

Reads the ``kept`` (tokens per head, per compressed layer) and ``kept_layers`` fields that runs
store in their predictions; draws (1) mean kept tokens per layer, one line per run (or sample), and
(2) a heatmap of rows = runs (or samples) x columns = layers. PNG and PDF.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.report.common import save_figure  # noqa: E402
from harness.run import results  # noqa: E402


def allocation_rows(runs: list[Path], by: str = "run") -> tuple[list[str], list[int], np.ndarray]:
    """Labels, model layer indices and a [rows, layers] matrix of mean kept tokens per head."""
    labels, matrix, layers = [], [], None
    for run in runs:
        rows = [r for r in results.read_predictions(run) if r.get("kept")]
        if not rows:
            continue
        layers = layers or rows[0].get("kept_layers") or list(range(len(rows[0]["kept"])))
        if len(rows[0]["kept"]) != len(layers):
            raise ValueError(f"{run}: {len(rows[0]['kept'])} layers, other runs have {len(layers)}; "
                             "plot runs of one model together")
        name = f"{run.parent.parent.name}/{run.name}"
        if by == "sample":
            for r in rows:
                labels.append(f"{name}:{r['id']}")
                matrix.append(r["kept"])
        else:
            labels.append(name)
            matrix.append(np.mean([r["kept"] for r in rows], axis=0))
    if not matrix:
        raise ValueError("no run with kept-token reports (FullKV keeps everything and reports nothing)")
    return labels, layers, np.asarray(matrix, dtype=float)


def plot(labels, layers, matrix, path_stem: Path, title: str = "") -> list[Path]:
    """Mean kept tokens per layer (one line per label) above a labels x layers heatmap of the same
    numbers; writes ``<path_stem>.png`` and ``.pdf`` and returns the two paths."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(layers) + 4), 4 + 0.35 * len(labels) + 4))
    for label, row in zip(labels, matrix):
        top.plot(layers, row, marker="o", markersize=3, label=label)
    top.set_xlabel("layer")
    top.set_ylabel("kept tokens per head (mean)")
    top.legend(fontsize=7)
    image = bottom.imshow(matrix, aspect="auto", cmap="viridis")
    bottom.set_xticks(range(len(layers)), layers, fontsize=7)
    bottom.set_yticks(range(len(labels)), labels, fontsize=7)
    bottom.set_xlabel("layer")
    fig.colorbar(image, ax=bottom, label="kept tokens per head")
    fig.suptitle(title or "KV cache kept per layer")
    fig.tight_layout()
    return save_figure(fig, path_stem, dpi=120)


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
