"""Token-wise low-rank K/V transforms: DynaKV's building blocks and its training-free baselines.

DynaKV (Lu et al., "One Size Does Not Fit All: Token-Wise Adaptive Compression for KV Cache", arXiv
2603.04411v1; no public code, reference-dynakv.md) compresses each token's pre-RoPE key (and value)
vector ``x`` of one layer, all KV heads joint (``d = Hkv * head_dim``), to a *prefix* of its coefficients
in a per-layer basis ``U`` (PCA-initialised), with a per-token prefix length ``r_t``:

    x~ = x @ U                                   # rotate                       [..., d]
    p  = softmax(x~ @ W + b)                     # the gate: a cut-off distribution per token
    m  = suffix_sum(p)                           # m_i = P(cut-off >= i): 1 at i = 0, non-increasing
    training:  x^ = (x~ * m) @ U^-1              # soft mask, gradients flow
    inference: r_t = #(m > tau); x^ = (x~ * prefix(r_t)) @ U^-1    # only x~[:r_t] need be stored

This module has the pieces as pure tensor functions (``pca_basis``, ``retain_mask``, ``hard_ranks``,
``prefix_mask``, ``energy_ranks``, ``joint_weight_svd``) and the transforms that use them, each built by
name from ``TRANSFORMS`` (``build_transform``):

* ``pca_uniform``: every token keeps ``round(rate * d)`` coefficients of the PCA basis (the paper's
  "no adaptivity, no training" ablation, Eigen-Attention-like; reference-dynakv.md section 9.1);
* ``svd_weights``: Palu's joint low-rank factorisation of ``W_k``/``W_v`` at ``round(rate * d)`` (the paper's
  main baseline, training-free; it acts on the projection's input, not on the key);
* ``energy``: every token keeps the fewest coefficients whose energy reaches ``eta`` of its own
  (training-free and token-adaptive: *our* ablation, not in the paper; section 9.3);
* ``dynakv``: the learned gate (``TokenGate``) with soft masking for training and ``tau`` for inference.

The transforms act on ``[..., d]`` vectors and return the reconstruction and the kept rank per token;
attaching them to a model (the K/V transform hook) is the harness's part. Choices the paper leaves open
are knobs with our defaults named: ``centred`` (PCA of centred states; the paper subtracts no mean in
``x @ U``, so the default is False), ``reconstruction`` (``inverse``: ``U^-1`` as the paper; ``transpose``:
``U^T``, exact for an orthogonal ``U``).

The paper trains ``U`` with the gates, from its PCA initialisation, without constraining it to stay orthogonal
(reference-dynakv.md section 2.1; how it keeps ``U^-1`` is not stated). ``DynaKV.learn_basis`` makes a
transform's ``U`` trainable (``TrainableBasis``) in the way its ``reconstruction`` implies: a free matrix
reconstructed by ``torch.linalg.inv`` (``inverse``), or a matrix kept orthogonal by parametrisation so that
``U^-1 = U^T`` exactly (``transpose``); ``DynaKV.freeze_basis`` writes the trained ``U`` back as a plain basis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import ConfigError

RECONSTRUCTIONS = ("inverse", "transpose")
#: what DynaKV's training does with the bases: keep them (PCA), or train them with the gates
BASIS_CHOICES = ("frozen", "train")


@dataclass
class Basis:
    """A per-layer basis: ``vectors`` ``[d, d]`` (column ``i`` is direction ``i``, by decreasing
    ``eigenvalues`` ``[d]``), and the ``mean`` ``[d]`` subtracted before projecting (None: uncentred).
    float64 or float32, as computed."""

    vectors: torch.Tensor
    eigenvalues: torch.Tensor
    mean: torch.Tensor | None = None

    def to(self, device=None, dtype: torch.dtype = torch.float32) -> "Basis":
        """A copy on ``device`` in ``dtype`` (float32 by default: what the transforms compute in)."""
        return Basis(self.vectors.to(device, dtype), self.eigenvalues.to(device, dtype),
                     None if self.mean is None else self.mean.to(device, dtype))


def transforms_on(bases: dict, name: str, device_of=lambda layer: None, gates: dict | None = None,
                  **knobs) -> dict:
    """The transform ``name`` (with ``knobs``) on every basis of ``bases`` (layer -> {"k"/"v": ``Basis``}): layer ->
    {"k"/"v": transform}, each with its basis in float32 on ``device_of(layer)``, centred where the basis has a
    mean; a DynaKV transform gets ``gates[layer][kind]`` there, or a fresh ``TokenGate`` without ``gates``."""
    out = {}
    for layer, pair in bases.items():
        device = device_of(layer)
        out[layer] = {}
        for kind, basis in pair.items():
            t = build_transform(name, centred=basis.mean is not None, **knobs)
            t.basis = basis.to(device)
            if isinstance(t, DynaKV):
                t.gate = (gates[layer][kind] if gates else TokenGate(basis.vectors.shape[0])).to(device)
            out[layer][kind] = t
    return out


class Moments:
    """Streaming second moments of states ``[N, d]`` (``add`` per batch, float64 sums), so that calibration over
    millions of tokens keeps ``d x d`` numbers per layer instead of the states: ``basis(centred)`` equals
    ``pca_basis`` of all the states added (up to float64 summation order)."""

    def __init__(self, d: int, device=None):
        self.count = 0
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=device)

    def add(self, states: torch.Tensor) -> None:
        """Accumulate ``states`` ``[N, d]``."""
        x = states.reshape(-1, states.shape[-1]).to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer += x.T @ x

    def basis(self, centred: bool = False) -> Basis:
        """The PCA basis of every state added (``pca_basis``'s definition); ``ValueError`` for fewer than 2."""
        if self.count < 2:
            raise ValueError(f"PCA needs at least 2 states; got {self.count}")
        second_moment = self.outer / self.count
        mean = None
        if centred:
            mean = self.total / self.count
            second_moment = second_moment - torch.outer(mean, mean)
        return _eigenbasis(second_moment, mean)


def _eigenbasis(second_moment: torch.Tensor, mean: torch.Tensor | None) -> Basis:
    eigenvalues, vectors = torch.linalg.eigh(second_moment)       # ascending
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    peak = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[peak, torch.arange(vectors.shape[1])])
    return Basis(vectors * signs, eigenvalues, mean)


