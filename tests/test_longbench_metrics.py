"""LongBench v1 scorer: each metric on hand-checked cases, the official quirks (THUDM/LongBench
commit 2e00731, LongBench/metrics.py and eval.py), aggregation, both averages and the CLI."""

import json
import math
import re
import subprocess
import sys

import pytest

from harness.longbench import metrics as m
from harness.longbench import score as score_cli

from conftest import ROOT, SHARED

APPROX = dict(abs=1e-6)  # pltrdy rouge adds 1e-8 to its F denominators


# ---------------------------------------------------------------- tables

def test_tables_cover_the_21_datasets_and_longbench_e():
    assert len(m.DATASET_METRIC) == 21 and set(m.CATEGORIES) == set(m.DATASET_METRIC) == set(m.LANGUAGES)
    sizes = {c: sum(v == c for v in m.CATEGORIES.values()) for c in m.CATEGORY_ORDER}
    assert sizes == {"Single-Doc QA": 4, "Multi-Doc QA": 4, "Summarization": 4, "Few-shot": 4, "Synthetic": 3,
                     "Code": 2}
    assert len(m.ENGLISH_16) == 16 and all(m.LANGUAGES[d] in ("en", "code") for d in m.ENGLISH_16)
    assert sum(m.LANGUAGES[d] == "zh" for d in m.CATEGORIES) == 5
    assert m.FIRST_LINE_DATASETS == ("trec", "triviaqa", "samsum", "lsht")
    assert len(m.LONGBENCH_E) == 13 and set(m.LONGBENCH_E) <= set(m.ENGLISH_16)
    assert m.base_dataset("hotpotqa_e") == "hotpotqa" and m.metric_for("lcc_e") is m.code_sim_score
    assert m.metric_for("multifieldqa_zh") is m.qa_f1_zh_score and m.metric_for("vcsum") is m.rouge_zh_score
    with pytest.raises(ValueError, match="unknown LongBench dataset 'dureader_e'.*narrativeqa"):
        m.base_dataset("dureader_e")  # LongBench-E has no Chinese configs


# ---------------------------------------------------------------- English QA F1

def test_normalize_answer_order_of_steps():
    assert m.normalize_answer("  The  Cat, a dog & AN owl! ") == "cat dog owl"
    # Punctuation goes before articles: "the-end" -> "theend", no whole-word article left.
    assert m.normalize_answer("the-end") == "theend"
    assert m.normalize_answer("Théâtre “quoted”") == "théâtre “quoted”"  # only ASCII punctuation removed


def test_qa_f1_score_hand_checked():
    # "the cat sat on the mat." -> [cat sat on mat]; "a cat on a mat" -> [cat on mat]
    # common 3: P = 3/4, R = 3/3, F1 = 2 * .75 * 1 / 1.75 = 6/7
    assert m.qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    # Multiset counts: [paris paris] vs [paris]: common 1, P = 1/2, R = 1, F1 = 2/3
    assert m.qa_f1_score("Paris Paris", "paris") == pytest.approx(2 / 3)
    assert m.qa_f1_score("", "paris") == 0.0
    assert m.qa_f1_score("the", "a") == 0.0  # both normalise to nothing: no common token -> 0
    assert m.qa_f1_score("the-end", "end") == 0.0


# ---------------------------------------------------------------- Chinese

def test_normalize_zh_answer_exact_punctuation_set():
    # 》 (U+300B) is in the official set, 《 (U+300A) is not; ，！ go; all whitespace goes.
    assert m.normalize_zh_answer("《三体》，Hello World！") == "《三体helloworld"
    assert "》" in m.ZH_PUNCTUATION and "《" not in m.ZH_PUNCTUATION
    # Full-width full stop ． (U+FF0E) and low quote ‚ (U+201A) are missing from the official list.
    assert m.normalize_zh_answer("３．５‚") == "３．５‚"
    assert m.normalize_zh_answer("“你好”…—【注】") == "你好注"
    assert m.normalize_zh_answer("a.b\t c") == "abc"


