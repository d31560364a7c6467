"""LongBench v1 metrics and aggregation with the official semantics, quirks included.

Reference: THUDM/LongBench commit 2e00731, ``LongBench/metrics.py`` (the metric functions) and
``LongBench/eval.py`` (``dataset2metric``, ``scorer``, ``scorer_e``); the spec we follow is
``reference-eval.md`` part A. The code here is written from that description, not copied.

Every metric has the signature ``(prediction: str, ground_truth: str, **kwargs) -> float`` and scores
one prediction against one ground truth; ``sample_score`` applies the first-line rule and the max over
ground truths, ``score_dataset`` / ``score_dataset_e`` give the dataset score as eval.py prints it.

Libraries are the ones the official scorer uses, because the numbers depend on them: ``rouge``
(pltrdy, ROUGE-L summary-level, no lowercasing or stemming; not Google's ``rouge_score``), ``jieba``
(precise mode) and ``fuzzywuzzy`` (python-Levenshtein backend if installed, else difflib; see
``fuzz_backend``).
"""

from __future__ import annotations

import re
import string
import sys
import threading
import warnings
from collections import Counter
from typing import Callable, Sequence

import jieba
import numpy as np
from fuzzywuzzy import fuzz
from rouge import Rouge

Metric = Callable[..., float]

# --------------------------------------------------------------------------------------------
# Dataset tables (reference-eval.md A.1, A.6; eval.py dataset2metric)
# --------------------------------------------------------------------------------------------

CATEGORY_ORDER = ("Single-Doc QA", "Multi-Doc QA", "Summarization", "Few-shot", "Synthetic", "Code")

CATEGORIES = {
    "narrativeqa": "Single-Doc QA", "qasper": "Single-Doc QA", "multifieldqa_en": "Single-Doc QA",
    "multifieldqa_zh": "Single-Doc QA",
    "hotpotqa": "Multi-Doc QA", "2wikimqa": "Multi-Doc QA", "musique": "Multi-Doc QA", "dureader": "Multi-Doc QA",
    "gov_report": "Summarization", "qmsum": "Summarization", "multi_news": "Summarization", "vcsum": "Summarization",
    "trec": "Few-shot", "triviaqa": "Few-shot", "samsum": "Few-shot", "lsht": "Few-shot",
    "passage_count": "Synthetic", "passage_retrieval_en": "Synthetic", "passage_retrieval_zh": "Synthetic",
    "lcc": "Code", "repobench-p": "Code",
}

# "code" datasets count in both the English and the Chinese leaderboard (LongBench README).
LANGUAGES = {name: "en" for name in CATEGORIES}
LANGUAGES.update({name: "zh" for name in ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")})
LANGUAGES.update({"lcc": "code", "repobench-p": "code"})

# eval.py cuts these predictions at their first line (few-shot prompts make models continue the pattern).
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")

# The 16 datasets (14 English + 2 code) that SnapKV/PyramidKV/DynamicKV average, in the papers' column order.
#: Test samples per LongBench v1 dataset (THUDM/LongBench README, 4,750 in all; reference-eval.md A.1,
#: column n): what a complete run scores. LongBench-E's ``<name>_e`` sets are not listed.
DATASET_SIZES = {name: 200 for name in CATEGORIES} | {"multifieldqa_en": 150, "lcc": 500, "repobench-p": 500}
ENGLISH_16 = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
              "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")

# LongBench-E configs, loaded as "<name>_e" (README order).
LONGBENCH_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
               "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")

BUCKETS = ("0-4k", "4-8k", "8k+")


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def _code_points(*spans) -> str:
    """Characters of inclusive code-point spans (an int is a one-character span)."""
    chars = []
    for span in spans:
        first, last = (span, span) if isinstance(span, int) else span
        chars.extend(chr(c) for c in range(first, last + 1))
    return "".join(chars)


