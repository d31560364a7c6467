"""RULER's 13 tasks as data (reference-ruler.md section 1.4; RULER scripts/synthetic.yaml and
scripts/data/synthetic/constants.py at c3f5e3b), and where kvpress splits each family's prompt into
context and question (section 4.1).

One frozen dataclass per family; ``TASKS`` maps task name to its config in RULER's order.
"""

from __future__ import annotations

from dataclasses import dataclass

NIAH, VARIABLE_TRACKING, COMMON_WORDS, FREQ_WORDS, QA = (
    "niah", "variable_tracking", "common_words_extraction", "freq_words_extraction", "qa")
FAMILIES = (NIAH, VARIABLE_TRACKING, COMMON_WORDS, FREQ_WORDS, QA)


@dataclass(frozen=True, kw_only=True)
class RulerTask:
    """What every task has: its ``family`` (the RULER script), ``max_new_tokens`` (RULER's
    ``tokens_to_generate``, also reserved out of the length budget) and ``metric`` (``all``: share of gold
    strings found; ``part``: any one found)."""
    family: str
    max_new_tokens: int
    metric: str = "all"

    def __post_init__(self):
        if self.family not in FAMILIES or self.metric not in ("all", "part"):
            raise ValueError(f"family={self.family!r} / metric={self.metric!r}: choose from {FAMILIES} / ('all', 'part')")


@dataclass(frozen=True, kw_only=True)
class NiahTask(RulerTask):
    """Needle in a haystack. ``haystack``: ``noise`` (the repeated grass/sky paragraph), ``essay`` (Paul
    Graham essays) or ``needle`` (distractor needles with random keys and values); ``key_type`` /
    ``value_type``: ``words`` (adjective-noun), ``numbers`` (7 digits) or ``uuids``; ``num_keys`` keys in the
    text, ``num_values`` values (needles) per key, ``num_queries`` keys asked (the text holds
    ``max(num_keys, num_queries)`` keys, as RULER)."""
    family: str = NIAH
    max_new_tokens: int = 128
    haystack: str
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    @property
    def keys_in_text(self) -> int:
        return max(self.num_keys, self.num_queries)


@dataclass(frozen=True, kw_only=True)
class VariableTrackingTask(RulerTask):
    """Variable tracking: ``num_chains`` chains of ``num_hops`` re-assignments hidden in the noise
    haystack; the gold is the first chain's ``num_hops + 1`` names."""
    family: str = VARIABLE_TRACKING
    max_new_tokens: int = 30
    haystack: str = "noise"
    num_chains: int = 1
    num_hops: int = 4


@dataclass(frozen=True, kw_only=True)
class CommonWordsTask(RulerTask):
    """Common words extraction: ``num_cw`` common words repeated ``freq_cw`` times among others repeated
    ``freq_ucw`` times (lengths of 4096 and more; shorter lengths use 6 and 1)."""
    family: str = COMMON_WORDS
    max_new_tokens: int = 120
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10


@dataclass(frozen=True, kw_only=True)
class FreqWordsTask(RulerTask):
    """Frequent words extraction: coded words drawn with Zipf (zeta) frequencies of exponent ``alpha``."""
    family: str = FREQ_WORDS
    max_new_tokens: int = 50
    alpha: float = 2.0


@dataclass(frozen=True, kw_only=True)
class QATask(RulerTask):
    """Question answering over real documents plus distractors: ``dataset`` ``squad`` (SQuAD v2 dev) or
    ``hotpotqa`` (HotpotQA dev distractor)."""
    family: str = QA
    max_new_tokens: int = 32
    metric: str = "part"
    dataset: str


#: the 13 tasks in RULER's order (synthetic.yaml)
TASKS: dict[str, RulerTask] = {
    "niah_single_1": NiahTask(haystack="noise"),
    "niah_single_2": NiahTask(haystack="essay"),
    "niah_single_3": NiahTask(haystack="essay", value_type="uuids"),
    "niah_multikey_1": NiahTask(haystack="essay", num_keys=4),
    "niah_multikey_2": NiahTask(haystack="needle"),
    "niah_multikey_3": NiahTask(haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": NiahTask(haystack="essay", num_values=4),
    "niah_multiquery": NiahTask(haystack="essay", num_queries=4),
    "vt": VariableTrackingTask(),
    "cwe": CommonWordsTask(),
    "fwe": FreqWordsTask(),
    "qa_1": QATask(dataset="squad"),
    "qa_2": QATask(dataset="hotpotqa"),
}
RULER_13 = tuple(TASKS)
QA_TASKS = ("qa_1", "qa_2")
#: the 11 tasks that need no external QA data ("RULER-11", as KVCache-Factory runs it)
RULER_11 = tuple(name for name in TASKS if name not in QA_TASKS)
#: the tasks that read the essay corpus
ESSAY_TASKS = tuple(name for name, task in TASKS.items() if getattr(task, "haystack", None) == "essay")


@dataclass(frozen=True)
class SplitPattern:
    """kvpress's split of a RULER prompt (``create_huggingface_dataset.py``): the context is everything
    before the LAST match of ``question`` (a regular expression); the answer prefix starts at the next
    match of ``answer_prefix`` after it."""
    question: str
    answer_prefix: str


#: per family (reference-ruler.md section 4.1)
SPLIT_PATTERNS: dict[str, SplitPattern] = {
    NIAH: SplitPattern(r"What (?:is|are all) the special magic", "The special magic"),
    VARIABLE_TRACKING: SplitPattern(r"Question: Find all variables that are assigned the value", "Answer:"),
    COMMON_WORDS: SplitPattern(r"Question: What are the 10 most common words in the above list\?", "Answer:"),
    FREQ_WORDS: SplitPattern(r"Question: Do not provide any explanation\.", "Answer:"),
    QA: SplitPattern(r"Answer the question based on the given documents\.", "Answer:"),
}
