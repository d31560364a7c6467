"""Score LongBench cases with the official scorer and write them as golden data for the tests.

    git clone https://github.com/THUDM/LongBench /tmp/LongBench && git -C /tmp/LongBench checkout 2e00731
    python scripts/make_longbench_golden.py --official /tmp/LongBench/LongBench --out tests/data/longbench_golden.json

The cases (predictions against answers, written here for every one of the 21 datasets and the
official quirks: first-line datasets, leading newlines, empty predictions, Chinese, classes, code)
are scored two ways by the official code at commit 2e00731, run outside this repository: per sample
with its metric functions and eval.py's per-prediction rule, and per dataset by running eval.py
itself (``--e`` too, for the LongBench-E length buckets) on prediction files in a temporary folder.
Nothing of the official code is copied into this repository: only its outputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

EN_QA = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"]
EN_SUMMARY = ["gov_report", "qmsum", "multi_news", "samsum"]

QA_CASES = [("Paris", ["Paris"]), ("The capital is Paris.", ["Paris", "the city of Paris"]),
    ("\n\nParis\nThe second line explains more.", ["Paris"]), ("An answer that is wrong", ["Paris"]), ("", ["Paris"]),
    ("   ", ["Paris"]), ("A dog, the cat & an OWL!", ["cat and owl", "the dog"]),
    ("Second line holds it\nParis", ["Paris"]), ("the the the", ["the"]),
    ("1,200 people attended in 1999", ["1200 people", "1999"])]
SUMMARY_CASES = [
    ("The committee met on Monday. It approved the budget. Members disagreed about taxes.",
     ["On Monday the committee approved the budget, although members disagreed about taxes."]),
    ("Budget approved.", ["The committee approved the budget after a long debate about taxes and spending."]),
    ("", ["A summary that the empty prediction cannot match."]),
    ("Alice asked Bob for the report.\nBob said he would send it tomorrow.",
     ["Bob will send Alice the report tomorrow."]),
    ("\nAlice and Bob agree to meet at noon. They will discuss the project.",
     ["Alice and Bob will meet at noon to discuss the project."]),
    ("word " * 60, ["word word word and other words"]), ("Same text. Same text.", ["Same text. Same text."])]
ZH_QA_CASES = [("北京是中国的首都。", ["北京"]), ("答案是上海", ["上海", "上海市"]), ("", ["北京"]), ("他在2008年去了北京，看了奥运会。", ["2008年北京奥运会"]),
    ("完全不相关的回答", ["北京"]), ("\n北京\n第二行", ["北京"])]
ZH_SUMMARY_CASES = [("会议讨论了预算问题，大家同意下周再开会。", ["会议讨论预算，决定下周再次开会。"]), ("没有内容", ["会议讨论预算，决定下周再次开会。"]), ("", ["会议讨论预算。"]),
    ("预算。预算。预算。", ["会议讨论预算问题。"])]
TREC_CLASSES = ["Abbreviation", "Entity", "Description", "Human", "Location", "Numeric value"]
TREC_CASES = [("Location", ["Location"]), ("The type is Human", ["Human"]),
    ("Numeric value\nLocation", ["Numeric value"]), ("\n\nEntity", ["Entity"]),
    ("Description and Entity", ["Entity"]), ("nothing matches", ["Human"]), ("", ["Location"]),
    ("Abbreviation Abbreviation", ["Abbreviation"])]
LSHT_CLASSES = ["体育", "财经", "科技", "娱乐", "教育"]
LSHT_CASES = [("体育", ["体育"]), ("这是财经新闻", ["财经"]), ("科技\n体育", ["科技"]), ("娱乐和教育", ["教育"]), ("无法判断", ["体育"]),
    ("", ["财经"])]
COUNT_CASES = [("12", ["12"]), ("There are 12 unique paragraphs.", ["12"]),
    ("I count 3, then 12, then 12 again", ["12"]), ("no number here", ["7"]), ("", ["7"]), ("7 7 8", ["7"])]
RETRIEVAL_EN_CASES = [("Paragraph 3", ["Paragraph 3"]), ("The answer is Paragraph 12.", ["Paragraph 12"]),
    ("Paragraph 4 or Paragraph 5", ["Paragraph 5"]), ("None of them", ["Paragraph 1"]), ("", ["Paragraph 2"]),
    ("3", ["Paragraph 3"])]
RETRIEVAL_ZH_CASES = [("段落3", ["段落3"]), ("答案是段落12", ["段落12"]), ("段落4和段落5", ["段落5"]), ("不知道", ["段落1"]), ("", ["段落2"]),
    ("12", ["段落12"])]
CODE_CASES = [("    return x + 1", ["    return x + 1"]), ("return x+1\nprint(x)", ["    return x + 1"]),
    ("# a comment\n`return value`", ["return value"]),
    ("```python\nfor i in range(10):\n```", ["for i in range(10):"]), ("", ["x = 1"]),
    ("\n\nself.value = value", ["self.value = value"]), ("completely different code", ["import numpy as np"])]

LENGTHS = [1200, 3999, 4000, 6500, 7999, 8000, 15000]


def cases() -> dict[str, list[dict]]:
    """dataset -> rows {pred, answers, all_classes, length}."""
    table: dict[str, list[tuple[str, list[str]]]] = {}
    for dataset in EN_QA:
        table[dataset] = QA_CASES
    for dataset in EN_SUMMARY:
        table[dataset] = SUMMARY_CASES
    table.update({"multifieldqa_zh": ZH_QA_CASES, "dureader": ZH_SUMMARY_CASES, "vcsum": ZH_SUMMARY_CASES,
                  "trec": TREC_CASES, "lsht": LSHT_CASES, "passage_count": COUNT_CASES,
                  "passage_retrieval_en": RETRIEVAL_EN_CASES, "passage_retrieval_zh": RETRIEVAL_ZH_CASES,
                  "lcc": CODE_CASES, "repobench-p": CODE_CASES})
    classes = {"trec": TREC_CLASSES, "lsht": LSHT_CLASSES}
    out = {}
    for dataset, rows in table.items():
        out[dataset] = [{"pred": pred, "answers": answers, "all_classes": classes.get(dataset),
                         "length": LENGTHS[i % len(LENGTHS)]} for i, (pred, answers) in enumerate(rows)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="the LongBench/ folder of the official repository at 2e00731")
    parser.add_argument("--out", default="tests/data/longbench_golden.json")
    args = parser.parse_args()
    official = Path(args.official).resolve()
    sys.path.insert(0, str(official))
    import eval as official_eval  # noqa: E402  (the official eval.py: its metric table and per-prediction rule)

    data = cases()
    rows = []
    for dataset, items in data.items():
        metric = official_eval.dataset2metric[dataset]
        for item in items:
            prediction = item["pred"]
            if dataset in ["trec", "triviaqa", "samsum", "lsht"]:
                prediction = prediction.lstrip("\n").split("\n")[0]
            score = 0.0
            for answer in item["answers"]:
                score = max(score, metric(prediction, answer, all_classes=item["all_classes"]))
            rows.append({"dataset": dataset, **item, "score": score})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder, flag in (("pred", []), ("pred_e", ["--e"])):
            target = Path(tmp) / folder / "golden"
            target.mkdir(parents=True)
            for dataset, items in data.items():
                (target / f"{dataset}.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                                         encoding="utf-8")
            subprocess.run([sys.executable, str(official / "eval.py"), "--model", "golden", *flag], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            results[folder] = json.loads((target / "result.json").read_text(encoding="utf-8"))
    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"source": f"THUDM/LongBench {commit or '2e00731'} LongBench/metrics.py and eval.py, run by "
                     "scripts/make_longbench_golden.py",
           "rows": rows, "eval": results["pred"], "eval_e": results["pred_e"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"{len(rows)} rows, {len(results['pred'])} datasets -> {args.out}")


if __name__ == "__main__":
    main()
