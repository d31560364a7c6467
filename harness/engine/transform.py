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
import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from harness.engine.batched import TRANSFORMS_ATTACHED
from harness.engine.cache import text_config
from harness.engine.compat import IntegrationError
from harness.engine.hook import all_attention_modules

#: where a model normalises keys, the layout of ``k_norm``'s output (model_type -> layout)
KEY_NORM_LAYOUT = {"qwen3": "tokens_heads", "qwen3_moe": "tokens_heads", "gemma3_text": "heads_tokens",
                   "gemma3": "heads_tokens"}


@dataclass
class TransformLog:
    """What the transforms kept.

    ``calls``: per model layer and ``"k"``/``"v"``, the kept-rank tensor of every hooked call outside decoding, in
    order (the prompt: the prefill, then an appended question; kept on the device, so logging never
    synchronises); ``generated``: per decoded row (its index among the caches of one ``decode_caches`` or
    ``generate_many`` call; 0 for ``generate``), ``(layer, kind) -> int64 [tokens]``, the kept rank of each
    generated token fed back to the model; ``dims``: the joint width ``d`` per layer; ``soft_rates``: in soft
    mode each call's mean mask. ``tokens``, ``rank_sum``, ``histogram`` and ``retain_rate`` summarise ``calls``.

    While decoding, ``add`` does not append: the decoder sets ``recorder`` (batched decoding: ranks written in
    place into the decoder's fixed buffers, which a captured CUDA graph replays) or ``row`` (plain decoding,
    one model call per token), and hands the ranks over per row (``set_generated``). ``identity`` names the
    attached transforms (a key for the decoders, and their graphs, built while they are attached);
    ``transforms`` holds them."""

    calls: dict = field(default_factory=lambda: defaultdict(list))
    dims: dict = field(default_factory=dict)
    soft_rates: list = field(default_factory=list)   # training (mode="soft"): each hooked call's mean soft mask
    recorder: object = None                          # batched decoding: RankRecorder of the decoder
    row: int | None = None                           # plain decoding: the row whose token this is
    transforms: tuple = field(default=(), repr=False)   # the attached transform objects (kept alive)
    identity: tuple = ()
    _generated: dict = field(default_factory=dict, repr=False)   # row -> {(layer, kind): [tensors on the device]}

    def add(self, layer: int, kind: str, ranks: torch.Tensor, d: int) -> None:
        """Record the kept ``ranks`` (int ``[...]``, one per token) of ``layer``'s ``kind`` (``k``/``v``)."""
        self.dims[layer] = d
        if self.recorder is not None:
            self.recorder.write((layer, kind), ranks)
        elif self.row is not None:     # kept on the device: plain decoding never synchronises for the log
            self._generated.setdefault(self.row, {}).setdefault((layer, kind), []).append(ranks.detach().reshape(-1))
        else:
            self.calls[(layer, kind)].append(ranks.detach())

    def set_generated(self, row: int, ranks: dict) -> None:
        """Row ``row``'s generated tokens' kept ranks, ``(layer, kind) -> int [tokens]`` (from a decoder's recorder:
        ``RankRecorder.rows`` copies them out of its reused buffers). A negative entry marks a step the hook did not
        record, which ``generated`` refuses."""
        self._generated[row] = {key: [r.reshape(-1)] for key, r in ranks.items()}

    @property
    def generated(self) -> dict:
        """``row -> {(layer, kind): int64 [tokens]}`` on the CPU. RuntimeError where a recorded step holds no rank
        (a decode step that did not pass the transform)."""
        return {row: self.generated_row(row) for row in self._generated}

    def generated_row(self, row: int) -> dict:
        """Row ``row``'s entry of ``generated`` alone (``{}`` for a row without generated ranks), with the same
        check: a runner handing out rows as they finish reads one row without converting every other."""
        out = {key: torch.cat(parts).to("cpu", torch.int64) for key, parts in self._generated.get(row, {}).items()}
        for key, ranks in out.items():
            if ranks.numel() and int(ranks.min()) < 0:
                raise RuntimeError(f"row {row}: layer {key[0]} ({key[1]}) recorded no kept rank for generated tokens "
                                   f"{torch.nonzero(ranks < 0).reshape(-1)[:8].tolist()}: a decode step bypassed the "
                                   "K/V transform")
        return out

    def _flat(self, key) -> torch.Tensor:
        return torch.cat([r.reshape(-1).cpu() for r in self.calls[key]])

    @property
    def tokens(self) -> dict:
        """``(layer, kind) -> tokens seen``."""
        return {key: sum(r.numel() for r in calls) for key, calls in self.calls.items()}

    @property
    def rank_sum(self) -> dict:
        """``(layer, kind) -> the sum of the kept ranks``."""
        return {key: int(self._flat(key).sum()) for key in self.calls}

    @property
    def histogram(self) -> dict:
        """``(layer, kind) -> {rank: tokens}``."""
        out = {}
        for key in self.calls:
            values, counts = torch.unique(self._flat(key), return_counts=True)
            out[key] = {int(v): int(c) for v, c in zip(values, counts)}
        return out

    def retain_rate(self, kind: str | None = None, layer: int | None = None) -> float:
        """Kept dimensions over all dimensions (0-1) over the tokens seen, for one ``kind`` and/or one
        ``layer`` or all; NaN before any token."""
        keys = [k for k in self.calls if (kind is None or k[1] == kind) and (layer is None or k[0] == layer)]
        total = sum(r.numel() * self.dims[k[0]] for k in keys for r in self.calls[k])
        return sum(int(self._flat(k).sum()) for k in keys) / total if total else float("nan")


