"""Shared prefill: prefill a prompt once and compress it many ways.

Compression happens after each layer's attention, so the prefill is the same for every method and
budget (DESIGN.md, speed principles). ``prefill_once`` runs the model once with the full cache and
captures the post-RoPE queries each method needs; ``compressed_cache`` then builds, for one
compressor, exactly the cache the hook would have built during that prefill (same tensors, same
``CompressionSession``), and ``generate_many`` decodes each variant from it. Results equal the
one-method-at-a-time path token for token (tests/test_shared.py).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from harness.engine import hook
from harness.engine.batched import DecodeStats, decode_caches, decoding_row, spans_devices
from harness.engine.cache import make_cache, text_config
from harness.engine.compat import check_query_layout
from harness.engine.generate import Generation, check_decode, check_request, check_split, decode_loop, extend, prefill
from harness.engine.stopping import Stopping
from methods.base import KVCompressor


class QueryCapture:
    """Stands in for a hook controller: records the trailing ``count`` queries of each layer."""

    def __init__(self, count_for_length, query_heads: int):
        self.count_for_length = count_for_length
        self.query_heads = query_heads
        self.queries: dict[int, torch.Tensor] = {}

    def capture(self, layer_idx: int, query: torch.Tensor) -> None:
        """Keep the last ``count_for_length(q)`` queries ``[B, Hq, c, d]`` of layer ``layer_idx``'s
        forward of ``q`` tokens. Raises ``IntegrationError`` when ``query`` is not
        ``[B, query_heads, q, d]``."""
        check_query_layout(layer_idx, query, self.query_heads)
        self.queries[layer_idx] = query[:, :, -self.count_for_length(query.shape[2]):]


@dataclass
class SharedPrefill:
    """What ``prefill_once`` keeps of one prompt: the full cache after prefill, the post-RoPE queries
    per compressed model layer (``[1, Hq, c, d]``, ``c`` the most any compressor reads), the compressed
    model layers, the greedy first token ``[1, 1]`` and the prompt length in tokens."""

    cache: object                 # the full cache after prefill
    queries: dict[int, torch.Tensor]
    layers: list[int]             # compressed (full-attention) model layers
    first_token: torch.Tensor     # [1, 1]
    prompt_length: int


def prefill_once(model, input_ids: torch.Tensor, compressors: list[KVCompressor],
                 suppress: list[int] | None = None) -> SharedPrefill:
    """One full prefill, keeping what every compressor in ``compressors`` will read (``suppress``: ids
    the first token may not be).

    ``input_ids``: ``[1, n]``. Raises ``CompressionNotApplied`` when the wrapped attention function
    never ran for some full-attention layer (its queries were not captured), and ``IntegrationError``
    from ``hook.routed`` or a query layout check."""
    def needed(n):
        return max([c.query_count(n) for c in compressors if not c.is_noop] or [1])
    capture = QueryCapture(needed, text_config(model.config).num_attention_heads)
    cache = make_cache(model)
    with hook.routed(model, capture) as layers:
        first = prefill(model, input_ids, cache, suppress)
    unseen = [idx for idx in layers if idx not in capture.queries]
    if unseen:
        raise hook.CompressionNotApplied(f"shared prefill: the wrapped attention function never ran for layers {unseen}, "
                                         "so their queries were not captured and they cannot be compressed")
    return SharedPrefill(cache, capture.queries, layers, first, input_ids.shape[1])


def compressed_cache(shared: SharedPrefill, compressor: KVCompressor):
    """A fresh cache for ``compressor`` built from the shared prefill, plus the session report.

    The layers are shallow copies (the shared cache stays full); compressed layers get the session's
    ``Kept`` through ``CompressedLayer.replace``. Returns ``(cache, report)``, the report None for
    FullKV. Raises ``CompressionNotApplied`` (``hook.verify_compressed``) when the cache does not hold
    what the session returned, and passes on the session's errors."""
    cache = copy.copy(shared.cache)
    cache.layers = [copy.copy(layer) for layer in shared.cache.layers]   # decoding rebinds, never mutates
    if compressor.is_noop:
        return cache, None
    session = compressor.new_session(len(shared.layers))
    updates = {}
    for position, layer_idx in enumerate(shared.layers):
        layer = cache.layers[layer_idx]
        query = shared.queries[layer_idx]
        query = query[:, :, -compressor.query_count(shared.prompt_length):]
        updates.update(session.add_layer(position, layer.keys, layer.values, query))
    updates.update(session.finish())
    for position, kept in updates.items():
        if not kept.whole:
            cache.layers[shared.layers[position]].replace(kept.keys, kept.values, kept.positions)
    hook.verify_compressed(cache, shared.layers, updates, shared.prompt_length, compressor, session)
    report = session.report()
    for entry in report["layers"]:
        entry["model_layer"] = shared.layers[entry["layer"]]
    return cache, report