def test_qa_f1_zh_score_segments_then_normalises():
    # jieba precise mode: 我爱北京 -> 我|爱|北京 ; 北京。 -> 北京|。 and 。 normalises away.
    import jieba
    assert list(jieba.cut("我爱北京", cut_all=False)) == ["我", "爱", "北京"]
    assert m.qa_f1_zh_score("北京", "北京。") == 1.0
    # [我 爱 北京] vs [北京]: common 1, P = 1/3, R = 1, F1 = 2 * (1/3) / (4/3) = 1/2
    assert m.qa_f1_zh_score("我爱北京", "北京") == pytest.approx(0.5)
    # 北京|是|中国|的|首都 vs 首都|是|北京: common 3, P = 3/5, R = 1, F1 = 1.2 / 1.6 = 3/4
    assert m.qa_f1_zh_score("北京是中国的首都", "首都是北京") == pytest.approx(0.75)
    assert m.qa_f1_zh_score("。", "北京") == 0.0


# ---------------------------------------------------------------- ROUGE-L (pltrdy rouge)

def test_rouge_score_library_semantics():
    # one sentence each; LCS {the, cat}: R = 2/2, P = 2/3, F = 2 * (2/3) / (5/3) = 0.8
    assert m.rouge_score("the cat sat", "the cat") == pytest.approx(0.8, **APPROX)
    # no lowercasing: LCS {cat}, R = P = 1/2, F = 1/2
    assert m.rouge_score("The cat", "the cat") == pytest.approx(0.5, **APPROX)
    # exclusive=True counts unique words: "cat cat cat" has n = 1 -> F = 1
    assert m.rouge_score("cat cat cat", "cat") == pytest.approx(1.0, **APPROX)
    # summary-level union LCS over '.'-split sentences: "b" and "a" each match -> union {a, b}, F = 1;
    # as one sentence "b a" vs "a b" the LCS is 1 word -> F = 1/2
    assert m.rouge_score("b. a", "a b") == pytest.approx(1.0, **APPROX)
    assert m.rouge_score("b a", "a b") == pytest.approx(0.5, **APPROX)
    assert m.rouge_score("same text", "same text") < 1.0  # 0.999999995: the library's epsilon


def test_rouge_empty_prediction_scores_zero():
    assert m.rouge_score("", "the cat") == 0.0  # "Hypothesis is empty" caught
    assert m.rouge_score("...", "the cat") == 0.0  # only periods: no sentence left
    assert m.rouge_score("the cat", "") == 0.0
    assert m.rouge_zh_score("", "北京") == 0.0


def test_rouge_zh_score_on_jieba_words():
    # Words 北京|是|中国|的|首都 vs 首都|是|北京, one sentence each. Every pair of shared words comes
    # in opposite orders, so the LCS is 1 word: R = 1/3, P = 1/5, F = 2 * (1/15) / (8/15) = 1/4
    assert m.rouge_zh_score("北京是中国的首都", "首都是北京") == pytest.approx(0.25, **APPROX)
    assert m.rouge_zh_score("我爱北京", "我爱北京") == pytest.approx(1.0, **APPROX)


def _recursion_depth_case(fillers: int):
    # Reference "a", prediction "a f0 f1 ...": the LCS reconstruction recurses once per filler word.
    return "a " + " ".join(f"f{i}" for i in range(fillers)), "a"


EVAL_PY_LIKE = """
from rouge import Rouge
def rouge_score(prediction, ground_truth):      # frame 3, as metrics.rouge_score under eval.py
    try:
        return Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except Exception:
        return 0.0
def scorer(n):                                   # frame 2, as eval.py scorer
    return rouge_score("a " + " ".join(f"f{i}" for i in range(n)), "a")
low, high = 10, 5000                             # frame 1: the script's <module>
while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if scorer(mid) > 0 else (low, mid)
print(low)
"""


def _nested(depth, fn, *args):
    return fn(*args) if depth == 0 else _nested(depth - 1, fn, *args)