def fingerprint(layer: int, kind: str, transform) -> tuple:
    """What a captured decode step reads of ``transform``: its object, its scalar settings (``tau``, ``eta``,
    ``rate``, ``reconstruction``, ...) and, for every tensor it holds (basis, mean, gate parameters, SVD
    factors), the storage address and version: a graph is reused only while all of these are unchanged (a new
    ``tau``, a replaced or updated basis or gate gives another key, so another graph)."""
    tensors = []

    def visit(value):
        if isinstance(value, torch.Tensor):
            tensors.append((value.data_ptr(), None if value.is_inference() else value._version, tuple(value.shape)))
        elif isinstance(value, torch.nn.Module):
            for param in value.parameters():
                visit(param)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name))

    scalars = []
    for f in dataclasses.fields(transform):
        value = getattr(transform, f.name)
        if isinstance(value, (bool, int, float, str)) or value is None:
            scalars.append((f.name, value))
        else:
            visit(value)
    return (layer, kind, id(transform), type(transform).__name__, tuple(scalars), tuple(tensors))


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
    """Per model layer: ``(layer, ("k", key point, layout, k_proj), ("v", v_proj, "flat", v_proj))``; the last
    module is where a transform acting on the projection's input (``svd_weights``) is hooked."""
    model_type = text_config(model.config).model_type
    for layer, attention in all_attention_modules(model).items():
        key, layout = _key_module(attention, model_type)
        yield layer, ("k", key, layout, attention.k_proj), ("v", attention.v_proj, "flat", attention.v_proj)


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
    if getattr(model, TRANSFORMS_ATTACHED, None) is not None:
        raise RuntimeError("K/V transforms are already attached to this model; transformed() does not nest (the "
                           "decoder keys its graphs by the one set attached): leave the outer block first")
    log = log if log is not None else TransformLog()
    handles = []
    known = set()

    def hook_for(layer, kind, transform, layout):
        def hook(module, args, output):
            if getattr(transform, "acts_on", "output") == "input":    # svd_weights: from the projection's input
                out, ranks = transform.apply_input(args[0])
                log.add(layer, kind, ranks, out.shape[-1])
                return out
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
            for kind, module, layout, projection in points:
                transform = transforms.get(layer, {}).get(kind)
                if transform is None:
                    continue
                if getattr(transform, "acts_on", "output") == "input":
                    module, layout = projection, "flat"
                handles.append(module.register_forward_hook(hook_for(layer, kind, transform, layout)))
        missing = sorted(set(transforms) - known)
        if missing:
            raise IntegrationError(f"transforms for layers {missing}, which {type(model).__name__} does not have")
        log.transforms = tuple(t for pair in transforms.values() for t in pair.values() if t is not None)
        log.identity = (mode, *sorted(fingerprint(layer, kind, t) for layer, pair in transforms.items()
                                      for kind, t in pair.items() if t is not None))
        setattr(model, TRANSFORMS_ATTACHED, log)     # the decoders record generated tokens' ranks through it
        yield log
    finally:
        for handle in handles:
            handle.remove()
        if hasattr(model, TRANSFORMS_ATTACHED):
            delattr(model, TRANSFORMS_ATTACHED)


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
            for kind, module, layout, _ in points:
                handles.append(module.register_forward_hook(hook_for(layer, kind, layout)))
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return dict(states)


def joint_widths(model) -> dict:
    """Model layer -> the joint K width ``d`` (KV heads x head dim: ``k_proj``'s output features)."""
    return {layer: attention.k_proj.weight.shape[0] for layer, attention in all_attention_modules(model).items()}


def accumulate_states(model, input_ids: torch.Tensor, sink) -> None:
    """One forward of ``input_ids`` ``[B, T]`` (no cache, no gradient) calling ``sink(layer, kind, states)`` with
    each layer's pre-RoPE keys (after ``k_norm`` where the model has one) and values, heads joint, as
    ``[B*T, d]`` in the model dtype: calibration without holding every layer's states at once."""
    handles = []

    def hook_for(layer, kind, layout):
        def hook(module, args, output):
            joint = _to_joint(output, layout)
            sink(layer, kind, joint.reshape(-1, joint.shape[-1]))
        return hook

    try:
        for layer, *points in _points(model):
            for kind, module, layout, _ in points:
                handles.append(module.register_forward_hook(hook_for(layer, kind, layout)))
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
