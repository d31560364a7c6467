"""RULER's needle-in-a-haystack family (reference-ruler.md section 1.5; RULER
scripts/data/synthetic/niah.py at c3f5e3b, and at e40fae1 for ``ruler_2024``): the eight ``niah_*`` tasks.

Deviation (named ``singular_on_task_text``): the singular rewrite for one queried value (``Some`` -> ``A``,
``are all`` -> ``is``, ``are`` -> ``is``, ``answers`` -> ``answer``) applies to the task template and the
answer prefix only; RULER applies it to the whole filled-in template, chat wrapper included, so a wrapper
containing "are" would be rewritten too. With the ``base`` wrapper the two agree.
"""

from __future__ import annotations

import uuid

import numpy as np

from harness.ruler.essays import EssayCorpus
from harness.ruler.fitting import HEAD, Prompt, Streams
from harness.ruler.tasks import NiahTask
from harness.ruler.words import adjective_noun_keys

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
#: RULER's depth grid in percent: round(linspace(0, 100, 40))
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))
_SINGULAR = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))


def singular(template: str) -> str:
    """RULER's plain substring rewrite of a template for one queried value."""
    for old, new in _SINGULAR:
        template = template.replace(old, new)
    return template


def join_queries(queries: list[str]) -> str:
    """``a``; ``a, and b``; ``a, b, c, and d`` (RULER's join of the queried keys)."""
    return ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]


class Niah:
    """Builds NIAH prompts of a given haystack size from the shared random streams.

    Size unit: noise paragraphs, distractor needles, or essay words. ``increment``: 500 words for the
    essay; 25 (5 below 4096 tokens) for noise and needle haystacks. ``ruler_head`` cycles the essay corpus
    when the size exceeds it; ``ruler_2024`` caps the search at the corpus size (``cap``)."""

    cap_after_step = False      # 2024: the size is capped at the corpus before the step (niah.py e40fae1)

    def __init__(self, task: NiahTask, length: int, streams: Streams, version: str,
                 essays: EssayCorpus | None = None, split_sentences=None):
        if task.haystack == "essay" and (essays is None or split_sentences is None):
            raise ValueError("the essay haystack needs the essay corpus and a sentence splitter")
        self.task, self.streams, self.version = task, streams, version
        self.essays, self.split_sentences = essays, split_sentences
        self.increment = 500 if task.haystack == "essay" else (5 if length < 4096 else 25)
        self.probe_size = self.increment
        self.cap = len(essays.words) if task.haystack == "essay" and version != HEAD else None
        self.keys = adjective_noun_keys() if "words" in (task.key_type, task.value_type) else None
        self.template, self.answer_prefix, self.type_name = TEMPLATE, ANSWER_PREFIX, task.value_type
        if task.num_queries * task.num_values == 1:
            self.template, self.answer_prefix = singular(TEMPLATE), singular(ANSWER_PREFIX)
            self.type_name = task.value_type[:-1]

    def upper_bound(self, length: int, tokens_per_unit: float) -> int:
        """The binary search's upper end: three times the estimated size."""
        return max(int((length / tokens_per_unit) * 3), self.increment * 2)

    def gold_suffix(self, outputs: list[str]) -> str:
        """What RULER 2024's linear search appends to the prompt when counting: the gold values."""
        return " ".join(outputs)

    def _draw(self, kind: str) -> str:
        rng = self.streams.py
        if kind == "numbers":
            return str(rng.randint(1_000_000, 9_999_999))
        if kind == "words":
            return rng.choice(self.keys)
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def build(self, size: int, index: int | None = None) -> Prompt:
        """One prompt with ``size`` haystack units (``index`` is unused: every NIAH sample is drawn fresh)."""
        task = self.task
        keys, values, needles = [], [], []
        for _ in range(task.keys_in_text):
            keys.append(self._draw(task.key_type))
            values.append([])
            for _ in range(task.num_values):
                values[-1].append(self._draw(task.value_type))
                needles.append(NEEDLE.format(type_needle_v=task.value_type, key=keys[-1], value=values[-1][-1]))
        self.streams.fresh().shuffle(needles)
        context = self._essay_context(size, needles) if task.haystack == "essay" else self._line_context(size, needles)
        queried = self.streams.py.sample(range(task.keys_in_text), task.num_queries)
        query = join_queries([keys[i] for i in queried])
        fill = {"type_needle_v": self.type_name, "query": query}
        return Prompt(self.template.format(context=context, **fill), self.answer_prefix.format(**fill),
                      [value for i in queried for value in values[i]])

    def _line_context(self, size: int, needles: list[str]) -> str:
        """Noise paragraphs or distractor needles, one per line; the needles at uniform random line
        indices (the first shuffled needle at the largest index)."""
        task = self.task
        if task.haystack == "noise":
            lines = [NOISE] * size
        else:
            lines = [NEEDLE.format(type_needle_v=task.value_type, key=self._draw(task.key_type),
                                   value=self._draw(task.value_type)) for _ in range(size)]
        for position, needle in zip(sorted(self.streams.py.sample(range(size), len(needles)), reverse=True), needles):
            lines.insert(position, needle)
        return "\n".join(lines)

    def _essay_context(self, size: int, needles: list[str]) -> str:
        """The first ``size`` essay words, split into sentences; each needle after the sentence at a depth
        drawn without replacement from ``DEPTHS`` (position ``int(n_sentences * depth / 100)``)."""
        words = self.essays.words
        if size > len(words) and self.version == HEAD:    # HEAD cycles the corpus (7097a4f)
            words = words * (-(-size // len(words)))
        sentences = self.split_sentences(" ".join(words[:size]).strip())
        depths = self.streams.py.sample(DEPTHS, len(needles))
        cuts = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in depths) + [len(sentences)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        return " ".join(parts)
