"""RULER tables from results folders (reporters read only results folders).

    kvh ruler-table results/ruler/llama3_1 [more roots...] [--format md|csv] [--out FILE]
        [--reference FILE | --no-reference]

A RULER run is a folder below the roots whose ``manifest.json`` says ``config.task.name: ruler``, or,
without a manifest, whose ``scores.json`` names a RULER suite. Its scores are its ``scores.json``
(``harness.ruler.score.summary``: RULER's string_match_all/part per task and length, the task mean per
length, Avg, wAvg and the effective length against 85.6); where that file is missing or counts fewer
samples than the folder's rows (a run cut short, resumed), they are recomputed from the rows with the
same function, with a warning.

Runs are grouped by model, protocol, generator version (``task.generator_version``), compression scope
(``protocol.compression_scope``) and suite (RULER-13, RULER-11 without QA, or a named subset): each group
is its own table, never mixed. In a group, methods are in the papers' order (FullKV first, then
``common.METHOD_NAMES``), each by token budget ascending ("SnapKV @128"), then by compression ratio
ascending ("SnapKV @r0.5", the budget resolved per prompt).

Per group: a summary (method x length: the task mean per length, Avg, wAvg inc/dec, effective length;
an Avg over fewer lengths than the columns says so, "88.10 (1/2 lengths)"), then the published anchors
(``results/reference/ruler/ruler_readme.json``) in their own labelled tables, never in our rows: the
RULER README rows for the lengths shown (only the run's model where the README has it; the printed Avg
and wAvg are over 4K-128K), the 85.6 threshold, and kvpress's 4K numbers by ratio where the group has
ratio runs. Then per method a task x length table with a "Mean (<suite>)" row and, at 4K, GPT-4-1106's
per-task scores (RULER issue #63) as a labelled column. A subset of tasks gets means over its tasks,
labelled as not RULER's score, and no effective length.

``--format md`` (default) is the Markdown that docs/RULER.md pastes; ``--format csv`` is one flat table
(``kind`` = ours | task | published | published_task). Printed, or written to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness import config
from harness.report.common import RunInfo, distinct_labels, markdown, method_label, method_rank, run_info
from harness.ruler import metrics, score
from harness.run import results

log = logging.getLogger(__name__)

DEFAULT_REFERENCE = config.reference_dir() / "ruler" / "ruler_readme.json"
FORMATS = ("md", "csv")
#: where each part of ruler_readme.json comes from (its "source" field says the same at length)
README_SOURCE = "RULER README (github:NVIDIA/RULER)"
SELF_REPORTED_SOURCE = "RULER README, reported by the model's authors"
GPT4_SOURCE = "RULER issue #63, maintainer"
NO_RUNS_FIX = ("fix: run `make ruler MODEL=...` or `kvh run task=ruler ...` with results_dir there, or pass the "
               "folder that holds ruler/<model>/<protocol>/<method>/")
UNKNOWN = "unknown"


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupKey:
    """What must be equal for runs to share a table."""

    model: str
    protocol: str
    generator_version: str
    compression_scope: str
    tasks: tuple   # the tasks of the suite, in RULER's order

    @property
    def suite(self) -> str:
        """"RULER-13", "RULER-11" or "RULER subset (k tasks)" (``harness.ruler.score.suite_label``)."""
        return score.suite_label(self.tasks)

    @property
    def is_suite(self) -> bool:
        """True for RULER-13 and RULER-11, whose per-length means are RULER's score."""
        return self.suite in ("RULER-13", "RULER-11")

    @property
    def title(self) -> str:
        """"RULER-13: llama3_1, protocol default, generator ruler_head, compression scope context"."""
        suite = self.suite if self.is_suite else f"{self.suite}: {', '.join(self.tasks)}"
        return (f"{suite}: {self.model}, protocol {self.protocol}, generator {self.generator_version}, "
                f"compression scope {self.compression_scope}")


