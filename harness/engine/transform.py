"""The second kind of attachment: per-token K/V transforms (DynaKV and its low-rank baselines,
``methods.lowrank``), applied where each token's key and value are produced, at prefill and at every
decode step (DESIGN.md, "Two kinds of attachment"; reference-dynakv.md section 8).

A forward hook on each layer's key point replaces its output by the transform's reconstruction:

* keys: after ``k_proj`` (Llama, Mistral, Qwen2: the flat ``[B, T, Hkv * hd]`` output is the joint
  vector), or after ``k_norm`` where the model normalises keys (Qwen3: ``[B, T, Hkv, hd]``; Gemma 3:
  ``[B, Hkv, T, hd]``), always before RoPE;
* values: after ``v_proj``.

The reconstructed vectors go into the model's normal cache: exact simulation of a latent store (the
attention outputs are the same, up to the dtype's rounding); what a latent store would hold is
*accounted* from the kept ranks (``TransformLog``). Hooks are removed on exit, also when the block
raises. ``record_states`` uses the same points to collect calibration states.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from harness.engine.cache import text_config
from harness.engine.compat import IntegrationError
from harness.engine.hook import all_attention_modules

#: where a model normalises keys, the layout of ``k_norm``'s output (model_type -> layout)
KEY_NORM_LAYOUT = {"qwen3": "tokens_heads", "qwen3_moe": "tokens_heads", "gemma3_text": "heads_tokens",
                   "gemma3": "heads_tokens"}


@dataclass
class TransformLog:
    """What the transforms kept, per model layer and ``"k"``/``"v"``: tokens seen and the sum of their
    kept ranks, and a histogram of ranks (``rank -> tokens``); ``dims`` the joint width ``d`` per layer."""

    tokens: dict = field(default_factory=lambda: defaultdict(int))
    rank_sum: dict = field(default_factory=lambda: defaultdict(int))
    histogram: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    dims: dict = field(default_factory=dict)
    soft_rates: list = field(default_factory=list)   # training (mode="soft"): each hooked call's mean soft mask

    def add(self, layer: int, kind: str, ranks: torch.Tensor, d: int) -> None:
        """Record the kept ``ranks`` (int ``[...]``, one per token) of ``layer``'s ``kind`` (``k``/``v``)."""
        key = (layer, kind)
        flat = ranks.reshape(-1)
        self.tokens[key] += flat.numel()
        self.rank_sum[key] += int(flat.sum())
        self.dims[layer] = d
        for value, count in zip(*torch.unique(flat, return_counts=True)):
            self.histogram[key][int(value)] += int(count)

    def retain_rate(self, kind: str | None = None, layer: int | None = None) -> float:
        """Kept dimensions over all dimensions (0-1) over the tokens seen, for one ``kind`` and/or one
        ``layer`` or all; NaN before any token."""
        keys = [k for k in self.tokens if (kind is None or k[1] == kind) and (layer is None or k[0] == layer)]
        total = sum(self.tokens[k] * self.dims[k[0]] for k in keys)
        return sum(self.rank_sum[k] for k in keys) / total if total else float("nan")


def _key_module(attention, model_type: str):
    norm = getattr(attention, "k_norm", None)
    if norm is not None:
        if model_type not in KEY_NORM_LAYOUT:
            raise IntegrationError(f"{model_type}: its attention normalises keys (k_norm), and the layout of that output "
                                   f"is known for {sorted(KEY_NORM_LAYOUT)} only; add it to KEY_NORM_LAYOUT")
        return norm, KEY_NORM_LAYOUT[model_type]
    if not hasattr(attention, "k_proj") or not hasattr(attention, "v_proj"):
        raise IntegrationError(f"{model_type}: its attention has no separate k_proj/v_proj (a fused projection?), so "
                               "the K/V transform hook has no place to act")
    return attention.k_proj, "flat"


def _to_joint(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "flat":
        return x
    if layout == "tokens_heads":                 # [B, T, H, hd]
        return x.flatten(-2)
    return x.transpose(1, 2).flatten(-2)         # [B, H, T, hd] -> [B, T, H * hd]


def _from_joint(x: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "flat":
        return x
    if layout == "tokens_heads":
        return x.view(like.shape)
    b, h, t, hd = like.shape
    return x.view(b, t, h, hd).transpose(1, 2)


def _points(model):
    model_type = text_config(model.config).model_type
    for layer, attention in all_attention_modules(model).items():
        key, layout = _key_module(attention, model_type)
        yield layer, ("k", key, layout), ("v", attention.v_proj, "flat")


@contextlib.contextmanager
def transformed(model, transforms: dict, log: TransformLog | None = None, mode: str = "hard"):
    """For the block, every token's pre-RoPE key and value of each layer in ``transforms`` (model layer ->
    ``{"k": transform or None, "v": transform or None}``, each a fitted ``methods.lowrank`` transform) is
    replaced by the transform's reconstruction; kept ranks go to ``log``. ``mode="soft"`` (training, DynaKV
    transforms only): the soft-masked reconstruction, differentiable in the gates, and each call's mean
    mask in ``log.soft_rates``. Yields the log. Raises ``IntegrationError`` for a model whose key point is
    unknown, or a layer of ``transforms`` the model does not have; ``ValueError`` for another mode."""
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode={mode!r} is not one of ('hard', 'soft')")
    if mode == "soft":
        plain = [f"{layer}/{kind}" for layer, pair in transforms.items() for kind, t in pair.items()
                 if t is not None and getattr(t, "gate", None) is None]
        if plain:
            raise ValueError(f"mode='soft' needs DynaKV transforms with gates; {plain} have none")
    log = log if log is not None else TransformLog()
    handles = []
    known = set()

    def hook_for(layer, kind, transform, layout):
        def hook(module, args, output):
            joint = _to_joint(output, layout)
            if mode == "soft":
                out, mask = transform.soft(joint)
                log.soft_rates.append(mask.mean())
            else:
                out, ranks = transform.apply(joint)
                log.add(layer, kind, ranks, joint.shape[-1])
            return _from_joint(out, output, layout)
        return hook

    try:
        for layer, *points in _points(model):
            known.add(layer)
            for kind, module, layout in points:
                transform = transforms.get(layer, {}).get(kind)
                if transform is not None:
                    handles.append(module.register_forward_hook(hook_for(layer, kind, transform, layout)))
        missing = sorted(set(transforms) - known)
        if missing:
            raise IntegrationError(f"transforms for layers {missing}, which {type(model).__name__} does not have")
        yield log
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def record_states(model, input_ids: torch.Tensor) -> dict:
    """Calibration states: one forward of ``input_ids`` ``[B, T]``; returns model layer ->
    ``{"k": [B*T, d], "v": [B*T, d]}`` float32 pre-RoPE keys (after ``k_norm`` where the model has one)
    and values, heads joint."""
    states: dict = defaultdict(dict)
    handles = []

    def hook_for(layer, kind, layout):
        def hook(module, args, output):
            states[layer][kind] = _to_joint(output, layout).reshape(-1, _to_joint(output, layout).shape[-1]).float()
        return hook

    try:
        for layer, *points in _points(model):
            for kind, module, layout in points:
                handles.append(module.register_forward_hook(hook_for(layer, kind, layout)))
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return dict(states)
