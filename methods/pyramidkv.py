"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): more cache in lower layers, less in higher ones.

SnapKV's pooled window scores select the tokens; only the per-layer count differs, following the
reference schedule exactly (KVCache-Factory ``PyramidKVCluster`` at ffac160; reference-methods.md
section 2.5), with ``beta = 20`` and integer floors:

    base = budget - w;  min_num = base // beta;  max_num = 2 * base - min_num
    if max_num >= n - w: max_num = n - w; min_num = 2 * base - max_num
    steps = (max_num - min_num) // (L - 1);  layer l keeps max_num - l * steps (+ the window)

Three regimes by prompt length ``n``: ``n <= budget`` keeps everything; ``n < 2 * base`` is uniform
SnapKV with ``base`` tokens per layer (layer 0's share would not fit); otherwise the pyramid.
The floors make the mean slightly larger than ``base``. The reference divides by ``L - 1`` before
anything else, so a single-layer model crashes there; here ``L = 1`` is uniform SnapKV.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.base import register
from methods.snapkv import SnapKV


def pyramid_counts(budget: int, window: int, num_layers: int, prompt_length: int, beta: int = 20) -> list[int]:
    """Tokens kept outside the window per layer (the pyramid regime's formula, any prompt length)."""
    base = budget - window
    min_num = base // beta
    max_num = 2 * base - min_num
    if max_num >= prompt_length - window:
        max_num = prompt_length - window
        min_num = 2 * base - max_num
    if num_layers == 1:
        return [base]
    steps = (max_num - min_num) // (num_layers - 1)
    return [max_num - layer * steps for layer in range(num_layers)]


@register
@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    beta: int = 20

    def layer_budget(self, layer: int, num_layers: int, prompt_length: int) -> int:
        base = self.budget - self.window_size
        if prompt_length < 2 * base or num_layers == 1:
            return self.budget
        return pyramid_counts(self.budget, self.window_size, num_layers, prompt_length, self.beta)[layer] + self.window_size