@dataclass(frozen=True)
class RulerRun:
    """One RULER results folder: its manifest's facts and its ``scores.json`` fields (``summary``)."""

    folder: Path
    info: RunInfo
    model_id: str | None          # config.model.name_or_path (a hub id or a local path)
    protocol: str
    generator_version: str
    compression_scope: str
    ratio: float | None           # method.compression_ratio; None: a token budget (or FullKV)
    summary: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The registry name (``method.name``; the folder name without a manifest)."""
        return self.info.method or UNKNOWN

    @property
    def budget(self) -> int | None:
        """Tokens kept per head per layer; None for FullKV and for a ratio run (its budget is per prompt)."""
        return None if self.ratio is not None else self.info.budget

    @property
    def label(self) -> str:
        """"FullKV", "SnapKV @128", "SnapKV @r0.5"."""
        name = method_label(self.method)
        if self.ratio is not None:
            return f"{name} @r{self.ratio:g}"
        return name if self.budget is None else f"{name} @{self.budget}"

    @property
    def order(self) -> tuple:
        """FullKV first, the papers' method order, token budgets ascending, then ratios ascending."""
        kind, size = (1, self.ratio) if self.ratio is not None else (0, -1 if self.budget is None else self.budget)
        return method_rank(self.method), self.method, kind, size, str(self.folder)

    @property
    def tasks(self) -> tuple:
        """The tasks the run has rows for at any length, in RULER's order (``metrics.TASKS``)."""
        present = {t for by_task in self.summary["tasks"].values() for t in by_task}
        return tuple(t for t in metrics.TASKS if t in present)

    @property
    def lengths(self) -> list[int]:
        """The context lengths (tokens) the run has rows for, ascending."""
        return sorted(int(x) for x in self.summary["tasks"])

    @property
    def key(self) -> GroupKey:
        """The table the run belongs in (``GroupKey``)."""
        return GroupKey(self.info.model or UNKNOWN, self.protocol, self.generator_version, self.compression_scope,
                        self.tasks)


def _manifest(folder: Path) -> dict:
    path = folder / results.MANIFEST
    return results.read_json(path) if path.is_file() else {}


def _section(manifest: dict, group: str) -> dict:
    value = (manifest.get("config") or {}).get(group) if isinstance(manifest.get("config"), dict) else None
    return value if isinstance(value, dict) else {}


def is_ruler(folder) -> bool:
    """A RULER run: its manifest's ``config.task.name`` is ``ruler``, or (no manifest, or one that does
    not say) its ``scores.json`` has a ``suite`` naming RULER."""
    folder = Path(folder)
    task = _section(_manifest(folder), "task").get("name")
    if task is not None:
        return task == "ruler"
    scores = folder / results.SCORES
    return scores.is_file() and str(results.read_json(scores).get("suite", "")).startswith("RULER")


def find_ruler_runs(roots) -> list[Path]:
    """The RULER run folders at or below each of ``roots`` (``is_ruler``), each once. Raises
    ``FileNotFoundError`` for a root that does not exist and ``SystemExit`` (one line naming the root
    and the fix) for a root with no RULER run."""
    found = set()
    for root in roots:
        folders = set()
        for marker in (results.MANIFEST, results.SCORES):
            folders.update(f for f in results.find_runs([root], marker) if is_ruler(f))
        if not folders:
            raise SystemExit(f"no RULER runs under {root} (folders whose {results.MANIFEST} has config.task.name "
                             f"ruler, or whose {results.SCORES} names a RULER suite); {NO_RUNS_FIX}")
        found |= folders
    return sorted(found)


def load_summary(folder) -> dict:
    """The folder's RULER scores: its ``scores.json`` where it covers every finished row, else
    ``harness.ruler.score.summary`` of the rows (a warning says why). Raises ``ValueError`` for a folder
    with neither rows nor a RULER ``scores.json``, or with rows that are not RULER rows."""
    folder = Path(folder)
    rows = list(results.finished(folder).values())
    path = folder / results.SCORES
    stored = results.read_json(path) if path.is_file() else {}
    has_scores = isinstance(stored.get("tasks"), dict)
    counted = stored.get("samples", sum(n for by_task in stored.get("samples_per_task", {}).values()
                                        for n in by_task.values()))
    if has_scores and (not rows or counted == len(rows)):
        return stored
    if not rows:
        raise ValueError(f"{folder}: no finished rows and no RULER {results.SCORES}")
    why = f"{results.SCORES} counts {counted} samples" if has_scores else f"no {results.SCORES} with RULER scores"
    log.warning("%s: %s, the folder has %d finished rows: scored from the rows (harness.ruler.score.summary)",
                folder, why, len(rows))
    return score.summary(rows)