def test_rouge_recursion_error_scores_zero_with_eval_py_headroom():
    """A long sentence pair overflows the library's recursive LCS and scores 0.0 (eval.py's bare
    except). We reproduce the threshold of a script-level call chain like eval.py's at any depth."""
    limit_before = sys.getrecursionlimit()
    largest_ok = int(subprocess.run([sys.executable, "-c", EVAL_PY_LIKE], capture_output=True, text=True,
                                    check=True).stdout)
    for depth in (0, 150):  # the caller's own stack depth must not matter
        assert _nested(depth, m.rouge_score, *_recursion_depth_case(largest_ok)) > 0
        assert _nested(depth, m.rouge_score, *_recursion_depth_case(largest_ok + 1)) == 0.0
        # rouge_zh_score has one more frame under eval.py (it calls rouge_score): one word less of room
        assert _nested(depth, m.rouge_zh_score, *_recursion_depth_case(largest_ok - 1)) > 0
        assert _nested(depth, m.rouge_zh_score, *_recursion_depth_case(largest_ok)) == 0.0
    assert sys.getrecursionlimit() == limit_before  # restored after each call


# ---------------------------------------------------------------- classification

TREC_LIKE = ["Person", "Location", "Number", "Other location", "location", "loc"]


def test_classification_two_labels_half():
    # matches [Person, Location]; none is a proper substring of "Location" -> 1/2
    assert m.classification_score("Person or Location", "Location", all_classes=TREC_LIKE) == 0.5
    assert m.classification_score("Location", "Location", all_classes=["Person", "Location"]) == 1.0


def test_classification_drops_labels_inside_the_ground_truth():
    # matches [Other location, location]; "location" is inside "Other location" but not equal -> dropped
    assert m.classification_score("Other location", "Other location",
                                  all_classes=["Other location", "location", "Number"]) == 1.0
    # ... but only when the ground truth contains it: "Person" survives next to "Other location"
    assert m.classification_score("Person, Other location", "Other location",
                                  all_classes=["Person", "Other location"]) == 0.5


def test_classification_remove_while_iterating_skips_the_next_label():
    # matches [loc, location, Other location]. Step 0: "loc" removed -> [location, Other location];
    # step 1 looks at index 1 = "Other location" (kept): "location" was skipped and survives -> 1/2.
    assert m.classification_score("Other location", "Other location",
                                  all_classes=["loc", "location", "Other location"]) == 0.5
    # In another order nothing is skipped: [Other location, location, loc] -> step 1 removes
    # "location" -> [Other location, loc]; step 2 is past the end: "loc" survives too -> 1/2.
    assert m.classification_score("Other location", "Other location",
                                  all_classes=["Other location", "location", "loc"]) == 0.5
    # [location, Other location]: "location" removed at step 0, then index 1 is past the end -> 1.0
    assert m.classification_score("Other location", "Other location",
                                  all_classes=["location", "Other location"]) == 1.0


def test_classification_no_match_or_wrong_label():
    assert m.classification_score("I do not know", "Location", all_classes=TREC_LIKE[:3]) == 0.0
    assert m.classification_score("Person", "Location", all_classes=TREC_LIKE[:3]) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        m.classification_score("Person", "Person")


# ---------------------------------------------------------------- retrieval and count

def test_retrieval_scores_share_of_numbers():
    assert m.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert m.retrieval_score("Paragraph 12 and Paragraph 3", "Paragraph 12") == 0.5      # [12, 3]
    assert m.retrieval_score("Paragraph 12, paragraph 12 (page 5)", "Paragraph 12") == pytest.approx(2 / 3)
    assert m.retrieval_score("Paragraph 120", "Paragraph 12") == 0.0                    # whole runs only
    assert m.retrieval_score("no idea", "Paragraph 12") == 0.0
    assert m.retrieval_zh_score("答案是段落5", "段落5") == 1.0
    assert m.retrieval_zh_score("段落5和段落15", "段落5") == 0.5                          # [5, 15]
    with pytest.raises(ValueError, match="no paragraph id"):
        m.retrieval_score("Paragraph 1", "the first one")


