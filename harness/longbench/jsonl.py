"""The line loop shared by LongBench's two JSONL readers: the official data files
(``harness.tasks.longbench.read_rows``) and our prediction files (``harness.longbench.score``).

Both split on ``"\\n"`` only, as LongBench's pred.py and eval.py read their files (``str.splitlines``
would also cut a row at U+2028), skip blank lines and want one JSON object per line; each reader
words its own error messages, since the fix differs (re-download a data file, re-run a dataset).
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

NotJson = Callable[[str, json.JSONDecodeError], Exception]
NotObject = Callable[[str, object], Exception]


def numbered_objects(path, text: str, not_json: NotJson, not_object: NotObject) -> Iterator[tuple[str, int, dict]]:
    """``(where, line number, object)`` for each non-blank line of ``text`` (read from ``path``;
    ``where`` is ``"<path>:<line>"``, lines counted from 1). A line that is not valid JSON raises
    ``not_json(where, error)``, one that is JSON but not an object raises ``not_object(where, value)``
    (both without the decoder's traceback attached)."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise not_json(where, error) from None
        if not isinstance(row, dict):
            raise not_object(where, row)
        yield where, number, row
