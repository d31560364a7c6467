"""SnapKV (Li et al., 2024, arXiv 2404.14469): keep what the observation window attends to.

Per layer and head: pooled attention of the last ``window_size`` prompt queries on the prefix
(``methods.scoring.window_scores``), the top ``budget - window_size`` prefix tokens by
``torch.topk`` (descending score order, as stored by the reference), then the window itself.
Reference: FasterDecoding/SnapKV ``snapkv_utils.py`` and KVCache-Factory ``SnapKVCluster``
(reference-methods.md section 2.4). The papers' runs use kernel 7 and maxpool; the original SnapKV
defaults are window 32, kernel 5, avgpool.
"""

from dataclasses import dataclass

import torch

from methods.base import UniformCompressor, register
from methods.scoring import window_scores


@register
@dataclass
class SnapKV(UniformCompressor):
    """SnapKV: per layer and head, the top ``budget - window_size`` prefix tokens by pooled
    observation-window score, then the window (arXiv 2404.14469; FasterDecoding/SnapKV
    ``snapkv_utils.py``, KVCache-Factory ``SnapKVCluster``). Its knobs are ``KVCompressor``'s; a prompt
    of at most ``budget`` tokens is kept whole."""

    name = "snapkv"

    def scores(self, keys, queries, scaling=None) -> torch.Tensor:
        """Pooled window scores of the prefix tokens (``methods.scoring.window_scores``).

        ``keys``: ``[B, Hkv, n, d]``; ``queries``: ``[B, Hq, >=window_size, d]``; ``scaling`` replaces
        ``1 / sqrt(d)``. Returns ``[B, H, n - window_size]`` in the model dtype (H: Hq for
        ``query_head``, Hkv for ``kv_head``).
        """
        return window_scores(queries, keys, self.window_size, self.kernel_size, self.pooling,
                             self.granularity, scaling)

    def select(self, layer, num_layers, keys, values, queries, count):
        """The ``count`` best-scored prefix tokens: int64 ``[B, H, count]``, in descending score order
        (``torch.topk``'s order and tie-break, as the reference stores them)."""
        return self.scores(keys, queries).topk(count, dim=-1).indices