def pca_basis(states: torch.Tensor, centred: bool = False, dtype: torch.dtype = torch.float64) -> Basis:
    """The PCA basis of calibration ``states`` ``[N, d]`` (pre-RoPE keys or values of one layer, heads
    joint): the eigenvectors of the second-moment matrix ``X^T X / N`` (``centred``: of the covariance,
    with the mean subtracted) by decreasing eigenvalue, computed in ``dtype`` (float64 by default; the
    paper's footnote 2, reference-dynakv.md section 2.1). Each eigenvector's sign is fixed so that its
    largest-magnitude entry is positive (deterministic across runs). Raises ``ValueError`` for fewer than
    2 states or a tensor that is not 2-D."""
    if states.dim() != 2 or states.shape[0] < 2:
        raise ValueError(f"states must be [N >= 2, d]; got {tuple(states.shape)}")
    x = states.to(dtype)
    mean = x.mean(dim=0) if centred else None
    if mean is not None:
        x = x - mean
    return _eigenbasis(x.T @ x / x.shape[0], mean)


def retain_mask(probabilities: torch.Tensor) -> torch.Tensor:
    """DynaKV's soft mask from the gate's cut-off distribution ``[..., d]``: ``m_i = sum_{j >= i} p_j``,
    the probability that the cut-off lies at or beyond ``i`` (``Flip(cumsum(p))``, ON-LSTM's cumax;
    reference-dynakv.md section 2.2). Non-increasing along the last axis, ``m_0 = sum(p)`` (1 for a
    distribution), same dtype."""
    return probabilities.flip(-1).cumsum(-1).flip(-1)


