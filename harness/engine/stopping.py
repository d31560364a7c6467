"""When greedy generation stops: transformers' ``generate`` semantics, shared by the plain loop
(``harness.engine.generate``) and the batched one (``harness.engine.batched``).

* ``min_new_tokens``: the stop ids' logits are -inf while fewer new tokens exist
  (``MinNewTokensLengthLogitsProcessor``); LongBench's ``pred.py`` passes ``min_length=context_length + 1``
  for samsum, which is ``min_new_tokens=1``: the first token cannot be a stop token.
* stop ids (``eos_token_id``): generation ends on one; it is kept (``EosTokenCriteria``).
* stop strings: transformers' own ``StopStringCriteria``: a match needs the stop string to end in the
  last token and may start in the prompt; checked on the last few tokens only, one step at a time.
* ``max_new_tokens``.
"""

from __future__ import annotations

import weakref

import torch


class Stopping:
    """When greedy generation of one prompt stops, with the semantics of transformers' ``generate``.

    stop_ids:       token ids that end generation (``eos_token_id``); the stop token is kept.
    min_new_tokens: while fewer new tokens exist, the stop ids' logits are -inf (they cannot be chosen).
    stop_strings:   generation ends once the sequence ends in a token that completes one of them
                    (transformers' ``StopStringCriteria``, which may match across the prompt's end).
    prompt_ids:     the prompt (only its last tokens are kept, for stop strings that start in it).

    Raises ``ValueError`` when ``min_new_tokens < 0``.
    """

    def __init__(self, tokenizer, stop_ids=(), min_new_tokens: int = 0, stop_strings=(), prompt_ids=()):
        if min_new_tokens < 0:
            raise ValueError(f"min_new_tokens={min_new_tokens} must be >= 0")
        self.stop_ids = sorted({int(t) for t in stop_ids})
        self._stop_set = frozenset(self.stop_ids)
        self.min_new_tokens = int(min_new_tokens)
        self.stop_strings = list(stop_strings)
        self.criteria = _stop_string_criteria(tokenizer, tuple(self.stop_strings)) if self.stop_strings else None
        tail = self.criteria.maximum_token_len if self.criteria is not None else 0
        self.prompt_tail = [int(t) for t in list(prompt_ids)[-tail:]] if tail else []

    def suppressed(self, new_tokens: int) -> list[int]:
        """Ids whose logits are masked when choosing new token number ``new_tokens`` (0-based)."""
        return self.stop_ids if new_tokens < self.min_new_tokens else []

    def reason(self, tokens: list[int]) -> str | None:
        """Why generation ends after the new ``tokens`` (``"stop_token"``, ``"stop_string"``), or None."""
        if tokens[-1] in self._stop_set:
            return "stop_token"
        if self.criteria is not None:
            window = (self.prompt_tail + tokens)[-self.criteria.maximum_token_len:]
            if bool(self.criteria(torch.tensor([window]), None)[0]):
                return "stop_string"
        return None


_CRITERIA: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _stop_string_criteria(tokenizer, stop_strings: tuple[str, ...]):
    """transformers' ``StopStringCriteria`` (its vocabulary tables take a moment to build: one per
    tokenizer and stop strings, kept while the tokenizer lives)."""
    from transformers import StopStringCriteria
    per_tokenizer = _CRITERIA.setdefault(tokenizer, {})
    if stop_strings not in per_tokenizer:
        per_tokenizer[stop_strings] = StopStringCriteria(tokenizer, list(stop_strings))
    return per_tokenizer[stop_strings]
