"""RULER's frequent words extraction ``fwe`` (reference-ruler.md section 1.6.3; RULER
scripts/data/synthetic/freq_words_extraction.py at c3f5e3b, and at e40fae1 for ``ruler_2024``).

A text of random 6-letter coded words whose frequencies follow a zeta (Zipf) law: the word of rank r
appears ``int(W * r**-alpha / zeta(alpha))`` times. Rank 1 is ``...`` (noise the question says to
ignore); the gold is ranks 2-4. Sizing: the budget is ``L' = L - tokens_to_generate`` (``ruler_head``,
9f1c84d) or ``L`` (``ruler_2024``: its prompts can exceed ``L`` by up to the generation allowance), the
vocabulary ``L' // 50`` words, and W starts at ``L' // 6`` and grows by ``L' // 32`` while the prompt is
under ``L'`` tokens, then steps back once; each sample starts from that W and shrinks it while its prompt
is over ``L'``.

zeta(2) is computed as ``math.pi ** 2 / 6`` (no scipy): in float64 it equals ``scipy.special.zeta(2.0)``,
1.6449340668482264 (a test states it); only ``alpha == 2.0`` (RULER's only setting) is supported.
"""

from __future__ import annotations

import math
import string

import numpy as np

from harness.ruler.fitting import HEAD, Count, Prompt, Streams, TooShort
from harness.ruler.tasks import FreqWordsTask

TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?")
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
ZETA_2 = math.pi ** 2 / 6       # == scipy.special.zeta(2.0) == 1.6449340668482264 in float64
WORD_LENGTH = 6
NOISE_WORD = "..."


class FreqWords:
    """Builds fwe prompts. ``budget``: the token budget for the prompt (``L'``); ``vocab_size``:
    ``L' // 50``; ``increment``: ``L' // 32`` words."""

    def __init__(self, task: FreqWordsTask, length: int, streams: Streams, version: str):
        if task.alpha != 2.0:
            raise ValueError(f"fwe alpha={task.alpha}: only RULER's alpha=2.0 is supported (zeta(2) = pi^2/6 without "
                             "scipy); fix: alpha=2.0")
        self.task, self.streams = task, streams
        self.budget = length - task.max_new_tokens if version == HEAD else length
        self.vocab_size = self.budget // 50
        self.increment = self.budget // 32

    def vocabulary(self) -> list[str]:
        """``vocab_size`` distinct random 6-letter words (from the stream), sorted, shuffled with a fresh
        ``Random(seed)``, the first replaced by ``...``."""
        rng = self.streams.py
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=WORD_LENGTH)) for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=WORD_LENGTH)))
        vocab = sorted(set(vocab))
        self.streams.fresh().shuffle(vocab)
        vocab[0] = NOISE_WORD
        return vocab

    def counts(self, num_words: int, vocab_size: int) -> list[int]:
        """Occurrences of each rank: ``int(W * r**-alpha / zeta(alpha))``, in RULER's float64 order."""
        ranks = np.arange(1, vocab_size + 1)
        return [int(c) for c in (num_words * (ranks ** -self.task.alpha) / ZETA_2).astype(int)]

    def build(self, vocab: list[str], num_words: int) -> Prompt:
        """The prompt for ``vocab`` at ``num_words`` (no draw from the stream: the word list is shuffled
        with a fresh ``Random(seed)``); gold ``vocab[1:4]``."""
        words = [word for word, count in zip(vocab, self.counts(num_words, len(vocab))) for _ in range(count)]
        self.streams.fresh().shuffle(words)
        return Prompt(TEMPLATE.format(context=" ".join(words)), ANSWER_PREFIX, vocab[1:4])

    def fit(self, count: Count) -> int:
        """W for the task (one new vocabulary from the stream): from ``L' // 6`` up by ``L' // 32`` while
        the prompt is under ``L'``, then one step back."""
        if self.vocab_size < 4 or self.increment < 1:
            raise TooShort(0, -1, self.budget)
        vocab = self.vocabulary()
        num_words = self.budget // WORD_LENGTH
        while count(self.build(vocab, num_words)) < self.budget:
            num_words += self.increment
        return num_words - self.increment

    def sample(self, count: Count, num_words: int) -> tuple[Prompt, int, int]:
        """``(prompt, W, tokens)``: a new vocabulary, W shrunk by ``L' // 32`` while the prompt is over
        ``L'``; ``TooShort`` when even no words at all are over (RULER would loop forever)."""
        vocab = self.vocabulary()
        while True:
            prompt = self.build(vocab, num_words)
            tokens = count(prompt)
            if tokens <= self.budget:
                return prompt, num_words, tokens
            if num_words <= 0:
                raise TooShort(num_words, tokens + self.task.max_new_tokens, self.budget)
            num_words -= self.increment