# The official Chinese punctuation string, as code points. It is a hand-picked list, not a Unicode
# class, and its holes are part of the metric: it has the closing 》 (U+300B) but not the opening 《
# (U+300A), no 〈 〉, no full-width full stop ． (U+FF0E) and no low single quote ‚ (U+201A).
_ZH_EXTRA_PUNCTUATION = _code_points(
    (0xFF01, 0xFF0D), 0xFF0F,   # ！＂＃＄％＆＇（）＊＋，－ and ／ (skips ．)
    (0xFF1A, 0xFF20),           # ：；＜＝＞？＠
    (0xFF3B, 0xFF40),           # ［＼］＾＿｀
    (0xFF5B, 0xFF64),           # ｛｜｝～｟｠ and half-width ｡｢｣､
    (0x3001, 0x3003),           # 、。〃
    0x300B,                     # 》 only
    (0x300C, 0x3011),           # 「」『』【】
    (0x3014, 0x301F),           # 〔〕〖〗〘〙〚〛〜〝〞〟
    0x3030, (0x303E, 0x303F),   # 〰 〾〿
    (0x2013, 0x2014),           # – —
    (0x2018, 0x2019), (0x201B, 0x201F),   # ‘’‛“”„‟
    (0x2026, 0x2027),           # …‧
    0xFE4F,                     # ﹏
)
ZH_PUNCTUATION = frozenset(string.punctuation + _ZH_EXTRA_PUNCTUATION)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """English answer normalisation of metrics.py: lowercase, drop ASCII punctuation, replace the
    whole words a/an/the with a space, collapse whitespace (in that order: punctuation goes first, so
    "the-end" becomes "theend" and keeps its article)."""
    text = "".join(ch for ch in s.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation of metrics.py: lowercase, drop ASCII and the fixed CJK/full-width
    punctuation set (``ZH_PUNCTUATION``), then remove *all* whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in ZH_PUNCTUATION)
    return "".join(text.split())


# --------------------------------------------------------------------------------------------
# Metrics (metrics.py)
# --------------------------------------------------------------------------------------------

def _token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Multiset token F1 (metrics.py f1_score). No common token -> 0, which also covers empty lists."""
    common = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(prediction_tokens)
    recall = common / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 after ``normalize_answer``, whitespace tokens (metrics.py qa_f1_score)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    # Segment the raw text first, normalise each word after: punctuation still guides jieba.
    words = (normalize_zh_answer(word) for word in jieba.cut(text, cut_all=False))
    return [word for word in words if word]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 over jieba words (precise mode), each normalised with ``normalize_zh_answer``, empty
    words dropped (metrics.py qa_f1_zh_score)."""
    return _token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


# Rouge().get_scores rebuilds the LCS with a recursive helper, so a long sentence pair (a Chinese
# summary has no ASCII '.', hence is one sentence) raises RecursionError, which eval.py's bare
# `except` turns into 0.0. Whether it raises depends on the stack already in use, so we give the
# library exactly the room it has under `python eval.py`: CPython's default limit 1000, with 3
# frames below get_scores (<module> -> scorer -> rouge_score), 4 for rouge_zh_score. The call runs
# in a fresh thread: its stack is known whatever the caller's (pytest, Hydra...), and a thread's
# base counts like a script's <module> against the limit (checked on CPython 3.8 to 3.13, where
# C-level re-entries in the caller's stack would otherwise shift the threshold).
_EVAL_PY_RECURSION_LIMIT = 1000
_EVAL_PY_FRAMES_ROUGE = 3
_EVAL_PY_FRAMES_ROUGE_ZH = 4
_recursion_limit_lock = threading.Lock()


def _frames_below_caller() -> int:
    """Python frames on the caller's stack, the caller's own frame included."""
    frame, count = sys._getframe(1), 0
    while frame is not None:
        count += 1
        frame = frame.f_back
    return count


