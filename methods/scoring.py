"""Observation-window scores and pooling: the scorer shared by SnapKV, PyramidKV and DynamicKV.

Numerics follow the reference code step by step, because max pooling turns local peaks into
plateaus of equal scores and ``torch.topk``'s tie-break then decides which token survives
(spec: reference-methods.md section 1 and section 9, items 1-2; KVCache-Factory
``SnapKVCluster.update_kv`` at ffac160; the original FasterDecoding/SnapKV ``snapkv_utils.py``):

1. ``A = (q_window @ k^T) / sqrt(d)`` in the model dtype, ``[B, H, w, n]``;
2. a causal mask inside the trailing ``w x w`` block only (``finfo.min`` where key > query), the
   prefix stays fully visible to every window query;
3. softmax over all ``n`` keys in float32, cast back to the model dtype;
4. sum over the window queries of the mass on the prefix keys ``[0, n - w)`` (model dtype);
5. (``kv_head`` granularity) mean over each query group, in the model dtype;
6. 1-D pooling, stride 1, padding ``kernel // 2`` (avg counts the padding).

Only ``w x n`` scores are ever formed: no ``n x n`` attention matrix.

float16 (KVCache-Factory's default dtype) is the one documented exception. The product ``q @ k^T``
is formed *before* the division by sqrt(d), so a large dot product (|q.k| > 65504) overflows to inf
in float16: a row holding +inf, or only -inf, has a NaN softmax, the NaN spreads through the sum to
every score of the head, and ``topk`` keeps arbitrary tokens. ``attention_probs`` recomputes exactly
those rows (NaN after the reference's softmax) from float32 logits; every other row keeps the
reference's float16 numerics bit for bit, and bfloat16 and float32 inputs take the reference path only.
For the observation window (a few dozen query rows) the float32 logits are always formed and picked
per row, which needs no host synchronisation; for H2O's all-query chunks (``sync_free=False``) they are
formed only when a chunk has such a row, at the price of one host synchronisation per chunk (float16
only).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from methods.base import repeat_heads


def attention_logits(queries: torch.Tensor, keys: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """``queries [B, H, m, d] @ keys [B, H, n, d]^T`` scaled like the reference: ``[B, H, m, n]``.

    The product is formed in the inputs' dtype *before* scaling (the reference order; see the module
    docstring for float16 overflow), then divided by ``sqrt(d)``, or multiplied by ``scaling`` when
    given. Both heads axes must match (keys already repeated to the query heads).
    """
    logits = torch.matmul(queries, keys.transpose(2, 3))
    if scaling is None:
        return logits.div_(math.sqrt(queries.shape[-1]))
    return logits.mul_(scaling)


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, mask: Callable[[torch.Tensor], None] | None = None,
                    scaling: float | None = None, sync_free: bool = True) -> torch.Tensor:
    """``softmax(mask(queries @ keys^T / sqrt(d)))`` over the key axis, in float32, ``[B, H, m, n]``.

    The logits are formed in the model dtype and ``mask`` (which edits them in place, e.g. adding
    ``finfo.min`` above a diagonal) runs on them before the float32 softmax: the reference numerics.
    float16 rows whose softmax is NaN (logits that overflowed to inf) are recomputed from float32
    logits with the same mask: always and picked per row (``sync_free``, no host synchronisation), or
    only when some row needs it (one synchronisation; for large ``m``).

    ``queries``: ``[B, H, m, d]``; ``keys``: ``[B, H, n, d]`` (same head count); ``scaling`` replaces
    ``1 / sqrt(d)`` (``attention_logits``). ``mask`` must work on model-dtype and float32 logits alike.
    """
    logits = attention_logits(queries, keys, scaling)
    if mask is not None:
        mask(logits)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    if logits.dtype != torch.float16:
        return probs
    overflowed = torch.isnan(probs).any(dim=-1, keepdim=True)                   # [B, H, m, 1]
    if not sync_free and not bool(overflowed.any()):
        return probs
    exact = attention_logits(queries.float(), keys.float(), scaling)
    if mask is not None:
        mask(exact)
    return torch.where(overflowed, F.softmax(exact, dim=-1), probs)


def window_attention_mass(queries: torch.Tensor, keys: torch.Tensor, window: int,
                          scaling: float | None = None) -> torch.Tensor:
    """Summed softmax attention of the last ``window`` queries on each prefix key.

    queries: ``[B, Hq, >=window, d]`` (only the last ``window`` rows are used);
    keys: ``[B, Hq, n, d]`` (already repeated to query heads). Returns ``[B, Hq, n - window]`` in the
    model dtype. Steps 1-4 of the module docstring: causal mask inside the trailing ``window x window``
    block only, float32 softmax over all ``n`` keys, mass summed over the window queries. ``scaling``
    as in ``attention_logits``.
    """
    q = queries[:, :, -window:]

    def causal_inside_window(logits: torch.Tensor) -> None:   # [B, H, w, n]
        mask = torch.full((window, window), torch.finfo(logits.dtype).min, device=logits.device, dtype=logits.dtype)
        logits[:, :, :, -window:] += torch.triu(mask, diagonal=1)   # 0 on and below the diagonal

    probs = attention_probs(q, keys, causal_inside_window, scaling).to(q.dtype)
    return probs[:, :, :, : keys.shape[2] - window].sum(dim=2)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling over the token axis: ``scores [B, H, L]`` -> ``[B, H, L]`` in the same dtype.

    Stride 1, padding ``kernel_size // 2`` (the length is kept for an odd kernel); ``avgpool`` counts
    the zero padding, as ``F.avg_pool1d`` does. Raises ``ValueError`` when ``pooling`` is neither
    ``maxpool`` nor ``avgpool``.
    """
    padding = kernel_size // 2
    if pooling == "avgpool":
        return F.avg_pool1d(scores, kernel_size=kernel_size, padding=padding, stride=1)
    if pooling == "maxpool":
        return F.max_pool1d(scores, kernel_size=kernel_size, padding=padding, stride=1)
    raise ValueError(f"pooling={pooling!r} is not one of ('maxpool', 'avgpool')")


