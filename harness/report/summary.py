"""Comparison tables from results folders (reporters read only results folders).

    kvh report results/passkey/smollm2_135m [more folders...]

Every folder below the given ones that holds a ``predictions.jsonl`` is a run; each becomes a row:
its method and budget ("SnapKV @128"), its folder, its score per depth (averaged over context lengths), per context length, and the mean (100 x the
mean of the rows' ``score``: the needle task's word recall, passkey's share of keys found), rows in
the papers' method order (FullKV first, then each method by budget ascending; ``manifest.json``).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from harness.report.common import distinct_labels, markdown, run_info
from harness.run import results
from harness.run.results import find_runs  # noqa: F401  (the run finder; callers import it from here too)


def _mean(values) -> float:
    return round(100 * sum(values) / len(values), 1) if values else float("nan")


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def passkey_table(runs: list[Path]) -> tuple[list[str], list[list]]:
    """Header and rows: method (``common.distinct_labels``: "SnapKV @128"; the folder name without a
    manifest), run (the folder below its task), one column per depth, one per context length, mean,
    samples (scores in percent, one decimal); runs in ``common.RunInfo.order`` (FullKV first, the
    papers' order, budget ascending)."""
    data = {}
    depths, lengths = set(), set()
    infos = sorted((run_info(r) for r in runs), key=lambda info: info.order)
    labels = dict(zip((info.folder for info in infos), distinct_labels(infos)))
    for run in (info.folder for info in infos):
        rows = [r for r in results.read_predictions(run) if "nll" not in r]   # perplexity: scores.json has it
        by_depth, by_length = defaultdict(list), defaultdict(list)
        for r in rows:
            by_depth[r.get("depth")].append(r["score"])
            by_length[r.get("context_length")].append(r["score"])
        depths.update(by_depth)
        lengths.update(by_length)
        data[run] = (by_depth, by_length, [r["score"] for r in rows])
    depths, lengths = sorted(d for d in depths if d is not None), sorted(x for x in lengths if x is not None)
    header = (["method", "run"] + [f"depth {_label(d)}%" for d in depths] + [f"{_label(x)} tok" for x in lengths]
              + ["mean", "samples"])
    table = []
    for run, (by_depth, by_length, scores) in data.items():
        label = str(run.relative_to(run.parents[2])) if len(run.parents) > 2 else str(run)
        table.append([labels[run], label] + [_mean(by_depth.get(d, [])) for d in depths]
                     + [_mean(by_length.get(x, [])) for x in lengths] + [_mean(scores), len(scores)])
    return header, table


def write_outputs(out, header: list[str], rows: list[list]) -> list[Path]:
    """``table.md``, ``table.csv`` and ``table.json`` (header and rows) in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table.md", out / "table.csv", out / "table.json"]
    paths[0].write_text(markdown(header, rows) + "\n", encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    results.write_json(paths[2], {"header": header, "rows": rows})
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvh report", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", help="write table.md and table.csv into this folder")
    args = parser.parse_args(argv)
    runs = results.find_runs(args.folders, results.PREDICTIONS)
    if not runs:
        raise SystemExit(f"no runs (folders with {results.PREDICTIONS}) under {args.folders}")
    header, rows = passkey_table(runs)
    print(markdown(header, rows))
    if args.out:
        write_outputs(args.out, header, rows)


if __name__ == "__main__":
    results.run_cli(main)
