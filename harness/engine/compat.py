"""Every transformers calling convention the harness relies on, in one place, each checked.

The harness attaches to a model through public extension points only, but those points still come
with conventions that have changed between releases (5.24 renamed the cache argument of every
forward from ``past_key_values`` to ``cache``; the hook that looked for the old name found nothing
and every run silently kept the full cache). Each convention is either resolved here without
depending on a name, or checked once with an ``IntegrationError`` that names the installed
transformers version and the mismatch:

* the keyword a model's ``forward`` takes its cache under: read from the signature
  (``cache_keyword``), never assumed;
* ``logits_to_keep``: passed only where the signature has it, otherwise the last position is
  sliced from the full logits (``forward_logits``);
* the model file's eager attention function (``eager_attention``): "eager" is not a registered
  ``AttentionInterface`` entry, each model file defines its own ``eager_attention_forward``;
* the attention function's tensor layout ``[B, heads, tokens, head_dim]`` (``check_query_layout``);
* the cache-layer API ``harness.engine.cache.CompressedLayer`` builds on (checked by running it once:
  ``harness.engine.cache.check_layer_api``).

The cache object the hook compresses is the one the harness created and bound to the controller
(``harness.engine.hook``), so nothing depends on the keyword under which transformers hands the cache to an
attention module.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable

import torch
import transformers

TRANSFORMERS_VERSION = transformers.__version__
#: the attention backends the hook wraps; anything else fails at config time
BACKENDS = ("sdpa", "eager", "flash_attention_2")


class IntegrationError(RuntimeError):
    """The installed transformers does not follow a convention the harness relies on, or a model
    ran around the harness's hook. The message names the transformers version and the mismatch."""

    def __init__(self, message: str):
        super().__init__(f"{message} [transformers {TRANSFORMERS_VERSION}]")


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def forward_parameters(model) -> frozenset[str]:
    """Named parameters of ``type(model).forward`` (decorators that wrap it keep the signature)."""
    return _forward_parameters(type(model))


def cache_keyword(model) -> str:
    """The keyword under which ``model``'s forward takes a cache: ``cache`` (transformers 5.24+) or
    ``past_key_values`` (earlier 5.x). Raises ``IntegrationError`` when the forward takes neither."""
    parameters = forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise IntegrationError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values` "
                           f"(its parameters: {sorted(parameters)}); the harness cannot hand it a cache")


def forward_kwargs(model, cache, last_only: bool = True) -> dict:
    """Keyword arguments of a cached forward of ``model``: the cache under the model's own keyword,
    ``use_cache``, and ``logits_to_keep=1`` where the model takes it and only the last logits are wanted.
    Raises ``IntegrationError`` (``cache_keyword``) when the forward takes no cache keyword."""
    kwargs = {cache_keyword(model): cache, "use_cache": True}
    if last_only and "logits_to_keep" in forward_parameters(model):
        kwargs["logits_to_keep"] = 1
    return kwargs


def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
                   last_only: bool = True) -> torch.Tensor:
    """One forward of ``input_ids [B, q]`` at ``position_ids [B, q]`` with ``cache``; returns the logits
    ``[B, 1, V]`` of the last position (``last_only``) or ``[B, q, V]``.
    Raises ``IntegrationError`` (``forward_kwargs``) when the forward takes no cache keyword."""
    kwargs = forward_kwargs(model, cache, last_only)
    logits = model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits
    return logits[:, -1:] if last_only else logits


@functools.lru_cache(maxsize=None)
def _eager_function(module_class: type) -> Callable | None:
    return getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None)


def eager_attention(module) -> Callable:
    """The model file's own eager attention (``eager_attention_forward`` in the module that defines
    the attention class): what transformers runs for ``attn_implementation="eager"``. Raises
    ``IntegrationError`` when that module defines none."""
    function = _eager_function(type(module))
    if function is None:
        raise IntegrationError(f"{type(module).__name__} (module {type(module).__module__}) defines no "
                               "eager_attention_forward, so the hook cannot wrap attn_implementation='eager'; "
                               f"use one of {[b for b in BACKENDS if b != 'eager']}")
    return function


def check_query_layout(layer_idx: int, query: torch.Tensor, expected_heads: int) -> None:
    """The attention function receives queries as ``[B, heads, tokens, head_dim]`` (the layout the
    compressors read); anything else means the calling convention changed. Raises
    ``IntegrationError`` when ``query`` is not 4-D or its axis 1 is not ``expected_heads``."""
    if query.dim() != 4 or query.shape[1] != expected_heads:
        raise IntegrationError(f"layer {layer_idx}: the attention function received queries "
                               f"of shape {tuple(query.shape)}; expected [batch, {expected_heads} heads, tokens, "
                               "head_dim]")


def check_backend(name: str) -> None:
    """``model.attn_implementation`` must be a backend the hook wraps (flash_attention_2 only where the
    ``flash_attn`` package imports). Raises ``methods.ConfigError`` naming the value and the fix."""
    from methods import ConfigError
    if name not in BACKENDS:
        raise ConfigError(f"model.attn_implementation={name!r} is not supported; choose one of {list(BACKENDS)} "
                          "(sdpa: PyTorch's kernels, FlashAttention among them on a GPU; eager: the model file's "
                          "own matmul-softmax attention)")
    if name == "flash_attention_2":
        import importlib.util
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation='flash_attention_2' needs the flash-attn package, which is "
                              "not installed; fix: pip install 'kv-harness[flash]', or use "
                              "model.attn_implementation=sdpa (PyTorch's own FlashAttention kernel on GPUs)")
