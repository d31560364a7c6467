"""DynaKV's post-training (reference-dynakv.md section 3): the gates learn, on plain next-token
prediction, which coefficients each token can drop, with the objective ``CE + alpha * R^2`` where ``R`` is
the mean soft-mask retain rate over all tokens, layers and K/V. The backbone is frozen (the paper does not
say; its "lightweight fine-tuning to calibrate the gating mechanism" suggests so) and so is the basis
here (training it is a later option); a larger ``alpha`` gives a lower rate, one trained model per rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.engine.transform import transformed


def gate_parameters(transforms: dict) -> list[torch.nn.Parameter]:
    """The trainable parameters of every DynaKV gate in ``transforms`` (layer -> {"k"/"v": transform})."""
    return [p for pair in transforms.values() for t in pair.values() if getattr(t, "gate", None) is not None
            for p in t.gate.parameters()]


def objective(model, transforms: dict, input_ids: torch.Tensor, alpha: float,
              backward: bool = False) -> tuple[torch.Tensor, dict]:
    """``(loss, parts)`` for one batch ``[B, T]``: ``loss = CE + alpha * R^2`` with the soft masks
    (``transformed(mode="soft")``); ``parts``: ``ce``, ``rate`` and ``loss`` as floats. ``backward``: also
    ``loss.backward()`` while the hooks are still attached (gradient checkpointing re-runs the layers during
    the backward pass, and they must transform as in the forward)."""
    with transformed(model, transforms, mode="soft") as log:
        logits = model(input_ids=input_ids, use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        rate = torch.stack(log.soft_rates).mean()
        loss = ce + alpha * rate ** 2
        if backward:
            loss.backward()
    return loss, {"ce": float(ce.detach()), "rate": float(rate.detach()), "loss": float(loss.detach())}


def post_train(model, transforms: dict, batches: list[torch.Tensor], alpha: float, steps: int,
               lr: float = 1e-3) -> list[dict]:
    """Train the gates of ``transforms`` for ``steps`` AdamW steps over ``batches`` (``[B, T]`` token ids,
    cycled), the model frozen (its ``requires_grad`` flags restored afterwards). Returns one record per
    step: ``step``, ``ce``, ``rate`` (mean soft retain rate, 0-1) and ``loss``. Raises ``ValueError`` when
    ``transforms`` holds no DynaKV gate or ``alpha < 0``."""
    params = gate_parameters(transforms)
    if not params:
        raise ValueError("post_train needs DynaKV transforms (with gates); fit them first")
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)   # no pull of the gates towards uniform
    history = []
    try:
        for step in range(steps):
            optimizer.zero_grad()
            loss, parts = objective(model, transforms, batches[step % len(batches)], alpha, backward=True)
            optimizer.step()
            history.append({"step": step, **parts})
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    return history
