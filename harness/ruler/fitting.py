"""The mechanics every RULER generator shares (reference-ruler.md sections 1.2 and 1.3): the random
streams, the built prompt, and fitting a family's size knob to a length budget.

* ``Streams``: one sequential stream per (task, length) file, as RULER's ``random.seed(seed)`` and
  ``np.random.seed(seed)`` give, but on our own ``random.Random`` and ``numpy.random.RandomState``
  instances (the global generators are never touched); ``fresh()`` is the new ``random.Random(seed)``
  RULER uses for its fixed shuffles.
* ``binary_search`` (``ruler_head``, RULER 56ea4ef): one probe estimates tokens per unit, then the
  largest size in ``[increment, upper]`` whose prompt fits.
* ``linear_search`` (``ruler_2024``, RULER e40fae1): from ``increment`` upwards in steps of ``increment``
  until the prompt plus the gold string(s) no longer fits, then one step back.
* ``build_within``: one sample at the fitted size, backing off by ``increment`` while it does not fit.
  RULER loops forever when even the smallest size does not fit; here that raises ``TooShort`` (named
  deviation ``backoff_floor``).

A *builder* is a family object with ``increment``, ``probe_size``, ``build(size, index)``,
``upper_bound(length, tokens_per_unit)``, ``gold_suffix(outputs)``, ``cap`` and ``cap_after_step``. All
probes run the real generator, so they consume the streams exactly as RULER's do.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

HEAD, V2024 = "ruler_head", "ruler_2024"
VERSIONS = (HEAD, V2024)


@dataclass
class Streams:
    """The random state of one generation run: ``py`` (RULER's global ``random``), ``np`` (RULER's global
    ``numpy.random``), both seeded with ``seed``."""
    seed: int
    py: random.Random = field(init=False)
    np: np.random.RandomState = field(init=False)

    def __post_init__(self):
        self.py = random.Random(self.seed)
        self.np = np.random.RandomState(self.seed)

    def fresh(self) -> random.Random:
        """A new ``random.Random(seed)``: the same permutation for every list of the same length."""
        return random.Random(self.seed)


@dataclass
class Prompt:
    """A built task text: ``input`` (before the answer prefix), ``answer_prefix`` and the gold ``outputs``."""
    input: str
    answer_prefix: str
    outputs: list[str]


class TooShort(Exception):
    """Even the smallest size does not fit: ``size`` units gave ``tokens`` (generation allowance and
    extras included) over the budget ``limit``."""

    def __init__(self, size: int, tokens: int, limit: int):
        super().__init__(f"{size} units give {tokens} tokens > {limit}")
        self.size, self.tokens, self.limit = size, tokens, limit


class BeyondData(Exception):
    """A size larger than the family's data (CWE: more distinct words than its vocabulary)."""


Count = Callable[[Prompt], int]


def binary_search(builder, count: Count, length: int, reserve: int) -> int:
    """The largest size whose prompt fits ``count(prompt) + reserve <= length`` (``reserve``: the
    generation allowance plus, for vt, the one-shot example), RULER HEAD's way: a probe at
    ``builder.probe_size`` gives tokens per unit, the search runs over ``[increment,
    builder.upper_bound(length, tokens_per_unit)]``; ``increment`` when nothing fits. A probe beyond the
    family's data (``BeyondData``) counts as too long."""
    increment = builder.increment
    tokens_per_unit = count(builder.build(builder.probe_size)) / builder.probe_size
    low, high = increment, builder.upper_bound(length, tokens_per_unit)
    best = None
    while low <= high:
        middle = (low + high) // 2
        try:
            fits = count(builder.build(middle)) + reserve <= length
        except BeyondData:
            fits = False
        if fits:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return increment if best is None else best


def linear_search(builder, count: Count, length: int, reserve: int) -> int:
    """RULER 2024's search: from ``increment`` up in steps of ``increment`` while ``count(prompt + gold) +
    reserve`` stays under ``length``; one step back once it exceeds ``length`` (an exact hit ends the loop
    one step beyond, as RULER's loop does; the per-sample back-off then corrects it). With a ``cap``
    (the essay, CWE or QA corpus size) the size stops there."""
    increment, cap = builder.increment, builder.cap
    size, total = increment, 0
    while total < length:
        prompt = builder.build(size)
        total = count(Prompt(prompt.input, prompt.answer_prefix + builder.gold_suffix(prompt.outputs), [])) + reserve
        if total > length:
            size -= increment
            break
        if cap is not None and not builder.cap_after_step and size > cap:
            size = cap
            break
        size += increment
        if cap is not None and builder.cap_after_step and size > cap:
            size = cap
            break
    return size


def fit(builder, count: Count, length: int, reserve: int, version: str) -> int:
    """The fitted size of ``version`` (``binary_search`` for ``ruler_head``, ``linear_search`` for
    ``ruler_2024``)."""
    return (binary_search if version == HEAD else linear_search)(builder, count, length, reserve)


def build_within(build: Callable[[int], Prompt], count: Count, length: int, reserve: int, size: int,
                 increment: int) -> tuple[Prompt, int, int]:
    """``(prompt, size, tokens)``: a prompt built at ``size`` whose ``count + reserve <= length``, backing
    off by ``increment`` while it does not fit (a fresh draw each try, as RULER). ``TooShort`` when it does
    not fit at a size of ``increment`` or less (RULER would retry forever)."""
    while True:
        if size < 1:
            raise TooShort(size, -1, length)
        prompt = build(size)
        tokens = count(prompt)
        if tokens + reserve <= length:
            return prompt, size, tokens
        if size <= increment:
            raise TooShort(size, tokens + reserve, length)
        size -= increment