def _rouge_l_f(prediction: str, ground_truth: str, eval_py_frames: int) -> float:
    result = [0.0]  # what eval.py scores on any failure (empty text, RecursionError...)

    def call() -> None:
        # This frame stands for eval.py's rouge_score frame: same room left below it.
        sys.setrecursionlimit(_EVAL_PY_RECURSION_LIMIT + _frames_below_caller() - eval_py_frames)
        try:
            result[0] = Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
        except Exception:
            pass

    with _recursion_limit_lock:  # the recursion limit is process-wide: one scorer call at a time
        previous = sys.getrecursionlimit()
        try:
            worker = threading.Thread(target=call, name="longbench-rouge")
            worker.start()
            worker.join()
        finally:
            sys.setrecursionlimit(previous)
    return result[0]


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of pltrdy ``rouge`` (summary-level union LCS, sentences split on ASCII '.', words on
    whitespace, unique-word denominators, no lowercasing/stemming). Any exception -> 0.0 (an empty
    prediction raises "Hypothesis is empty"). Identical texts score 0.999999995, not 1 (the
    library's epsilon)."""
    return _rouge_l_f(prediction, ground_truth, _EVAL_PY_FRAMES_ROUGE)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """``rouge_score`` on jieba words (precise mode) joined with spaces (metrics.py rouge_zh_score)."""
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return _rouge_l_f(prediction, ground_truth, _EVAL_PY_FRAMES_ROUGE_ZH)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None,
                         **kwargs) -> float:
    """metrics.py classification_score: 1/len(matches) if the ground truth is among the class names
    found (as substrings) in the prediction, else 0.

    Quirks kept for parity: names that are substrings of the ground truth but not equal to it are
    dropped by removing them from the very list being iterated, so the name right after a removed one
    is never examined (and may survive). The official difflib "best match" fallback is unreachable
    (its guard compares a list with 0), so an empty match list simply scores 0.
    """
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the dataset's class names)")
    matches = [name for name in all_classes if name in prediction]
    # Replay `for name in matches: ... matches.remove(name)`: the list iterator walks an index that
    # advances one step per item while remove() shifts the tail left under it.
    index = 0
    while index < len(matches):
        name = matches[index]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)  # first equal element, as list.remove does
        index += 1
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _share_equal(numbers: list[str], target: str) -> float:
    """Fraction of the digit runs equal (as strings) to the target; 0 when there are none."""
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def _paragraph_id(ground_truth: str, pattern: re.Pattern) -> str:
    found = pattern.findall(ground_truth)
    if not found:  # metrics.py would fail with IndexError here; say what is wrong instead
        raise ValueError(f"ground truth {ground_truth!r} has no paragraph id matching {pattern.pattern!r}")
    return found[0]


_DIGITS = re.compile(r"\d+")
_PARAGRAPH_EN = re.compile(r"Paragraph (\d+)")
_PARAGRAPH_ZH = re.compile(r"段落(\d+)")


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the prediction's digit runs equal to the id in "Paragraph N" of the ground truth
    (metrics.py retrieval_score): "Paragraph 3 or 7" for Paragraph 3 scores 0.5."""
    return _share_equal(_DIGITS.findall(prediction), _paragraph_id(ground_truth, _PARAGRAPH_EN))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """``retrieval_score`` with the Chinese pattern 段落N (metrics.py retrieval_zh_score)."""
    return _share_equal(_DIGITS.findall(prediction), _paragraph_id(ground_truth, _PARAGRAPH_ZH))


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the prediction's digit runs equal to the ground-truth string (metrics.py count_score)."""
    return _share_equal(_DIGITS.findall(prediction), str(ground_truth))