def hard_ranks(mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Inference ranks from a soft mask ``[..., d]``: ``r_t = #(m > tau)`` (int64 ``[...]``). Where ``m``
    is non-increasing, ``1[m > tau]`` is exactly a prefix of ``r_t`` ones."""
    return (mask > tau).sum(dim=-1)


def prefix_mask(ranks: torch.Tensor, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., d]`` of ``dtype``: 1 at positions ``< ranks`` (int ``[...]``), 0 after."""
    return (torch.arange(d, device=ranks.device) < ranks.unsqueeze(-1)).to(dtype)


def energy_ranks(coefficients: torch.Tensor, eta: float) -> torch.Tensor:
    """Per token, the fewest leading coefficients whose energy ``sum x~_i^2`` reaches ``eta`` of the
    token's total (int64 ``[...]``, in ``[1, d]``; 1 for a zero vector). ``coefficients``: ``[..., d]`` in
    the (PCA) basis. ``eta`` in (0, 1]."""
    energy = coefficients.double().square()
    cumulative = energy.cumsum(-1)
    total = cumulative[..., -1:]
    reached = cumulative >= eta * total * (1 - 1e-12)     # relative tolerance: rounding never adds a dimension
    return reached.to(torch.int64).argmax(dim=-1) + 1


def joint_weight_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Palu-style joint low-rank factorisation of a K or V projection (all heads together): ``weight``
    ``[d, d_model]`` (``nn.Linear``'s layout) -> ``(down [rank, d_model], up [d, rank])`` with
    ``up @ down`` the best rank-``rank`` approximation (truncated SVD, float32 or better); the cache would
    hold the ``rank``-dim latent ``down @ h`` and reconstruct with ``up`` (reference-dynakv.md section 9.2,
    the paper's main baseline). Raises ``ValueError`` for a rank outside ``[1, min(weight.shape)]``."""
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank={rank} must be in [1, {min(weight.shape)}]")
    u, s, vh = torch.linalg.svd(weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32),
                                full_matrices=False)
    return vh[:rank], u[:, :rank] * s[:rank]


class TokenGate(torch.nn.Module):
    """DynaKV's gate for one layer and one of K/V: ``p = softmax(x~ @ W + b)`` over the ``d`` cut-off
    positions (one logit per position; reference-dynakv.md section 2.2, width ``d`` is our reading).
    ``forward(x~ [..., d]) -> m [..., d]``, the soft mask (``retain_mask``). Initialised to keep every
    dimension: zero ``W`` and ``b`` peaked at the last cut-off by ``5 + log(d)``, so every mask entry is
    within about ``e^-5`` (0.7 %) of 1: training starts next to the full model with gradients not vanishing."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d, d))
        self.bias = torch.nn.Parameter(torch.zeros(d))
        with torch.no_grad():
            self.bias[-1] = 5.0 + math.log(d)

    def forward(self, rotated: torch.Tensor) -> torch.Tensor:
        """``rotated`` ``[..., d]`` coefficients -> the soft mask ``[..., d]`` in their dtype (the softmax in
        float32)."""
        logits = rotated @ self.weight.to(rotated.dtype) + self.bias.to(rotated.dtype)
        return retain_mask(torch.softmax(logits.float(), dim=-1)).to(rotated.dtype)


class TrainableBasis(torch.nn.Module):
    """A per-layer basis ``U`` ``[d, d]`` being trained with the gates (reference-dynakv.md section 2.1: ``U`` is
    PCA-initialised, then trained; the paper does not constrain it to stay orthogonal and does not say how it
    keeps ``U^-1``). Its parameters are float32; ``vectors`` is ``U`` (column ``i`` is direction ``i``).

    ``orthogonal=False`` (``reconstruction="inverse"``): ``vectors`` is a free parameter, initialised to
    ``init``; the reconstruction is ``torch.linalg.inv(U)``, recomputed in float32 and differentiable.
    ``orthogonal=True`` (``reconstruction="transpose"``): ``vectors`` is parametrised on the orthogonal group
    (``torch.nn.utils.parametrizations.orthogonal``: the matrix exponential of a skew-symmetric parameter,
    times ``init``), so ``U^-1 = U^T`` at every step; ``init`` must then be orthogonal (PCA eigenvectors are),
    and one that is not to float32 tolerance (a basis stored in bfloat16) is first re-orthogonalised by QR.

    ``forward() -> (U, U^-1)``, float32 ``[d, d]`` each, autocast off. ``ValueError`` for ``init`` not ``[d, d]``."""

    def __init__(self, init: torch.Tensor, orthogonal: bool = False):
        super().__init__()
        if init.dim() != 2 or init.shape[0] != init.shape[1]:
            raise ValueError(f"a basis must be [d, d]; got {tuple(init.shape)}")
        self.orthogonal = orthogonal
        self.vectors = torch.nn.Parameter(init.detach().to(torch.float32).clone())
        if orthogonal:
            torch.nn.utils.parametrizations.orthogonal(self, "vectors")

    def matrix(self) -> torch.Tensor:
        """``U`` (float32 ``[d, d]``; orthogonal: computed from the parameter on each call, autocast off)."""
        with torch.autocast(device_type=next(self.parameters()).device.type, enabled=False):
            return self.vectors

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, U^-1)``: float32 ``[d, d]`` each, autocast off (``U^T`` when orthogonal, else ``torch.linalg.inv``)."""
        vectors = self.matrix()
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            return vectors, vectors.T if self.orthogonal else torch.linalg.inv(vectors)


@dataclass
class LowRankTransform:
    """Base of the token-wise low-rank transforms of one layer's K or V (``d`` = KV heads x head dim).

    ``basis``: the layer's ``Basis`` (set after calibration; ``fit`` computes it); ``reconstruction``:
    ``inverse`` (``U^-1``, the paper) or ``transpose`` (``U^T``, exact only for an orthogonal ``U``).
    ``apply(x [..., d]) -> (x^ [..., d] in x's dtype, ranks int64 [...])``. Subclasses give ``ranks``."""

    name: ClassVar[str] = ""
    #: where it acts: "output" (the key/value vector) or "input" (the projection's input: svd_weights)
    acts_on: ClassVar[str] = "output"
    reconstruction: str = "inverse"
    centred: bool = False
    basis: Basis | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"{self.name}: reconstruction={self.reconstruction!r} is not one of {RECONSTRUCTIONS}")

    def fit(self, states: torch.Tensor) -> "LowRankTransform":
        """Compute the basis from calibration states ``[N, d]`` (``pca_basis``); returns self."""
        self.basis = pca_basis(states, centred=self.centred)
        return self

    def basis_vectors(self) -> torch.Tensor:
        """``U`` ``[d, d]`` (column ``i`` is direction ``i``): the basis' ``vectors``. RuntimeError before ``fit``."""
        if self.basis is None:
            raise RuntimeError(f"{self.name}: no basis; call fit(states) first")
        return self.basis.vectors

    def _inverse(self) -> torch.Tensor:
        """``U^-1`` ``[d, d]`` (``U^T`` for ``reconstruction="transpose"``), in ``U``'s dtype.

        A ``U`` that requires grad, under grad mode, gets a fresh ``torch.linalg.inv`` in this call's graph and
        nothing is cached. Otherwise the inverse is computed once, without a graph, and cached against the
        tensor itself (held, so that a freed tensor's id reused by a new one cannot match) and its ``_version``
        (bumped by any in-place change, an optimizer step included): a replaced or updated ``U`` is never
        answered with an old inverse, and no cached tensor carries an autograd graph across calls. An inference
        tensor has no version to compare, so its inverse is computed on every call, never cached."""
        vectors = self.basis_vectors()
        if self.reconstruction == "transpose":
            return vectors.T
        if (vectors.requires_grad and torch.is_grad_enabled()) or vectors.is_inference():
            return torch.linalg.inv(vectors)
        cached = getattr(self, "_inverse_cache", None)
        if cached is None or cached[0] is not vectors or cached[1] != vectors._version:
            with torch.inference_mode(False), torch.no_grad():   # a plain tensor, usable in and out of inference
                self._inverse_cache = (vectors, vectors._version, torch.linalg.inv(vectors))
        return self._inverse_cache[2]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` -> coefficients ``[..., d]`` in the basis (float64 or the basis dtype)."""
        vectors = self.basis_vectors()
        x = x.to(vectors.dtype)
        if self.basis.mean is not None:
            x = x - self.basis.mean
        return x @ vectors

    def ranks(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The kept rank per token (int64 ``[...]``) of ``coefficients`` ``[..., d]``; subclasses decide."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress and reconstruct every token of ``x`` ``[..., d]``: keep each token's first ``r_t``
        coefficients; returns ``(x^, r)`` with ``x^`` in ``x``'s dtype."""
        coefficients = self.rotate(x)
        ranks = self.ranks(coefficients)
        kept = coefficients * prefix_mask(ranks, coefficients.shape[-1], coefficients.dtype)
        out = kept @ self._inverse()
        if self.basis.mean is not None:
            out = out + self.basis.mean
        return out.to(x.dtype), ranks


def kept_rank(rate: float, d: int) -> int:
    """``round(rate * d)``, at least 1: the rank a fixed-rate transform keeps of ``d`` dimensions."""
    return max(1, round(rate * d))


def _check_fraction(method: str, knob: str, value, meaning: str, example: float) -> None:
    """``value`` must be a number in (0, 1]; ``ConfigError`` naming the knob, its meaning and an example."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{method}: {knob}={value!r} must be in (0, 1] ({meaning}); fix: e.g. {knob}={example}")


@dataclass
class PCAUniform(LowRankTransform):
    """Every token keeps ``round(rate * d)`` coefficients (at least 1): the training-free ablation."""

    name: ClassVar[str] = "pca_uniform"
    rate: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self.name, "rate", self.rate, "the fraction of dimensions kept", 0.5)

    def ranks(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``round(rate * d)`` (at least 1) for every token: int64 ``[...]``."""
        return torch.full(coefficients.shape[:-1], kept_rank(self.rate, coefficients.shape[-1]), dtype=torch.int64,
                          device=coefficients.device)


@dataclass
class EnergyAdaptive(LowRankTransform):
    """Each token keeps the fewest coefficients holding ``eta`` of its energy (``energy_ranks``): our
    training-free token-adaptive ablation, not the paper's."""

    name: ClassVar[str] = "energy"
    eta: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self.name, "eta", self.eta, "the share of each token's energy kept", 0.9)

    def ranks(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``energy_ranks(coefficients, eta)``: int64 ``[...]``."""
        return energy_ranks(coefficients, self.eta)


@dataclass
class DynaKV(LowRankTransform):
    """The learned gate (``gate``: a ``TokenGate``) with ``tau`` for inference ranks; ``soft(x)`` is the
    training path (the continuous mask, differentiable in ``gate``, and in ``U`` while ``learned_basis`` is set:
    ``learn_basis``, ``step_basis``, ``freeze_basis``)."""

    name: ClassVar[str] = "dynakv"
    tau: float = 0.1
    gate: TokenGate | None = dataclasses.field(default=None, repr=False)
    #: ``U`` while it is being trained (``learn_basis``); None: ``basis.vectors`` is ``U``
    learned_basis: TrainableBasis | None = dataclasses.field(default=None, repr=False)

    def learn_basis(self) -> TrainableBasis:
        """Make ``U`` trainable from the current ``basis`` (the PCA one, the paper's initialisation): a
        ``TrainableBasis`` on the basis' device, orthogonal when ``reconstruction="transpose"``. The basis'
        eigenvalues and mean stay (as float32 from now on); no tensor of the basis is modified (the calibration's
        bases may be shared with other transforms). Returns it (the same one on a second call). RuntimeError
        before ``fit``."""
        if self.learned_basis is None:
            vectors = self.basis_vectors()
            self.basis = self.basis.to(vectors.device)     # float32 mean: the soft path computes in float32
            self.learned_basis = TrainableBasis(vectors, orthogonal=self.reconstruction == "transpose").to(
                vectors.device)
        return self.learned_basis

    def freeze_basis(self) -> None:
        """End training ``U``: the trained ``U`` (float32, detached) becomes ``basis.vectors`` of a new ``Basis``
        with the same eigenvalues (the calibration's) and mean; nothing without ``learned_basis``."""
        if self.learned_basis is None:
            return
        with torch.no_grad():
            vectors = self.learned_basis.matrix().detach().clone()
        self.basis = Basis(vectors, self.basis.eigenvalues, self.basis.mean)
        self.learned_basis = None

    @contextlib.contextmanager
    def step_basis(self):
        """For one training step (forward and backward): ``(U, U^-1)`` computed once from ``learned_basis`` and
        used by every call in the block, gradient checkpointing's recomputation included (it sees the tensors of
        the forward, made outside the checkpointed layers); dropped on exit, so that no tensor of this step's
        graph serves a later step. Nothing without ``learned_basis``."""
        if self.learned_basis is None:
            yield
            return
        self._step_basis = self.learned_basis()
        try:
            yield
        finally:
            self._step_basis = None

    def basis_vectors(self) -> torch.Tensor:
        """``U``: this step's (``step_basis``), else the trained one's current value, else ``basis.vectors``."""
        step = getattr(self, "_step_basis", None)
        if step is not None:
            return step[0]
        if self.learned_basis is not None:
            return self.learned_basis.matrix()
        return super().basis_vectors()

    def _inverse(self) -> torch.Tensor:
        step = getattr(self, "_step_basis", None)
        if step is not None:
            return step[1]
        if self.learned_basis is not None:
            return self.learned_basis()[1]
        return super()._inverse()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau < 1:
            raise ConfigError(f"dynakv: tau={self.tau!r} must be in [0, 1) (the mask threshold; the paper's example "
                              "is 0.1); fix: e.g. tau=0.1")

    def fit(self, states: torch.Tensor) -> "DynaKV":
        """The PCA basis of ``states`` ``[N, d]`` (the paper's initialisation; a basis being trained is dropped)
        and, if there is none yet, a fresh ``TokenGate`` that keeps every dimension; returns self."""
        super().fit(states)
        self.learned_basis = None
        if self.gate is None:
            self.gate = TokenGate(states.shape[-1]).to(states.device)
        return self

    def ranks(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``#(m > tau)`` of the gate's soft mask per token: int64 ``[...]``."""
        return hard_ranks(self.gate(coefficients.float()), self.tau)

    def soft(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: ``(x^, m)`` with ``x^ = (x~ * m) @ U^-1`` and the soft mask ``m [..., d]``, in float32 even
        under autocast (inference computes in float32 too: training must see the same transform). ``x^`` is in
        ``x``'s dtype; differentiable in the gate and, while it is being trained, in ``U``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            coefficients = self.rotate(x).float()
            mask = self.gate(coefficients)
            out = (coefficients * mask) @ self._inverse().float()
            if self.basis.mean is not None:
                out = out + self.basis.mean.float()
        return out.to(x.dtype), mask


@dataclass
class WeightSVD(LowRankTransform):
    """Palu-style joint low-rank factorisation of the K or V projection (the paper's main baseline,
    training-free; reference-dynakv.md sections 6 and 9.2): ``fit_weight`` factors ``W [d, d_model]`` to rank
    ``round(rate * d)`` (``joint_weight_svd``); a latent store holds ``down @ h`` per token and the layer
    reconstructs ``up @ latent (+ bias)``. It acts on the projection's *input* ``h`` (``acts_on``), so on
    models that normalise keys the normalisation runs on the reconstruction, as in Palu. No basis."""

    name: ClassVar[str] = "svd_weights"
    acts_on: ClassVar[str] = "input"
    rate: float = 0.5
    down: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    up: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    bias: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self.name, "rate", self.rate, "the fraction of dimensions kept", 0.5)

    def fit_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "WeightSVD":
        """Factor ``weight`` ``[d, d_model]`` (float32 SVD) keeping ``bias`` ``[d]``; returns self."""
        self.down, self.up = joint_weight_svd(weight.detach().float(), kept_rank(self.rate, weight.shape[0]))
        self.bias = None if bias is None else bias.detach().float()
        return self

    def apply_input(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``[..., d_model]`` -> ``(x^ [..., d] in h's dtype, ranks int64 [...])``: the projection through
        its rank-``r`` factorisation, every token keeping ``r``."""
        if self.down is None:
            raise RuntimeError("svd_weights: call fit_weight(weight, bias) first")
        dtype = self.down.dtype if h.device.type == "cpu" else h.dtype
        out = (h.to(dtype) @ self.down.to(h.device, dtype).T) @ self.up.to(h.device, dtype).T
        if self.bias is not None:
            out = out + self.bias.to(h.device, dtype)
        ranks = torch.full(h.shape[:-1], self.down.shape[0], dtype=torch.int64, device=h.device)
        return out.to(h.dtype), ranks


TRANSFORMS = {cls.name: cls for cls in (PCAUniform, WeightSVD, EnergyAdaptive, DynaKV)}


def build_transform(name: str, **knobs) -> LowRankTransform:
    """The transform registered as ``name`` with ``knobs``; ``ConfigError`` naming the choices otherwise."""
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown low-rank transform {name!r}; choose from {sorted(TRANSFORMS)}")
    return TRANSFORMS[name](**knobs)
