"""Calibration (PCA bases from text) and post-training (the gates, CE + alpha * R^2) of DynaKV, and the retain
rate a checkpoint realises on text (reference-dynakv.md sections 2.1, 3 and 4).

``calibrate`` streams the pre-RoPE keys and values of every layer into float64 second moments
(``methods.lowrank.Moments``) and returns the PCA bases. ``train`` learns the gates with the backbone frozen
(our default; the paper does not say, section 11) and the bases either frozen at PCA (``basis="frozen"``, the
default) or trained with the gates from PCA (``basis="train"``, the paper, section 2.1), bf16 autocast on a GPU
(the transform itself in float32), optional gradient checkpointing, and data parallelism over ``torchrun`` ranks
(each rank its share of the windows, gate and basis gradients averaged), with the frozen backbone optionally
sharded over the ranks by FSDP (``shard_backbone``: an 8B model's weights split across GPUs instead of copied on
each; reference-dynakv.md section 10). ``measure`` applies the hard masks (``tau``) and reports the realised rates.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from harness.engine.posttrain import build_optimizer, checked_gates, frozen_backbone, learning_bases, objective
from harness.engine.transform import TransformLog, accumulate_states, transformed
from methods.lowrank import Moments

log = logging.getLogger(__name__)


def calibrate(model, windows: torch.Tensor, batch_size: int = 8, centred: bool = False) -> dict:
    """PCA bases of every layer's K and V over ``windows`` ``[N, T]``: model layer -> {"k"/"v": ``Basis``}
    (float64), each the eigenbasis of the states' second moment (``centred``: covariance)."""
    device = next(model.parameters()).device
    moments: dict = {}

    def sink(layer, kind, states):
        if (layer, kind) not in moments:
            moments[(layer, kind)] = Moments(states.shape[-1], device=states.device)
        moments[(layer, kind)].add(states)

    for start in range(0, windows.shape[0], batch_size):
        accumulate_states(model, windows[start:start + batch_size].to(device), sink)
    bases: dict = {}
    for (layer, kind), m in sorted(moments.items()):
        bases.setdefault(layer, {})[kind] = m.basis(centred)
    return bases


#: the eta grid ``energy_rates`` measures
ETA_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def energy_rates(model, bases: dict, windows: torch.Tensor, etas=ETA_GRID, batch_size: int = 8) -> dict:
    """The retain rate the ``energy`` transform realises on ``windows`` at each ``eta``: ``{eta: rate}`` (0-1),
    so that a target rate can be matched (reference-dynakv.md section 9.3: tune eta to hit a mean rate)."""
    from methods.lowrank import transforms_on
    device = next(model.parameters()).device
    out = {}
    for eta in etas:
        transforms = transforms_on(bases, "energy", lambda layer: device, eta=eta)
        out[eta] = round(measure(model, transforms, windows, batch_size)["retain_rate"], 4)
    return out


def eta_for_rate(rates: dict, target: float) -> float:
    """The eta of ``rates`` (``energy_rates``) whose rate is closest to ``target``."""
    return min(rates, key=lambda eta: abs(rates[eta] - target))


def shard_backbone(model) -> int:
    """Shard ``model`` over the ranks of the initialised process group with FSDP (``torch.distributed.fsdp.
    fully_shard``, FSDP2): each decoder layer (the parent of each attention module) is its own unit, gathered
    for its forward (and its recomputation under gradient checkpointing) and freed after, then the rest
    (embeddings, final norm, output head, tied or not) at the root. Each rank then holds ``1/world`` of the
    weights; outputs are the unsharded model's (the weights are gathered exactly). The K/V transform hooks on
    ``k_proj``/``k_norm``/``v_proj`` still fire (the modules stay where they were). The gates and bases are not
    part of the model: their gradients are averaged by ``train`` as without FSDP. Returns the number of decoder
    layers sharded. RuntimeError without an initialised process group."""
    from torch.distributed.fsdp import fully_shard

    from harness.engine.hook import all_attention_modules
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("shard_backbone needs an initialised process group (run under torchrun)")
    names = {id(module): name for name, module in model.named_modules()}
    layers = [model.get_submodule(names[id(attention)].rpartition(".")[0])
              for attention in all_attention_modules(model).values()]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return len(layers)