def load_run(folder) -> RulerRun:
    """A ``RulerRun`` from the folder's ``manifest.json`` (method and knobs, ``config.model.name`` and
    ``name_or_path``, ``config.protocol.name`` and ``compression_scope``, ``config.task.generator_version``;
    "unknown" where absent; the scope falls back to the rows' ``compression_scope``) and ``load_summary``."""
    folder = Path(folder)
    manifest = _manifest(folder)
    summary = load_summary(folder)
    info = run_info(folder)
    if info.method is None:   # no manifest: the folder name is all there is
        info = replace(info, method=folder.name)
    protocol = _section(manifest, "protocol")
    scope = protocol.get("compression_scope")
    if scope is None:
        row = next(iter(results.finished(folder).values()), {})
        scope = row.get("compression_scope", UNKNOWN)
    ratio = info.knobs.get("compression_ratio")
    return RulerRun(folder, info, _section(manifest, "model").get("name_or_path"), str(protocol.get("name", UNKNOWN)),
                    str(_section(manifest, "task").get("generator_version", UNKNOWN)), str(scope),
                    None if ratio is None or info.method == "fullkv" else float(ratio), summary)


def load_runs(roots) -> list[RulerRun]:
    """Every RULER run below ``roots`` (``find_ruler_runs``, ``load_run``); a folder that cannot be
    scored is skipped with a warning, and none left is a ``SystemExit`` naming the roots."""
    runs = []
    for folder in find_ruler_runs(roots):
        try:
            runs.append(load_run(folder))
        except ValueError as err:
            log.warning("skipped: %s", err)
    if not runs:
        raise SystemExit(f"no RULER run under {', '.join(map(str, roots))} has scored rows; {NO_RUNS_FIX}")
    return runs