def test_count_score():
    assert m.count_score("There are 7 unique paragraphs out of 30", "7") == 0.5  # [7, 30]
    assert m.count_score("7", "7") == 1.0
    assert m.count_score("07", "7") == 0.0  # compared as strings
    assert m.count_score("seven", "7") == 0.0


# ---------------------------------------------------------------- code similarity

def test_code_sim_first_line_rule():
    # fence and '#' comment lines skipped; "x = 1" identical -> 100
    assert m.code_sim_score("```python\n# comment\nx = 1\n```", "x = 1") == 1.0
    assert m.code_sim_score("\n\nx = 1\ny = 2", "x = 1") == 1.0       # leading newlines stripped
    assert m.code_sim_score("// note\n\nfoo()", "foo()") == 0.0       # the empty line qualifies first
    assert m.code_sim_score("a = b  # why\nfoo()", "foo()") == 1.0    # a '#' anywhere skips the line
    # Only '\n' is stripped: " " is the first line. Indel ratio: lens 1 + 5, LCS 1 (the space),
    # (6 - 4) / 6 = 0.333 -> int 33 -> 0.33
    assert m.code_sim_score(" \nx = 1", "x = 1") == 0.33
    # "x = 10" vs "x = 1": lens 11, LCS 5 -> 10/11 = 0.909 -> 91
    assert m.code_sim_score("x = 10", "x = 1") == 0.91
    assert m.code_sim_score("# only comments\n// here", "") == 1.0  # "" == "": fuzz.ratio says 100


def test_fuzz_backend_is_recorded():
    assert m.fuzz_backend() in ("python-Levenshtein", "difflib")
    try:
        import Levenshtein  # noqa: F401
    except ImportError:
        assert m.fuzz_backend() == "difflib"
    else:
        assert m.fuzz_backend() == "python-Levenshtein"
    assert m.scorer_environment()["fuzz_backend"] == m.fuzz_backend()


# ---------------------------------------------------------------- per-sample and per-dataset

def test_first_line_rule_only_for_few_shot_datasets():
    pred = "\n\nParis\nQuestion: and the other? Answer: London"
    assert m.sample_score("triviaqa", pred, ["Paris"]) == 1.0
    assert m.sample_score("narrativeqa", pred, ["Paris"]) < 1.0       # whole text scored
    assert m.sample_score("triviaqa", " \nParis", ["Paris"]) == 0.0    # only '\n' is stripped
    assert m.sample_score("trec", "\nLocation\nPerson", ["Location"], ["Person", "Location"]) == 1.0
    assert m.sample_score("trec_e", "\nLocation\nPerson", ["Location"], ["Person", "Location"]) == 1.0


def test_max_over_ground_truths():
    # vs "Paris": [city of paris] / [paris] -> P 1/3, R 1, F1 0.5; vs "the city of Paris": 1.0
    assert m.sample_score("hotpotqa", "city of Paris", ["Paris", "the city of Paris"]) == 1.0
    assert m.sample_score("hotpotqa", "city of Paris", ["Paris"]) == 0.5
    assert m.sample_score("hotpotqa", "Paris", []) == 0.0  # starts from 0.0


def test_score_dataset_rounds_100_times_mean():
    # count scores 1/3, 1, 1 -> mean 7/9 -> 77.777... -> 77.78
    assert m.score_dataset("passage_count", ["3 4 5", "3", "3"], [["3"]] * 3) == 77.78
    assert m.score_dataset("passage_count", ["1", "2", "3"], [["3"]] * 3) == 33.33
    with pytest.raises(ValueError, match="no predictions"):
        m.score_dataset("passage_count", [], [])


# Per-sample scores 1, 1, 0, .2, .25, .2, .2, 1 (count: 1 of 5 numbers right = .2, 1 of 4 = .25).
# eval.py scorer sums left to right: 100 * 3.85 / 8 = 48.12500000000001 -> 48.13.
# eval.py scorer_e uses np.mean (pairwise): exactly 48.125, numpy rounds half to even -> 48.12.
PRECISION_PREDS = ["3", "3", "4", "3 1 1 1 1", "3 1 1 1", "3 1 1 1 1", "3 1 1 1 1", "3"]


