"""H2O (Zhang et al., 2023, arXiv 2306.14048) as the KV-compression papers run it: prefill only.

Heavy hitters are the prefix tokens with the largest accumulated softmax attention from the prompt's
queries; they are kept with the recent window, per head, once at the end of prefill, with no pooling
and no eviction while decoding (KVCache-Factory ``H2OKVCluster``; reference-methods.md section 2.3).
The score changed over the reference code's history, so ``variant`` names the one you want:

* ``causal`` (default): every prompt query attends causally; the true heavy-hitter score
  (KVCache-Factory HEAD 9f9aa2e, "Fix H2O causal masking").
* ``reference_2024``: every prompt query, but the causal mask only inside the trailing window block,
  so earlier queries also see later keys (KVCache-Factory 98e8228..2026-06, the code of the DynamicKV
  and PyramidKV tables; issue #49).
* ``window``: only the last ``window_size`` queries, i.e. SnapKV without pooling (before 2024-10-13).

The reference forms the whole ``[B, H, n, n]`` softmax (out of memory at 32K on 80 GB). Here the
queries are processed ``query_chunk`` rows at a time, so memory is ``O(H * n * query_chunk)``. Each
chunk's probabilities are rounded to the model dtype as the reference does and summed in float32,
with one final rounding to the model dtype, which is what the reference's single ``sum`` computes up
to summation order.

``scorer`` picks how the ``causal`` and ``reference_2024`` scores are computed:

* ``reference`` (default): the chunked computation above.
* ``fused``: ``methods.h2o_fused``, two passes that never write a probability (Triton kernels on a CUDA
  device, the same passes in PyTorch elsewhere), about 4x faster on an H200. It rounds where the reference
  rounds, but forms ``exp(logit - lse)`` instead of ``exp(logit - max) / sum``, so a few scores differ in
  the last bit of the model dtype (measured by ``scripts/gpu_check_h2o.py``: 20-22 of 190,976 at 6K tokens,
  against 1-5 for ``reference``, which differs from the reference code's single sum only in summation
  order; no kept token differed in either). Results of ``fused`` go to their own folders (``scorerfused``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import ConfigError, UniformCompressor, register, repeat_heads
from methods.h2o_fused import fused_accumulated_attention
from methods.scoring import attention_probs, group_mean, layer_mean, window_attention_mass

VARIANTS = ("causal", "reference_2024", "window")
SCORERS = ("reference", "fused")


def accumulated_attention(queries: torch.Tensor, keys: torch.Tensor, window: int, variant: str,
                          query_chunk: int) -> torch.Tensor:
    """Summed attention of all ``n`` prompt queries on the prefix keys ``[0, n - window)``.

    queries, keys: ``[B, H, n, d]`` (keys repeated to the query heads). Returns ``[B, H, n - window]``
    in the model dtype.

    ``variant``: ``causal`` or ``reference_2024`` (module docstring; not checked here, ``H2O.validate``
    guards it). The queries run ``query_chunk`` rows at a time: each chunk's float32 probabilities are
    rounded to the model dtype and summed in float32, with one final rounding to the model dtype.
    float16 costs one host synchronisation per chunk (``attention_probs`` with ``sync_free=False``).
    """
    n = keys.shape[2]
    prefix = n - window
    total = torch.zeros(*keys.shape[:2], prefix, dtype=torch.float32, device=keys.device)
    for start in range(0, n, query_chunk):
        stop = min(start + query_chunk, n)
        # causal: keys after the chunk's last query are masked for every row, so they are left out
        # (exactly: their exp() would be 0); reference_2024 lets early queries see every key
        visible = stop if variant == "causal" else n
        # only columns from `first` on can be masked: all keys before the chunk are visible to it
        # (causal), or only the trailing window block is causal (reference_2024)
        first = start if variant == "causal" else max(prefix, start)
        future = None
        if first < visible:
            query_index = torch.arange(start, stop, device=keys.device)[:, None]
            key_index = torch.arange(first, visible, device=keys.device)[None, :]
            future = key_index > query_index                                            # [c, visible - first]
            if variant == "reference_2024":
                future &= query_index >= prefix

        def mask(logits: torch.Tensor) -> None:                                         # [B, H, c, visible]
            if future is not None:
                logits[..., first:visible].masked_fill_(future, torch.finfo(logits.dtype).min)

        probs = attention_probs(queries[:, :, start:stop], keys[:, :, :visible], mask, sync_free=False).to(queries.dtype)
        total[:, :, : min(visible, prefix)] += probs[:, :, :, :prefix].sum(dim=2, dtype=torch.float32)
    return total.to(queries.dtype)


@register
@dataclass
class H2O(UniformCompressor):
    """H2O heavy hitters, prefill only (arXiv 2306.14048; KVCache-Factory ``H2OKVCluster``): per layer
    and head, the top ``budget - window_size`` prefix tokens by accumulated attention, then the window;
    no pooling (``kernel_size`` and ``pooling`` are validated but unused).

    ``variant``: ``causal``, ``reference_2024`` or ``window`` (module docstring). ``query_chunk``: query
    rows per softmax chunk, so memory is ``O(H * n * query_chunk)`` (``reference`` scorer, and the
    ``fused`` scorer's PyTorch passes). ``scorer``: ``reference`` or ``fused`` (module docstring; not for
    ``window``, not for float16 models).
    """

    name = "h2o"
    choices = {**UniformCompressor.choices, "variant": VARIANTS, "scorer": SCORERS}
    left_out_at_default = {"scorer": "reference"}     # records made before the knob existed keep their names
    variant: str = "causal"
    query_chunk: int = 256
    scorer: str = "reference"

    def validate(self) -> None:
        """``KVCompressor.validate``, then ``ConfigError`` when ``variant`` is not in ``VARIANTS`` or
        ``query_chunk`` is not a positive integer (a bool is rejected)."""
        super().validate()
        if self.variant not in VARIANTS:
            raise ConfigError(f"h2o: variant={self.variant!r} is not one of {VARIANTS}")
        if isinstance(self.query_chunk, bool) or not isinstance(self.query_chunk, int) or self.query_chunk <= 0:
            raise ConfigError(f"h2o: query_chunk={self.query_chunk!r} must be a positive integer (e.g. 1024)")
        if self.scorer not in SCORERS:
            raise ConfigError(f"h2o: scorer={self.scorer!r} is not one of {SCORERS}; fix: protocol.h2o_scorer=reference "
                              "(the default) or protocol.h2o_scorer=fused (method.scorer in a single-method run)")
        if self.scorer == "fused" and self.variant == "window":
            raise ConfigError("h2o: scorer='fused' computes the all-query variants only, and variant='window' scores "
                              "the last window_size queries; fix: protocol.h2o_scorer=reference, or "
                              "protocol.h2o_variant=causal / reference_2024")

    def check_model_dtype(self, dtype: str) -> None:
        """``ConfigError`` for ``scorer=fused`` on a float16 model (``methods.h2o_fused`` has no float16 form)."""
        if self.scorer == "fused" and str(dtype).removeprefix("torch.") in ("float16", "half"):
            raise ConfigError(f"{self.method_name}: scorer=fused does not take a float16 model (model.dtype={dtype}); "
                              "fix: protocol.h2o_scorer=reference, or model.dtype=bfloat16")

    def query_count(self, prompt_length: int) -> int:
        """Trailing prompt queries (tokens) the hook captures: all ``prompt_length`` for ``causal`` and
        ``reference_2024``, ``min(window_size, prompt_length)`` for ``window``."""
        return min(self.window_size, prompt_length) if self.variant == "window" else prompt_length

    def scores(self, keys, queries) -> torch.Tensor:
        """Heavy-hitter scores of the prefix tokens, not pooled: ``[B, H, n - window_size]`` in the
        model dtype (H: Hq for ``query_head``; Hkv for ``kv_head``, the mean over each query group).

        ``keys``: ``[B, Hkv, n, d]``; ``queries``: ``[B, Hq, n, d]``, all prompt queries
        (``[B, Hq, >=window_size, d]`` for ``window``). Raises ``ValueError`` when ``causal`` or
        ``reference_2024`` gets fewer or more than ``n`` queries, and (``fused``) for a float16 model.
        """
        groups = queries.shape[1] // keys.shape[1]
        if self.variant == "window":
            mass = window_attention_mass(queries, repeat_heads(keys, groups), self.window_size)
        else:
            if queries.shape[2] != keys.shape[2]:
                raise ValueError(f"h2o variant {self.variant!r} needs all {keys.shape[2]} prompt queries, "
                                 f"got {queries.shape[2]}")
            if self.scorer == "fused":     # keys stay grouped: the kernels read each KV head for its query heads
                mass = fused_accumulated_attention(queries, keys, self.window_size, self.variant, self.query_chunk)
            else:
                mass = accumulated_attention(queries, repeat_heads(keys, groups), self.window_size, self.variant,
                                             self.query_chunk)
        if self.granularity == "layer":
            return layer_mean(mass)
        return group_mean(mass, keys.shape[1]) if self.granularity == "kv_head" else mass

    def select(self, layer, num_layers, keys, values, queries, count):
        """The ``count`` heaviest prefix tokens: int64 ``[B, H, count]``, in descending score order
        (``torch.topk``). Raises ``ValueError`` as ``scores`` does."""
        return self.scores(keys, queries).topk(count, dim=-1).indices
