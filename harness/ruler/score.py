"""A RULER run's final scores from its rows, as RULER's ``eval/evaluate.py`` and README compute them
(reference-ruler.md section 3; the metrics are ``harness.ruler.metrics``).

Rows carry ``task``, ``context_length``, ``pred`` and ``answers``. Per (length, task): the task's metric
over its samples (0-100, ``round(., 2)``) and its nulls; per length: the unweighted task mean where the
tasks form RULER-13 or RULER-11 (any other subset gets per-task scores only, labelled with the tasks
it has); over lengths: Avg, wAvg (inc/dec) and the effective length against 85.6.
"""

from __future__ import annotations

from collections import defaultdict

from harness.ruler import metrics


def suite_label(tasks) -> str:
    """``RULER-13``, ``RULER-11`` (no QA), or ``RULER subset (k tasks)`` for any other set of task names."""
    names = set(tasks)
    if names == set(metrics.TASKS):
        return "RULER-13"
    if names == set(metrics.TASKS) - set(metrics.QA_TASKS):
        return "RULER-11"
    return f"RULER subset ({len(names)} tasks)"


def summary(rows: list[dict], expected_tasks=None, samples_per_task: int | None = None) -> dict:
    """``scores.json``'s RULER fields from a folder's finished rows.

    Returns ``{"suite", "tasks": {length: {task: score}}, "nulls": {length: {task: [empty, samples]}},
    "samples": {length: {task: n}}, "lengths": {length: score}, "avg", "wavg_inc", "wavg_dec",
    "effective_length", "score"}``; lengths are strings (JSON keys); ``lengths`` holds only the complete
    lengths (every task of the suite with all its samples), and the averages are None where no length is
    complete or the tasks are not a RULER suite; ``score`` is ``avg`` (the number the generic reports show).
    ``expected_tasks`` (the run's tasks, QA tasks without data left out) and ``samples_per_task``: what
    a complete length holds, and the suite's label; None: the tasks the rows have, any number of samples.
    Raises ``ValueError`` for a row without ``task`` or ``context_length``."""
    grouped: dict[int, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if "task" not in row or "context_length" not in row:
            raise ValueError(f"row {row.get('id')!r} has no task or context_length: not a RULER row")
        grouped[int(row["context_length"])][row["task"]].append(row)
    all_tasks = set(expected_tasks) if expected_tasks is not None else \
        {task for by_task in grouped.values() for task in by_task}
    suite = suite_label(all_tasks)
    incomplete = {}
    tasks, nulls, counts, per_length = {}, {}, {}, {}
    for length in sorted(grouped):
        scored = {}
        for task in [t for t in metrics.TASKS if t in grouped[length]]:
            task_rows = grouped[length][task]
            result = metrics.task_score(task, [r["pred"] for r in task_rows], [list(r["answers"]) for r in task_rows])
            scored[task] = result["score"]
            nulls.setdefault(str(length), {})[task] = result["nulls"]
            counts.setdefault(str(length), {})[task] = len(task_rows)
        tasks[str(length)] = scored
        short = {t: len(grouped[length][t]) for t in all_tasks
                 if len(grouped[length].get(t, [])) < (samples_per_task or 1)}
        if short:
            incomplete[str(length)] = short
        if suite in ("RULER-13", "RULER-11") and set(scored) == all_tasks and not short:
            per_length[length] = metrics.length_score(scored)["score"]
    out = {"suite": suite, "tasks": tasks, "nulls": nulls, "samples_per_task": counts,
           "lengths": {str(k): round(v, 2) for k, v in per_length.items()},
           "avg": None, "wavg_inc": None, "wavg_dec": None, "effective_length": None}
    if incomplete:
        out["incomplete"] = incomplete       # length -> {task: samples it has}, below what a complete length holds
    if per_length:
        averages = metrics.across_lengths(per_length)
        out.update({k: round(v, 2) for k, v in averages.items()})
        out["effective_length"] = metrics.effective_length(per_length)
    out["score"] = out["avg"]
    return out
