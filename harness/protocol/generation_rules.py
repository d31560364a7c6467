"""A protocol's per-dataset generation rules: the stop ids and ``min_new_tokens`` its reference script
passes to ``generate``.

Protocol config (``conf/protocol/*.yaml``)::

    stop_tokens:    {default: [generation_config], samsum: [eos, "\\n"]}
    min_new_tokens: {default: 0, samsum: 1}

Keys are dataset names as the reference script compares them (LongBench's base names, which
LongBench-E shares: pred.py loads ``samsum_e`` but tests ``dataset == "samsum"``); ``default`` applies
to every other dataset and to the non-LongBench tasks. A stop list *replaces* the model's stop ids, as
pred.py's ``eos_token_id=[...]`` does; its entries are:

* ``generation_config``: the model's ``generation_config.eos_token_id`` (what ``generate`` stops on when
  the script passes nothing);
* ``model``: the model config's stop ids (the generation config's, the tokenizer's EOS, and the model
  file's ``extra_stop_tokens`` such as Llama-3's ``<|eot_id|>``: KVCache-Factory issue #46);
* ``eos``: ``tokenizer.eos_token_id``;
* any other text: the last token id of ``tokenizer.encode(text, add_special_tokens=False)`` (pred.py's
  ``"\\n"``).
"""

from __future__ import annotations

from methods.base import ConfigError

SYMBOLS = ("generation_config", "model", "eos")


def _table(protocol, key: str) -> dict:
    table = protocol.get(key)
    if table is None or not hasattr(table, "keys") or "default" not in table:
        raise ConfigError(f"protocol {protocol.get('name')!r}: {key} must map dataset names (and 'default') to its "
                          f"rule, e.g. {key}: {{default: ..., samsum: ...}}; got {table!r}")
    return table


def check(protocol) -> None:
    """Before the model loads: both tables exist and every entry has the right type."""
    for dataset, entries in _table(protocol, "stop_tokens").items():
        if isinstance(entries, str) or not all(isinstance(e, str) and e for e in entries):
            raise ConfigError(f"protocol.stop_tokens.{dataset}={entries!r} must be a list of {list(SYMBOLS)} or texts, "
                              "e.g. [eos, \"\\n\"]")
    for dataset, count in _table(protocol, "min_new_tokens").items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"protocol.min_new_tokens.{dataset}={count!r} must be an integer >= 0")


def rule(protocol, key: str, dataset: str | None):
    table = _table(protocol, key)
    return table[dataset] if dataset is not None and dataset in table else table["default"]


def stop_ids(protocol, dataset: str | None, lm) -> list[int]:
    """The stop ids of ``dataset`` (None: the default rule) for the loaded model ``lm``."""
    tokenizer = lm.tokenizer
    ids: list[int] = []
    for entry in rule(protocol, "stop_tokens", dataset):
        if entry == "generation_config":
            eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
            ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        elif entry == "model":
            ids += lm.stop_token_ids
        elif entry == "eos":
            if tokenizer.eos_token_id is None:
                raise ConfigError("protocol.stop_tokens names eos, but this tokenizer has no eos_token")
            ids.append(tokenizer.eos_token_id)
        else:
            encoded = tokenizer.encode(entry, add_special_tokens=False)
            if not encoded:
                raise ConfigError(f"protocol.stop_tokens: {entry!r} encodes to no token with this tokenizer")
            ids.append(encoded[-1])
    return sorted({int(i) for i in ids})


def min_new_tokens(protocol, dataset: str | None) -> int:
    return int(rule(protocol, "min_new_tokens", dataset))