def test_score_dataset_and_e_keep_their_own_arithmetic():
    answers = [["3"]] * len(PRECISION_PREDS)
    assert m.score_dataset("passage_count", PRECISION_PREDS, answers) == 48.13
    assert m.score_dataset_e("passage_count", PRECISION_PREDS, answers, [100] * 8)["0-4k"] == 48.12


def test_longbench_e_buckets():
    assert [m.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000, 10**6)] == \
        ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    preds, answers = ["7", "7", "1", "7"], [["7"]] * 4
    out = m.score_dataset_e("passage_count_e", preds, answers, [3999, 4000, 7999, 9000])
    assert out == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 100.0}
    out = m.score_dataset_e("passage_count", ["7"], [["7"]], [8000])
    assert math.isnan(out["0-4k"]) and math.isnan(out["4-8k"]) and out["8k+"] == 100.0


# ---------------------------------------------------------------- averages

# PyramidKV paper Table 1, Llama-3-8B-Instruct FullKV: Avg 41.46 (plain mean of 16).
PYRAMIDKV_FULLKV = dict(zip(m.ENGLISH_16, [25.70, 29.75, 41.12, 45.55, 35.87, 22.35, 25.63, 23.03, 26.21, 73.00,
                                           90.56, 41.88, 4.67, 69.25, 58.05, 50.77]))
# LongBench README, ChatGLM3-6B-32k per dataset; leaderboard Avg EN 48.5, ZH 52.8.
CHATGLM3 = {"narrativeqa": 26.0, "qasper": 43.3, "multifieldqa_en": 51.7, "multifieldqa_zh": 62.3,
            "hotpotqa": 54.4, "2wikimqa": 44.9, "musique": 40.4, "dureader": 44.78, "gov_report": 36.8,
            "qmsum": 23.9, "multi_news": 27.9, "vcsum": 17.8, "trec": 79.0, "triviaqa": 87.1, "samsum": 38.2,
            "lsht": 42.0, "passage_count": 2.0, "passage_retrieval_en": 99.0, "passage_retrieval_zh": 94.0,
            "lcc": 57.66, "repobench-p": 54.76}


def test_paper_average_is_plain_mean_of_16():
    avg = m.paper_average(PYRAMIDKV_FULLKV)
    assert avg["label"] == "paper_avg16" and avg["value"] == 41.46 and avg["missing"] == []
    with pytest.raises(ValueError, match="lcc, repobench-p"):
        m.paper_average({k: v for k, v in PYRAMIDKV_FULLKV.items() if k not in ("lcc", "repobench-p")})
    part = m.paper_average({"qasper": 10.0, "trec": 20.0}, strict=False)
    assert part["value"] == 15.0 and len(part["missing"]) == 14


def test_official_average_is_mean_of_category_means():
    en = m.official_average(CHATGLM3, "en")
    # (40.333 + 46.567 + 29.533 + 68.1 + 56.21 + 50.5) / 6 = 48.54 (leaderboard 48.5)
    assert en["label"] == "official_avg_en" and en["value"] == 48.54 and round(en["value"], 1) == 48.5
    assert en["categories"] == {"Single-Doc QA": 40.33, "Multi-Doc QA": 46.57, "Summarization": 29.53,
                                "Few-shot": 68.1, "Synthetic": 50.5, "Code": 56.21}
    # (62.3 + 44.78 + 17.8 + 42.0 + 94.0 + 56.21) / 6 = 52.848 (leaderboard 52.8)
    assert m.official_average(CHATGLM3, "zh")["value"] == 52.85
    # the two conventions differ on the same scores: plain mean of the 16 = 767.02 / 16 = 47.94
    assert m.paper_average(CHATGLM3)["value"] == 47.94
    with pytest.raises(ValueError, match="narrativeqa"):
        m.official_average({"qasper": 1.0}, "en")


# ---------------------------------------------------------------- CLI

