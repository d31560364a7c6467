"""RULER's task generators (harness/ruler; reference-ruler.md sections 1, 2 and 6): for a fixed seed and a
tiny tokenizer, every generator's output has the structure the spec describes (needle counts, value
counts, placement, one-shot blocks, the exact question phrases), and the length fitting lands within the
spec's tolerance below the target and never above.

The tiny tokenizer counts words and punctuation marks (``\\w+|[^\\w\\s]``), about one token per English
word as a subword tokenizer gives; a byte count cannot hold RULER's vt example (five noise paragraphs in
500 tokens), which a test checks raises a clear error.

Fitting tolerance (derived from section 1.2): ``ruler_head``'s binary search resolves the size to one
unit (the probe one unit larger did not fit), so a sample built at the fitted size lands within one
unit's tokens of the budget plus the spread of its random parts (keys, values, words) against the probe;
each back-off step (a sample over the budget is rebuilt ``increment`` units smaller) adds ``increment``
units. fwe grows its word count in steps of ``L' // 32``, so its resolution is one such step.

Golden digests pin the samples themselves: RULER's own scripts, run once offline with the same tokenizer,
template and splitter, produced the same bytes for all 13 tasks in both versions.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import os
import random
import re
from pathlib import Path

import pytest

from harness.ruler import essays, metrics, words
from harness.ruler.common_words import CommonWords
from harness.ruler.fitting import Streams
from harness.ruler.freq_words import ZETA_2, FreqWords
from harness.ruler.generate import DEVIATIONS, RulerSample, generate
from harness.ruler.niah import DEPTHS
from harness.ruler.tasks import QA_TASKS, RULER_11, RULER_13, SPLIT_PATTERNS, TASKS

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KV_HARNESS_SHARED", ROOT.parent / "shared"))
ESSAYS = SHARED / "data" / "haystack" / "PaulGrahamEssays"
TOKEN = re.compile(r"\w+|[^\w\s]")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: ([0-9a-f-]+)\.")


def count(text: str, prefix: str) -> int:
    return len(TOKEN.findall(text + prefix))


def needs_essays():
    if not ESSAYS.is_dir():
        pytest.skip(f"the Paul Graham essays are not at {ESSAYS} (set KV_HARNESS_SHARED to the shared folder)")


def run(task, length=2048, n=4, **kwargs) -> tuple[list[RulerSample], dict]:
    if task in ESSAY_TASKS:
        needs_essays()
        kwargs.setdefault("essays_dir", ESSAYS)
        kwargs.setdefault("splitter", "regex")
    return generate(task, length, count, n, **kwargs)


# ---------------------------------------------------------------- word lists, essays, task table

def test_word_lists_have_wonderwords_2_2_0_sizes():
    assert {name: len(words.word_list(name)) for name in words.EXPECTED_SIZES} == {
        "nounlist.txt": 6786, "adjectivelist.txt": 912, "verblist.txt": 1042}
    keys = words.adjective_noun_keys()
    assert len(keys) == 6_175_260
    # sha256 of "\n".join(sorted(set(f"{a}-{n}" for a in adjectives for n in nouns))), materialised once
    # with wonderwords 2.2.0: the lazy sequence is that list, element for element
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == \
        "020e4aab7091c71c01b31963463e27eb17631adf2926129d50b3613496a4b41a"
    assert (keys[0], keys[1_000_000], keys[3_141_592], keys[-1]) == (
        "Early-ATM", "courageous-formal", "lonely-vengeance", "zonked-zucchini")
    assert random.Random(1).choice(keys) == "damaged-boot"   # random.choice indexes the lazy sequence
    vocabulary = words.cwe_vocabulary(42)
    assert len(vocabulary) == len(set(vocabulary)) == 8169
    expected = sorted(set(words.word_list("nounlist.txt") + words.word_list("adjectivelist.txt")
                          + words.word_list("verblist.txt")))
    random.Random(42).shuffle(expected)
    assert list(vocabulary) == expected


def test_lazy_keys_sort_like_the_strings_where_prefixes_and_spaces_interleave():
    adjectives = ["blue", "blue-eyed", "ad", "ad hoc", "Early", "x", "x-rated", "old", "old-fashioned", "blue"]
    nouns = ["eyed-cat", "apple", "zoo", "a", "rated", "b-c", "ATM", "e"]
    lazy = words.AdjectiveNounKeys(adjectives, nouns)
    materialised = sorted({f"{a}-{n}" for a in adjectives for n in nouns})
    assert list(lazy) == materialised and len(lazy) == len(materialised)
    assert [lazy[i] for i in range(len(lazy))] == materialised


def test_another_wonderwords_version_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.0.1")
    with pytest.raises(ValueError, match=r"3\.0\.1 is installed.*pip install wonderwords==2\.2\.0"):
        words.check_version()


def test_task_table_is_rulers():
    assert RULER_13 == metrics.TASKS and QA_TASKS == ("qa_1", "qa_2") and RULER_11 == RULER_13[:11]
    assert {name: task.max_new_tokens for name, task in TASKS.items()} == dict(
        dict.fromkeys(RULER_13[:8], 128), vt=30, cwe=120, fwe=50, qa_1=32, qa_2=32)
    assert {name: task.metric for name, task in TASKS.items()} == metrics.METRICS
    assert TASKS["niah_multiquery"].keys_in_text == 4 and TASKS["niah_multikey_1"].keys_in_text == 4
    assert (TASKS["niah_multikey_3"].key_type, TASKS["niah_multikey_3"].value_type) == ("uuids", "uuids")
    assert (TASKS["cwe"].freq_cw, TASKS["cwe"].freq_ucw, TASKS["cwe"].num_cw, TASKS["fwe"].alpha) == (30, 3, 10, 2.0)
    assert {TASKS[name].family for name in RULER_13} == set(SPLIT_PATTERNS)


def test_depth_grid_is_the_40_point_grid():
    assert DEPTHS == (0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49, 51, 54, 56, 59, 62,
                      64, 67, 69, 72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100)


def test_essay_corpus_is_the_sorted_files_concatenated_without_separator():
    needs_essays()
    corpus = essays.load_essays(ESSAYS)
    files = sorted(ESSAYS.glob("*.txt"), key=lambda p: p.name)
    assert corpus.files == tuple(p.name for p in files) and corpus.files[:3] == ("addiction.txt", "aord.txt", "apple.txt")
    assert len(corpus.files) == 49
    assert corpus.sha256[0] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    text = "".join(p.read_text(encoding="utf-8") for p in files)
    assert list(corpus.words) == re.sub(r"\s+", " ", text).split(" ")
    assert corpus.words[:3] == ("July", "2010What", "hard")     # RULER's text, quirks included


def test_sentence_splitters():
    split, name = essays.sentence_splitter("regex")
    assert name == "regex" and split("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    text = "It was 3.5 km. He said so.  Then left."
    assert " ".join(split(re.sub(r"\s+", " ", text))) == re.sub(r"\s+", " ", text)
    with pytest.raises(ValueError, match="splitter='nltk' is not one of"):
        essays.sentence_splitter("nltk")
    if essays.punkt_available():
        assert essays.sentence_splitter("auto")[1] == "punkt"
    else:
        assert essays.sentence_splitter("auto")[1] == "regex"
        with pytest.raises(ValueError, match="punkt_tab.*fix"):
            essays.sentence_splitter("punkt")


# ---------------------------------------------------------------- fitting

def _tolerance(task: str, samples: list[RulerSample], record: dict, resolution: int = 1,
               extra: int = 0) -> list[tuple[int, float]]:
    """(gap below the length, allowed gap) per sample, as the module docstring derives it: ``resolution``
    units of search resolution plus the units backed off, at an upper bound of the tokens per unit, plus
    the spread of the random parts and ``extra`` tokens."""
    fitted = record["fitted_size"]
    per_unit = max((s.length - s.max_new_tokens) / s.size for s in samples)   # an upper bound (template included)
    if task == "fwe":
        resolution = record["increment"]
    spread = 64 if task == "cwe" else 32      # random keys/values/words of a sample against the search's probe
    return [(record["length"] - s.length, (fitted - s.size + resolution) * per_unit + spread + extra) for s in samples]


@pytest.mark.parametrize("length", [2048, 4096])
@pytest.mark.parametrize("task", RULER_11)
def test_head_fitting_lands_close_below_and_never_above(task, length):
    samples, record = run(task, length, n=4)
    for sample in samples:
        assert sample.length == count(sample.input, sample.answer_prefix) + sample.max_new_tokens <= length
        assert sample.size <= record["fitted_size"] and (record["fitted_size"] - sample.size) % record["increment"] == 0
    for gap, allowed in _tolerance(task, samples, record):
        assert 0 <= gap <= allowed
    assert [s.index for s in samples] == [0, 1, 2, 3] and {s.task for s in samples} == {task}
    assert record["token_lengths"]["max"] <= length and record["version"] == "ruler_head"
    assert record["ruler_commit"] == "c3f5e3b" and record["seed"] == 42
    assert set(record["deviations"]) <= set(DEVIATIONS)
    pattern = SPLIT_PATTERNS[TASKS[task].family]
    for sample in samples:   # the question starts at the last kvpress question match; the answer prefix is RULER's
        assert re.match(pattern.question, sample.input[sample.question_start:])
        assert not re.search(pattern.question, sample.input[sample.question_start + 1:])
        assert sample.answer_prefix.startswith(" " + pattern.answer_prefix)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "vt", "cwe", "niah_multivalue"])
def test_2024_linear_fitting_undershoots_by_at_most_one_increment(task):
    samples, record = run(task, 4096, n=3, version="ruler_2024")
    assert record["ruler_commit"] == "e40fae1"
    assert all(sample.length <= 4096 for sample in samples)
    gold = max(count(" " + str(s.outputs), "") for s in samples)     # the 2024 search also counted the gold
    for gap, allowed in _tolerance(task, samples, record, resolution=record["increment"], extra=gold):
        assert 0 <= gap <= allowed


def test_a_sample_that_cannot_fit_raises_instead_of_looping():
    with pytest.raises(ValueError, match=r"length=300 is too short for RULER task niah_single_1.*fix"):
        run("niah_single_1", 300)
    with pytest.raises(ValueError, match=r"too short for RULER task niah_single_2"):
        run("niah_single_2", 600)
    with pytest.raises(ValueError, match="too short for RULER task fwe"):
        run("fwe", 150)


def test_a_byte_count_cannot_hold_the_vt_example():
    with pytest.raises(ValueError, match="vt one-shot example does not fit RULER's 500-token"):
        generate("vt", 4096, lambda text, prefix: len((text + prefix).encode()), 2)


def test_determinism_same_seed_same_samples_other_seed_other_samples():
    for task in ("niah_multikey_2", "vt", "cwe", "fwe"):
        first, record = run(task, n=3)
        again, _ = run(task, n=3)
        other, _ = run(task, n=3, seed=7)
        assert first == again
        assert [s.input for s in first] != [s.input for s in other]
        assert record["seed"] == 42


# ---------------------------------------------------------------- golden: RULER's own scripts

def _digest(samples: list[RulerSample]) -> str:
    rows = [[s.input, s.answer_prefix, s.outputs, s.length] for s in samples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


#: digests of 3 samples at length 2048 with the tiny tokenizer (essays: the 49 files, regex splitter). RULER's
#: own scripts (scripts/data/synthetic/*.py at c3f5e3b and at e40fae1, run once offline with this tokenizer,
#: the base template and this splitter) give the same samples, byte for byte: same stream, same fitting.
GOLDEN = {
    "ruler_head": {"niah_single_1": "6692d49643830c3d", "niah_single_2": "d31216ca0cc8a3c8",
                   "niah_single_3": "e37b57c5f84e447a", "niah_multikey_1": "fe7b3341243da74a",
                   "niah_multikey_2": "6b5d34c97aab396b", "niah_multikey_3": "cfd7477082544378",
                   "niah_multivalue": "9764785b178ac408", "niah_multiquery": "46e0243be88962d7",
                   "vt": "8d300716619b77a8", "cwe": "11d616cd578c6d0a", "fwe": "e6ab13ae75d0ab20"},
    "ruler_2024": {"niah_single_1": "9c04a6d52160a05f", "niah_single_2": "dcc67f6793403c45",
                   "niah_single_3": "11a0abace47763c2", "niah_multikey_1": "fe03b1a02c8f473d",
                   "niah_multikey_2": "40c4ee93bd5eeb2a", "niah_multikey_3": "1dc9b187b040085c",
                   "niah_multivalue": "a2557883068996b2", "niah_multiquery": "61198dec49d42f70",
                   "vt": "eeb965b511aef8c6", "cwe": "17da066056510589", "fwe": "e53a2cef23ce5715"},
}
#: the same for the QA tasks on the synthetic files below (qa_1 at 700 tokens, qa_2 at 900)
GOLDEN_QA = {"ruler_head": {"qa_1": "eb84988ff0c965f8", "qa_2": "27c9a70ae600c869"},
             "ruler_2024": {"qa_1": "20a4e66b3b7b4ff0", "qa_2": "aff502446d9169ad"}}


@pytest.mark.parametrize("version", ["ruler_head", "ruler_2024"])
@pytest.mark.parametrize("task", RULER_11)
def test_samples_are_rulers_own(task, version):
    assert _digest(run(task, 2048, n=3, version=version)[0]) == GOLDEN[version][task]


@pytest.mark.parametrize("version", ["ruler_head", "ruler_2024"])
def test_qa_samples_are_rulers_own(version, tmp_path):
    squad, hotpotqa = _squad(tmp_path / "squad.json"), _hotpotqa(tmp_path / "hotpotqa.json")
    assert _digest(generate("qa_1", 700, count, 3, version=version, squad_path=squad)[0]) == GOLDEN_QA[version]["qa_1"]
    assert _digest(generate("qa_2", 900, count, 3, version=version, hotpotqa_path=hotpotqa)[0]) == GOLDEN_QA[version]["qa_2"]


# ---------------------------------------------------------------- NIAH

SINGULAR_QUESTION = re.escape("What is the special magic {t} for ") + "(.+)" + re.escape(" mentioned in the provided text?")
PLURAL_QUESTION = re.escape("What are all the special magic {t}s for ") + "(.+)" + re.escape(" mentioned in the provided text?")


def _question(sample: RulerSample) -> str:
    return sample.input[sample.question_start:]


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multivalue", "niah_multiquery"])
def test_niah_needles_values_and_phrases(task):
    config = TASKS[task]
    samples, _ = run(task, 2048, n=3)
    type_name = config.value_type[:-1]
    for sample in samples:
        needles = NEEDLE.findall(sample.input)
        assert len(needles) == config.keys_in_text * config.num_values
        assert {kind for kind, _, _ in needles} == {config.value_type}      # needles always plural
        by_key = collections.defaultdict(list)
        for _, key, value in needles:
            by_key[key].append(value)
        question = _question(sample)
        if config.num_queries * config.num_values == 1:
            query = re.fullmatch(SINGULAR_QUESTION.replace(re.escape("{t}"), type_name), question).group(1)
            assert sample.input.startswith(f"A special magic {type_name} is hidden within the following text. Make "
                                           f"sure to memorize it. I will quiz you about the {type_name} afterwards.\n")
            assert sample.answer_prefix == f" The special magic {type_name} for {query} mentioned in the provided text is"
        else:
            query = re.fullmatch(PLURAL_QUESTION.replace(re.escape("{t}"), type_name), question).group(1)
            assert sample.input.startswith(f"Some special magic {type_name}s are hidden within the following text. "
                                           f"Make sure to memorize it. I will quiz you about the {type_name}s afterwards.\n")
            assert sample.answer_prefix == f" The special magic {type_name}s for {query} mentioned in the provided text are"
        queried = query.split(", and ") if config.num_queries > 1 else [query]
        if config.num_queries > 1:      # "a, b, c, and d"
            queried = queried[0].split(", ") + queried[1:]
            assert query == ", ".join(queried[:-1]) + ", and " + queried[-1] and len(queried) == 4
        assert sorted(sample.outputs) == sorted(value for key in queried for value in by_key[key])
        if config.num_values > 1:       # gold in draw order; the needles in a fresh Random(42) permutation of it
            shuffled = list(sample.outputs)
            random.Random(42).shuffle(shuffled)
            assert shuffled == [value for _, _, value in needles]
        else:                           # gold in query order
            assert sample.outputs == [by_key[key][0] for key in queried]
        assert len(sample.outputs) == config.num_queries * config.num_values
        for value in sample.outputs:
            assert sample.input.count(value) == 1
        if config.key_type == "words":
            assert all(re.fullmatch(r"[\w '-]+-[\w '-]+", key) for key in by_key)
        if config.value_type == "numbers":
            assert all(re.fullmatch(r"\d{7}", v) for v in sample.outputs)
        else:
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                       for v in sample.outputs)


def test_niah_noise_haystack_placement():
    samples, record = run("niah_single_1", 2048, n=3)
    header = "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about the number afterwards.\n"
    for sample in samples:
        lines = sample.input[len(header):sample.question_start - 1].split("\n")
        noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
        assert len(lines) == sample.size + 1 and lines.count(noise) == sample.size
        assert [i for i, line in enumerate(lines) if line != noise] != []
    positions = {[i for i, line in enumerate(s.input.split("\n")) if "special magic numbers" in line][0] for s in samples}
    assert len(positions) > 1        # uniform random line, not a fixed depth


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_niah_needle_haystack_has_distractors(task):
    samples, _ = run(task, 2048, n=3)
    for sample in samples:
        body = sample.input[sample.input.index("\n") + 1:sample.question_start - 1].split("\n")
        assert len(body) == sample.size + 1 and all(NEEDLE.fullmatch(line) for line in body)
        query = re.search(r"for (.+) mentioned", _question(sample)).group(1)
        gold_lines = [line for line in body if NEEDLE.fullmatch(line).group(2) == query]
        assert len(gold_lines) == 1 and gold_lines[0].endswith(f"is: {sample.outputs[0]}.")
        assert len({NEEDLE.fullmatch(line).group(2) for line in body}) > sample.size // 2    # fresh random keys


@pytest.mark.parametrize("task", ["niah_multikey_1", "niah_multiquery"])
def test_niah_essay_needles_sit_at_the_depth_grid(task):
    samples, _ = run(task, 4096, n=3)
    corpus = essays.load_essays(ESSAYS)
    for sample in samples:
        start = sample.input.index("\n") + 1
        context = sample.input[start:sample.question_start - 1]
        sentences = essays.regex_sentences(" ".join(corpus.words[:sample.size]).strip())
        pieces = NEEDLE.split(context)[::4]        # the text between needles (split keeps the 3 groups)
        assert " ".join(p.strip() for p in pieces if p.strip()) == " ".join(sentences)
        cuts, seen = [], 0
        for piece in pieces[:-1]:
            seen += len(essays.regex_sentences(piece.strip())) if piece.strip() else 0
            cuts.append(seen)
        assert cuts == sorted(cuts)
        allowed = {int(len(sentences) * (depth / 100)) for depth in DEPTHS}
        assert all(cut in allowed for cut in cuts)


# ---------------------------------------------------------------- vt

def test_vt_chain_gold_and_head_one_shot_example():
    samples, record = run("vt", 4096, n=3)
    examples = []
    for sample in samples:
        task_start = sample.input.rindex("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        example, task_text = sample.input[:task_start], sample.input[task_start:]
        assert example.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        example_names = re.findall(r"\b[A-Z]{3}\b", example.split("they are: ")[1])
        assert example.endswith(" " + " ".join(example_names) + "\n\n") and len(example_names) == 5
        assert "they are:  " in example        # the answer prefix's trailing space + the joining space
        examples.append(example)
        value = re.search(r"assigned the value (\d{5}) in the text above\.$", task_text).group(1)
        names = sample.outputs
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names) and len(set(names)) == 5
        lines = task_text.split("\n")
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
        chain_lines = [line for line in lines if line.startswith("VAR ")]
        assert chain_lines == chain
        noise = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
        assert lines.count(noise) == sample.size
        assert task_text.endswith(f"\nQuestion: Find all variables that are assigned the value {value} in the text above.")
        assert sample.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                                        f"variables are assigned the value {value}, they are: ")
        assert "12345" not in example        # the example's value is randomized per sample
        example_value = re.search(r"VAR [A-Z]{3} = (\d{5})\n", example).group(1)
        assert [line for line in example.split("\n") if line.startswith("VAR ")] == (
            [f"VAR {example_names[0]} = {example_value}"]
            + [f"VAR {example_names[j + 1]} = VAR {example_names[j]} " for j in range(4)])
        assert f"assigned the value {example_value} in the text above. Answer: According to the chain(s)" in example
    skeleton = {re.sub(r"\b[A-Z]{3}\b|\d{5}", "#", e) for e in examples}
    assert len(skeleton) == 1 and len(set(examples)) == 3      # one example, names and value redrawn per sample


def test_vt_2024_example_spacing_and_typo():
    samples, _ = run("vt", 4096, n=2, version="ruler_2024")
    for sample in samples:
        assert sample.input.startswith(" Memorize and track the chain(s) of variable assignment hidden in the following text. VAR"
                                       ) or sample.input.startswith(" Memorize and track the chain(s) of variable "
                                                                     "assignment hidden in the following text. The grass")
        assert " in the text Answer: According to" in sample.input      # 2024 dropped the example's last word
        assert "variables are assgined the value" in sample.input and "assgined" in sample.answer_prefix
        assert "\n\n\n\nMemorize and track" in sample.input            # " " + example("...\n\n") + "\n\n"
        assert "again.\n The grass" in sample.input                     # 2024 noise: paragraphs end in \n, joined by spaces
    assert samples[0].input.split("\n\n\n\n")[0] == samples[1].input.split("\n\n\n\n")[0]   # one fixed example


# ---------------------------------------------------------------- cwe

def _numbered(text: str) -> list[str]:
    items = re.findall(r"(\d+)\. (\S+)", text)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    return [w for _, w in items]


@pytest.mark.parametrize("length,common,uncommon,shot", [(4096, 30, 3, (40, 10, 3)), (2048, 6, 1, (20, 3, 1))])
def test_cwe_repeats_gold_and_fewshot_block(length, common, uncommon, shot):
    samples, _ = run("cwe", length, n=2)
    question = "\nQuestion: What are the 10 most common words in the above list?"
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    header = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n")
    for sample in samples:
        assert sample.answer_prefix == prefix and sample.input.endswith(question)
        shot_text, real_text = sample.input.split(prefix + " ")
        real_list = real_text.split("\n", 1)[1]
        assert real_list.startswith(header)
        counts = collections.Counter(_numbered(real_list[len(header):-len(question)]))
        assert {w for w, c in counts.items() if c == common} == set(sample.outputs) and len(sample.outputs) == 10
        assert set(counts.values()) == {common, uncommon} and len(counts) == sample.size
        assert shot_text.startswith(header) and shot_text.endswith(question)
        shot_counts = collections.Counter(_numbered(shot_text[len(header):-len(question)]))
        n_words, shot_common, shot_uncommon = shot
        assert len(shot_counts) == n_words and sorted(set(shot_counts.values())) == sorted({shot_common, shot_uncommon})
        shot_gold = _numbered(real_text.split("\n", 1)[0])
        assert len(shot_gold) == 10 and all(shot_counts[w] == shot_common for w in shot_gold)
        vocabulary = set(words.cwe_vocabulary(42))
        assert set(counts) <= vocabulary and set(shot_counts) <= vocabulary


def test_cwe_2024_has_no_space_before_the_fewshot_answers():
    sample = run("cwe", 4096, n=1, version="ruler_2024")[0][0]
    assert "most often in the list are:1. " in sample.input
    head = run("cwe", 4096, n=1)[0][0]
    assert "most often in the list are: 1. " in head.input


def test_cwe_probe_beyond_the_vocabulary_counts_as_too_long():
    builder = CommonWords(TASKS["cwe"], 4096, Streams(42), "ruler_head")
    with pytest.raises(Exception, match="8169"):
        builder.build(9000)


# ---------------------------------------------------------------- fwe

def test_fwe_gold_is_the_three_most_frequent_coded_words():
    assert ZETA_2 == 1.6449340668482264            # scipy.special.zeta(2.0), in float64
    assert abs(ZETA_2 - sum(r ** -2.0 for r in range(1, 200_000))) < 1e-5
    samples, record = run("fwe", 4096, n=3)
    for sample in samples:
        assert sample.input.endswith("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are "
                                     "the three most frequently appeared words in the above coded text?")
        assert sample.input.startswith("Read the following coded text and track the frequency of each coded word. Find "
                                       "the three most frequently appeared coded words. ")
        assert sample.answer_prefix == " Answer: According to the coded text above, the three most frequently appeared words are:"
        text = sample.input.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = collections.Counter(text.split(" "))
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..." and ranked[1:4] == sample.outputs
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])
        total = sample.size
        assert [counts[w] for w in ranked[:4]] == [int(total * r ** -2.0 / ZETA_2) for r in range(1, 5)]
    assert record["increment"] == (4096 - 50) // 32


def test_fwe_budget_differs_between_versions():
    head = FreqWords(TASKS["fwe"], 4096, Streams(42), "ruler_head")
    old = FreqWords(TASKS["fwe"], 4096, Streams(42), "ruler_2024")
    assert (head.budget, head.vocab_size, old.budget, old.vocab_size) == (4046, 80, 4096, 81)
    samples, _ = run("fwe", 4096, n=3, version="ruler_2024")
    for sample in samples:          # 2024 fitted the prompt alone to L: the total may pass L by the allowance
        assert sample.length - sample.max_new_tokens <= 4096 < 4096 + sample.max_new_tokens
    assert max(s.length for s in samples) > 4096


# ---------------------------------------------------------------- qa

def _squad(path: Path) -> Path:
    data = {"version": "v2.0", "data": [
        {"title": f"T{a}", "paragraphs": [
            {"context": f"Article {a} paragraph {p} says " + " ".join(f"w{a}x{p}x{i}" for i in range(10)) + ".",
             "qas": [{"question": f"What does article {a} paragraph {p} say?", "id": f"{a}-{p}",
                      "is_impossible": p == 1,
                      "answers": [] if p == 1 else [{"text": f"w{a}x{p}x0", "answer_start": 0},
                                                    {"text": f"w{a}x{p}x0", "answer_start": 0},
                                                    {"text": f"w{a}x{p}x1", "answer_start": 9}]}]}
            for p in range(8)]} for a in range(6)]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _hotpotqa(path: Path) -> Path:
    data = [{"_id": str(q), "question": f"Which title holds fact {q}?", "answer": f"answer{q}",
             "context": [[f"Title {q}-{d}", [f"Sentence one of {q}-{d}. ", f"Fact {q}-{d}."]] for d in range(10)]}
            for q in range(12)]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _documents(text: str) -> list[str]:
    context = text.split("The following are given documents.\n\n", 1)[1].split("\n\nAnswer the question")[0]
    documents = context.split("\n\n")
    for i, document in enumerate(documents):
        assert document.startswith(f"Document {i + 1}:\n")
    return [document.split(":\n", 1)[1] for document in documents]


def test_qa_squad_structure(tmp_path):
    path = _squad(tmp_path / "squad.json")
    samples, record = generate("qa_1", 700, count, 4, squad_path=path)
    assert record["qa_file"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["qa_file"]["questions"] == 6 * 7 and record["qa_file"]["documents"] == 48
    answerable = [(a, p) for a in range(6) for p in range(8) if p != 1]
    slots = set()
    for sample, (a, p) in zip(samples, answerable):         # sample i asks question i, in file order
        assert sample.input.endswith(f"\n\nQuestion: What does article {a} paragraph {p} say?")
        assert sample.answer_prefix == " Answer:" and sample.outputs == [f"w{a}x{p}x0", f"w{a}x{p}x0", f"w{a}x{p}x1"]
        assert sample.input.startswith("Answer the question based on the given documents. Only give me the answer and "
                                       "do not output any other words.\n\nThe following are given documents.\n\n")
        documents = _documents(sample.input)
        assert len(documents) == sample.size and len(set(documents)) == sample.size
        gold = [i for i, d in enumerate(documents) if d.startswith(f"Article {a} paragraph {p} says")]
        assert len(gold) == 1
        assert sum(d.startswith(f"Article {a} ") for d in documents) == 8      # the same article's paragraphs first
        slots.add(gold[0])
        permutation = list(range(sample.size))
        random.Random(42).shuffle(permutation)       # own documents first, then a fresh Random(42) shuffle
        assert permutation.index(0) == gold[0]
        assert re.match(SPLIT_PATTERNS["qa"].question, sample.input[sample.question_start:])
        assert sample.input[sample.question_start:].startswith("Answer the question based on the given documents. "
                                                               "Only give me the answer and do not output any other "
                                                               "words.\n\nQuestion:")
    assert len(slots) == 1


def test_qa_hotpotqa_structure(tmp_path):
    path = _hotpotqa(tmp_path / "hotpot.json")
    samples, record = generate("qa_2", 900, count, 3, hotpotqa_path=path)
    assert record["qa_file"]["documents"] == 120
    for q, sample in enumerate(samples):
        assert sample.outputs == [f"answer{q}"] and sample.input.endswith(f"Question: Which title holds fact {q}?")
        documents = _documents(sample.input)
        own = {f"Title {q}-{d}\nSentence one of {q}-{d}. Fact {q}-{d}." for d in range(10)}
        assert own <= set(documents) and len(documents) == sample.size > 10


def test_qa_needs_its_file_and_says_ruler_11():
    with pytest.raises(ValueError, match=r"qa_1 needs squad_path.*RULER-11"):
        generate("qa_1", 4096, count, 2)
    with pytest.raises(ValueError, match=r"qa_2 needs hotpotqa_path.*RULER-11"):
        generate("qa_2", 4096, count, 2)
    with pytest.raises(ValueError, match="does not exist"):
        generate("qa_1", 4096, count, 2, squad_path="/nonexistent/squad.json")


# ---------------------------------------------------------------- arguments

def test_bad_arguments_name_the_value_the_choices_and_the_fix():
    with pytest.raises(ValueError, match=r"unknown RULER task 'niah'.*niah_single_1.*qa_2"):
        generate("niah", 4096, count, 1)
    with pytest.raises(ValueError, match=r"unknown RULER generator version 'head'.*ruler_head.*ruler_2024"):
        generate("vt", 4096, count, 1, version="head")
    with pytest.raises(ValueError, match=r"niah_single_2 reads the Paul Graham essays.*essays_dir.*fix"):
        generate("niah_single_2", 4096, count, 1)
    with pytest.raises(ValueError, match="num_samples=0"):
        generate("vt", 4096, count, 0)
    with pytest.raises(ValueError, match=r"splitter='spacy' is not one of.*fix"):
        generate("vt", 4096, count, 1, splitter="spacy")
    with pytest.raises(ValueError, match="is not a folder"):
        generate("niah_single_2", 4096, count, 1, essays_dir="/nonexistent/essays")
