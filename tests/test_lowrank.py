"""DynaKV's building blocks and training-free baselines (methods/lowrank.py), against independent
computations: numpy's eigendecomposition and SVD, brute-force ranks, exact reconstruction at full rank."""

import numpy as np
import pytest
import torch

from methods import ConfigError
from methods.lowrank import (
    Basis,
    DynaKV,
    TokenGate,
    TrainableBasis,
    build_transform,
    energy_ranks,
    hard_ranks,
    joint_weight_svd,
    pca_basis,
    prefix_mask,
    retain_mask,
)


def states(n=400, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 0.5


@pytest.mark.parametrize("centred", [False, True])
def test_pca_basis_equals_numpy_eigendecomposition(centred):
    x = states()
    basis = pca_basis(x, centred=centred)
    a = x.numpy() - (x.numpy().mean(0) if centred else 0)
    values, vectors = np.linalg.eigh(a.T @ a / len(a))
    order = np.argsort(values)[::-1]
    np.testing.assert_allclose(basis.eigenvalues.numpy(), values[order], rtol=1e-10)
    for i, j in enumerate(order):       # the same directions, up to sign
        assert abs(abs(np.dot(basis.vectors[:, i].numpy(), vectors[:, j])) - 1) < 1e-8
    assert torch.allclose(basis.vectors.T @ basis.vectors, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert (basis.mean is not None) == centred


def test_soft_mask_is_monotone_and_its_hard_version_a_prefix():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, 32), dim=-1)
    m = retain_mask(p)
    assert torch.allclose(m[:, 0], torch.ones(50)) and (m.diff(dim=-1) <= 1e-7).all()
    assert torch.allclose(m, torch.stack([p[:, i:].sum(-1) for i in range(32)], dim=-1), atol=1e-6)
    for tau in (0.05, 0.1, 0.5):
        r = hard_ranks(m, tau)
        hard = (m > tau).float()
        assert torch.equal(hard, prefix_mask(r, 32))               # exactly a prefix of r_t ones


@pytest.mark.parametrize("name, knobs", [("pca_uniform", {"rate": 1.0}), ("energy", {"eta": 1.0}),
                                         ("pca_uniform", {"rate": 1.0, "centred": True})])
def test_full_rate_reproduces_the_states(name, knobs):
    x = states()
    transform = build_transform(name, **knobs).fit(x)
    out, ranks = transform.apply(x)
    assert (ranks == 16).all()
    torch.testing.assert_close(out, x, rtol=1e-9, atol=1e-9)


def test_pca_uniform_keeps_the_same_rank_for_every_token_and_the_best_subspace():
    x = states()
    out, ranks = build_transform("pca_uniform", rate=0.25, reconstruction="transpose").fit(x).apply(x)
    assert (ranks == 4).all()
    # the mean squared error of a rank-4 PCA projection is the sum of the 12 smallest eigenvalues
    basis = pca_basis(x)
    assert torch.isclose(((out - x) ** 2).sum(-1).mean(), basis.eigenvalues[4:].sum(), rtol=1e-8)


def test_energy_ranks_are_the_fewest_reaching_eta():
    torch.manual_seed(1)
    c = torch.randn(200, 12, dtype=torch.float64)
    for eta in (0.3, 0.8, 0.99):
        r = energy_ranks(c, eta)
        for row, rank in zip(c, r.tolist()):
            energy = (row ** 2).numpy()
            brute = next(k for k in range(1, 13) if energy[:k].sum() >= eta * energy.sum())
            assert rank == brute


def test_joint_weight_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(2)
    w = torch.randn(24, 40, dtype=torch.float64)
    down, up = joint_weight_svd(w, 6)
    assert down.shape == (6, 40) and up.shape == (24, 6)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    assert np.isclose(np.linalg.norm(w.numpy() - (up @ down).numpy()), np.sqrt((s[6:] ** 2).sum()))
    with pytest.raises(ValueError, match="rank=0"):
        joint_weight_svd(w, 0)


def test_dynakv_starts_at_full_rank_and_its_soft_path_is_differentiable():
    x = states(d=8)
    transform = DynaKV(tau=0.1).fit(x)
    out, ranks = transform.apply(x)
    assert (ranks == 8).all()                               # the gate starts by keeping everything
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    soft, mask = transform.soft(x.float())
    mask.mean().backward()
    assert transform.gate.weight.grad is not None and transform.gate.bias.grad.abs().sum() > 0
    assert (mask.diff(dim=-1) <= 1e-6).all()


def test_inverse_reconstruction_is_exact_for_a_non_orthogonal_basis():
    x = states(d=8)
    transform = DynaKV(tau=0.1).fit(x)
    transform.basis.vectors = transform.basis.vectors + 0.1 * torch.randn(8, 8, dtype=torch.float64)
    out, _ = transform.apply(x)
    torch.testing.assert_close(out, x, rtol=1e-8, atol=1e-8)
    transpose = DynaKV(tau=0.1, reconstruction="transpose").fit(x)
    transpose.basis.vectors = transform.basis.vectors
    assert not torch.allclose(transpose.apply(x)[0], x, atol=1e-3)   # U^T is not U^-1 here


