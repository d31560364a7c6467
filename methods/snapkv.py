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
    name = "snapkv"

    def scores(self, keys, queries, scaling=None) -> torch.Tensor:
        return window_scores(queries, keys, self.window_size, self.kernel_size, self.pooling,
                             self.granularity, scaling)

    def select(self, layer, num_layers, keys, values, queries, count):
        return self.scores(keys, queries).topk(count, dim=-1).indices