def _first_code_line(prediction: str) -> str:
    # Skip markdown fences and comment lines (any line with `, # or //); an empty line qualifies.
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzzywuzzy ``fuzz.ratio``/100 between the first qualifying line of the prediction and the
    ground truth (metrics.py code_sim_score). fuzz.ratio is an int: 100 for identical strings (even
    two empty ones), 0 if exactly one is empty."""
    return fuzz.ratio(_first_code_line(prediction), ground_truth) / 100


def fuzz_backend() -> str:
    """Which engine fuzz.ratio uses: "python-Levenshtein" or "difflib" (they can differ by a point on
    some pairs; the published numbers used python-Levenshtein). Record it with the scores."""
    return "python-Levenshtein" if fuzz.SequenceMatcher.__module__ == "fuzzywuzzy.StringMatcher" else "difflib"


def scorer_environment() -> dict:
    """Versions of the libraries the numbers depend on, and the fuzzywuzzy backend."""
    from harness.run.results import package_version
    packages = ("rouge", "jieba", "fuzzywuzzy", "python-Levenshtein", "Levenshtein")
    return {"fuzz_backend": fuzz_backend(), **{pkg: package_version(pkg) for pkg in packages}}


# eval.py dataset2metric.
DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score, "dureader": rouge_zh_score,
    "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score, "vcsum": rouge_zh_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score, "lsht": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def known_datasets() -> list[str]:
    """The 21 LongBench names and the 13 LongBench-E names."""
    return list(DATASET_METRIC) + [f"{name}_e" for name in LONGBENCH_E]


def base_dataset(name: str) -> str:
    """The LongBench dataset behind a name: itself, or ``hotpotqa`` for the LongBench-E ``hotpotqa_e``
    (same prompt and metric). Unknown names raise ValueError listing the known ones."""
    if name in DATASET_METRIC:
        return name
    if name.endswith("_e") and name[:-2] in LONGBENCH_E:
        return name[:-2]
    raise ValueError(f"unknown LongBench dataset {name!r}; known: {', '.join(known_datasets())}")


def metric_for(name: str) -> Metric:
    """The metric of a dataset, LongBench-E names included."""
    return DATASET_METRIC[base_dataset(name)]


# --------------------------------------------------------------------------------------------
# Aggregation (eval.py scorer / scorer_e)
# --------------------------------------------------------------------------------------------

def sample_score(dataset: str, prediction: str, ground_truths: Sequence[str],
                 all_classes: Sequence[str] | None = None) -> float:
    """One sample as eval.py scores it: first line only for ``FIRST_LINE_DATASETS`` (leading newlines
    stripped, nothing else), then the max over the ground truths starting from 0.0 (so no ground
    truth scores 0)."""
    base = base_dataset(dataset)
    metric = DATASET_METRIC[base]
    if base in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for ground_truth in ground_truths:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score


def _check_lengths(dataset: str, predictions: Sequence, *others: Sequence) -> None:
    if not predictions:
        raise ValueError(f"{dataset}: no predictions to score")
    for other in others:
        if len(other) != len(predictions):
            raise ValueError(f"{dataset}: {len(predictions)} predictions but {len(other)} answers/lengths")


def score_dataset(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                  all_classes: Sequence[str] | None = None) -> float:
    """Dataset score of eval.py ``scorer``: round(100 * sum / n, 2), summing left to right as it does."""
    _check_lengths(dataset, predictions, answers)
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers):
        total += sample_score(dataset, prediction, ground_truths, all_classes)
    return round(100 * total / len(predictions), 2)


def length_bucket(length: int) -> str:
    """LongBench-E bucket of a sample's ``length`` field (words, or characters for Chinese; not tokens)."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def score_dataset_e(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                    lengths: Sequence[int], all_classes: Sequence[str] | None = None) -> dict[str, float]:
    """Per-bucket scores of eval.py ``scorer_e``: round(100 * np.mean(bucket), 2), NaN for an empty
    bucket. np.mean (pairwise summation) and numpy's rounding of a float64 are kept on purpose: they
    can differ from ``score_dataset``'s left-to-right sum and Python rounding in the last digit."""
    _check_lengths(dataset, predictions, answers, lengths)
    buckets: dict[str, list[float]] = {name: [] for name in BUCKETS}
    for prediction, ground_truths, length in zip(predictions, answers, lengths):
        buckets[length_bucket(length)].append(sample_score(dataset, prediction, ground_truths, all_classes))
    result = {}
    for name, scores in buckets.items():
        with warnings.catch_warnings():  # np.mean([]) warns and gives NaN, which is what eval.py writes
            warnings.simplefilter("ignore", RuntimeWarning)
            result[name] = float(round(100 * np.mean(scores), 2))
    return result


