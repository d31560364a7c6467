"""A transformers cache whose full-attention layers can be replaced by a compressed prompt.

``CompressedLayer`` behaves exactly like transformers' ``DynamicLayer`` until the hook calls
``replace`` at the end of that layer's prefill. From then on it stores only the kept prompt tokens
(plus generated tokens) but still reports the *virtual* length, the number of tokens the model has
seen, through ``get_seq_length``: position ids derived from the cache therefore continue from the
original prompt length, never from the compressed length (reference-methods.md section 8, item 9).
Masks are sized from what is physically stored (``get_mask_sizes``).

With ``granularity=query_head`` the kept tensors carry one head per query head; decode-time keys
arrive with one head per KV head and are repeated to match before they are appended, exactly as
the reference (which stores ``repeat_kv`` output) does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from methods.base import repeat_heads


class CompressedLayer(DynamicLayer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.virtual_length = 0
        self.compressed = False

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized and self.keys.numel() and self.keys.shape[1] != key_states.shape[1]:
            groups = self.keys.shape[1] // key_states.shape[1]
            key_states, value_states = repeat_heads(key_states, groups), repeat_heads(value_states, groups)
        self.virtual_length += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the kept prompt in place of the full one; the virtual length is unchanged."""
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.compressed = True

    @property
    def stored_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.virtual_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.virtual_length = 0
        self.compressed = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.virtual_length -= min(-tokens_to_remove, self.stored_length)
        super().crop(tokens_to_remove)


def make_cache(model) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are ``CompressedLayer``s
    (sliding-window layers keep transformers' own layer class)."""
    cache = DynamicCache(config=model.config)
    layer_types = full_attention_layers(model.config)
    if not cache.layers:  # config without layer structure: build them ourselves
        cache.layers = [CompressedLayer() for _ in range(num_layers(model.config))]
    for i, layer in enumerate(cache.layers):
        if i in layer_types and type(layer) is DynamicLayer:
            cache.layers[i] = CompressedLayer()
    return cache


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def num_layers(config) -> int:
    return text_config(config).num_hidden_layers


def full_attention_layers(config) -> list[int]:
    """Indices of the layers with global (full) attention; sliding-window layers are excluded."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return list(range(cfg.num_hidden_layers))
    return [i for i, t in enumerate(types) if t == "full_attention"]
