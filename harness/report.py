"""Comparison tables from results folders (reporters read only results folders).

    python -m harness.report results/passkey/smollm2_135m [more folders...]

Every folder below the given ones that holds a ``predictions.jsonl`` is a run; each becomes a row
with its score per depth (averaged over context lengths), per context length, and the mean.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

from harness import results


def find_runs(roots) -> list[Path]:
    """Run folders with a ``predictions.jsonl`` at or below ``roots``."""
    return results.find_runs(roots)


def _mean(values) -> float:
    return round(100 * sum(values) / len(values), 1) if values else float("nan")


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def passkey_table(runs: list[Path]) -> tuple[list[str], list[list]]:
    """Header and rows: run, one column per depth, one per context length, mean, samples."""
    data = {}
    depths, lengths = set(), set()
    for run in runs:
        rows = results.read_predictions(run)
        by_depth, by_length = defaultdict(list), defaultdict(list)
        for r in rows:
            by_depth[r.get("depth")].append(r["score"])
            by_length[r.get("context_length")].append(r["score"])
        depths.update(by_depth)
        lengths.update(by_length)
        data[run] = (by_depth, by_length, [r["score"] for r in rows])
    depths, lengths = sorted(d for d in depths if d is not None), sorted(x for x in lengths if x is not None)
    header = (["run"] + [f"depth {_label(d)}%" for d in depths] + [f"{_label(x)} tok" for x in lengths]
              + ["mean", "samples"])
    table = []
    for run, (by_depth, by_length, scores) in data.items():
        label = str(run.relative_to(run.parents[2])) if len(run.parents) > 2 else str(run)
        table.append([label] + [_mean(by_depth.get(d, [])) for d in depths]
                     + [_mean(by_length.get(x, [])) for x in lengths] + [_mean(scores), len(scores)])
    return header, table


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", help="write table.md and table.csv into this folder")
    args = parser.parse_args(argv)
    runs = find_runs(args.folders)
    if not runs:
        raise SystemExit(f"no runs (folders with {results.PREDICTIONS}) under {args.folders}")
    header, rows = passkey_table(runs)
    text = markdown(header, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n", encoding="utf-8")
        with (out / "table.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
        results.write_json(out / "table.json", {"header": header, "rows": rows})


if __name__ == "__main__":
    results.run_cli(main)
