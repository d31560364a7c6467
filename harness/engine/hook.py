"""Attach a compressor to a transformers model for the duration of a ``with`` block.

    with attach(model, compressor) as controller:
        cache = make_cache(model)
        first = harness.engine.generate.prefill(model, input_ids, cache)   # compresses, then verifies
        ...decode...
    controller.report   # what the last prompt kept, per layer

Two standard extension points, both removed on exit (also when the block raises):

* a forward hook on every full-attention module (``register_forward_hook(with_kwargs=True)``). At
  the end of a layer's prefill it reads the layer's full post-RoPE keys and values from the cache,
  hands them with the captured queries to the per-prompt ``CompressionSession`` and writes what the
  session returns back into the cache. The layer's own attention has already run on the full KV,
  so the prefill output (and the first generated token) is exactly FullKV's.
* an attention function registered with transformers' ``AttentionInterface`` that wraps the model's
  own backend (``compat.BACKENDS``: sdpa, eager, flash_attention_2). It records the post-RoPE queries
  the model really used (no re-computation, so q-norms and RoPE variants of any model are exact) and
  lets a layer whose cache holds one head per query head (``granularity=query_head``) run without
  repeating them again.

Finding the cache does not depend on any keyword name: ``harness.engine.generate.prefill`` binds the cache
it passes to the model (``Controller.bind``); without a binding the hook takes the one ``Cache``
instance among the attention module's arguments, whatever it is called. Every compressed layer must
prove that the model wrote into that cache during the forward (``CompressedLayer.take_written``),
and every prefill ends with ``verify_compressed``: each layer that should be compressed holds exactly
what the compressor returned, and the report exists. Anything else raises ``CompressionNotApplied``,
naming the layer, the method and the transformers version: a run is never silently uncompressed
(the reference code's stale ``kv_seq_len`` turned every sample after the first into FullKV without a
word, reference-methods.md section 1).

No model file is edited and no forward is replaced. Sliding-window layers (Gemma 3's local layers)
get no hook: they are left as they are and the budget applies to the full-attention layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from harness.engine import compat
from harness.engine.cache import CompressedLayer, full_attention_layers, text_config
from methods.base import CompressionSession, Kept, KVCompressor

PREFIX = "kvharness_"
_CONTROLLERS: dict[int, object] = {}  # id(attention module) -> controller (or query capture) while attached


class CompressionNotApplied(compat.IntegrationError):
    """A compressor was attached but the cache does not hold what it returned."""


class _GroupsOverride:
    """The attention module seen through a lens with ``num_key_value_groups = 1``: used when the
    cache already holds one head per query head."""

    def __init__(self, module):
        self._module = module
        self.num_key_value_groups = 1

    def __getattr__(self, name):
        return getattr(self._module, name)


def _base_function(base_name: str, module):
    if base_name == "eager":
        return compat.eager_attention(module)
    return ALL_ATTENTION_FUNCTIONS[base_name]


def _wrapped_attention(base_name: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        controller = _CONTROLLERS.get(id(module))
        if controller is not None:
            controller.capture(module.layer_idx, query)
        base = _base_function(base_name, module)
        if key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:
            module = _GroupsOverride(module)
        if (query.shape[2] == 1 and isinstance(attention_mask, torch.Tensor)
                and attention_mask.shape[-1] != key.shape[-2]):
            attention_mask = _single_query_mask(attention_mask, key.shape[-2])
        elif controller is not None and 1 < query.shape[2] < key.shape[-2] and base_name != "flash_attention_2":
            attention_mask = appended_tokens_mask(query, key.shape[-2], base_name)
        return base(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def appended_tokens_mask(query: torch.Tensor, kv_length: int, base_name: str) -> torch.Tensor:
    """The mask of ``q > 1`` new tokens appended to a cache that holds ``kv_length - q`` earlier entries
    (``harness.engine.generate.extend``: a question fed after the compressed context): every earlier entry
    is visible and the new tokens are causal among themselves, i.e. query ``i`` sees key ``j`` iff
    ``j <= kv_length - q + i``. transformers would size it from the cache's *virtual* length, which a
    compressed layer does not store, and each layer stores a different number of entries, so the mask is
    built here per layer. ``[1, 1, q, kv_length]``: bool (True = attend) for SDPA, additive (0 or the
    dtype's minimum) for the eager backend. Flash attention's causal flag is already aligned this way."""
    q = query.shape[2]
    rows = torch.arange(q, device=query.device)[:, None] + (kv_length - q)
    allowed = torch.arange(kv_length, device=query.device)[None, :] <= rows
    if base_name == "eager":
        return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min)[None, None]
    return allowed[None, None]


def _single_query_mask(mask: torch.Tensor, kv_length: int):
    """A decode-step mask sized for another layer's cache length. Each layer stores a different
    number of tokens; with no padding a single query sees every stored token, so no mask is needed."""
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if bool(allowed.all()):
        return None
    raise NotImplementedError("padded batches with per-layer compressed caches are not supported "
                              "by this decode path; run with batch size 1")


def wrapped_implementation(base_name: str) -> str:
    """Register (once) and return the name of our wrapper around the ``base_name`` backend
    (``PREFIX + base_name``; a name that already has the prefix is returned as is), with
    ``base_name``'s mask function. Raises ``IntegrationError`` when ``base_name`` is not in
    ``compat.BACKENDS``, is not registered in transformers' ``AttentionInterface`` (eager excepted) or
    has no mask function."""
    if base_name.startswith(PREFIX):
        return base_name
    if base_name not in compat.BACKENDS:
        raise compat.IntegrationError(f"the model runs attn_implementation={base_name!r}, which the hook does not "
                                      f"wrap; supported: {list(compat.BACKENDS)}")
    if base_name != "eager" and base_name not in ALL_ATTENTION_FUNCTIONS:
        raise compat.IntegrationError(f"attention implementation {base_name!r} is not registered in transformers' "
                                      f"AttentionInterface; registered: {sorted(ALL_ATTENTION_FUNCTIONS.keys())}")
    if base_name not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise compat.IntegrationError(f"transformers has no mask function for {base_name!r}; registered: "
                                      f"{sorted(ALL_MASK_ATTENTION_FUNCTIONS.keys())}")
    name = PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapped_attention(base_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def all_attention_modules(model) -> dict[int, torch.nn.Module]:
    """Model layer index -> its self-attention module (the first module of a class named ``*Attention``
    with a ``layer_idx`` and a ``config``), sliding-window layers included."""
    found = {}
    for _, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and type(module).__name__.endswith("Attention") and hasattr(module, "config"):
            found.setdefault(idx, module)
    return dict(sorted(found.items()))


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """Model layer index -> its self-attention module, for the full-attention layers. Raises
    ``IntegrationError`` when the modules found do not match the config's full-attention layers."""
    full = full_attention_layers(model.config)
    found = {idx: module for idx, module in all_attention_modules(model).items() if idx in full}
    if sorted(found) != sorted(full):
        raise compat.IntegrationError(f"{type(model).__name__}: attention modules (a class named *Attention with a "
                                      f"layer_idx) found for layers {sorted(found)}, but the config's full-attention "
                                      f"layers are {full}")
    return dict(sorted(found.items()))


def _where(controller) -> str:
    return f"method {controller.compressor.name!r} ({type(controller.compressor).__name__})"


@dataclass
class Controller:
    """Connects the hooks of one attached model to the per-prompt compression session."""

    compressor: KVCompressor
    layers: list[int]                       # model layer indices that are compressed, in order
    query_heads: int = 0                    # the model's query heads (layout check of captured queries)
    session: CompressionSession | None = None
    cache: Cache | None = None              # bound by harness.engine.generate.prefill for one prefill
    captured: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    final: dict[int, Kept] = field(default_factory=dict)    # compressed-layer position -> what was written
    sessions_started: int = 0
    appending: bool = False                 # True while harness.engine.generate.extend appends tokens uncompressed

    @property
    def report(self) -> dict | None:
        """What the last prompt kept: ``CompressionSession.report`` with each layer's ``model_layer``
        added, or None before any prefill (and always for FullKV). Copies the kept positions to the
        CPU."""
        if self.session is None:
            return None
        out = self.session.report()
        for entry in out["layers"]:
            entry["model_layer"] = self.layers[entry["layer"]]
        return out

    def bind(self, cache: Cache, fresh: bool = True) -> None:
        """Compress into ``cache`` (from ``harness.engine.cache.make_cache``; ``fresh``: still empty, for a
        prefill) and decode from it: the hook reads this cache, never one found in the forward's
        arguments. Resets the layers' written counts. Raises ``TypeError`` when a compressed layer of
        ``cache`` is not a ``CompressedLayer``, and ``ValueError`` when ``fresh`` and a layer already
        holds tokens."""
        for idx in self.layers:
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            if not isinstance(layer, CompressedLayer):
                raise TypeError("compression needs the cache from harness.engine.cache.make_cache(model); got "
                                f"{type(cache).__name__} with a {type(layer).__name__} at layer {idx}")
            if fresh and layer.virtual_length:
                raise ValueError(f"prefill needs an empty cache: layer {idx} already holds {layer.virtual_length} "
                                 "tokens (use a new make_cache(model) per prompt)")
            layer.take_written()
        self.cache = cache

    def capture(self, layer_idx: int, query: torch.Tensor) -> None:
        """Called by the wrapped attention function on every forward of a compressed layer: keep the
        last ``query_count(q)`` post-RoPE queries of ``query [B, Hq, q, d]`` and ``q`` for
        ``after_attention``. Raises ``IntegrationError`` when ``query`` is not ``[B, query_heads, q, d]``."""
        compat.check_query_layout(layer_idx, query, self.query_heads)
        count = self.compressor.query_count(query.shape[2])
        self.captured[layer_idx] = (query[:, :, -count:], query.shape[2])

    def _cache_of(self, layer_idx: int, args, kwargs) -> Cache:
        if self.cache is not None:
            return self.cache
        found = {id(v): v for v in (*args, *kwargs.values()) if isinstance(v, Cache)}
        if len(found) == 1:
            return next(iter(found.values()))
        raise CompressionNotApplied(
            f"layer {layer_idx}, {_where(self)}: the attention module received "
            f"{'no' if not found else len(found)} transformers Cache objects, so the hook cannot tell which cache "
            "to compress; prefill with harness.engine.generate.prefill(model, ids, make_cache(model)), or call "
            "controller.bind(cache) first")

    def after_attention(self, module, args, kwargs, output):
        """Forward hook of a full-attention module: at the end of the layer's prefill, hand its full
        keys and values ``[B, Hkv, n, d]`` and the captured queries to the session and write what it
        returns into the cache (``CompressedLayer.replace``); a decode step passes through.

        The first compressed layer starts a new session. Returns None (the output is unchanged).
        Raises ``CompressionNotApplied`` when no queries were captured, the cache cannot be found, or the
        cache did not receive the forward's tokens; ``TypeError`` when the layer is not a
        ``CompressedLayer``; ``NotImplementedError`` for a multi-token forward on a non-empty cache
        (chunked prefill); ``RuntimeError`` when no session has started (a later layer prefilled before
        the first compressed one). A multi-token forward on a prefilled cache passes through only while
        ``appending`` (``harness.engine.generate.extend``).
        """
        layer_idx = module.layer_idx
        captured = self.captured.pop(layer_idx, None)
        if captured is None:
            raise CompressionNotApplied(
                f"layer {layer_idx}, {_where(self)}: the attention module ran but the wrapped attention function "
                f"({text_config(module.config)._attn_implementation!r}) was never called, so its queries were not "
                "seen; the model does not dispatch attention through transformers' AttentionInterface")
        query, query_length = captured
        cache = self._cache_of(layer_idx, args, kwargs)
        layer = cache.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            raise TypeError("compression needs the cache from harness.engine.cache.make_cache(model); got "
                            f"{type(cache).__name__} with a {type(layer).__name__} at layer {layer_idx}")
        written = layer.take_written()
        if written != query_length:
            raise CompressionNotApplied(
                f"layer {layer_idx}, {_where(self)}: attention ran on {query_length} new tokens but the harness cache "
                f"received {written}; the model wrote its keys and values somewhere else (another cache object, or "
                "the cache passed under a name the model ignores)")
        if layer.compressed or layer.virtual_length != query_length:
            if query_length == 1 or self.appending:
                return None                      # a decode step, or tokens appended uncompressed (extend)
            raise NotImplementedError(
                f"layer {layer_idx}: a {query_length}-token forward on a cache that already holds "
                f"{layer.virtual_length - query_length} tokens (chunked prefill) is not supported with a compressor "
                "attached; prefill the whole prompt in one forward")
        position = self.layers.index(layer_idx)
        if position == 0:  # a new prompt: fresh per-sample state
            self.session = self.compressor.new_session(len(self.layers))
            self.final = {}
            self.sessions_started += 1
        if self.session is None:
            raise RuntimeError(f"layer {layer_idx} prefilled before layer {self.layers[0]}")
        updates = self.session.add_layer(position, layer.keys, layer.values, query)
        if position == len(self.layers) - 1:
            updates.update(self.session.finish())
        for compressed_idx, kept in updates.items():
            if not kept.whole:
                cache.layers[self.layers[compressed_idx]].replace(kept.keys, kept.values, kept.positions)
        self.final.update(updates)
        return None

    def verify(self, cache: Cache, prompt_length: int, sessions_before: int) -> None:
        """After a prefill: one new session ran and ``cache`` holds what it returned (no host sync: the
        report, which copies the kept positions to the CPU, is built only when asked for). Raises
        ``CompressionNotApplied`` otherwise (here or in ``verify_compressed``)."""
        if self.sessions_started != sessions_before + 1 or self.session is None:
            raise CompressionNotApplied(
                f"{_where(self)} is attached, but {self.sessions_started - sessions_before} compression sessions ran "
                f"during this {prompt_length}-token prefill (expected 1): the forward hook on layer {self.layers[0]} "
                "never saw the prefill, so the cache was left uncompressed")
        verify_compressed(cache, self.layers, self.final, prompt_length, self.compressor, self.session)


def verify_compressed(cache, layers: list[int], final: dict[int, Kept], prompt_length: int,
                      compressor: KVCompressor, session: CompressionSession) -> None:
    """The invariant every compressed prefill ends with (cheap: shapes and storage pointers, no GPU sync).

    For each compressed layer (``layers``: model indices, in order) the cache holds exactly the
    ``Kept`` the session returned last (``final``, keyed by position): kept whole -> the full prompt
    uncompressed; otherwise the same length, heads and kept-positions tensor. The session recorded
    every layer, so the report is complete. Raises ``CompressionNotApplied`` naming the layer, the
    method and the transformers version.
    """
    method = f"method {compressor.name!r}"
    missing = [idx for pos, idx in enumerate(layers) if pos not in final]
    if missing:
        raise CompressionNotApplied(f"{method}: layers {missing} should have been compressed and were not (the hook "
                                    f"did not reach them during the prefill); {len(layers) - len(missing)} of "
                                    f"{len(layers)} were")
    unreported = [idx for pos, idx in enumerate(layers) if pos not in session.kept_positions]
    if unreported:
        raise CompressionNotApplied(f"{method}: the report has no entry for layers {unreported}")
    for pos, idx in enumerate(layers):
        layer, kept = cache.layers[idx], final[pos]
        if not isinstance(layer, CompressedLayer):
            raise CompressionNotApplied(f"layer {idx}, {method}: the cache holds a {type(layer).__name__}, not the "
                                        "CompressedLayer the compressor wrote into")
        if layer.virtual_length != prompt_length:
            raise CompressionNotApplied(f"layer {idx}, {method}: the cache has seen {layer.virtual_length} tokens of a "
                                        f"{prompt_length}-token prompt; the model did not write this cache")
        recorded = session.kept_positions[pos]
        if kept.whole:
            ok = not layer.compressed and layer.stored_length == prompt_length and recorded is None
            want = f"the whole prompt ({prompt_length} tokens, uncompressed)"
        else:
            ok = (layer.compressed and layer.positions is not None and layer.keys.shape == kept.keys.shape
                  and layer.positions.shape == kept.positions.shape
                  and layer.positions.data_ptr() == kept.positions.data_ptr()
                  and recorded is not None and recorded.data_ptr() == kept.positions.data_ptr())
            want = f"the {kept.count} kept tokens x {kept.keys.shape[1]} heads the compressor returned"
        if not ok:
            have = (f"{layer.stored_length} stored tokens x {0 if layer.keys is None else layer.keys.shape[1]} heads, "
                    f"compressed={layer.compressed}")
            raise CompressionNotApplied(f"layer {idx}, {method}: the cache holds {have}, expected {want}")


def verify_seen(cache, seen: int) -> None:
    """Every layer of a harness cache has seen ``seen`` tokens (the model wrote this cache, not another);
    the layers' write counters start again from zero. Only ``CompressedLayer``s are checked. Raises
    ``CompressionNotApplied`` naming the first layer whose virtual length differs."""
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, CompressedLayer):
            if layer.virtual_length != seen:
                raise CompressionNotApplied(f"layer {idx}: the harness cache has seen {layer.virtual_length} tokens where "
                                            f"the model has seen {seen}; the model did not write this cache")
            layer.take_written()


