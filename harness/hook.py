"""Attach a compressor to a transformers model for the duration of a ``with`` block.

    with attach(model, compressor) as handle:
        ...prefill with a cache from ``harness.cache.make_cache``, then decode...
    handle.report   # what the last prompt kept, per layer

Two standard extension points, both removed on exit (also when the block raises):

* a forward hook on every full-attention module (``register_forward_hook(with_kwargs=True)``). At
  the end of a layer's prefill it reads the layer's full post-RoPE keys and values from the cache,
  hands them with the captured queries to the per-prompt ``CompressionSession`` and writes what the
  session returns back into the cache. The layer's own attention has already run on the full KV,
  so the prefill output (and the first generated token) is exactly FullKV's.
* an attention function registered with transformers' ``AttentionInterface`` that wraps the model's
  own backend (sdpa, eager or flash-attention). It records the post-RoPE queries the model really
  used (no re-computation, so q-norms and RoPE variants of any model are exact) and lets a layer
  whose cache holds one head per query head (``granularity=query_head``) run without repeating
  them again.

No model file is edited and no forward is replaced (reference-methods.md section 1 describes the
monkeypatching this avoids). Sliding-window layers (Gemma 3's local layers) get no hook: they are
left as they are and the budget applies to the full-attention layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from harness.cache import CompressedLayer, full_attention_layers, text_config
from methods.base import CompressionSession, KVCompressor

PREFIX = "kvharness_"
_CONTROLLERS: dict[int, "Controller"] = {}  # id(attention module) -> controller while attached


class _GroupsOverride:
    """The attention module seen through a lens with ``num_key_value_groups = 1``: used when the
    cache already holds one head per query head."""

    def __init__(self, module):
        self._module = module
        self.num_key_value_groups = 1

    def __getattr__(self, name):
        return getattr(self._module, name)


def _wrapped_attention(base_name: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        controller = _CONTROLLERS.get(id(module))
        if controller is not None and query.shape[2] > 1:
            controller.capture(module.layer_idx, query)
        if key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:
            module = _GroupsOverride(module)
        if (query.shape[2] == 1 and isinstance(attention_mask, torch.Tensor)
                and attention_mask.shape[-1] != key.shape[-2]):
            attention_mask = _single_query_mask(attention_mask, key.shape[-2])
        base = ALL_ATTENTION_FUNCTIONS[base_name]
        return base(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _single_query_mask(mask: torch.Tensor, kv_length: int):
    """A decode-step mask sized for another layer's cache length. Each layer stores a different
    number of tokens; with no padding a single query sees every stored token, so no mask is needed."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if bool(allowed.all()):
        return None
    raise NotImplementedError("padded batches with per-layer compressed caches are not supported "
                              "by this decode path; run with batch size 1")


def wrapped_implementation(base_name: str) -> str:
    """Register (once) and return the name of our wrapper around the ``base_name`` backend."""
    if base_name.startswith(PREFIX):
        return base_name
    name = PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base_name not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"attention implementation {base_name!r} is not registered in transformers; "
                             f"known: {sorted(ALL_ATTENTION_FUNCTIONS.keys())}")
        AttentionInterface.register(name, _wrapped_attention(base_name))
        if base_name in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """Model layer index -> its self-attention module, for the full-attention layers."""
    full = set(full_attention_layers(model.config))
    found = {}
    for _, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            if idx in full and idx not in found:
                found[idx] = module
    if not found:
        raise ValueError(f"no attention modules with a layer_idx found in {type(model).__name__}")
    return dict(sorted(found.items()))


@dataclass
class Controller:
    """Connects the hooks of one attached model to the per-prompt compression session."""

    compressor: KVCompressor
    layers: list[int]                       # model layer indices that are compressed, in order
    session: CompressionSession | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    sessions_started: int = 0

    @property
    def report(self) -> dict | None:
        if self.session is None:
            return None
        out = self.session.report()
        for entry in out["layers"]:
            entry["model_layer"] = self.layers[entry["layer"]]
        return out

    def capture(self, layer_idx: int, query: torch.Tensor) -> None:
        self.captured[layer_idx] = query[:, :, -self.compressor.query_count(query.shape[2]):]

    def after_attention(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        layer_idx = module.layer_idx
        query = self.captured.pop(layer_idx, None)
        if cache is None or query is None:
            return None
        layer = cache.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            raise TypeError("compression needs the cache from harness.cache.make_cache(model); got "
                            f"{type(cache).__name__} with a {type(layer).__name__} at layer {layer_idx}")
        prompt_length = query.shape[2] if self.compressor.queries_needed == "all" else None
        if layer.compressed or layer.stored_length != layer.virtual_length:
            return None  # not the prefill of a fresh prompt (chunked prefill is not compressed)
        if prompt_length is not None and prompt_length != layer.stored_length:
            return None
        position = self.layers.index(layer_idx)
        if position == 0:  # a new prompt: fresh per-sample state
            self.session = self.compressor.new_session(len(self.layers))
            self.sessions_started += 1
        if self.session is None:
            raise RuntimeError(f"layer {layer_idx} prefilled before layer {self.layers[0]}")
        updates = self.session.add_layer(position, layer.keys, layer.values, query)
        if position == len(self.layers) - 1:
            updates.update(self.session.finish())
        for compressed_idx, kept in updates.items():
            if not kept.whole:
                cache.layers[self.layers[compressed_idx]].replace(kept.keys, kept.values)
        return None


@contextlib.contextmanager
def routed(model, controller):
    """For the block: the model's attention runs through our wrapper, and the wrapper reports every
    full-attention module's queries to ``controller`` (anything with ``capture(layer_idx, query)``).
    Yields the model layer indices of those modules."""
    modules = attention_modules(model)
    original = text_config(model.config)._attn_implementation
    try:
        _set_attention(model, wrapped_implementation(original))
        for module in modules.values():
            _CONTROLLERS[id(module)] = controller
        yield list(modules)
    finally:
        for module in modules.values():
            _CONTROLLERS.pop(id(module), None)
        _set_attention(model, original)


@contextlib.contextmanager
def attach(model, compressor: KVCompressor):
    """Hooks ``compressor`` into ``model`` for the block; the model is unchanged afterwards.

    Yields the ``Controller`` (``.report`` describes what the last prompt kept). FullKV attaches
    nothing at all.
    """
    modules = attention_modules(model)
    controller = Controller(compressor, list(modules))
    if compressor.is_noop:
        yield controller
        return
    handles = []
    try:
        with routed(model, controller):
            for module in modules.values():
                handles.append(module.register_forward_hook(controller.after_attention, with_kwargs=True))
            yield controller
    finally:
        for handle in handles:
            handle.remove()


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if text_config(model.config)._attn_implementation != name:
        text_config(model.config)._attn_implementation = name


def is_attached(model) -> bool:
    """True while any hook of ours is on the model (used by tests)."""
    modules = attention_modules(model).values()
    return any(id(m) in _CONTROLLERS or m._forward_hooks for m in modules) or \
        text_config(model.config)._attn_implementation.startswith(PREFIX)
