"""FullKV: the uncompressed cache, the reference every method is measured against.

As in both reference repositories, FullKV runs the model exactly as shipped: the hook attaches
nothing, so generation equals plain ``model.generate`` token for token.
"""

from dataclasses import dataclass

from methods.base import Kept, UniformCompressor, register


@register
@dataclass
class FullKV(UniformCompressor):
    name = "fullkv"
    is_noop = True

    def validate(self) -> None:  # the knobs are recorded but have no effect
        pass

    def compress_layer(self, layer, num_layers, keys, values, queries) -> Kept:
        return self.whole_prompt(keys, values, queries.shape[1])
