"""Perplexity over a text file with a sliding window (the standard strided evaluation of transformers'
perplexity guide, as DynaKV reports WikiText-2 and C4 perplexity: reference-dynakv.md sections 6-7).

The text is tokenized once, without special tokens, and read in windows whose starts advance by
``stride``: each window scores only the tokens no earlier window scored (its last ``end - previous end``
tokens), with the window's earlier tokens as context. ``bos`` (null: what the tokenizer does by default)
puts the tokenizer's BOS before every window, unscored, inside ``context_length``: models trained with a
BOS (Gemma 3) are far off without it (the guide's GPT-2 has none). Without BOS a window's first token has
no context and is not scored. Perplexity = ``exp(total NLL / scored tokens)``. Every window is one sample
(``w<index>``), so a run resumes window by window; the rows hold each window's NLL sum and token count,
and ``scores.json`` the perplexity.

Text files: ``.txt`` / ``.raw`` (WikiText-2's ``wiki.test.raw``: the file as is) or ``.jsonl[.gz]`` with a
``text`` field per line (C4: documents joined by ``"\\n\\n"``). ``label`` names the text in the results
(e.g. that ``../shared``'s WikiText-2 is a reconstruction, not checksum-verified).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from pathlib import Path

from harness.run import results
from harness.tasks import checks
from harness.tasks.base import Sample, Task
from methods import ConfigError


def read_text(path: str) -> str:
    """The text of ``path``: a plain file, or the ``text`` fields of a ``.jsonl``/``.jsonl.gz`` joined by blank
    lines. ConfigError for a missing file or a JSON line without ``text``."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"task.text_path={str(path)!r} is not a file; fix: a .txt/.raw file or a .jsonl(.gz) with a "
                          "'text' field (e.g. ../shared/data/text/wikitext-2-raw-reconstructed/wiki.test.raw)")
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as f:
        if ".jsonl" not in file.name:
            return f.read()
        texts = []
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{file}:{number}: not JSON ({error.msg}); fix: one JSON object per line") from None
                if not isinstance(row, dict) or "text" not in row:
                    raise ConfigError(f"{file}:{number}: no 'text' field; fix: one JSON object with 'text' per line")
                texts.append(row["text"])
    return "\n\n".join(texts)


def _token_ids(path: str, tokenizer, max_tokens: int | None) -> tuple[int, ...]:
    stat = Path(str(path)).expanduser().stat()     # a rewritten file is tokenized again
    return _cached_ids(str(path), stat.st_mtime_ns, stat.st_size, tokenizer, max_tokens)


@functools.lru_cache(maxsize=2)
def _cached_ids(path: str, mtime_ns: int, size: int, tokenizer, max_tokens: int | None) -> tuple[int, ...]:
    ids = tokenizer(read_text(path), add_special_tokens=False).input_ids
    return tuple(ids[:max_tokens] if max_tokens else ids)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS first by default."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x").input_ids[:1] == [bos]


def uses_bos(cfg, tokenizer) -> bool:
    """``task.bos``, or where null whether the tokenizer puts its BOS first by default (``adds_bos``)."""
    return bool(cfg.bos) if cfg.get("bos") is not None else adds_bos(tokenizer)


