"""Text for calibration and post-training: token windows cut from text files (reference-dynakv.md section 3:
plain next-token prediction on web/book text; ``../shared/data/text/`` has Project Gutenberg books, C4 and
WikiText-2; read its SOURCES.md).

Files are read in sorted order (a directory: every ``*.txt``, ``*.raw``, ``*.txt.gz``, ``*.jsonl(.gz)`` in it,
sorted by name); each document is tokenized on its own without special tokens, documents are joined by the
tokenizer's EOS, and the stream is cut into windows of ``seq_len`` tokens, each starting with BOS where the
tokenizer adds one by default. Deterministic: the same files and tokenizer give the same windows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from methods import ConfigError

SUFFIXES = (".txt", ".raw", ".txt.gz", ".jsonl", ".jsonl.gz")


def text_files(paths) -> list[Path]:
    """The text files ``paths`` name (files, or directories searched one level deep), sorted within each
    directory. ConfigError for a path that does not exist or a directory without text files."""
    files = []
    for item in paths:
        path = Path(str(item)).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise ConfigError(f"{path} holds no text file ({', '.join(SUFFIXES)}); fix: a folder of such files")
            files += found
        else:
            raise ConfigError(f"--text {item}: no such file or folder; fix: text files or folders, e.g. "
                              "../shared/data/text/gutenberg")
    if not files:
        raise ConfigError("no text given; fix: --text <files or folders>")
    return files


def token_windows(tokenizer, paths, tokens: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """``(windows [N, seq_len] int64, record)``: the first ``tokens`` tokens (rounded down to whole windows) of
    the files in ``paths``. ``record``: the files read (name, sha256 of their bytes), the window count and
    tokens. ConfigError when the files hold fewer than one window."""
    from harness.tasks.perplexity import adds_bos, read_text
    if seq_len < 2:
        raise ConfigError(f"--seq-len {seq_len}: a window needs at least 2 tokens; fix: e.g. 1024")
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seq_len - (bos is not None)
    eos = tokenizer.eos_token_id
    needed = max(1, tokens // seq_len) * body
    stream: list[int] = []
    used = []
    for file in text_files(paths):
        if len(stream) >= needed:
            break
        ids = tokenizer(read_text(str(file)), add_special_tokens=False)["input_ids"]
        stream += ids + ([eos] if eos is not None else [])
        used.append({"file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()})
    count = min(len(stream), needed) // body
    if count == 0:
        raise ConfigError(f"the text holds {len(stream)} tokens, fewer than one window of {seq_len}; fix: more text "
                          "or a shorter --seq-len")
    if count * seq_len < tokens - seq_len:
        import logging
        logging.getLogger(__name__).warning("the text holds %d tokens: %d windows of %d (%d tokens), not the %d asked "
                                            "for", len(stream), count, seq_len, count * seq_len, tokens)
    windows = torch.tensor(stream[: count * body], dtype=torch.int64).view(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows, {"files": used, "windows": count, "seq_len": seq_len, "tokens": count * seq_len,
                     "bos": bos is not None}

