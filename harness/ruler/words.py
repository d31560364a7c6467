"""RULER's word lists, read from the asset files of the installed ``wonderwords`` (reference-ruler.md
sections 1.5, 1.6.2 and 2).

RULER reads ``nounlist.txt``, ``adjectivelist.txt`` and ``verblist.txt`` through wonderwords' private
helper (each line right-stripped) and builds two lists:

* NIAH keys (``niah.py``): every ``adjective-noun`` pair, de-duplicated and sorted; a key is
  ``random.choice`` over that list. ``adjective_noun_keys()`` gives the same sequence without
  materialising its 6,175,260 strings (see ``AdjectiveNounKeys``).
* CWE words (``common_words_extraction.py``): nouns + adjectives + verbs, de-duplicated, sorted, then
  shuffled with a fresh ``random.Random(seed)``: 8169 words with wonderwords 2.2.0.

Only wonderwords 2.2.0 gives RULER's samples (3.0.1 drops four nouns and so changes every sample), so any
other installed version raises ``ValueError``.
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import importlib.resources
import random
import warnings
from collections.abc import Iterator, Sequence

WONDERWORDS_VERSION = "2.2.0"
#: list sizes with wonderwords 2.2.0 (reference-ruler.md section 2)
EXPECTED_SIZES = {"nounlist.txt": 6786, "adjectivelist.txt": 912, "verblist.txt": 1042}
EXPECTED_KEYS = 6_175_260
EXPECTED_CWE_WORDS = 8169


def installed_version() -> str | None:
    """The installed wonderwords version, or None when it is not installed."""
    try:
        return importlib.metadata.version("wonderwords")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version() -> str:
    """The installed wonderwords version when it is 2.2.0; ``ValueError`` naming the installed version and
    the fix otherwise (reference-ruler.md section 2: another version changes every sample)."""
    version = installed_version()
    if version != WONDERWORDS_VERSION:
        found = "is not installed" if version is None else f"{version} is installed"
        raise ValueError(f"RULER's word lists need wonderwords=={WONDERWORDS_VERSION} (the version of RULER's 2024 data; "
                         f"another version changes every sample), but wonderwords {found}; fix: "
                         f"pip install wonderwords=={WONDERWORDS_VERSION}")
    return version


@functools.lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """One asset file of wonderwords (``nounlist.txt``, ``adjectivelist.txt``, ``verblist.txt``) as RULER
    reads it: one entry per line, each right-stripped, duplicates and order kept (2.2.0: 6786 / 912 / 1042
    lines). ``ValueError`` when wonderwords is not 2.2.0."""
    check_version()
    with warnings.catch_warnings():     # importing wonderwords 2.2.0 runs its own deprecated open_text
        warnings.simplefilter("ignore", DeprecationWarning)
        assets = importlib.resources.files("wonderwords") / "assets"
    text = (assets / name).read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":        # readlines() gives no entry after the final newline
        lines.pop()
    return tuple(line.rstrip() for line in lines)


class AdjectiveNounKeys(Sequence):
    """``sorted(set(f"{adj}-{noun}" for adj in adjectives for noun in nouns))`` as a lazy sequence, so
    ``random.choice(keys)`` (which is ``keys[rng._randbelow(len(keys))]``) draws what RULER draws.

    Why index arithmetic is exact: every key of one adjective starts with the prefix ``adj + "-"``, and
    within one adjective the keys sort as the nouns do. The keys of two adjectives can interleave only
    when one prefix is a prefix of the other (``blue-`` and ``blue-eyed-``); otherwise all keys of one
    come before all keys of the other, in the order of the prefixes (not of the adjectives: ``ad hoc-``
    sorts before ``ad-``). So the adjectives fall into clusters (the prefix-related ones); clusters are
    ordered by their shortest prefix, a one-adjective cluster is the sorted nouns behind its prefix, and
    only the five multi-adjective clusters of 2.2.0 (blue/blue-eyed, high/high-pitched, old/old-fashioned,
    teeny/teeny-tiny, wide/wide-eyed) are materialised (13,572 keys each). A test checks the sha256 of the
    whole sequence against the materialised list."""

    def __init__(self, adjectives: Sequence[str], nouns: Sequence[str]):
        self._nouns = sorted(set(nouns))
        prefixes = sorted({adjective + "-" for adjective in adjectives})
        clusters: list[list[str]] = []
        for prefix in prefixes:    # sorted, so a prefix comes right before the prefixes it is a prefix of
            if clusters and prefix.startswith(clusters[-1][0]):
                clusters[-1].append(prefix)
            else:
                clusters.append([prefix])
        self._blocks: list[str | list[str]] = []   # a prefix (one adjective) or the cluster's sorted keys
        self._starts: list[int] = []
        total = 0
        for cluster in clusters:
            self._starts.append(total)
            if len(cluster) == 1:
                self._blocks.append(cluster[0])
                total += len(self._nouns)
            else:
                keys = sorted({prefix + noun for prefix in cluster for noun in self._nouns})
                self._blocks.append(keys)
                total += len(keys)
        self._length = total

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"key index {index} out of range 0..{self._length - 1}")
        block = bisect.bisect_right(self._starts, index) - 1
        offset = index - self._starts[block]
        content = self._blocks[block]
        return content + self._nouns[offset] if isinstance(content, str) else content[offset]

    def __iter__(self) -> Iterator[str]:
        for content in self._blocks:
            if isinstance(content, str):
                yield from (content + noun for noun in self._nouns)
            else:
                yield from content


@functools.lru_cache(maxsize=1)
def adjective_noun_keys() -> AdjectiveNounKeys:
    """The NIAH key list (6,175,260 ``adjective-noun`` keys with wonderwords 2.2.0), sorted and
    de-duplicated as RULER's ``niah.py`` builds it; a lazy ``Sequence`` for ``random.choice``.
    ``ValueError`` when wonderwords is not 2.2.0. Source: RULER scripts/data/synthetic/niah.py at c3f5e3b."""
    return AdjectiveNounKeys(word_list("adjectivelist.txt"), word_list("nounlist.txt"))


@functools.lru_cache(maxsize=4)
def cwe_vocabulary(seed: int = 42) -> tuple[str, ...]:
    """The CWE word list: nouns + adjectives + verbs, de-duplicated, sorted, shuffled with a fresh
    ``random.Random(seed)`` (8169 words with wonderwords 2.2.0). ``ValueError`` when wonderwords is not
    2.2.0. Source: RULER scripts/data/synthetic/common_words_extraction.py at c3f5e3b."""
    words = sorted(set(word_list("nounlist.txt") + word_list("adjectivelist.txt") + word_list("verblist.txt")))
    random.Random(seed).shuffle(words)
    return tuple(words)