def require_full_attention(model, compressor: KVCompressor) -> None:
    """A compressor needs at least one full-attention layer to compress; a model whose every layer
    slides (or is chunked) would otherwise run as FullKV under the compressor's name. Raises
    ``ConfigError`` in that case (never for FullKV)."""
    if not compressor.is_noop and not full_attention_layers(model.config):
        from methods import ConfigError
        raise ConfigError(f"method {compressor.name!r}: {type(model).__name__} has no full-attention layer (every layer "
                          "is sliding-window or chunked), so there is nothing to compress; use method=fullkv, or a "
                          "model with full-attention layers")


def active_controller(model) -> Controller | None:
    """The compression controller attached to ``model``, if any (a ``QueryCapture`` does not count).
    Raises ``IntegrationError`` as ``attention_modules`` does."""
    for module in attention_modules(model).values():
        controller = _CONTROLLERS.get(id(module))
        if isinstance(controller, Controller):
            return controller
    return None


@contextlib.contextmanager
def routed(model, controller):
    """For the block: the model's attention runs through our wrapper, and the wrapper reports every
    full-attention module's queries to ``controller`` (anything with ``capture(layer_idx, query)``).
    Yields the model layer indices of those modules. The original implementation is restored on exit
    (also when the block raises). Raises ``IntegrationError`` from ``attention_modules``,
    ``wrapped_implementation`` and ``set_attention``."""
    modules = attention_modules(model)
    original = text_config(model.config)._attn_implementation
    try:
        set_attention(model, wrapped_implementation(original))
        for module in modules.values():
            _CONTROLLERS[id(module)] = controller
        yield list(modules)
    finally:
        for module in modules.values():
            _CONTROLLERS.pop(id(module), None)
        set_attention(model, original)


