"""FullKV: the uncompressed cache, the reference every method is measured against.

As in both reference repositories, FullKV runs the model exactly as shipped: the hook attaches
nothing, so generation equals plain ``model.generate`` token for token.
"""

from dataclasses import dataclass

from methods.base import Kept, UniformCompressor, register


@register
@dataclass
class FullKV(UniformCompressor):
    """The uncompressed cache (``is_noop``): the hook attaches nothing and every layer keeps the whole
    prompt. The knobs are accepted and recorded but have no effect."""

    name = "fullkv"
    is_noop = True

    def validate(self) -> None:  # the knobs are recorded but have no effect
        """Accept any knob values (they have no effect); never raises."""
        pass

    def compress_layer(self, layer, num_layers, keys, values, queries) -> Kept:
        """The whole prompt (``Kept.whole``): ``keys``, ``values`` ``[B, Hkv, n, d]`` -> ``[B, H, n, d]``
        at this granularity, positions ``[B, H, n]``. Reached only model-free (``compress_all``); the
        hook does not run for FullKV."""
        return self.whole_prompt(keys, values, queries.shape[1])
