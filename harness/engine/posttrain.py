"""DynaKV's post-training (reference-dynakv.md section 3): the gates learn, on plain next-token
prediction, which coefficients each token can drop, with the objective ``CE + alpha * R^2`` where ``R`` is
the mean soft-mask retain rate over all tokens, layers and K/V. The backbone is frozen (the paper does not
say; its "lightweight fine-tuning to calibrate the gating mechanism" suggests so). The basis ``U`` of every
layer's K and V is frozen at PCA by default (``basis="frozen"``); ``basis="train"`` trains it jointly with the
gates from its PCA initialisation, as the paper does (section 2.1), keeping ``U^-1`` as each transform's
``reconstruction`` says (``methods.lowrank.TrainableBasis``). A larger ``alpha`` gives a lower rate, one trained
model per rate.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from harness.engine.transform import transformed
from methods.lowrank import BASIS_CHOICES


def gate_parameters(transforms: dict) -> list[torch.nn.Parameter]:
    """The trainable parameters of every DynaKV gate in ``transforms`` (layer -> {"k"/"v": transform})."""
    return [p for pair in transforms.values() for t in pair.values() if getattr(t, "gate", None) is not None
            for p in t.gate.parameters()]


def basis_parameters(transforms: dict) -> list[torch.nn.Parameter]:
    """The trainable parameters of every basis being trained in ``transforms`` (``DynaKV.learn_basis``): float32,
    ``[d, d]`` each (``U`` itself, or the orthogonal parametrisation's parameter); empty when none is."""
    return [p for pair in transforms.values() for t in pair.values()
            if getattr(t, "learned_basis", None) is not None for p in t.learned_basis.parameters()]


@contextlib.contextmanager
def learning_bases(transforms: dict, basis: str = "frozen"):
    """For the block, with ``basis="train"``, every DynaKV transform's ``U`` trainable (``learn_basis``, from its
    current basis); yields their parameters (``basis_parameters``; ``[]`` for ``"frozen"``). On exit, also when
    the block raises, the trained ``U`` becomes each transform's plain basis (``freeze_basis``). ``ValueError``
    for another ``basis``."""
    if basis not in BASIS_CHOICES:
        raise ValueError(f"basis={basis!r} is not one of {BASIS_CHOICES}")
    learning = [t for pair in transforms.values() for t in pair.values()
                if basis == "train" and hasattr(t, "learn_basis")]
    for t in learning:
        t.learn_basis()
    try:
        yield basis_parameters(transforms)
    finally:
        for t in learning:
            t.freeze_basis()


def build_optimizer(gates: list, basis_params: list, lr: float,
                    basis_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW without weight decay (no pull of the gates towards uniform, nor of ``U`` towards 0): the gates at
    ``lr``, the bases (if any) in a second group at ``basis_lr`` (None: ``lr``). Each group's ``base_lr`` is
    its rate before warm-up. ``ValueError`` for a rate that is not > 0."""
    basis_lr = lr if basis_lr is None else basis_lr
    for name, value in (("lr", lr), ("basis_lr", basis_lr)):
        if not value > 0:
            raise ValueError(f"{name}={value} must be > 0")
    groups = [{"params": gates, "lr": lr, "base_lr": lr}]
    if basis_params:
        groups.append({"params": basis_params, "lr": basis_lr, "base_lr": basis_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


@contextlib.contextmanager
def _step_bases(transforms: dict):
    """Each trained ``U`` and its inverse computed once for the step (``DynaKV.step_basis``)."""
    with contextlib.ExitStack() as stack:
        for pair in transforms.values():
            for t in pair.values():
                if getattr(t, "step_basis", None) is not None:
                    stack.enter_context(t.step_basis())
        yield


def objective(model, transforms: dict, input_ids: torch.Tensor, alpha: float,
              backward: bool = False) -> tuple[torch.Tensor, dict]:
    """``(loss, parts)`` for one batch ``[B, T]``: ``loss = CE + alpha * R^2`` with the soft masks
    (``transformed(mode="soft")``); ``parts``: ``ce``, ``rate`` and ``loss`` as floats. ``backward``: also
    ``loss.backward()`` while the hooks are still attached (gradient checkpointing re-runs the layers during
    the backward pass, and they must transform as in the forward). A basis being trained enters as ``U`` and
    ``U^-1`` computed once for the batch, before the model runs (``DynaKV.step_basis``)."""
    with _step_bases(transforms), transformed(model, transforms, mode="soft") as log:
        logits = model(input_ids=input_ids, use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        rate = torch.stack(log.soft_rates).mean()
        loss = ce + alpha * rate ** 2
        if backward:
            loss.backward()
    return loss, {"ce": float(ce.detach()), "rate": float(rate.detach()), "loss": float(loss.detach())}


def checked_gates(transforms: dict, alpha: float, basis: str) -> list[torch.nn.Parameter]:
    """The gate parameters of ``transforms`` (``gate_parameters``), after checking the training settings:
    ``ValueError`` for no DynaKV gate, ``alpha < 0`` or ``basis`` not in ``BASIS_CHOICES``."""
    gates = gate_parameters(transforms)
    if not gates:
        raise ValueError("training needs DynaKV transforms with gates; fit them first")
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    if basis not in BASIS_CHOICES:
        raise ValueError(f"basis={basis!r} is not one of {BASIS_CHOICES}")
    return gates


@contextlib.contextmanager
def frozen_backbone(model):
    """For the block, no parameter of ``model`` requires grad (the backbone stays frozen); each one's flag is
    restored on exit, also when the block raises."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def post_train(model, transforms: dict, batches: list[torch.Tensor], alpha: float, steps: int,
               lr: float = 1e-3, basis: str = "frozen", basis_lr: float | None = None) -> list[dict]:
    """Train the gates of ``transforms`` (and with ``basis="train"`` their bases ``U``, at ``basis_lr``, None:
    ``lr``; see ``learning_bases``) for ``steps`` AdamW steps over ``batches`` (``[B, T]`` token ids, cycled),
    the model frozen (its ``requires_grad`` flags restored afterwards). Returns one record per step: ``step``,
    ``ce``, ``rate`` (mean soft retain rate, 0-1) and ``loss``. Raises ``ValueError`` when ``transforms`` holds
    no DynaKV gate, ``alpha < 0``, a rate is not > 0 or ``basis`` is not one of ``BASIS_CHOICES``."""
    gates = checked_gates(transforms, alpha, basis)
    history = []
    with frozen_backbone(model), learning_bases(transforms, basis) as basis_params:
        adamw = build_optimizer(gates, basis_params, lr, basis_lr)
        for step in range(steps):
            adamw.zero_grad()
            loss, parts = objective(model, transforms, batches[step % len(batches)], alpha, backward=True)
            adamw.step()
            history.append({"step": step, **parts})
    return history