def prefill_variants(model, tokenizer, input_ids: torch.Tensor, compressors: list[KVCompressor], max_new_tokens: int,
                     stop_token_ids=(), stop_strings=(), min_new_tokens: int = 0,
                     compressed_tokens: int | None = None) -> tuple[list[KVCompressor], Stopping, SharedPrefill, int]:
    """The shared prefill of one prompt ``input_ids [1, n]`` for ``compressors``: ``(compressors resolved to the
    budget of the compressed part, the prompt's Stopping, the SharedPrefill of its first c tokens, c)``. Raises
    ``ValueError`` for more than one prompt, ``max_new_tokens < 1`` or a bad ``compressed_tokens``, and what
    ``require_full_attention`` and ``prefill_once`` raise."""
    check_request(input_ids, max_new_tokens)
    c = check_split(input_ids.shape[1], compressed_tokens)
    compressors = [compressor.resolved(c) for compressor in compressors]
    for compressor in compressors:
        hook.require_full_attention(model, compressor)
    stopping = Stopping(tokenizer, stop_token_ids, min_new_tokens, stop_strings, input_ids[0].tolist())
    return compressors, stopping, prefill_once(model, input_ids[:, :c], compressors, stopping.suppressed(0)), c


@torch.no_grad()
def generate_many(model, tokenizer, input_ids: torch.Tensor, compressors: list[KVCompressor], max_new_tokens: int,
                  stop_token_ids=(), stop_strings=(), min_new_tokens: int = 0, decode: str = "batched",
                  cuda_graphs: bool = True, max_batch: int = 16, stats: DecodeStats | None = None,
                  compile: bool = False, compressed_tokens: int | None = None) -> list[Generation]:
    """Greedy generation of one prompt under every compressor, with one shared prefill.

    ``compressed_tokens``: as ``harness.engine.generate.generate``: only the first ``c`` tokens are
    prefilled (once) and compressed; each variant then appends the rest uncompressed to its own cache
    (``extend``) and decodes from its own first token. Compressors with a ``compression_ratio`` are
    resolved to the budget of the compressed part.

    ``decode="batched"`` decodes all variants together from fixed-shape buffers (``harness.engine.batched``,
    CUDA graphs on a GPU, at most ``max_batch`` rows a group); ``"plain"`` decodes them one at a time
    with a model call per token. Greedy tokens are the same (tests/test_batched.py).

    ``input_ids``: ``[1, n]``. Returns one ``Generation`` per compressor, in order. Raises
    ``ConfigError`` for an unknown ``decode`` or a bad ``max_batch`` (``check_decode``) and for a
    compressor on a model without full-attention layers; ``ValueError`` when ``min_new_tokens < 0``;
    ``CompressionNotApplied``/``IntegrationError`` as ``prefill_once``, ``compressed_cache`` and the
    decoders raise them; ``ValueError`` (as ``generate``) for more than one prompt or
    ``max_new_tokens < 1``.
    """
    check_decode(decode, max_batch)
    compressors, stopping, shared, c = prefill_variants(model, tokenizer, input_ids, compressors, max_new_tokens,
                                                        stop_token_ids, stop_strings, min_new_tokens, compressed_tokens)
    n = input_ids.shape[1]
    if decode == "batched" and spans_devices(shared.cache):
        decode = "plain"     # a model split over devices (device_map): one variant at a time, same tokens
    if decode == "batched":
        built = [compressed_cache(shared, compressor) for compressor in compressors]
        firsts = shared.first_token
        if c < n:
            firsts = torch.cat([appended(model, compressor, cache, input_ids[:, c:], c, stopping)
                                for compressor, (cache, _) in zip(compressors, built)])
        decoded = decode_caches(model, firsts, [cache for cache, _ in built], n, max_new_tokens, stopping,
                                cuda_graphs=cuda_graphs, max_batch=max_batch, stats=stats, compile=compile)
        return [Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), n, stopped_by, report)
                for (tokens, stopped_by), (_, report) in zip(decoded, built)]
    out = []
    for row, compressor in enumerate(compressors):
        cache, report = compressed_cache(shared, compressor)
        first = shared.first_token
        if c < n:
            first = appended(model, compressor, cache, input_ids[:, c:], c, stopping)
        attach = contextlib.nullcontext() if compressor.is_noop else hook.attach(model, compressor)
        with attach as controller:  # decoding a query-head cache needs the attention wrapper
            if controller is not None:
                controller.bind(cache, fresh=False)
            with decoding_row(model, row):    # attached K/V transforms: the generated tokens' ranks are this row's
                tokens, stopped_by = decode_loop(model, first, cache, n, max_new_tokens, stopping)
        out.append(Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), n, stopped_by, report))
    return out


def appended(model, compressor: KVCompressor, cache, suffix_ids: torch.Tensor, start: int,
             stopping: Stopping) -> torch.Tensor:
    """``extend`` one variant's cache with the uncompressed rest of the prompt ``[1, q]``; its first
    token ``[1, 1]``. A query-head cache needs the attention wrapper, so the compressor is attached
    (bound to this cache, compressing nothing)."""
    attach = contextlib.nullcontext() if compressor.is_noop else hook.attach(model, compressor)
    with attach as controller:
        if controller is not None:
            controller.bind(cache, fresh=False)
        return extend(model, suffix_ids, cache, start, stopping.suppressed(0))
