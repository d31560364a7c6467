"""RULER's common words extraction ``cwe`` (reference-ruler.md section 1.6.2; RULER
scripts/data/synthetic/common_words_extraction.py at c3f5e3b, and at e40fae1 for ``ruler_2024``).

A numbered list of words in which ``num_cw`` words repeat ``freq_cw`` times and the others ``freq_ucw``
times (below 4096 tokens: 6 and 1); the gold is the common words. A few-shot block of the same kind
(40 words, 10 and 3 repeats; below 4096 tokens: 20 words, 3 and 1) with its answer precedes the task.

Deviations (named): ``cwe_fewshot_bare_template``: the few-shot block is the bare task template + answer
prefix + answers (RULER fills the full template, chat wrapper included; with the ``base`` wrapper the two
agree); ``cwe_no_english_words``: RULER draws from ``json/english_words.json`` when a list needs more words
than the 8169 of wonderwords (only the longest lengths); that file is not used here, so a search probe
beyond the vocabulary counts as too long (it would not fit anyway; RULER's probe would also have drawn
from the stream) and a fitted size beyond it raises ``ValueError``.
"""

from __future__ import annotations

from harness.ruler.fitting import HEAD, BeyondData, Prompt, Streams
from harness.ruler.tasks import CommonWordsTask
from harness.ruler.words import cwe_vocabulary

TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
PROBE_WORDS = 4096
NUM_FEWSHOT = 1


def numbered(words: list[str]) -> str:
    """``1. w 2. w 3. w ...``"""
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


class CommonWords:
    """Builds cwe prompts with ``size`` distinct words in the real list. ``increment`` 10; the HEAD search
    probes at 4096 words and its upper end is twice the estimated size; ``ruler_2024`` caps the size at
    the vocabulary."""

    cap_after_step = True       # 2024: the size is capped after the step (common_words_extraction.py e40fae1)

    def __init__(self, task: CommonWordsTask, length: int, streams: Streams, version: str):
        self.task, self.streams, self.version = task, streams, version
        self.vocabulary = cwe_vocabulary(streams.seed)
        self.increment, self.probe_size = 10, PROBE_WORDS
        self.cap = len(self.vocabulary) if version != HEAD else None
        short = length < 4096
        self.fewshot_shape = (20, 3, 1) if short else (40, 10, 3)
        self.repeats = (6, 1) if short else (task.freq_cw, task.freq_ucw)
        self.probes_beyond_vocabulary = 0

    def upper_bound(self, length: int, tokens_per_unit: float) -> int:
        """HEAD's upper end for cwe (533f013): twice the estimated size."""
        return max(int(length // tokens_per_unit) * 2, self.increment * 2)

    def gold_suffix(self, outputs: list[str]) -> str:
        """What RULER 2024's search appends when counting: a space and the numbered gold words."""
        return " " + numbered(outputs)

    def example(self, num_words: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
        """RULER's ``get_example``: ``num_words`` sampled words, the first ``num_cw`` common, the list
        shuffled with a fresh ``Random(seed)`` and numbered; returns ``(numbered list, common words)``."""
        if num_words > len(self.vocabulary):
            self.probes_beyond_vocabulary += 1
            raise BeyondData(f"{num_words} distinct words > the {len(self.vocabulary)} of the vocabulary")
        sampled = self.streams.py.sample(self.vocabulary, num_words)
        common, uncommon = sampled[:self.task.num_cw], sampled[self.task.num_cw:]
        words = common * common_repeats + uncommon * uncommon_repeats
        self.streams.fresh().shuffle(words)
        return numbered(words), common

    def build(self, size: int, index: int | None = None) -> Prompt:
        """One prompt: a new few-shot block, then the real list of ``size`` distinct words."""
        shots = [self.example(*self.fewshot_shape) for _ in range(NUM_FEWSHOT)]
        context, answer = self.example(size, *self.repeats)
        space = " " if self.version == HEAD else ""     # the 2024 code had no space before the answers
        blocks = [TEMPLATE.format(context=shot) + ANSWER_PREFIX + space + numbered(gold) for shot, gold in shots]
        return Prompt("\n".join(blocks) + "\n" + TEMPLATE.format(context=context), ANSWER_PREFIX, answer)
