"""RULER's scorer against its golden cases (reference-ruler.md sections 3 and 6) and the published
README table (results/reference/ruler/ruler_readme.json, transcribed from section 5): the arithmetic is
RULER's where its numbers say so."""

from __future__ import annotations

import json

import pytest

from harness import config
from harness.ruler import metrics

README = json.loads((config.reference_dir() / "ruler" / "ruler_readme.json").read_text(encoding="utf-8"))


def test_the_two_metrics_on_the_specs_golden_case():
    assert metrics.string_match_all(["AB x"], [["ab", "cd"]]) == 50.0      # one of two gold strings
    assert metrics.string_match_part(["AB x"], [["ab", "cd"]]) == 100.0    # any one is enough
    assert metrics.string_match_all(["1234567"], [["345"]]) == 100.0       # digits match inside longer numbers
    assert metrics.string_match_all(["a b c d e f g h i j"], [list("abcdefghij")]) == 100.0   # no precision term


def test_task_scores_average_samples_and_round_to_two_decimals():
    # cwe-style partial credit: 3/10 and 1/10 -> (0.3 + 0.1) / 2 * 100 = 20.0; three samples -> 1/3 rounds
    gold = [f"w{i}" for i in range(10)]
    assert metrics.string_match_all(["w0 w1 w2", "w9"], [gold, gold]) == 20.0
    assert metrics.string_match_part(["yes", "no", "no"], [["yes"], ["yes"], ["yes"]]) == 33.33
    scored = metrics.task_score("qa_1", ["  \tParis\x00", ""], [["paris"], ["rome"]])
    assert scored == {"score": 50.0, "nulls": [1, 2]}


def test_postprocess_replaces_control_characters_and_strips():
    assert metrics.postprocess("  a\tb\x01c \n") == "a\nb\nc"
    assert metrics.postprocess("\x00\x1f") == ""


def test_length_score_is_the_unweighted_task_mean_of_13_or_11():
    # the maintainer's Gemini 4K example (RULER issue #10): (8 * 99.8 + 100 + 2 * 97.7 + 2 * 81.9) / 13 = 96.7
    scores = dict.fromkeys(metrics.TASKS[:8], 99.8) | {"vt": 100.0, "cwe": 97.7, "fwe": 97.7, "qa_1": 81.9,
                                                       "qa_2": 81.9}
    full = metrics.length_score(scores)
    assert full["suite"] == "RULER-13" and round(full["score"], 1) == 96.7
    eleven = metrics.length_score({k: v for k, v in scores.items() if k not in metrics.QA_TASKS})
    assert eleven["suite"] == "RULER-11" and eleven["score"] == pytest.approx((8 * 99.8 + 100 + 2 * 97.7) / 11)
    with pytest.raises(ValueError, match="missing \\['vt'\\]"):
        metrics.length_score({k: v for k, v in scores.items() if k != "vt"})


def test_the_readmes_averages_come_out_of_its_per_length_scores():
    lengths = README["lengths"]
    assert tuple(lengths) == metrics.LENGTHS
    llama = next(e for e in README["entries"] if e["model"] == "Llama-3.1-8B-Instruct")
    summary = metrics.across_lengths(dict(zip(lengths, llama["scores"])))
    # the row the spec verified: 88.3 / 85.4 / 91.3 exactly
    assert [round(summary[k], 1) for k in ("avg", "wavg_inc", "wavg_dec")] == [88.3, 85.4, 91.3]
    for entry in README["entries"]:   # the README rounds from unrounded length scores: within 0.1
        summary = metrics.across_lengths(dict(zip(lengths, entry["scores"])))
        for key in ("avg", "wavg_inc", "wavg_dec"):
            if entry[key] is not None:
                assert abs(summary[key] - entry[key]) <= 0.1 + 1e-9, (entry["model"], key)


@pytest.mark.parametrize("model, effective", [("Llama-3.1-8B-Instruct", 32768), ("Llama-3.1-70B-Instruct", 65536),
                                               ("Qwen2-72B-Instruct", 32768), ("Mistral-7B-Instruct-v0.2", 16384),
                                               ("GradientAI Llama-3-8B-Instruct-1048k", 16384)])
def test_effective_length_against_llama2s_85_6(model, effective):
    entry = next(e for e in README["entries"] if e["model"] == model)
    assert README["threshold"]["score"] == metrics.THRESHOLD
    assert metrics.effective_length(dict(zip(README["lengths"], entry["scores"]))) == effective


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same number"):
        metrics.string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one gold"):
        metrics.string_match_part(["a"], [[]])
    with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
        metrics.task_score("niah", ["a"], [["a"]])
    assert metrics.effective_length({4096: 80.0}) is None
