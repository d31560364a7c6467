"""RULER's scorer, as ``eval/evaluate.py`` and ``eval/synthetic/constants.py`` of github:NVIDIA/RULER
score (reference-ruler.md section 3), and the averages its README reports.

* ``postprocess``: a prediction stripped, every control character (U+0000-U+001F) replaced by a
  newline, stripped again; nothing else (no stop words; case only inside the metrics).
* ``string_match_all`` (the eight NIAH tasks, vt, cwe, fwe): per sample the fraction of its gold
  strings found, case-insensitively, as substrings of the prediction; ``string_match_part`` (qa_1,
  qa_2): per sample 1 when any gold string is found. Task score: the per-sample values summed, divided
  by the number of samples, times 100, ``round(., 2)`` (Python's round, as RULER).
* ``length_score``: the unweighted mean of the task scores at one length (13 tasks, or 11 without the
  two QA tasks: "RULER-11"); ``across_lengths``: the plain mean over lengths and the weighted means
  with weights 1..n increasing (``wavg_inc``) or decreasing (``wavg_dec``) with the length, divided by
  their sum (the README's 4K-128K: /21); ``effective_length``: the largest length whose score exceeds
  the threshold, Llama-2-7B-chat's 4K score 85.6.
"""

from __future__ import annotations

import re

from harness.ruler.tasks import QA_TASKS, RULER_13
from harness.ruler.tasks import TASKS as TASK_TABLE

#: the 13 tasks in RULER's order (synthetic.yaml); qa_1 reads SQuAD v2 dev, qa_2 HotpotQA dev
TASKS = RULER_13
#: the metric each task is scored with (reference-ruler.md section 1.4; the task table ``harness.ruler.tasks``)
METRICS = {name: task.metric for name, task in TASK_TABLE.items()}
#: Llama-2-7B-chat's 4K score, the README's bar for the effective length
THRESHOLD = 85.6
#: the README's lengths, in tokens
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """A prediction as RULER scores it: stripped, control characters (U+0000-U+001F) as newlines,
    stripped again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions and {len(references)} gold lists: need the same number, "
                         "at least one")
    if any(not gold for gold in references):
        raise ValueError("every sample needs at least one gold string")


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """The ``all`` metric, 0-100 rounded to 2 decimals: the mean over samples of the share of each
    sample's gold strings that occur (case-insensitively) in its prediction. Predictions are taken as
    given (``postprocess`` them first). Raises ``ValueError`` for unequal or empty lists, or a sample
    without gold strings."""
    _check(predictions, references)
    total = sum(sum(gold.lower() in pred.lower() for gold in golds) / len(golds)
                for pred, golds in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """The ``part`` metric, 0-100 rounded to 2 decimals: the share of samples where any gold string
    occurs (case-insensitively) in the prediction. Raises ``ValueError`` as ``string_match_all``."""
    _check(predictions, references)
    total = sum(any(gold.lower() in pred.lower() for gold in golds) for pred, golds in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)


def task_score(task: str, predictions: list[str], references: list[list[str]]) -> dict:
    """One task at one length: ``{"score": 0-100, "nulls": [empty predictions, samples]}``, the
    predictions ``postprocess``ed and scored with the task's metric (``METRICS``). Raises ``ValueError``
    for a task outside ``TASKS`` and as the metrics."""
    if task not in METRICS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {list(TASKS)}")
    cleaned = [postprocess(p) for p in predictions]
    metric = string_match_all if METRICS[task] == "all" else string_match_part
    return {"score": metric(cleaned, references), "nulls": [sum(not p for p in cleaned), len(cleaned)]}


def length_score(task_scores: dict[str, float]) -> dict:
    """The score at one length: the unweighted mean of the task scores (0-100, unrounded), over all 13
    tasks (``"suite": "RULER-13"``) or the 11 without QA (``"RULER-11"``, where SQuAD and HotpotQA are
    absent). Raises ``ValueError`` for any other set of tasks (a partial suite is not RULER's number)."""
    names = set(task_scores)
    if names == set(TASKS):
        suite = "RULER-13"
    elif names == set(TASKS) - set(QA_TASKS):
        suite = "RULER-11"
    else:
        missing = sorted(set(TASKS) - names - set(QA_TASKS)) or sorted(set(TASKS) - names)
        raise ValueError(f"a RULER length score needs all 13 tasks or the 11 without {list(QA_TASKS)}; missing "
                         f"{missing}, unknown {sorted(names - set(TASKS))}")
    return {"score": sum(task_scores.values()) / len(task_scores), "suite": suite}


def across_lengths(scores: dict[int, float]) -> dict:
    """The README's summary over lengths (``{length in tokens: score}``): ``avg`` (plain mean),
    ``wavg_inc`` and ``wavg_dec`` (weights 1..n in increasing or decreasing order of length, over their
    sum; 4K-128K: /21), unrounded. Raises ``ValueError`` for no lengths."""
    if not scores:
        raise ValueError("no lengths to average")
    ordered = [scores[length] for length in sorted(scores)]
    n = len(ordered)
    weights = range(1, n + 1)
    return {"avg": sum(ordered) / n,
            "wavg_inc": sum(w * s for w, s in zip(weights, ordered)) / sum(weights),
            "wavg_dec": sum(w * s for w, s in zip(reversed(weights), ordered)) / sum(weights)}


def effective_length(scores: dict[int, float], threshold: float = THRESHOLD) -> int | None:
    """The largest length (tokens) whose score exceeds ``threshold`` (default 85.6, Llama-2-7B-chat at
    4K, as the README underlines), or None where none does."""
    passing = [length for length, score in scores.items() if score > threshold]
    return max(passing) if passing else None