# --------------------------------------------------------------------------------------------
# Averages: two conventions, always labelled (reference-eval.md A.3)
# --------------------------------------------------------------------------------------------

def mean(values) -> float | None:
    """Plain mean (summed left to right), None for no values."""
    values = list(values)
    return sum(values) / len(values) if values else None


def category_means(scores: dict[str, float], datasets: Sequence[str]) -> dict[str, float]:
    """Unrounded mean score per LongBench category over those of ``datasets`` that have a score (a
    dataset outside ``CATEGORIES`` is left out); categories in the order they first appear in
    ``datasets``, members averaged in ``datasets`` order."""
    members: dict[str, list[float]] = {}
    for name in datasets:
        if name in scores and name in CATEGORIES:
            members.setdefault(CATEGORIES[name], []).append(scores[name])
    return {category: mean(values) for category, values in members.items()}


def subset_averages(scores: dict[str, float], datasets: Sequence[str] = ENGLISH_16
                    ) -> tuple[float | None, float | None, int]:
    """Both averages over any subset of columns, unrounded, for tables that mark a partial row:
    (plain mean as in ``paper_average``, mean of category means as in ``official_average``, how many
    of ``datasets`` have a score). A dataset outside ``CATEGORIES`` counts in the plain mean only;
    None where nothing can be averaged."""
    present = [name for name in datasets if name in scores]
    return (mean(scores[name] for name in present), mean(category_means(scores, present).values()),
            len(present))


def _present(scores: dict, datasets: Sequence[str], strict: bool, what: str) -> list[str]:
    missing = [name for name in datasets if name not in scores]
    if missing and strict:
        raise ValueError(f"{what} needs {', '.join(missing)} (missing); pass strict=False to average the "
                         f"{len(datasets) - len(missing)} present datasets")
    present = [name for name in datasets if name in scores]
    if not present:
        raise ValueError(f"{what}: none of {', '.join(datasets)} has a score")
    return present


def paper_average(scores: dict[str, float], strict: bool = True) -> dict:
    """The KV-compression papers' "Avg" (SnapKV, PyramidKV, DynamicKV): the plain mean of the 16
    English + code dataset scores (``ENGLISH_16``). Not the LongBench leaderboard average."""
    present = _present(scores, ENGLISH_16, strict, "paper_average")
    value = mean(scores[name] for name in present)
    return {"label": "paper_avg16", "description": "plain mean over the 16 English+code datasets "
            "(SnapKV/PyramidKV/DynamicKV papers)", "value": round(value, 2), "datasets": present,
            "missing": [name for name in ENGLISH_16 if name not in scores]}


def official_average(scores: dict[str, float], language: str = "en", strict: bool = True) -> dict:
    """The LongBench leaderboard "Avg": the mean of the six category averages (LongBench README; code
    completion counts in both the English and the Chinese board). ``language`` is "en" (14 English +
    2 code datasets) or "zh" (5 Chinese + 2 code)."""
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en' or 'zh', not {language!r}")
    datasets = [name for name in CATEGORIES if LANGUAGES[name] in (language, "code")]
    present = _present(scores, datasets, strict, f"official_average({language})")
    categories = category_means(scores, present)   # present follows CATEGORIES, hence CATEGORY_ORDER
    value = mean(categories.values())
    return {"label": f"official_avg_{language}", "description": "mean of the category averages "
            f"(LongBench leaderboard, {'English' if language == 'en' else 'Chinese'})", "value": round(value, 2),
            "categories": {name: round(v, 2) for name, v in categories.items()}, "datasets": present,
            "missing": [name for name in datasets if name not in scores]}