def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_cli_scores_a_folder(tmp_path):
    classes = ["Person", "Location"]
    _write(tmp_path / "trec.jsonl", [
        {"pred": "\nLocation\nPerson", "answers": ["Location"], "all_classes": classes, "length": 10},
        {"pred": "Person or Location", "answers": ["Location"], "all_classes": classes, "length": 10}])
    _write(tmp_path / "passage_count.jsonl", [
        {"pred": "3 4 5", "answers": ["3"], "all_classes": None},
        {"pred": "3", "answers": ["3"], "all_classes": None},
        {"pred": "3", "answers": ["3"], "all_classes": None}])
    _write(tmp_path / "hotpotqa_e.jsonl", [
        {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 5000},
        {"pred": "Rome", "answers": ["Paris"], "all_classes": None, "length": 9000}])
    (tmp_path / "notes.txt").write_text("not scored")
    out = subprocess.run([sys.executable, "-m", "harness.longbench.score", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    scores = json.loads(lines[-1])
    # trec: 1.0 (first line "Location") and 0.5 (two labels) -> 75.0; count: 77.78 (see above)
    assert scores["trec"] == 75.0 and scores["passage_count"] == 77.78
    assert scores["hotpotqa_e"]["4-8k"] == 100.0 and scores["hotpotqa_e"]["8k+"] == 0.0
    assert math.isnan(scores["hotpotqa_e"]["0-4k"])
    assert any(line.startswith("trec") and "75.00" in line for line in lines)
    saved = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert saved.keys() == scores.keys() and saved["trec"] == 75.0


def test_cli_e_flag_buckets_every_file(tmp_path, capsys):
    _write(tmp_path / "passage_count.jsonl", [{"pred": "3", "answers": ["3"], "all_classes": None, "length": 1}])
    assert score_cli.main([str(tmp_path), "--e"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["passage_count"]["0-4k"] == 100.0


@pytest.mark.parametrize("name, rows, message", [
    ("foo.jsonl", [{"pred": "x", "answers": ["x"], "all_classes": None}],
     r"foo\.jsonl: unknown LongBench dataset 'foo'; known: narrativeqa, .*hotpotqa_e"),
    ("trec.jsonl", [{"pred": "x", "answers": ["x"], "all_classes": ["x"]}, {"pred": "x", "answers": ["x"]}],
     r"trec\.jsonl:2: missing field\(s\) all_classes"),
    ("hotpotqa_e.jsonl", [{"pred": "x", "answers": ["x"], "all_classes": None}],
     r"hotpotqa_e\.jsonl:1: missing field\(s\) length"),
    ("hotpotqa.jsonl", [{"pred": "x", "answers": "x", "all_classes": None}],
     r"hotpotqa\.jsonl:1: answers must be a list of strings"),
    ("passage_retrieval_en.jsonl", [{"pred": "1", "answers": ["first"], "all_classes": None}],
     r"passage_retrieval_en\.jsonl: ground truth 'first' has no paragraph id"),
])
def test_cli_errors_name_file_line_and_fix(tmp_path, capsys, name, rows, message):
    _write(tmp_path / name, rows)
    assert score_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "result.json").exists()


def test_cli_error_on_partial_line_and_empty_folder(tmp_path, capsys):
    assert score_cli.main([str(tmp_path)]) == 2
    assert "no <dataset>.jsonl files" in capsys.readouterr().err
    (tmp_path / "qasper.jsonl").write_text('{"pred": "x", "answers": ["x"], "all_classes": null}\n{"pred": "x", "ans')
    assert score_cli.main([str(tmp_path)]) == 2
    assert "qasper.jsonl:2: not valid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------- real data (skips where absent)

LONGBENCH_DATA = SHARED / "data" / "longbench"


@pytest.mark.parametrize("dataset", ["multifieldqa_zh", "passage_retrieval_zh"])
def test_ground_truth_as_prediction_scores_100(dataset):
    path = LONGBENCH_DATA / f"{dataset}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} absent (official LongBench data, see shared/data/README.md)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200
    predictions = [row["answers"][0] for row in rows]
    assert m.score_dataset(dataset, predictions, [row["answers"] for row in rows], rows[-1]["all_classes"]) == 100.0
