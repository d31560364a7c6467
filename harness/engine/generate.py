"""Greedy prefill + decode with a compressor attached: the three small steps of gpt-fast's loop.

The prompt is prefilled in one forward (compression happens inside it, layer by layer); decoding
then feeds one token at a time with explicit position ids that continue from the original prompt
length (the compressed cache is shorter, the positions are not).

When to stop follows transformers' ``generate`` exactly (``Stopping``): ``min_new_tokens`` masks the
stop ids' logits until that many tokens exist (``MinNewTokensLengthLogitsProcessor``; the reference
scripts' ``min_length=context_length + 1`` is ``min_new_tokens=1``), a stop id ends generation and is
kept (``EosTokenCriteria``), and stop strings are matched by transformers' own ``StopStringCriteria``
on the end of the sequence, prompt included, one step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.engine import batched, compat, hook
from harness.engine.cache import make_cache
from harness.engine.hook import attach
from harness.engine.stopping import Stopping
from methods.base import ConfigError, KVCompressor


@dataclass
class Generation:
    """One prompt's greedy generation: the new token ids (a stop token included), their text (special
    tokens skipped), the prompt length in tokens, why it stopped, and the compressor's report (kept
    positions per layer; None for FullKV)."""

    token_ids: list[int]
    text: str
    prompt_length: int
    stopped_by: str          # "stop_token", "stop_string" or "max_new_tokens"
    report: dict | None      # what the compressor kept (None for FullKV)


def _greedy(logits: torch.Tensor, suppress: list[int] | None = None) -> torch.Tensor:
    """``logits [B, q, V]`` -> the argmax of the last position ``[B, 1]``, ``suppress`` ids masked."""
    last = logits[:, -1]
    if suppress:
        last = last.index_fill(-1, torch.tensor(suppress, device=last.device), float("-inf"))
    return last.argmax(dim=-1, keepdim=True)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, suppress: list[int] | None = None) -> torch.Tensor:
    """Prefill ``input_ids [1, n]`` into ``cache`` (from ``make_cache``); returns the greedy first token
    ``[1, 1]`` (``suppress``: ids it may not be, e.g. ``Stopping.suppressed(0)``). With a compressor
    attached (``harness.engine.hook.attach``) the cache is bound to it, compressed layer by layer during the
    forward, and verified afterwards (``hook.verify_compressed``): a prefill that was not compressed as
    configured raises ``hook.CompressionNotApplied``. Also raises ``CompressionNotApplied``
    (``hook.verify_seen``) when the model did not write ``cache``, and ``TypeError``/``ValueError``
    (``Controller.bind``) for a cache not from ``make_cache`` or not empty."""
    n = input_ids.shape[1]
    controller = hook.active_controller(model)
    if controller is not None:
        controller.bind(cache)
        sessions_before = controller.sessions_started
    positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
    logits = compat.forward_logits(model, input_ids, positions, cache)
    hook.verify_seen(cache, n)
    if controller is not None:
        controller.verify(cache, n, sessions_before)
    return _greedy(logits, suppress)


@torch.no_grad()
def decode_one(model, token: torch.Tensor, cache, position: int, suppress: list[int] | None = None) -> torch.Tensor:
    """One greedy step: ``token [B, 1]`` at ``position`` (the virtual length) -> the next ``[B, 1]``
    (int64 ids; ``suppress``: ids it may not be)."""
    positions = torch.full((token.shape[0], 1), position, device=token.device, dtype=torch.long)
    return _greedy(compat.forward_logits(model, token, positions, cache), suppress)


@torch.no_grad()
def extend(model, input_ids: torch.Tensor, cache, start: int, suppress: list[int] | None = None) -> torch.Tensor:
    """Append ``input_ids [1, q]`` uncompressed to a prefilled (and compressed) ``cache`` in one forward,
    at positions ``start .. start + q - 1`` (``start``: the tokens the cache has seen); returns the
    greedy next token ``[1, 1]`` (``suppress``: ids it may not be).

    This is kvpress's query-agnostic scope (``compression_scope=context``): the question, the chat
    template's end of turn and the answer prefix are fed after the context was compressed, attending
    to the kept context entries and causally to each other (``hook.appended_tokens_mask``). With a
    compressor attached the hook lets the forward through (``Controller.appending``) and compresses
    nothing. Raises ``CompressionNotApplied`` (``hook.verify_seen``) when the model did not write
    ``cache``."""
    controller = hook.active_controller(model)
    q = input_ids.shape[1]
    positions = torch.arange(start, start + q, device=input_ids.device).unsqueeze(0)
    if controller is not None:
        controller.appending = True
    try:
        logits = compat.forward_logits(model, input_ids, positions, cache)
    finally:
        if controller is not None:
            controller.appending = False
    hook.verify_seen(cache, start + q)
    return _greedy(logits, suppress)


def decode_loop(model, first_token: torch.Tensor, cache, prompt_length: int, max_new_tokens: int,
                stopping: Stopping) -> tuple[list[int], str]:
    """Greedy decoding from the first generated token; returns the tokens and why it stopped.

    ``first_token``: ``[1, 1]``, the prefill's greedy token; ``prompt_length`` and ``max_new_tokens`` in
    tokens. Returns ``(tokens, stopped_by)``: at most ``max_new_tokens`` ids, ``first_token`` first, and
    ``"stop_token"``, ``"stop_string"`` or ``"max_new_tokens"``. Raises ``CompressionNotApplied``
    (``hook.verify_seen``) when a decode step did not write ``cache``."""
    tokens: list[int] = []
    token = first_token
    reason = None
    for step in range(max_new_tokens):
        tokens.append(int(token))
        reason = stopping.reason(tokens)
        if reason:
            break
        if step + 1 < max_new_tokens:
            token = decode_one(model, token, cache, prompt_length + step, stopping.suppressed(step + 1))
    hook.verify_seen(cache, prompt_length + len(tokens) - 1)   # every decode step wrote this cache
    return tokens, reason or "max_new_tokens"


DECODE_MODES = ("batched", "plain")
#: a run's ``decode`` setting: the engine's modes, and ``continuous`` (the rows of many samples decoded together by
#: ``harness.engine.continuous.decode_rows``; a mode of the runner, not of ``generate``/``generate_many``)
RUN_DECODE_MODES = (*DECODE_MODES, "continuous")


def check_decode(decode: str, decode_batch=16, modes: tuple = DECODE_MODES) -> None:
    """Check the decode settings. Raises ``ConfigError`` when ``decode`` is not in ``modes`` (``DECODE_MODES``;
    a run's setting: ``RUN_DECODE_MODES``) or ``decode_batch`` is not a positive integer (a bool is rejected)."""
    if decode not in modes:
        continuous = " or 'continuous' (the rows of many samples together, refilled as they finish)" if (
            "continuous" in modes) else ""
        raise ConfigError(f"decode={decode!r} is not one of {modes}: 'batched' (fixed-shape slots, CUDA graphs "
                          "on a GPU; the default), 'plain' (one model call per token on the growing cache)"
                          f"{continuous}")
    if isinstance(decode_batch, bool) or not isinstance(decode_batch, int) or decode_batch < 1:
        raise ConfigError(f"decode_batch={decode_batch!r} must be a positive integer (the most variants decoded "
                          "together, e.g. 16)")


def check_split(prompt_length: int, compressed_tokens: int | None) -> int:
    """The number of prompt tokens prefilled and compressed: ``prompt_length`` for None, else
    ``compressed_tokens`` when ``1 <= compressed_tokens <= prompt_length`` (ValueError otherwise)."""
    if compressed_tokens is None:
        return prompt_length
    if not 1 <= compressed_tokens <= prompt_length:
        raise ValueError(f"compressed_tokens={compressed_tokens} must be in [1, {prompt_length}] (the prompt's length); "
                         "fix: None to compress the whole prompt, or the length of the part to compress")
    return int(compressed_tokens)


def check_request(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """One prompt (``input_ids [1, n]``) and at least one new token, else ``ValueError``."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"generation takes one prompt at a time; got batch {input_ids.shape[0]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")


def generate(model, tokenizer, input_ids: torch.Tensor, compressor: KVCompressor, max_new_tokens: int,
             stop_token_ids=(), stop_strings=(), min_new_tokens: int = 0, decode: str = "batched",
             cuda_graphs: bool = True, compile: bool = False, compressed_tokens: int | None = None) -> Generation:
    """Greedy generation of one prompt ``input_ids [1, n]`` with ``compressor`` attached.

    ``compressed_tokens``: None or ``n`` (the whole prompt is prefilled and compressed), or ``c < n``: the
    first ``c`` tokens are prefilled and compressed and the rest appended uncompressed (``extend``), the
    protocol's ``compression_scope``. A compressor with a ``compression_ratio`` is resolved to the
    token budget of the compressed part first (``KVCompressor.resolved``).

    Stops as transformers' ``generate`` would (``Stopping``): after a stop token (special tokens are
    left out of the text, as ``decode(..., skip_special_tokens=True)`` does), once the sequence ends in
    a stop string (the text keeps it), or after ``max_new_tokens``; ``min_new_tokens`` masks the stop
    ids until that many tokens exist. ``decode="batched"`` decodes from fixed-shape buffers
    (``harness.engine.batched``; a CUDA graph per step on a GPU), ``"plain"`` calls the model per token on the
    growing cache; greedy tokens are the same. A model spread over several devices always decodes plain.

    Raises ``ConfigError`` for an unknown ``decode`` (``check_decode``) and from ``attach``;
    ``ValueError`` when ``input_ids`` holds more than one prompt, ``max_new_tokens < 1`` or
    ``min_new_tokens < 0``; ``CompressionNotApplied``/``IntegrationError`` when the compressor was not
    applied as configured or transformers' conventions differ.
    """
    check_decode(decode)
    check_request(input_ids, max_new_tokens)
    n = input_ids.shape[1]
    c = check_split(n, compressed_tokens)
    compressor = compressor.resolved(c)
    stopping = Stopping(tokenizer, stop_token_ids, min_new_tokens, stop_strings, input_ids[0].tolist())
    cache = make_cache(model)
    with attach(model, compressor) as controller:
        first = prefill(model, input_ids[:, :c], cache, stopping.suppressed(0))
        if c < n:
            first = extend(model, input_ids[:, c:], cache, c, stopping.suppressed(0))
        if decode == "batched" and batched.spans_devices(cache):
            decode = "plain"   # a model split over devices: the plain path (same tokens)
        if decode == "plain":
            with batched.decoding_row(model, 0):
                tokens, stopped_by = decode_loop(model, first, cache, n, max_new_tokens, stopping)
        report = controller.report
    if decode == "batched":
        [(tokens, stopped_by)] = batched.decode_caches(model, first, [cache], n, max_new_tokens, stopping,
                                                       cuda_graphs=cuda_graphs, compile=compile)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(tokens, text, n, stopped_by, report)