@contextlib.contextmanager
def attach(model, compressor: KVCompressor):
    """Hooks ``compressor`` into ``model`` for the block; the model is unchanged afterwards.

    Yields the ``Controller`` (``.report`` describes what the last prompt kept). FullKV attaches
    nothing at all. Raises ``IntegrationError`` (``attention_modules``, ``routed``) and ``ConfigError``
    for a model without full-attention layers (``require_full_attention``).
    """
    modules = attention_modules(model)
    controller = Controller(compressor, list(modules), text_config(model.config).num_attention_heads)
    if compressor.is_noop:
        yield controller
        return
    require_full_attention(model, compressor)
    handles = []
    try:
        with routed(model, controller):
            for module in modules.values():
                handles.append(module.register_forward_hook(controller.after_attention, with_kwargs=True))
            yield controller
    finally:
        for handle in handles:
            handle.remove()


def set_attention(model, name: str) -> None:
    """Switch ``model``'s attention implementation to ``name`` and check that every attention module
    now reads it (the modules look the name up in their config at every forward). Raises
    ``IntegrationError`` naming the first module that still reads another implementation."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if text_config(model.config)._attn_implementation != name:
        text_config(model.config)._attn_implementation = name
    for idx, module in all_attention_modules(model).items():
        if module.config._attn_implementation != name:
            raise compat.IntegrationError(f"layer {idx}: its attention module reads attn_implementation="
                                          f"{module.config._attn_implementation!r} after switching the model to {name!r}")


def is_attached(model) -> bool:
    """True while any hook of ours is on the model (used by tests)."""
    modules = attention_modules(model).values()
    return any(id(m) in _CONTROLLERS or m._forward_hooks for m in modules) or \
        text_config(model.config)._attn_implementation.startswith(PREFIX)