def group_runs(runs: list[RulerRun]) -> dict[GroupKey, list[tuple[str, RulerRun]]]:
    """``{GroupKey: [(label, run), ...]}``, groups sorted by their key's fields, runs in ``RulerRun.order``;
    labels told apart where two runs share one (``common.distinct_labels``: "SnapKV @128 (window_size=8)")."""
    groups: dict[GroupKey, list[RulerRun]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    out = {}
    for key in sorted(groups, key=lambda k: (k.model, k.protocol, k.generator_version, k.compression_scope,
                                             -len(k.tasks), k.tasks)):
        members = sorted(groups[key], key=lambda r: r.order)
        plain = {r.folder: r.label for r in members}
        labels = distinct_labels([replace(r.info, method=None) for r in members], fallback=plain.__getitem__)
        out[key] = list(zip(labels, members))
    return out


def load_reference(path) -> dict:
    """The published anchors (``results/reference/ruler/ruler_readme.json``: README rows, threshold,
    GPT-4's 4K per-task row, kvpress's 4K numbers). Raises ``FileNotFoundError``/``ResultFileError``."""
    return results.read_json(Path(path))


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------

def length_label(length: int) -> str:
    """A context length as RULER's README heads its columns: 4096 -> "4K", 131072 -> "128K"; a length
    that is not a multiple of 1024 as its token count."""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def length_means(run: RulerRun, key: GroupKey) -> dict[int, float]:
    """The per-length score: ``scores.json``'s ``lengths`` (RULER-13/11: lengths where every task has
    rows); for a subset, the plain mean of its tasks at each length where all of them have rows."""
    if key.is_suite:
        return {int(x): v for x, v in run.summary.get("lengths", {}).items()}
    return {int(x): sum(by_task.values()) / len(by_task) for x, by_task in run.summary["tasks"].items()
            if set(by_task) == set(key.tasks)}


def overall(run: RulerRun, key: GroupKey) -> dict:
    """Avg, wAvg inc/dec (RULER's weights, over the run's complete lengths), effective length (suites
    only: the threshold is a 13-task mean) and how many lengths the averages cover."""
    means = length_means(run, key)
    if not means:
        return {"avg": None, "wavg_inc": None, "wavg_dec": None, "effective_length": None, "lengths": 0}
    if key.is_suite and run.summary.get("avg") is not None:
        averaged = {k: run.summary[k] for k in ("avg", "wavg_inc", "wavg_dec")}
        effective = run.summary.get("effective_length")
    else:
        averaged = metrics.across_lengths(means)
        effective = metrics.effective_length(means) if key.is_suite else None
    return {**averaged, "effective_length": effective, "lengths": len(means)}


def samples_text(run: RulerRun) -> str:
    """Samples per task and length: "500", or the range "3-5" where they differ."""
    counts = [n for by_task in run.summary.get("samples_per_task", {}).values() for n in by_task.values()]
    if not counts:
        return ""
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------
# Tables: (header, rows of raw values); Markdown and CSV format them
# ------------------------------------------------------------------------------------------------

def summary_table(key: GroupKey, members: list[tuple[str, RulerRun]]) -> tuple[list[str], list[dict]]:
    """Method x length: header and one dict per run (``label``, ``folder``, ``lengths`` {tokens: score},
    ``avg``, ``wavg_inc``, ``wavg_dec``, ``effective_length``, ``lengths_averaged``, ``samples``)."""
    lengths = sorted({x for _, run in members for x in run.lengths})
    header = ["Method", *map(length_label, lengths), "Avg", "wAvg inc", "wAvg dec", "Effective length",
              "Samples/task", "Folder"]
    rows = []
    for label, run in members:
        means, over = length_means(run, key), overall(run, key)
        rows.append({"label": label, "run": run, "lengths": {x: means.get(x) for x in lengths},
                     "lengths_averaged": over.pop("lengths"), "columns": len(lengths), **over,
                     "samples": samples_text(run)})
    return header, rows


def task_table(key: GroupKey, run: RulerRun, reference: dict | None) -> tuple[list[str], list[list]]:
    """Task x length for one run: RULER's tasks in order (those it has), a last row "Mean (<suite>)";
    where the run has 4K and ``reference`` has GPT-4-1106's per-task 4K row, that row as a labelled
    last column. Cells are raw scores (0-100) or None."""
    lengths = run.lengths
    gpt4 = (reference or {}).get("per_task_4k", {})
    gpt4_name, gpt4_row = next(iter(gpt4.items()), (None, None))
    anchor = gpt4_row is not None and 4096 in lengths
    header = ["Task", *map(length_label, lengths)]
    if anchor:
        header.append(f"Published: {gpt4_name} at 4K ({GPT4_SOURCE})")
    rows = []
    for task in run.tasks:
        cells = [run.summary["tasks"].get(str(x), {}).get(task) for x in lengths]
        rows.append([task, *cells, *([gpt4_row.get(task)] if anchor else [])])
    means = length_means(run, key)
    mean_name = f"Mean ({key.suite})" if key.is_suite else f"Mean of {len(key.tasks)} tasks (not RULER's score)"
    rows.append([mean_name, *(means.get(x) for x in lengths),
                 *([_mean(gpt4_row.get(t) for t in run.tasks)] if anchor else [])])
    return header, rows


def model_match(anchor_model: str, members) -> bool:
    """The README's model is the runs' model: its name equals the last part of ``config.model.name_or_path``
    or ``config.model.name``, case-insensitively."""
    names = {str(n).rstrip("/").split("/")[-1].lower() for _, r in members for n in (r.model_id, r.info.model) if n}
    return anchor_model.lower() in names


def anchor_table(key: GroupKey, members, reference: dict) -> tuple[str, list[str], list[list]]:
    """The RULER README block for a group: heading (what differs from our rows), header and rows (Source,
    Model, the group's lengths the README has, Avg/wAvg as printed over 4K-128K). Only the runs' model
    where the README has it, else every row; the 85.6 threshold last."""
    readme_lengths = list(reference.get("lengths", []))
    lengths = [x for x in sorted({x for _, r in members for x in r.lengths}) if x in readme_lengths]
    entries = reference.get("entries", [])
    matched = [e for e in entries if model_match(e["model"], members)]
    differs = ([] if key.suite == "RULER-13" else ["suite"]) + ([] if matched else ["model"])
    heading = ("Published (RULER README, RULER-13, " + (f"not the same {' or '.join(differs)}" if differs else
               "same suite and model, other data and settings") + "): the 13-task mean per length; Avg and wAvg "
               "as printed, over 4K-128K, not over the lengths shown")
    header = ["Source", "Model", *map(length_label, lengths), "Avg (4K-128K)", "wAvg inc", "wAvg dec"]
    rows = []
    for entry in matched or entries:
        by_length = dict(zip(readme_lengths, entry["scores"]))
        source = SELF_REPORTED_SOURCE if entry.get("self_reported") else README_SOURCE
        rows.append([source, entry["model"], *(by_length.get(x) for x in lengths), entry.get("avg"),
                     entry.get("wavg_inc"), entry.get("wavg_dec")])
    threshold = reference.get("threshold")
    if threshold and threshold["length"] in lengths:
        rows.append([README_SOURCE, f"{threshold['model']} (effective-length threshold)",
                     *(threshold["score"] if x == threshold["length"] else None for x in lengths), None, None, None])
    return heading, header, rows


def kvpress_table(members, reference: dict) -> tuple[str, list[str], list[list]] | None:
    """kvpress's RULER 4K numbers by compression ratio, where the group has a ratio run at 4K; else None."""
    kvpress = reference.get("kvpress_4k")
    if not kvpress or not any(r.ratio is not None and 4096 in r.lengths for _, r in members):
        return None
    source = kvpress["source"]
    heading = f"Published (kvpress, RULER-13 at 4K, not the same method or data): {source}"
    short = source.split(" (")[0]   # "NVIDIA/kvpress PR #93"
    rows = [[short, "No compression", kvpress.get("no_compression")]]
    rows += [[short, f"KVzip @r{ratio}", value] for ratio, value in kvpress.get("kvzip_by_ratio", {}).items()]
    return heading, ["Source", "Method", "4K"], rows


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------

def number(value) -> str:
    """Two decimals ("95.50"); None or NaN -> "" (no score)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{round(float(value), 2) + 0.0:.2f}"


def printed(value) -> str:
    """A published number as printed ("95.5"); None -> "–"."""
    return "–" if value is None else f"{value:g}"


def effective_text(value, key: GroupKey, lengths) -> str:
    """"32K"; "<4K" where no length passes 85.6 (the README's notation); "" for a subset."""
    if not key.is_suite or not lengths:
        return ""
    return length_label(value) if value is not None else f"<{length_label(min(lengths))}"


def summary_cells(key: GroupKey, rows: list[dict]) -> list[list[str]]:
    """The summary rows as Markdown cells; an Avg over fewer lengths than the columns says so."""
    cells = []
    for r in rows:
        partial = r["lengths_averaged"] < r["columns"]
        note = f" ({r['lengths_averaged']}/{r['columns']} lengths)" if partial and r["avg"] is not None else ""
        complete = [x for x, v in r["lengths"].items() if v is not None]
        cells.append([r["label"], *(number(v) for v in r["lengths"].values()), number(r["avg"]) + note,
                      number(r["wavg_inc"]) + note, number(r["wavg_dec"]) + note,
                      effective_text(r["effective_length"], key, complete), r["samples"], r["run"].folder.name])
    return cells


def group_markdown(key: GroupKey, members, reference: dict | None) -> str:
    """One group's Markdown: heading, summary, the published blocks, a task table per run."""
    header, rows = summary_table(key, members)
    parts = [f"### {key.title}", markdown(header, summary_cells(key, rows))]
    if not key.is_suite:
        parts.append(f"Means over these {len(key.tasks)} tasks only: not RULER's score, not comparable with "
                     "RULER-13/11 or the published rows.")
    if reference:
        heading, a_header, a_rows = anchor_table(key, members, reference)
        parts += [heading + ".", markdown(a_header, [[s, m, *map(printed, v)] for s, m, *v in a_rows])]
        kvpress = kvpress_table(members, reference)
        if kvpress:
            parts += [kvpress[0] + ".", markdown(kvpress[1], [[s, m, printed(v)] for s, m, v in kvpress[2]])]
    for label, run in members:
        t_header, t_rows = task_table(key, run, reference)
        samples = samples_text(run)
        parts += [f"#### {label} ({run.folder.name}): per task, {key.suite}"
                  + (f", {samples} samples per task and length" if samples else ""),
                  markdown(t_header, [[name, *map(number, values)] for name, *values in t_rows])]
        empty = nulls_text(run)
        if empty:
            parts.append(f"Empty predictions (task length: empty/samples): {empty}.")
    return "\n\n".join(parts)


def nulls_text(run: RulerRun) -> str:
    """"cwe 4K: 3/500, vt 8K: 1/500" for the (task, length) pairs with empty predictions; "" for none."""
    out = []
    for x in run.lengths:
        for task, (empty, total) in run.summary.get("nulls", {}).get(str(x), {}).items():
            if empty:
                out.append(f"{task} {length_label(x)}: {empty}/{total}")
    return ", ".join(out)


def to_markdown(groups: dict, reference: dict | None) -> str:
    """Every group's Markdown (``group_markdown``), separated by blank lines."""
    return "\n\n".join(group_markdown(key, members, reference) for key, members in groups.items()) + "\n"


CSV_KEYS = ("kind", "model", "protocol", "generator_version", "compression_scope", "suite", "method", "folder",
            "source", "task")
CSV_TAIL = ("avg", "wavg_inc", "wavg_dec", "effective_length", "samples_per_task")


def csv_rows(groups: dict, reference: dict | None) -> tuple[list[str], list[list]]:
    """One flat table of every group: header (``CSV_KEYS``, one column per length in tokens, ``CSV_TAIL``)
    and rows of kind ``ours`` (a run's per-length means), ``task`` (a run's task), ``published`` (an
    anchor row, its source named) and ``published_task`` (GPT-4's per-task 4K row)."""
    lengths = sorted({x for members in groups.values() for _, r in members for x in r.lengths})
    header = [*CSV_KEYS, *map(str, lengths), *CSV_TAIL]
    out = []
    for key, members in groups.items():
        base = [key.model, key.protocol, key.generator_version, key.compression_scope, key.suite]

        def row(kind, method, folder, source, task, by_length, tail):
            return [kind, *base, method, folder, source, task, *(number(by_length.get(x)) for x in lengths), *tail]

        _, rows = summary_table(key, members)
        for r in rows:
            run = r["run"]
            out.append(row("ours", r["label"], str(run.folder), "", "", r["lengths"],
                           [number(r["avg"]), number(r["wavg_inc"]), number(r["wavg_dec"]),
                            "" if r["effective_length"] is None else r["effective_length"], r["samples"]]))
            for task in run.tasks:
                scores = {x: run.summary["tasks"].get(str(x), {}).get(task) for x in run.lengths}
                out.append(row("task", r["label"], str(run.folder), "", task, scores, ["", "", "", "", r["samples"]]))
        if reference:
            out += _published_csv(key, members, reference, row)
    return header, out


def _published_csv(key, members, reference, row) -> list[list]:
    readme_lengths = list(reference.get("lengths", []))
    _, a_header, a_rows = anchor_table(key, members, reference)
    shown = [x for x in sorted({x for _, r in members for x in r.lengths}) if x in readme_lengths]
    out = []
    for source, model, *values in a_rows:
        by_length, tail = dict(zip(shown, values)), values[len(shown):]
        out.append(row("published", model, "", source, "", by_length, [number(v) for v in tail] + ["", ""]))
    kvpress = kvpress_table(members, reference)
    for source, method, value in (kvpress[2] if kvpress else []):
        out.append(row("published", method, "", source, "", {4096: value}, ["", "", "", "", ""]))
    for name, per_task in reference.get("per_task_4k", {}).items():
        if any(4096 in r.lengths for _, r in members):
            out += [row("published_task", name, "", GPT4_SOURCE, t, {4096: per_task.get(t)}, ["", "", "", "", ""])
                    for t in key.tasks]
    return out


def to_csv(groups: dict, reference: dict | None) -> str:
    """``csv_rows`` as CSV text."""
    header, rows = csv_rows(groups, reference)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def report(roots, fmt: str = "md", reference_path=DEFAULT_REFERENCE) -> str:
    """The RULER report of the runs below ``roots`` as Markdown (``fmt="md"``) or CSV; ``reference_path``
    None: no published anchors. Raises ``SystemExit`` for a root without RULER runs, ``ValueError`` for
    an unknown format."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    groups = group_runs(load_runs(roots))
    reference = load_reference(reference_path) if reference_path is not None else None
    return to_markdown(groups, reference) if fmt == "md" else to_csv(groups, reference)


def main(argv=None) -> None:
    """``kvh ruler-table``: the report printed, or written to ``--out`` (its path printed). A root without
    RULER runs exits with one ``error:`` line (``results.run_cli``)."""
    parser = argparse.ArgumentParser(prog="kvh ruler-table", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("roots", nargs="+", help="results folders to search (e.g. results/ruler/llama3_1)")
    parser.add_argument("--format", choices=FORMATS, default="md", help="md: Markdown for docs; csv: one flat table")
    parser.add_argument("--out", type=Path, help="write here instead of printing (parent folders made)")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="published anchors (ruler_readme.json)")
    parser.add_argument("--no-reference", action="store_true", help="no published blocks or columns")
    args = parser.parse_args(argv)
    text = report(args.roots, args.format, None if args.no_reference else args.reference)
    if args.out is None:
        sys.stdout.write(text)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    results.run_cli(main)
