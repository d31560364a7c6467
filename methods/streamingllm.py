"""StreamingLLM (Xiao et al., 2023, arXiv 2309.17453) as the KV-compression papers run it.

Position-based, prefill only (KVCache-Factory ``StreamingLLMKVCluster``): keep the first
``budget - window_size`` prompt tokens (the attention sinks) and the last ``window_size``; no scores,
no rolling eviction while decoding, no re-indexing of positions.

The sink count depends only on how the window is set, and the reference runners disagree
(reference-methods.md section 2.2): KVCache-Factory since 2024-07 uses ``window = budget - 4``
(4 sinks, the faithful StreamingLLM), DynamicKV's pred.py uses ``window = 32`` (``budget - 32``
"sinks"). ``sink_tokens`` selects the first: when set, ``window_size`` becomes
``budget - sink_tokens``.
"""

from dataclasses import dataclass

import torch

from methods.base import ConfigError, UniformCompressor, register


@register
@dataclass
class StreamingLLM(UniformCompressor):
    """StreamingLLM as the compression papers run it (KVCache-Factory ``StreamingLLMKVCluster``): the
    first ``budget - window_size`` prompt tokens (the sinks) and the last ``window_size``, per layer.

    ``sink_tokens``: when set, the sink count, and ``window_size`` becomes ``budget - sink_tokens``.
    Raises ``ConfigError`` at construction when ``sink_tokens`` is not a positive integer or is not
    smaller than ``budget``, and for the checks of ``KVCompressor.validate``.
    """

    name = "streamingllm"
    sink_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.sink_tokens is not None:
            if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens <= 0:
                raise ConfigError(f"streamingllm: sink_tokens={self.sink_tokens!r} must be a positive integer "
                                  "(or null to use budget - window_size)")
            if self.sink_tokens >= self.budget:
                raise ConfigError(f"streamingllm: sink_tokens={self.sink_tokens} must be smaller than "
                                  f"budget={self.budget}; the rest of the budget is the recent window")
            self.window_size = self.budget - self.sink_tokens
        super().__post_init__()

    def select(self, layer, num_layers, keys, values, queries, count):
        """The first ``count`` prompt positions for every row and head: int64 ``[B, H, count]`` (an
        expanded view of ``0..count-1``; H: Hq for ``query_head``, Hkv for ``kv_head``). No scores:
        ``keys`` and ``queries`` give only the batch and head counts."""
        groups = queries.shape[1] // keys.shape[1] if self.granularity == "query_head" else 1
        b, heads = keys.shape[0], keys.shape[1] * groups
        return torch.arange(count, device=keys.device).expand(b, heads, count)