def windows(total: int, context_length: int, stride: int, bos: bool = False) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window over ``total`` text tokens: windows of ``context_length`` tokens
    (one of them the BOS with ``bos``) starting every ``stride`` tokens, each scoring its last
    ``scored = min(end - previous end, end - begin - 1 + bos)`` tokens (without BOS a window's first token
    has no context in it), until the end of the text."""
    out, previous = [], 0
    length = context_length - int(bos)
    for begin in range(0, total, stride):
        end = min(begin + length, total)
        scored = min(end - previous, end - begin - 1 + int(bos))
        if scored > 0:
            out.append((begin, end, scored))
        previous = end
        if end == total:
            break
    return out


def build_samples(cfg, tokenizer, count_tokens=None, **_) -> list[Sample]:
    """One sample per window (its token range in ``meta``; the ids are re-read from the cached tokenization
    when evaluated)."""
    ids = _token_ids(str(cfg.text_path), tokenizer, cfg.get("max_tokens"))
    if len(ids) < 2:
        raise ConfigError(f"task.text_path={cfg.text_path!r} holds {len(ids)} token(s); fix: a longer text")
    bos = uses_bos(cfg, tokenizer)
    return [Sample(id=f"w{i}", prompt="", answers=[], max_new_tokens=1,
                   meta={"begin": begin, "end": end, "scored_tokens": scored, "bos": bos})
            for i, (begin, end, scored) in enumerate(windows(len(ids), int(cfg.context_length), int(cfg.stride),
                                                             bos))]


def evaluate(cfg, lm, sample: Sample) -> dict:
    """One window's row fields: ``nll`` (sum of the negative log-likelihoods of its scored tokens, nats),
    ``scored_tokens`` and ``score`` (the window's own perplexity, which every row needs; the run's
    perplexity is ``finalize``'s, not a mean of these)."""
    import torch
    import torch.nn.functional as F
    ids = _token_ids(str(cfg.text_path), lm.tokenizer, cfg.get("max_tokens"))
    begin, end, scored = sample.meta["begin"], sample.meta["end"], sample.meta["scored_tokens"]
    device = next(lm.model.parameters()).device
    prefix = [lm.tokenizer.bos_token_id] if sample.meta["bos"] else []
    window = torch.tensor([prefix + list(ids[begin:end])], device=device)
    with torch.no_grad():
        logits = lm.model(input_ids=window, use_cache=False).logits[0, -scored - 1:-1].float()
    nll = float(F.cross_entropy(logits, window[0, -scored:], reduction="sum"))
    return {"nll": nll, "scored_tokens": scored, "score": math.exp(nll / scored)}


def finalize(folder: Path) -> dict:
    """``perplexity`` = exp(total NLL / scored tokens) over the finished windows, the token count, and
    ``score`` = the perplexity."""
    rows = list(results.finished(folder).values())
    nll, tokens = sum(r["nll"] for r in rows), sum(r["scored_tokens"] for r in rows)
    perplexity = math.exp(nll / tokens) if tokens else float("nan")
    return {"perplexity": round(perplexity, 4), "scored_tokens": tokens, "score": round(perplexity, 4)}


def validate(cfg) -> None:
    """Before the model loads: the text file, lengths and the method (perplexity reads every token's
    logits in one forward: an end-of-prefill eviction method has nothing to act on; FullKV, alone or with a
    K/V transform, which acts on every token)."""
    task = cfg.task
    if not task.get("text_path"):
        raise ConfigError("task=perplexity needs task.text_path (or KV_HARNESS_PERPLEXITY_TEXT); fix: "
                          "task.text_path=<a .txt/.raw file or a .jsonl(.gz) with 'text'>")
    read_text(task.text_path)      # the file exists and parses
    checks.positive_int("task.context_length", task.get("context_length"))
    if task.context_length < 2:
        raise ConfigError(f"task.context_length={task.context_length}: a window needs at least 2 tokens; fix: e.g. 1024")
    limit, why = checks.model_limit(cfg)
    if limit and task.context_length > limit:
        raise ConfigError(f"task.context_length={task.context_length} is more than {limit}{why}; fix: at most {limit}")
    checks.positive_int("task.stride", task.get("stride"))
    checks.positive_int("task.max_tokens", task.get("max_tokens"), allow_none=True)
    if task.stride > task.context_length:
        raise ConfigError(f"task.stride={task.stride} is larger than task.context_length={task.context_length}: tokens "
                          "between windows would never be scored; fix: a stride up to the context length")
    from methods.base import TRANSFORM_KNOBS
    names = list(cfg.methods or [cfg.method.name])
    allowed = ["fullkv", *TRANSFORM_KNOBS]
    if any(name not in allowed for name in names):
        raise ConfigError(f"task=perplexity runs FullKV or a K/V transform alone ({allowed}), got {names}: "
                          "end-of-prefill eviction has no effect on a single forward's logits; fix: method=fullkv or "
                          "methods=[fullkv,dynakv,...]")


def data_identity(cfg) -> dict:
    return {"text_sha256": results.file_sha256(Path(str(cfg.task.text_path)).expanduser()),
            "label": cfg.task.get("label")}


def scores(prediction: str, sample: Sample) -> dict:      # unused: evaluate gives the row's fields
    raise NotImplementedError("perplexity rows come from evaluate()")


TASK = Task(name="perplexity", validate=validate, data_identity=data_identity, build_samples=build_samples,
            scores=scores, finalize=finalize, evaluate=evaluate)
