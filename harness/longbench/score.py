"""Score LongBench predictions the way the official eval.py does (THUDM/LongBench commit 2e00731).

    kvh score DIR          # every <dataset>.jsonl in DIR -> {dataset: score}
    kvh score DIR --e      # LongBench-E: {dataset: {"0-4k": s, "4-8k": s, "8k+": s}}

Each line of ``<dataset>.jsonl`` is one sample: ``pred`` (str), ``answers`` (list of str),
``all_classes`` (list of str for trec/lsht, null otherwise) and, for LongBench-E, ``length``.
Files named ``<name>_e.jsonl`` are scored per length bucket even without ``--e``. Prints one line
per dataset and the averages it can form, then, as the last line, the scores as one JSON object;
the same object goes to ``DIR/result.json`` (eval.py's output file; NaN marks an empty bucket).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from harness.longbench import jsonl, metrics
from harness.run import results

RESULT = "result.json"
SUFFIX = ".jsonl"


class ScoreError(results.ResultFileError):
    """A predictions file that cannot be scored; the message names the file, the line and the fix."""


def _load(path: Path, bucketed: bool) -> dict:
    """Columns of one predictions file, checked line by line."""
    dataset = path.name[: -len(SUFFIX)]
    base = metrics.base_dataset(dataset)
    needs_classes = metrics.DATASET_METRIC[base] is metrics.classification_score
    columns = {"predictions": [], "answers": [], "lengths": [], "all_classes": None}
    lines = jsonl.numbered_objects(
        path, path.read_text(encoding="utf-8"),
        not_json=lambda where, err: ScoreError(f"{where}: not valid JSON ({err.msg}); a run cut short can leave a "
                                               "partial last line: finish or re-run the dataset, or delete that line"),
        not_object=lambda where, _: ScoreError(f"{where}: expected a JSON object with pred, answers, all_classes"))
    for where, _, row in lines:
        missing = [key for key in ("pred", "answers") if key not in row]
        if needs_classes and "all_classes" not in row:
            missing.append("all_classes")
        if bucketed and "length" not in row:
            missing.append("length")
        if missing:
            raise ScoreError(f"{where}: missing field(s) {', '.join(missing)}; each line needs pred (str), "
                             "answers (list of str), all_classes (copied from the dataset row"
                             + (", a list for this classification dataset" if needs_classes else ", may be null")
                             + ")" + (" and length (the dataset row's length field) for LongBench-E"
                                      if bucketed else ""))
        if not isinstance(row["pred"], str):
            raise ScoreError(f"{where}: pred must be a string, got {type(row['pred']).__name__}")
        answers = row["answers"]
        # A bare string would be scored character by character by the official loop: refuse it.
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ScoreError(f"{where}: answers must be a list of strings (the dataset row's answers), "
                             f"got {answers!r:.80}")
        if needs_classes and not isinstance(row["all_classes"], list):
            raise ScoreError(f"{where}: all_classes must be the list of class names for {base}, "
                             f"got {row['all_classes']!r:.80}")
        if bucketed and (isinstance(row["length"], bool) or not isinstance(row["length"], (int, float))):
            raise ScoreError(f"{where}: length must be a number (words, or characters for Chinese), "
                             f"got {row['length']!r:.80}")
        columns["predictions"].append(row["pred"])
        columns["answers"].append(answers)
        columns["lengths"].append(row.get("length"))
        columns["all_classes"] = row.get("all_classes")  # eval.py keeps the last line's value
    if not columns["predictions"]:
        raise ScoreError(f"{path}: no predictions in the file")
    return columns


def score_file(path: Path, longbench_e: bool = False):
    """The score of one ``<dataset>.jsonl``: a float, or a bucket dict for LongBench-E."""
    dataset = path.name[: -len(SUFFIX)]
    try:
        metrics.base_dataset(dataset)
    except ValueError as err:
        raise ScoreError(f"{path}: {err}. Name each file <dataset>.jsonl after its LongBench config") from None
    bucketed = longbench_e or dataset.endswith("_e")
    columns = _load(path, bucketed)
    try:
        if bucketed:
            return metrics.score_dataset_e(dataset, columns["predictions"], columns["answers"],
                                           columns["lengths"], columns["all_classes"])
        return metrics.score_dataset(dataset, columns["predictions"], columns["answers"], columns["all_classes"])
    except ValueError as err:  # e.g. a retrieval ground truth without its paragraph id
        raise ScoreError(f"{path}: {err}") from None


def score_dir(folder: Path, longbench_e: bool = False) -> dict:
    """``{dataset: score}`` for every ``*.jsonl`` in the folder, in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoreError(f"{folder} is not a folder; pass the folder holding <dataset>.jsonl files")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    if not files:
        raise ScoreError(f"{folder}: no <dataset>.jsonl files to score (known datasets: "
                         f"{', '.join(metrics.known_datasets())})")
    return {p.name[: -len(SUFFIX)]: score_file(p, longbench_e) for p in files}