def test_the_cached_inverse_follows_the_basis_and_never_carries_a_graph():
    x = states(d=8)
    transform = DynaKV(tau=0.1).fit(x)
    first = transform._inverse()
    assert transform._inverse() is first                                # computed once per basis
    with torch.no_grad():
        transform.basis.vectors.mul_(2.0)                               # in place, as an optimizer step is
    torch.testing.assert_close(transform._inverse(), first / 2.0)
    transform.basis = Basis(transform.basis.vectors.clone() + 0.1, transform.basis.eigenvalues)   # replaced
    torch.testing.assert_close(transform._inverse(), torch.linalg.inv(transform.basis.vectors))
    u = transform.basis.vectors.clone().requires_grad_(True)
    transform.basis = Basis(u, transform.basis.eigenvalues)
    with torch.no_grad():
        cached = transform._inverse()
    assert cached.grad_fn is None
    a, b = transform._inverse(), transform._inverse()                   # under grad: fresh, in each call's graph
    assert a is not b and a.grad_fn is not None and b.grad_fn is not None
    a.sum().backward()
    b.sum().backward()                                                  # no freed graph shared between the two
    torch.testing.assert_close(u.grad, 2 * torch.autograd.grad(torch.linalg.inv(u).sum(), u)[0])


@pytest.mark.parametrize("orthogonal", [False, True])
def test_a_trainable_basis_starts_at_its_init_and_keeps_its_reconstruction(orthogonal):
    init = pca_basis(states(d=8)).vectors.float()
    basis = TrainableBasis(init, orthogonal=orthogonal)
    u, inverse = basis()
    assert torch.equal(u.detach(), init) and u.dtype == torch.float32
    adamw = torch.optim.AdamW(basis.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(5):
        adamw.zero_grad()
        (basis.matrix() @ torch.arange(8.0)).square().sum().backward()
        adamw.step()
    u, inverse = basis()
    assert (u - init).abs().max() > 1e-2                                # it moved
    torch.testing.assert_close(u @ inverse, torch.eye(8), rtol=0, atol=1e-5)
    off = (u.T @ u - torch.eye(8)).abs().max()
    assert off < 1e-5 if orthogonal else off > 1e-3                     # U^T = U^-1 only when kept orthogonal
    if orthogonal:                                                      # a non-orthogonal init is re-orthogonalised
        q = TrainableBasis(init.bfloat16().float(), orthogonal=True).matrix()
        torch.testing.assert_close(q.T @ q, torch.eye(8), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \[d, d\]"):
        TrainableBasis(torch.zeros(3, 4))


def test_learning_a_basis_trains_u_and_freezing_writes_it_back():
    x = states(d=8)
    transform = DynaKV(tau=0.1).fit(x)
    pca, pca_copy, eigenvalues = transform.basis.vectors, transform.basis.vectors.clone(), transform.basis.eigenvalues
    learned = transform.learn_basis()
    assert transform.learn_basis() is learned and torch.equal(transform.basis_vectors().detach(), pca.float())
    with transform.step_basis():                                        # one U and U^-1 for the whole step
        step = transform._step_basis
        assert transform.basis_vectors() is step[0] and transform._inverse() is step[1]
        out, _ = transform.soft(x.float())
        out.sum().backward()
    assert transform._step_basis is None and learned.vectors.grad.abs().sum() > 0
    with torch.no_grad():
        learned.vectors.add_(0.05)
    transform.freeze_basis()
    assert transform.learned_basis is None and torch.equal(transform.basis.vectors, (pca.float() + 0.05))
    assert torch.equal(pca, pca_copy) and torch.equal(transform.basis.eigenvalues, eigenvalues.float())  # untouched
    assert not transform.basis.vectors.requires_grad
    torch.testing.assert_close(transform._inverse(), torch.linalg.inv(transform.basis.vectors))


def test_bad_knobs_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match="rate=0 must be in"):
        build_transform("pca_uniform", rate=0)
    with pytest.raises(ConfigError, match="eta=1.5"):
        build_transform("energy", eta=1.5)
    with pytest.raises(ConfigError, match="tau=1"):
        build_transform("dynakv", tau=1)
    with pytest.raises(ConfigError, match="reconstruction='pinv'"):
        build_transform("pca_uniform", reconstruction="pinv")
    with pytest.raises(ConfigError, match="choose from"):
        build_transform("palu")
    assert isinstance(TokenGate(4)(torch.zeros(2, 4)), torch.Tensor)


def test_the_inverse_of_an_inference_basis_follows_in_place_changes():
    """An inference tensor has no version to compare: its inverse is recomputed, never a stale cached one."""
    with torch.inference_mode():
        states = torch.randn(200, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        t = build_transform("pca_uniform", rate=1.0).fit(states)
        first = t._inverse().clone()
        t.basis.vectors.mul_(2)
        torch.testing.assert_close(t._inverse(), first / 2)
