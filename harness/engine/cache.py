"""A transformers cache whose full-attention layers can be replaced by a compressed prompt.

``CompressedLayer`` stores keys and values like transformers' ``DynamicLayer`` (appending along the
token axis) until the hook calls ``replace`` at the end of that layer's prefill. From then on it
stores only the kept prompt tokens (plus generated tokens) but still reports the *virtual* length,
the number of tokens the model has seen, through ``get_seq_length``: position ids derived from the
cache therefore continue from the original prompt length, never from the compressed length
(reference-methods.md section 8, item 9). Masks are sized from what is physically stored
(``get_mask_sizes``).

With ``granularity=query_head`` the kept tensors carry one head per query head; decode-time keys
arrive with one head per KV head and are repeated to match before they are appended, exactly as
the reference (which stores ``repeat_kv`` output) does.

The layer implements its own ``update``, ``crop`` and lengths rather than leaning on
``DynamicLayer``'s internals; it subclasses ``DynamicLayer`` only so that transformers treats it as
a dynamic full-attention layer. ``check_layer_api`` runs it once through transformers' ``Cache`` to
prove that the cache calls it the way this module assumes, and fails with the version otherwise.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from harness.engine.compat import IntegrationError
from methods.base import repeat_heads


class CompressedLayer(DynamicLayer):
    """One full-attention layer of a harness cache.

    keys, values: ``[B, H, stored, d]`` (H: KV heads, or query heads after a query_head compression);
    positions: ``[B, H, k]`` original token index of every kept prompt entry (None until ``replace``);
    virtual_length: tokens the model has seen (prompt + generated), whatever is stored;
    written: tokens written by ``update`` since the hook last called ``take_written``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.keys = self.values = None
        self.is_initialized = False
        self.virtual_length = 0
        self.compressed = False
        self.positions: torch.Tensor | None = None
        self.appended = 0            # tokens appended after the last replace (decode steps)
        self.written = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """On the first ``update``: record the device and start from empty ``[B, H, 0, d]`` keys and
        values in the dtype and device of ``key_states``/``value_states``."""
        self.device = key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, t, d]`` keys and values; returns everything stored ``[B, H, stored, d]``.

        On a layer holding query heads (after a ``query_head`` compression) the new KV heads are
        repeated to match first. Adds ``t`` tokens to the virtual length and the written count (and to
        ``appended`` once compressed); further arguments (transformers' cache kwargs) are ignored.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[1] != key_states.shape[1]:   # a query_head cache: repeat to the query heads
            groups = self.keys.shape[1] // key_states.shape[1]
            key_states, value_states = repeat_heads(key_states, groups), repeat_heads(value_states, groups)
        tokens = key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.virtual_length += tokens
        self.written += tokens
        if self.compressed:
            self.appended += tokens
        return self.keys, self.values

    def take_written(self) -> int:
        """Tokens written since the previous call (the hook's proof that the model used this cache)."""
        written, self.written = self.written, 0
        return written

    def replace(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the kept prompt ``[B, H, k, d]`` (original positions ``[B, H, k]``) in place of the full
        one; the virtual length is unchanged.

        Keys and values are stored contiguous, ``positions`` as given (not copied); ``appended``
        restarts at 0. Raises ``ValueError`` when the first three dimensions of ``keys`` or ``values``
        differ from ``positions.shape``.
        """
        if keys.shape[:3] != positions.shape or values.shape[:3] != positions.shape:
            raise ValueError(f"replace: keys {tuple(keys.shape)}, values {tuple(values.shape)} and positions "
                             f"{tuple(positions.shape)} disagree")
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.positions = positions
        self.compressed = True
        self.appended = 0

    @property
    def stored_length(self) -> int:
        """Tokens physically stored (``keys.shape[-2]``); 0 before the first ``update``."""
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """The virtual length: tokens the model has seen (prompt + generated), not what is stored, so
        position ids derived from the cache continue from the original prompt length."""
        return self.virtual_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask for a forward of ``query_length`` new tokens:
        ``(stored_length + query_length, 0)``, from what is stored, not the virtual length."""
        return self.stored_length + query_length, 0

    def get_max_length(self) -> int:
        """-1: a dynamic layer has no maximum length."""
        return -1

    def reset(self) -> None:
        """Back to empty and uncompressed: keys, values and positions dropped, every counter at 0."""
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.virtual_length = self.appended = self.written = 0
        self.compressed = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the most recent tokens. ``tokens_to_remove < 0`` removes that many (transformers 5.18+);
        a positive value is the older ``crop(max_length)`` form: keep the first ``max_length`` tokens seen.
        A compressed layer can drop only tokens appended after compression (its stored prompt is in
        selection order, so "the most recent prompt tokens" are not its last entries): ``ValueError``
        otherwise. At most the stored tokens are removed; the virtual length drops by as many."""
        remove = -tokens_to_remove if tokens_to_remove < 0 else max(0, self.virtual_length - tokens_to_remove)
        if remove == 0 or not self.is_initialized:
            return
        if self.compressed and remove > self.appended:
            raise ValueError(f"crop({tokens_to_remove}) would remove {remove} tokens from a compressed layer that "
                             f"appended only {self.appended} after compression; the compressed prompt cannot be cropped")
        remove = min(remove, self.stored_length)
        self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]
        self.virtual_length -= remove
        if self.compressed:
            self.appended -= remove

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Not supported: always raises ``NotImplementedError`` (no beam search, no several sequences
        per prompt)."""
        raise NotImplementedError("a compressed cache holds one prompt; beam search and sampling several "
                                  "sequences per prompt are not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Not supported: always raises ``NotImplementedError`` (rows cannot be selected)."""
        raise NotImplementedError("a compressed cache holds one prompt; selecting rows is not supported")


def _expect(what: str, got, want) -> None:
    if got != want:
        raise IntegrationError(f"the transformers Cache API is not the one harness.engine.cache was written for: {what} "
                               f"gave {got!r}, expected {want!r}")


@functools.lru_cache(maxsize=1)
def check_layer_api() -> None:
    """Run a ``CompressedLayer`` through transformers' ``Cache`` once: update routing, virtual length,
    mask sizes and crop as the harness assumes them (``Cache.update(k, v, layer_idx)``,
    ``Cache.get_seq_length(layer_idx)``, ``Cache.get_mask_sizes(query_length, layer_idx)``,
    ``Cache.crop(-n)``). Raises ``IntegrationError`` naming the version on any difference."""
    layer = CompressedLayer()
    cache = Cache(layers=[layer])
    x = torch.zeros(1, 1, 3, 2)
    keys, _ = cache.update(x, x, 0)
    _expect("Cache.update(k[3 tokens], v, 0) -> keys.shape[-2]", keys.shape[-2], 3)
    _expect("the layer's virtual length after Cache.update", layer.virtual_length, 3)
    layer.replace(x[:, :, :1], x[:, :, :1], torch.zeros(1, 1, 1, dtype=torch.long))
    _expect("Cache.get_seq_length(0) after compression (the virtual length)", cache.get_seq_length(0), 3)
    _expect("Cache.get_mask_sizes(1, 0) after compression (stored + query)", tuple(cache.get_mask_sizes(1, 0)), (2, 0))
    cache.update(x[:, :, :1], x[:, :, :1], 0)
    cache.crop(-1)
    _expect("(virtual, stored) after Cache.crop(-1)", (layer.virtual_length, layer.stored_length), (3, 1))


def make_cache(model) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are ``CompressedLayer``s
    (sliding-window layers keep transformers' own layer class).

    Runs ``check_layer_api`` first. Raises ``IntegrationError`` when ``DynamicCache(config=...)`` builds
    a different number of layers than the model has, or a full-attention layer that is not a plain
    ``DynamicLayer``.
    """
    check_layer_api()
    cache = DynamicCache(config=model.config)
    full = full_attention_layers(model.config)
    if not cache.layers:  # config without layer structure: build them ourselves
        cache.layers = [CompressedLayer() for _ in range(num_layers(model.config))]
    if len(cache.layers) != num_layers(model.config):
        raise IntegrationError(f"DynamicCache(config=...) built {len(cache.layers)} layers for a model with "
                               f"{num_layers(model.config)}")
    for i in full:
        layer = cache.layers[i]
        if type(layer) is not DynamicLayer and not isinstance(layer, CompressedLayer):
            raise IntegrationError(f"DynamicCache(config=...) made layer {i}, a full-attention layer, a "
                                   f"{type(layer).__name__}, not a DynamicLayer; the harness cannot compress it")
        cache.layers[i] = CompressedLayer()
    return cache


def text_config(config):
    """The decoder's text config (``config.get_text_config(decoder=True)``, e.g. of a multimodal
    model), or ``config`` itself where it has no ``get_text_config``."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def num_layers(config) -> int:
    """Decoder layers of the model: ``num_hidden_layers`` of its text config."""
    return text_config(config).num_hidden_layers


def full_attention_layers(config) -> list[int]:
    """Indices of the layers with global (full) attention, decided as transformers decides the layer
    types of its caches: ``config.layer_types`` where the config has them; otherwise every layer slides
    when ``sliding_window`` (or ``attention_chunk_size``) is set (Mistral-7B-v0.1), and none does when
    not. Sliding-window and chunked layers are never compressed."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        if getattr(cfg, "sliding_window", None) is not None or getattr(cfg, "attention_chunk_size", None) is not None:
            return []
        return list(range(cfg.num_hidden_layers))
    return [i for i, t in enumerate(types) if t == "full_attention"]
