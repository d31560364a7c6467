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

from methods.base import ConfigError, register
from methods.snapkv import SnapKV


def pyramid_counts(budget: int, window: int, num_layers: int, prompt_length: int, beta: int = 20) -> list[int]:
    """Tokens kept outside the window per layer (the pyramid regime's formula, any prompt length).

    ``budget``, ``window`` and ``prompt_length`` in tokens. Returns ``num_layers`` counts, layer 0
    first, layer ``l`` keeping ``max_num - l * steps`` (the schedule of the module docstring, KVCache-Factory
    ``PyramidKVCluster``); ``[budget - window]`` for a single layer. Nothing is clamped here.
    """
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
    """PyramidKV: SnapKV's pooled window scores with a per-layer count from the pyramid schedule
    (arXiv 2406.02069; KVCache-Factory ``PyramidKVCluster`` at ffac160). ``budget`` is the per-layer
    average; ``beta`` is the schedule's divisor (``min_num = (budget - w) // beta``, 20 in the
    reference)."""

    name = "pyramidkv"
    beta: int = 20

    def validate(self) -> None:
        """SnapKV's checks, and ``beta`` a positive integer (``ConfigError``; 0 would divide by zero)."""
        super().validate()
        if isinstance(self.beta, bool) or not isinstance(self.beta, int) or self.beta <= 0:
            raise ConfigError(f"pyramidkv: beta={self.beta!r} must be a positive integer (the reference uses 20)")

    def layer_budget(self, layer: int, num_layers: int, prompt_length: int) -> int:
        """Prompt tokens layer ``layer`` of ``num_layers`` keeps, window included, for a prompt of
        ``prompt_length`` tokens: ``budget`` when ``prompt_length < 2 * (budget - w)`` or the model has
        one layer (uniform SnapKV), otherwise ``pyramid_counts(...)[layer] + w``."""
        base = self.budget - self.window_size
        if prompt_length < 2 * base or num_layers == 1:
            return self.budget
        return pyramid_counts(self.budget, self.window_size, num_layers, prompt_length, self.beta)[layer] + self.window_size
