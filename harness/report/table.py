"""The paper-style LongBench table from run folders (reporters read only results folders).

    kvh table [results/longbench/llama3 more folders...] [--out DIR]
        [--reference results/reference] [--datasets narrativeqa qasper ...] [--latest] [--sweep-plot]

Every folder below the given ones that holds both ``manifest.json`` and ``result.json`` (written by
``harness.longbench.score``) is a LongBench run; a folder reached twice (a folder given twice, or nested
folders) counts once. Each run is a row keyed by (model, protocol, method, budget), read from the
manifest (``config.model.name``, ``config.protocol.name``, ``method.name``, ``method.budget``;
FullKV has no budget). Two runs with the same key are an error naming both folders, unless
``--latest`` keeps the one whose ``result.json`` is newest.

Columns: the datasets (default the 16 English ones the papers average, with the paper's short
headers), "Paper avg (mean of 16 datasets)" = plain mean over the 16 (the KV-compression papers' Avg)
and "Official avg (mean of 6 category means)" = mean of the LongBench category means (the
leaderboard's Avg; reference-eval.md A.3); with ``--datasets`` the counts are those of the columns.
An average over fewer datasets than the columns is marked with the count, e.g. "38.20 (3/16)". A
dataset scored on fewer samples than it has (``<dataset>.jsonl`` lines against LongBench's test set
size, ``harness.longbench.metrics.DATASET_SIZES``: a run with ``task.limit`` or one cut short) is
marked with the count, e.g. "31.20 (2/200)", and explained under the Markdown table.

Where ``--reference`` (default ``results/reference``, every ``*.json`` there) has published numbers
for the same model, method and budget, each such entry adds a "published" row under ours and a
"diff" row (ours - published) for the datasets both have; the averages are compared only when both
are complete. Writes ``table.md``, ``table.csv``, ``table.tex`` (booktabs) and ``table.json`` into
``--out`` and prints the Markdown; ``--sweep-plot`` adds ``budget_sweep.png``/``.pdf`` (average score
vs budget, one line per method, FullKV dashed). With no arguments it reads ``results`` and writes into
``results/tables``.

Where the folders hold no LongBench run but runs of other tasks (folders with ``predictions.jsonl``),
it prints and writes their summary table instead (``table.md``, ``table.csv``, ``table.json``, as
``kvh report`` makes it).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness import config
from harness.longbench import metrics
from harness.longbench.metrics import DATASET_SIZES
from harness.longbench.score import RESULT, sample_counts  # RESULT: LongBench eval.py's file name
from harness.report import summary
from harness.report.common import markdown, method_label, method_rank, save_figure
from harness.run import results

log = logging.getLogger(__name__)

DEFAULT_FOLDERS = ["results"]
DEFAULT_OUT = "results/tables"
DEFAULT_REFERENCE = config.reference_dir()   # results/reference/ of the checkout, shipped as harness.reference

# Column headers: the PyramidKV paper's (Table 1) for the 16, short forms for the Chinese ones.
SHORT = {
    "narrativeqa": "NrtvQA", "qasper": "Qasper", "multifieldqa_en": "MF-en", "hotpotqa": "HotpotQA",
    "2wikimqa": "2WikiMQA", "musique": "Musique", "gov_report": "GovReport", "qmsum": "QMSum",
    "multi_news": "MultiNews", "trec": "TREC", "triviaqa": "TriviaQA", "samsum": "SAMSum",
    "passage_count": "PCount", "passage_retrieval_en": "PRe", "lcc": "Lcc", "repobench-p": "RB-P",
    "multifieldqa_zh": "MF-zh", "dureader": "DuReader", "vcsum": "VCSum", "lsht": "LSHT",
    "passage_retrieval_zh": "PRe-zh",
}

PAPER_AVG, OFFICIAL_AVG = "Paper avg (mean of {n} datasets)", "Official avg (mean of {k} category means)"
PARTIAL_NOTE = ("(n/N) after a dataset's score: it was scored on only n of its N test samples (task.limit, or a "
                "run cut short); the averages include that score.")
KEY_COLUMNS = ("Model", "Protocol", "Method", "Budget", "Row")
FULL_BUDGET = "full"  # the Budget cell of FullKV rows


class DuplicateRunError(ValueError):
    """Two run folders give the same (model, method, budget, protocol) row."""


@dataclass(frozen=True)
class Run:
    folder: Path
    model: str
    protocol: str
    method: str
    budget: int | None
    scores: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)   # dataset -> samples scored (lines of <dataset>.jsonl)

    @property
    def key(self) -> tuple:
        return self.model, self.method, self.budget, self.protocol


@dataclass(frozen=True)
class Published:
    label: str               # the reference file's stem, with "(unofficial)" where the file says so
    model: str
    method: str
    budget: int | None
    scores: dict
    average: float | None    # as printed (plain mean of the 16)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _number(value) -> float | None:
    """A finished dataset score, or None (NaN, LongBench-E bucket dicts and the like are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _budget(method: str, budget) -> int | None:
    return None if method == "fullkv" or budget is None else int(budget)


def load_run(folder) -> Run:
    folder = Path(folder)
    manifest = results.read_json(folder / results.MANIFEST)
    try:
        method = manifest["method"]
        model = manifest["config"]["model"]["name"]
        protocol = manifest["config"]["protocol"]["name"]
        name = method["name"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{folder / results.MANIFEST}: no {err} field; a LongBench manifest needs method.name, "
                         "method.budget, config.model.name and config.protocol.name") from None
    raw = results.read_json(folder / RESULT)
    scores = {dataset: score for dataset, score in ((d, _number(v)) for d, v in raw.items()) if score is not None}
    return Run(folder, str(model), str(protocol), str(name), _budget(name, method.get("budget")), scores,
               sample_counts(folder))


def _describe(key: tuple) -> str:
    model, method, budget, protocol = key
    return f"model={model} method={method} budget={budget if budget is not None else FULL_BUDGET} protocol={protocol}"


def dedupe(runs: list[Run], latest: bool = False) -> list[Run]:
    """One run per (model, method, budget, protocol). Several: DuplicateRunError naming the folders,
    or with ``latest`` the one whose result.json was written last (the others are named in a warning)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    kept = []
    for key, group in groups.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        folders = " and ".join(str(r.folder) for r in group)
        if not latest:
            raise DuplicateRunError(f"{len(group)} run folders give the same row ({_describe(key)}): {folders}; "
                                    "pass --latest to keep the newest result.json, or move the others away")
        group.sort(key=lambda r: (r.folder / RESULT).stat().st_mtime)
        kept.append(group[-1])
        log.warning("%s: kept %s (newest result.json), ignored %s", _describe(key), group[-1].folder,
                    ", ".join(str(r.folder) for r in group[:-1]))
    return kept


def load_reference(path) -> list[Published]:
    """Published entries from one reference JSON file or every ``*.json`` in a folder
    (``{"source", "note", "entries": [{"model", "method", "budget", "scores", "average"}]}``)."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    entries = []
    for file in files:
        data = results.read_json(file)
        label = file.stem + (" (unofficial)" if data.get("unofficial") else "")
        for e in data["entries"]:
            entries.append(Published(label, e["model"], e["method"], _budget(e["method"], e.get("budget")),
                                     {d: float(v) for d, v in (e.get("scores") or {}).items()},
                                     None if e.get("average") is None else float(e["average"])))
    return entries


# ------------------------------------------------------------------------------------------------
# Averages and rows
# ------------------------------------------------------------------------------------------------

def _sort_key(run: Run) -> tuple:
    """The papers' layout: per model and protocol, FullKV first, then each budget ascending with its
    methods in the papers' order (``common.METHOD_NAMES``)."""
    return run.model, run.protocol, -1 if run.budget is None else run.budget, method_rank(run.method), run.method


def build_rows(runs: list[Run], reference: list[Published] = (), datasets=metrics.ENGLISH_16) -> list[dict]:
    """Rows in table order, raw numbers: ``model, protocol, method, budget, row ("ours" | "published" |
    "diff"), source, scores {dataset: float}, paper, official`` (None where not computed),
    ``present`` (datasets the averages cover; equal to len(datasets) when complete) and ``samples``
    {dataset: samples scored} (ours and diff rows; published rows: empty)."""
    complete_16 = sorted(datasets) == sorted(metrics.ENGLISH_16)  # the set the printed averages are over
    rows = []
    for run in sorted(runs, key=_sort_key):
        scores = {d: run.scores[d] for d in datasets if d in run.scores}
        paper, official, present = metrics.subset_averages(scores, datasets)
        base = {"model": run.model, "protocol": run.protocol, "method": run.method, "budget": run.budget}
        samples = {d: run.samples[d] for d in scores if d in run.samples}
        ours = {**base, "row": "ours", "source": str(run.folder), "scores": scores, "paper": paper,
                "official": official, "present": present, "samples": samples}
        rows.append(ours)
        for pub in reference:
            if (pub.model, pub.method, pub.budget) != (run.model, run.method, run.budget):
                continue
            p_scores = {d: pub.scores[d] for d in datasets if d in pub.scores}
            p_paper, p_official, p_present = metrics.subset_averages(p_scores, datasets)
            if complete_16 and pub.average is not None and (not pub.scores or p_present == len(datasets)):
                p_paper, p_present = pub.average, len(datasets)   # the number as printed
            if not p_scores:
                p_official = None
            rows.append({**base, "row": "published", "source": pub.label, "scores": p_scores, "paper": p_paper,
                         "official": p_official, "present": p_present, "samples": {}})
            both = len(datasets) if present == len(datasets) and p_present == len(datasets) else None

            def diff(a, b):
                return None if both is None or a is None or b is None else a - b

            rows.append({**base, "row": "diff", "source": f"ours - {pub.label}",
                         "scores": {d: scores[d] - p_scores[d] for d in datasets if d in scores and d in p_scores},
                         "paper": diff(paper, p_paper), "official": diff(official, p_official), "present": both,
                         "samples": samples})
    return rows


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------

def header(datasets=metrics.ENGLISH_16) -> list[str]:
    """The column names: the keys, one short name per dataset, the two averages named by what they
    average ("Paper avg (mean of 16 datasets)", "Official avg (mean of 6 category means)"), Source."""
    categories = {metrics.CATEGORIES[d] for d in datasets if d in metrics.CATEGORIES}
    return [*KEY_COLUMNS, *(SHORT.get(d, d) for d in datasets), PAPER_AVG.format(n=len(datasets)),
            OFFICIAL_AVG.format(k=len(categories)), "Source"]


def _cell(value, signed: bool = False) -> str:
    if value is None:
        return ""
    value = round(value, 2) + 0.0  # no "-0.00"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def partial(row: dict, dataset: str) -> tuple[int, int] | None:
    """(samples scored, test set size) where the row's ``dataset`` score is over fewer samples than
    LongBench's test set has (``DATASET_SIZES``), else None."""
    count, size = row.get("samples", {}).get(dataset), DATASET_SIZES.get(dataset)
    return (count, size) if count is not None and size is not None and count < size else None


def _score_cell(row: dict, dataset: str, signed: bool) -> str:
    text = _cell(row["scores"].get(dataset), signed)
    mark = partial(row, dataset) if text else None
    return text + (f" ({mark[0]}/{mark[1]})" if mark else "")


def footnotes(rows: list[dict], datasets=metrics.ENGLISH_16) -> list[str]:
    """Lines to print under the table: ``PARTIAL_NOTE`` where a score is marked "(n/N)", else none."""
    return [PARTIAL_NOTE] if any(partial(r, d) for r in rows for d in datasets if d in r["scores"]) else []


def _average_cell(value, present, total: int, signed: bool) -> str:
    if value is None:
        return ""
    return _cell(value, signed) + ("" if present == total else f" ({present}/{total})")


def _source(source: str) -> str:
    """A run folder below the working directory as a relative path, anything else as given."""
    try:
        return str(Path(source).relative_to(Path.cwd().resolve()))
    except ValueError:
        return source


def format_rows(rows: list[dict], datasets=metrics.ENGLISH_16) -> list[list[str]]:
    """Rows as text cells, in ``header(datasets)`` order."""
    cells = []
    for r in rows:
        signed = r["row"] == "diff"
        total = len(datasets)
        cells.append([r["model"], r["protocol"], method_label(r["method"]),
                      FULL_BUDGET if r["budget"] is None else str(r["budget"]), r["row"],
                      *(_score_cell(r, d, signed) for d in datasets),
                      _average_cell(r["paper"], r["present"], total, signed),
                      _average_cell(r["official"], r["present"], total, signed), _source(r["source"])])
    return cells


def row_dicts(head: list[str], cells: list[list[str]]) -> list[dict]:
    """One dict per row (header -> cell), e.g. for ``harness.report.wandb_log.log_run(table_rows=...)``."""
    return [dict(zip(head, row)) for row in cells]


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex(head: list[str], cells: list[list[str]]) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``); a rule between models/protocols."""
    numeric = len(head) - len(KEY_COLUMNS) - 1
    lines = [r"\begin{tabular}{" + "l" * len(KEY_COLUMNS) + "r" * numeric + "l}", r"\toprule",
             " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
    previous = None
    for row in cells:
        if previous is not None and row[:2] != previous:
            lines.append(r"\midrule")
        previous = row[:2]
        lines.append(" & ".join(_tex(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_outputs(out, head: list[str], cells: list[list[str]], rows: list[dict], notes: list[str] = ()
                  ) -> list[Path]:
    """``table.md`` (with ``notes`` under it), ``table.csv``, ``table.tex`` and ``table.json`` (raw
    numbers, and the notes) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table.md", out / "table.csv", out / "table.tex", out / "table.json"]
    paths[0].write_text(_with_notes(markdown(head, cells), notes) + "\n", encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([head, *cells])
    paths[2].write_text(latex(head, cells), encoding="utf-8")
    results.write_json(paths[3], {"header": head, "cells": cells, "rows": rows, "notes": list(notes)})
    return paths


def _with_notes(table_text: str, notes) -> str:
    return "\n\n".join([table_text, *notes])


# ------------------------------------------------------------------------------------------------
# Budget sweep plot
# ------------------------------------------------------------------------------------------------

def budget_sweep_plot(runs, path_stem, datasets=metrics.ENGLISH_16, dpi: int = 150) -> list[Path]:
    """Average score (plain mean over the ``datasets`` each run has; a point over fewer is labelled
    "3/16") vs budget: one panel per (model, protocol), one line per method, FullKV as a horizontal
    dashed line. ``runs`` are Run objects or run folders. Writes ``<path_stem>.png`` and ``.pdf``;
    returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = [r if isinstance(r, Run) else load_run(r) for r in runs]
    if not runs:
        raise ValueError("budget_sweep_plot needs at least one run")
    panels: dict[tuple, list[Run]] = {}
    for run in sorted(runs, key=_sort_key):
        panels.setdefault((run.model, run.protocol), []).append(run)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, constrained_layout=True)
    for ax, ((model, protocol), group) in zip(axes[0], panels.items()):
        lines: dict[str, list[tuple[int, float]]] = {}
        budgets = sorted({r.budget for r in group if r.budget is not None})
        for run in group:
            avg, _, present = metrics.subset_averages(run.scores, datasets)
            if avg is None:
                continue
            label = method_label(run.method)
            partial = "" if present == len(datasets) else f" ({present}/{len(datasets)})"
            if run.budget is None:
                ax.axhline(avg, color="black", linestyle="--", linewidth=1.2, label=f"{label} ({avg:.2f}){partial}")
            else:
                lines.setdefault(label, []).append((run.budget, avg, partial))
        for label, points in lines.items():
            points.sort()
            ax.plot([b for b, _, _ in points], [a for _, a, _ in points], marker="o", label=label)
            for budget, avg, partial in points:  # an average over fewer datasets says so
                if partial:
                    ax.annotate(partial.strip(), (budget, avg), textcoords="offset points", xytext=(4, 4),
                                fontsize="x-small")
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        ax.set_xlabel("KV budget (tokens per head per layer)")
        ax.set_ylabel(PAPER_AVG.format(n=len(datasets)))
        ax.set_title(f"{model} / {protocol}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path_stem, dpi)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def table(folders, reference=DEFAULT_REFERENCE, datasets=metrics.ENGLISH_16, latest: bool = False):
    """Runs, header, text cells and raw rows for the run folders below ``folders``
    (``reference=None``: no published rows)."""
    runs = dedupe([load_run(f) for f in results.find_runs(folders, RESULT, also=results.MANIFEST)], latest=latest)
    published = load_reference(reference) if reference is not None else []
    rows = build_rows(runs, published, datasets)
    return runs, header(datasets), format_rows(rows, datasets), rows


def other_tasks_table(folders, out, sweep_plot: bool = False) -> list[Path]:
    """Where ``folders`` hold no LongBench run: the summary table of the other tasks' runs (folders with
    ``predictions.jsonl``, as ``kvh report`` makes it), printed and written into ``out``
    (``table.md``/``.csv``/``.json``); returns the written paths. No run of any task: SystemExit with
    the LongBench message."""
    runs = results.find_runs(folders, results.PREDICTIONS)
    if not runs:
        raise SystemExit(f"no LongBench runs (folders with {results.MANIFEST} and {RESULT}) under {folders}")
    log.warning("no LongBench runs (folders with %s and %s) under %s; the summary table of the %d run(s) with %s "
                "instead", results.MANIFEST, RESULT, folders, len(runs), results.PREDICTIONS)
    if sweep_plot:
        log.warning("--sweep-plot needs LongBench runs: no budget_sweep plot")
    head, rows = summary.passkey_table(runs)
    print(markdown(head, rows))
    written = summary.write_outputs(out, head, rows)
    for p in written:
        print(p, file=sys.stderr)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvh table", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("folders", nargs="*", default=DEFAULT_FOLDERS, help="results folders to search")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for table.md/.csv/.tex/.json (and budget_sweep.*)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="published numbers: a reference JSON file or a folder of them "
                             f"(default {DEFAULT_REFERENCE} where it exists)")
    parser.add_argument("--no-reference", action="store_true", help="no published/diff rows")
    parser.add_argument("--datasets", nargs="+", default=list(metrics.ENGLISH_16), metavar="DATASET",
                        help="columns, in this order (default: the 16 English datasets)")
    parser.add_argument("--latest", action="store_true",
                        help="where several runs give the same row, keep the newest result.json")
    parser.add_argument("--sweep-plot", action="store_true", help="also write budget_sweep.png/.pdf into --out")
    args = parser.parse_args(argv)
    unknown = [d for d in args.datasets if d not in metrics.CATEGORIES]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; LongBench has {', '.join(metrics.CATEGORIES)}")
    if args.reference is not None and not args.reference.exists():
        parser.error(f"--reference {args.reference} does not exist")
    reference = None if args.no_reference else (args.reference or (DEFAULT_REFERENCE if DEFAULT_REFERENCE.is_dir()
                                                                    else None))
    try:
        runs, head, cells, rows = table(args.folders, reference, tuple(args.datasets), args.latest)
    except (DuplicateRunError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if not runs:
        other_tasks_table(args.folders, args.out, args.sweep_plot)
        return
    notes = footnotes(rows, tuple(args.datasets))
    print(_with_notes(markdown(head, cells), notes))
    written = write_outputs(args.out, head, cells, rows, notes)
    if args.sweep_plot:
        written += budget_sweep_plot(runs, Path(args.out) / "budget_sweep", tuple(args.datasets))
    for p in written:
        print(p, file=sys.stderr)


if __name__ == "__main__":
    results.run_cli(main)
