"""Scores for the Needle-in-a-Haystack test: pure functions of (model response, expected text).

Three scores, as reference-eval.md B.2 recommends (primary first):

* ``needle_word_recall``: the score the compression papers *plot*. KVCache-Factory / PyramidKV
  ``scripts/scripts_needle/visualize.py`` recomputes it from each stored response as the share of
  the distinct lower-cased whitespace words of "eat a sandwich and sit in dolores park on a sunny
  day." that occur among the response's lower-cased whitespace words (reference-methods.md section 5).
  Its words keep their punctuation, so "day." only matches "day." and "park," never matches "park";
  ``normalize=True`` strips punctuation on both sides (the spec's recommended variant).
* ``rouge1``: Google's ``rouge_score`` ROUGE-1 of the response against the needle sentence, stemmer
  on. KVCache-Factory's ``run_needle_in_haystack.py`` *stores* ``fmeasure * 10`` as the score of each
  cell (``rouge1_f_times_10``); its recall is the share of needle words the response reproduces.
* ``exact_match``: case-insensitive substring match of a key phrase (the RULER / kvpress
  string-match style, reference-eval.md B.2), 1.0 or 0.0.

The needle and questions are those of gkamradt's ``needlehaystack`` (reference-eval.md B.1) and of
KVCache-Factory's completion-style prompt (B.2).
"""

from __future__ import annotations

import functools
import string

#: The needle sentence, newlines included, as gkamradt's ``needlehaystack`` and KVCache-Factory insert it.
NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
#: KVCache-Factory's completion-style question (the prompt ends with "Question: {question}\nAnswer:").
QUESTION = "The best thing to do in San Francisco is: "
#: gkamradt's original retrieval question.
ORIGINAL_QUESTION = "What is the best thing to do in San Francisco?"
#: The expected answer of KVCache-Factory's ``visualize.py``, already lower-cased; "day." keeps its period.
EXPECTED_ANSWER = "eat a sandwich and sit in dolores park on a sunny day."
#: The key phrase of ``exact_match`` by default: the expected answer without its final period.
KEY_PHRASE = EXPECTED_ANSWER.rstrip(".")

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def _words(text: str, normalize: bool) -> set[str]:
    """Distinct lower-cased whitespace words; with ``normalize`` punctuation becomes a word break
    first ("park," -> "park", "day." -> "day", "sandwich,and" -> "sandwich", "and")."""
    text = text.lower()
    if normalize:
        text = text.translate(_PUNCTUATION)
    return set(text.split())


def needle_word_recall(response: str, expected: str = EXPECTED_ANSWER, normalize: bool = False) -> float:
    """Share of the distinct words of ``expected`` found among the words of ``response``, in [0, 1].

    ``normalize=False`` reproduces KVCache-Factory ``visualize.py``:
    ``len(set(resp.lower().split()) & set(exp.lower().split())) / len(set(exp.lower().split()))``.
    The expected answer has 12 words but 11 distinct ones ("a" twice), so each missing word costs
    1/11; a response ending in "day" (no period) or "day!" scores at most 10/11 there.
    ``normalize=True`` replaces punctuation by spaces on both sides before splitting.
    """
    target = _words(expected, normalize)
    if not target:
        raise ValueError(f"expected text {expected!r} has no words to recall")
    return len(_words(response or "", normalize) & target) / len(target)


@functools.lru_cache(maxsize=1)
def _rouge1_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1(response: str, needle: str = NEEDLE) -> dict[str, float]:
    """ROUGE-1 of ``response`` (prediction) against ``needle`` (target) with Google's ``rouge_score``
    (lower-cased alphanumeric tokens, Porter stemmer, clipped unigram counts).

    Returns ``{"precision", "recall", "f"}``: precision = share of the response's words that are in
    the needle, recall = share of the needle's words that the response reproduces. KVCache-Factory
    calls ``scorer.score(needle, response)`` in this order too.
    """
    s = _rouge1_scorer().score(needle, response or "")["rouge1"]
    return {"precision": float(s.precision), "recall": float(s.recall), "f": float(s.fmeasure)}


def rouge1_f_times_10(response: str, needle: str = NEEDLE) -> float:
    """The score KVCache-Factory stores per cell: ROUGE-1 F-measure x 10, in [0, 10]."""
    return rouge1(response, needle)["f"] * 10


def exact_match(response: str, key_phrase: str = KEY_PHRASE) -> float:
    """1.0 if ``key_phrase`` occurs in ``response`` ignoring case (runs of whitespace count as one
    space on both sides, so a line break inside the phrase still matches), else 0.0."""
    phrase = " ".join(key_phrase.lower().split())
    if not phrase:
        raise ValueError("key_phrase is empty")
    return float(phrase in " ".join((response or "").lower().split()))


#: Scores that ``harness.report.heatmap`` can recompute from a prediction row's ``pred`` and ``answers``
#: when the row does not store them (the way ``visualize.py`` recomputes its plotted score).
RECOMPUTABLE = {
    "needle_word_recall": lambda pred, answers: needle_word_recall(pred, answers[0] if answers else EXPECTED_ANSWER),
    "needle_word_recall_normalized": lambda pred, answers: needle_word_recall(
        pred, answers[0] if answers else EXPECTED_ANSWER, normalize=True),
    "exact_match": lambda pred, answers: exact_match(pred, answers[0].rstrip(".") if answers else KEY_PHRASE),
}

__all__ = ["NEEDLE", "QUESTION", "ORIGINAL_QUESTION", "EXPECTED_ANSWER", "KEY_PHRASE", "RECOMPUTABLE",
           "needle_word_recall", "rouge1", "rouge1_f_times_10", "exact_match"]