def sample_counts(folder: Path) -> dict[str, int]:
    """``{dataset: samples scored}``: the non-empty lines of each ``<dataset>.jsonl`` in the folder (what
    ``score_dir`` scores), in name order; compare with ``DATASET_SIZES`` to find a partial dataset."""
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    return {p.name[: -len(SUFFIX)]: len(results.jsonl_lines(p.read_bytes())) for p in files}


def summary_fields(scores: dict, counts: dict[str, int]) -> dict:
    """What a LongBench run's ``scores.json`` holds (``Task.finalize``): ``datasets`` = ``scores``
    ({dataset: 0-100}; LongBench-E: per length bucket) and the two averages the field reports, named
    (reference-eval.md A.3; ``metrics``), over the datasets present: ``paper_average`` (plain mean, the
    KV-compression papers' Avg) and ``official_average`` (mean of the category means, the leaderboard's
    English Avg), both over ``averages_cover`` (those of the 16 English + code datasets scored;
    ``averages_missing``: the others), None when none was; ``official_average_categories``; where a
    Chinese dataset was scored, ``official_average_zh`` over ``official_average_zh_covers``; and
    ``datasets_partial`` = ``{dataset: [scored, of]}`` for those scored on fewer samples (``counts``)
    than LongBench has (``metrics.DATASET_SIZES``). No mean over all samples: it is neither average."""
    flat = {name: value for name, value in scores.items() if isinstance(value, (int, float))}
    english = [name for name in metrics.ENGLISH_16 if name in flat]
    paper = metrics.paper_average(flat, strict=False) if english else {}
    official = metrics.official_average(flat, "en", strict=False) if english else {}
    fields = {"paper_average": paper.get("value"), "official_average": official.get("value"),
              "averages_cover": english, "averages_missing": [n for n in metrics.ENGLISH_16 if n not in flat],
              "official_average_categories": official.get("categories", {})}
    if any(metrics.LANGUAGES.get(name) == "zh" for name in flat):
        chinese = metrics.official_average(flat, "zh", strict=False)
        fields |= {"official_average_zh": chinese["value"], "official_average_zh_covers": chinese["datasets"]}
    sizes = metrics.DATASET_SIZES
    return {**fields, "datasets": scores,
            "datasets_partial": {name: [n, sizes[name]] for name, n in counts.items() if name in sizes and n < sizes[name]}}


def summary_lines(scores: dict) -> list[str]:
    """Human-readable lines: one per dataset, then whichever averages the scores allow."""
    lines = []
    for dataset, score in scores.items():
        metric = metrics.metric_for(dataset).__name__
        if isinstance(score, dict):
            buckets = "  ".join(f"{name} {value:6.2f}" for name, value in score.items())
            lines.append(f"{dataset:<24} {buckets}  ({metric})")
        else:
            lines.append(f"{dataset:<24} {score:6.2f}  ({metric})")
    flat = {name: value for name, value in scores.items() if not isinstance(value, dict)}
    if all(name in flat for name in metrics.ENGLISH_16):
        avg = metrics.paper_average(flat)
        lines.append(f"{avg['label']:<24} {avg['value']:6.2f}  ({avg['description']})")
    for language in ("en", "zh"):
        try:
            avg = metrics.official_average(flat, language)
        except ValueError:  # not every dataset of that board is here
            continue
        lines.append(f"{avg['label']:<24} {avg['value']:6.2f}  ({avg['description']})")
    if any(metrics.metric_for(name) is metrics.code_sim_score for name in scores):
        lines.append(f"code_sim backend: {metrics.fuzz_backend()}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvh score", description=__doc__.split("\n\n")[0],
                                     formatter_class=results.HelpFormatter)
    parser.add_argument("folder", type=Path, help="folder holding <dataset>.jsonl prediction files")
    parser.add_argument("--e", action="store_true", help="LongBench-E: score every file per length bucket")
    args = parser.parse_args(argv)
    logging.getLogger("jieba").setLevel(logging.WARNING)  # its dictionary-loading chatter
    try:
        scores = score_dir(args.folder, args.e)
    except (ScoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(scores):
        print(line)
    results.write_json(args.folder / RESULT, scores, indent=4)   # as eval.py
    print(json.dumps(scores, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