def group_mean(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, Hq, L] -> [B, Hkv, L]``: mean over the query heads that share a KV head, in the input
    dtype (``kv_head`` granularity, step 5). Hq must be a multiple of ``num_kv_heads`` (``view``
    raises ``RuntimeError`` otherwise)."""
    b, hq, length = scores.shape
    return scores.view(b, num_kv_heads, hq // num_kv_heads, length).mean(dim=2)


def layer_mean(scores: torch.Tensor) -> torch.Tensor:
    """``[B, H, L] -> [B, 1, L]``: mean over every head, in the input dtype (``layer`` granularity: one token
    set per layer, DynaKV's global token eviction, reference-dynakv.md section 5). Equal to the mean of the
    ``kv_head`` group means, since every group has the same number of query heads."""
    return scores.mean(dim=1, keepdim=True)


def window_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, kernel_size: int,
                  pooling: str, granularity: str = "query_head", scaling: float | None = None) -> torch.Tensor:
    """Pooled observation-window scores of the prefix tokens.

    queries: ``[B, Hq, >=window, d]``; keys: ``[B, Hkv, n, d]`` (un-repeated), Hq a multiple of Hkv.
    Returns ``[B, Hq, n - window]`` for ``query_head``, ``[B, Hkv, n - window]`` for ``kv_head`` and
    ``[B, 1, n - window]`` for ``layer`` (the mean over all query heads, before pooling),
    in the model dtype. Steps 1-6 of the module docstring (KVCache-Factory
    ``SnapKVCluster.update_kv``); ``scaling`` as in ``attention_logits``. Raises ``ValueError`` (from
    ``pool_scores``) for an unknown ``pooling``.
    """
    groups = queries.shape[1] // keys.shape[1]
    mass = window_attention_mass(queries, repeat_heads(keys, groups), window, scaling)
    if granularity == "kv_head":
        mass = group_mean(mass, keys.shape[1])
    elif granularity == "layer":
        mass = layer_mean(mass)
    return pool_scores(mass, kernel_size, pooling)