def fresh_transforms(bases: dict, tau: float = 0.1, device=None, reconstruction: str = "inverse") -> dict:
    """DynaKV transforms on ``bases`` with fresh gates (keeping every dimension), float32 on ``device``,
    reconstructing with ``reconstruction`` (``inverse``: ``U^-1``; ``transpose``: ``U^T``)."""
    from methods.lowrank import transforms_on
    return transforms_on(bases, "dynakv", lambda layer: device, tau=tau, reconstruction=reconstruction)


def train(model, transforms: dict, windows: torch.Tensor, alpha: float, steps: int, batch_size: int = 8,
          lr: float = 1e-3, checkpointing: bool = False, seed: int = 0, on_step=None, basis: str = "frozen",
          basis_lr: float | None = None) -> list[dict]:
    """Train the gates of ``transforms`` on ``windows`` ``[N, T]`` for ``steps`` AdamW steps (``batch_size``
    windows per step per rank, drawn in a seeded order; each group's lr constant after a 5 % linear warm-up; no
    weight decay). The model stays frozen. ``basis``: ``"frozen"`` keeps every ``U`` at its PCA values
    (bit-identical); ``"train"`` trains every layer's K and V ``U`` with the gates at ``basis_lr`` (None: ``lr``),
    from the current basis, as each transform's ``reconstruction`` says (``inverse``: a free ``U`` and
    ``torch.linalg.inv(U)`` each step; ``transpose``: an orthogonal ``U``, ``U^-1 = U^T``), and leaves the trained
    ``U`` as each transform's ``basis.vectors`` (float32; eigenvalues and mean kept). Under ``torchrun`` each
    rank draws from its own share and the gate and basis gradients are averaged. ``on_step(record)`` sees each
    step's ``step``, ``ce``, ``rate``, ``loss``, ``lr`` (and ``basis_lr`` when the basis trains). Returns the
    records. ``ValueError`` for ``alpha < 0``, no gates, a rate not > 0 or ``basis`` not in ``BASIS_CHOICES``."""
    gates = checked_gates(transforms, alpha, basis)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    device = next(model.parameters()).device
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    mine = windows[order[rank::world]]
    was_training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    warmup = max(1, steps // 20)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    history = []
    try:
        with frozen_backbone(model), learning_bases(transforms, basis) as basis_params:
            adamw = build_optimizer(gates, basis_params, lr, basis_lr)
            for step in range(steps):
                for group in adamw.param_groups:
                    group["lr"] = group["base_lr"] * min(1.0, (step + 1) / warmup)
                picks = [(step * batch_size + i) % mine.shape[0] for i in range(batch_size)]
                batch = mine[picks].to(device)
                adamw.zero_grad(set_to_none=True)
                with autocast:
                    loss, parts = objective(model, transforms, batch, alpha, backward=True)
                if world > 1:
                    for p in gates + basis_params:
                        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
                adamw.step()
                record = {"step": step, **parts, "lr": adamw.param_groups[0]["lr"]}
                if basis_params:
                    record["basis_lr"] = adamw.param_groups[1]["lr"]
                history.append(record)
                if on_step is not None:
                    on_step(record)
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return history


@torch.no_grad()
def measure(model, transforms: dict, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """The hard masks on ``windows`` ``[N, T]``: ``retain_rate`` (mean kept fraction over tokens, layers, K and V),
    ``retain_rate_k``/``_v``, ``per_layer`` ({layer: [k, v]}), the mean ``ce`` (nats per predicted token) and
    ``perplexity`` with the transforms applied, and ``tokens``."""
    device = next(model.parameters()).device
    log_ = TransformLog()
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        with transformed(model, transforms, log_):
            logits = model(input_ids=batch, use_cache=False).logits
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                       reduction="sum"))
        count += batch[:, 1:].numel()
    layers = sorted(log_.dims)
    return {"retain_rate": log_.retain_rate(), "retain_rate_k": log_.retain_rate("k"),
            "retain_rate_v": log_.retain_rate("v"),
            "per_layer": {layer: [log_.retain_rate("k", layer), log_.retain_rate("v", layer)] for layer in layers},
            "ce": nll / count, "perplexity": math.exp(nll / count), "tokens": int(windows.numel())}
