"""Isotropic and full Gaussian families behind the one posterior interface (docs/algorithms.md §5, §7).

Oracles: closed forms against torch.distributions, the full-covariance sampling check of
§10 item 10 (including the L^{-1} transposition bug it must catch), and serialization.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

import vbpc
from vbpc import DiagonalGaussian, FullGaussian, GaussianPosterior, IsotropicGaussian

F64 = torch.float64


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()  # d = 8 + 3 = 11


def _spd(d, seed=0, cond=30.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    eig = torch.logspace(0, math.log10(cond), d, dtype=F64)
    return (q * eig) @ q.T


def _flat(post, tensors):
    return torch.cat([tensors[n].detach().double().reshape(-1) for n in post.names])


# ----------------------------------------------------------------------------- full
def test_full_closed_forms_match_multivariate_normal():
    net = _net()
    d = sum(p.numel() for p in net.parameters())
    q = FullGaussian.from_module(net, precision=_spd(d, 0))
    p = FullGaussian.from_module(_net(), precision=_spd(d, 1, 5.0))
    with torch.no_grad():
        for e in p._entries:
            e.mean.add_(0.3)
    mq = MultivariateNormal(q._flat_mean(), precision_matrix=q.precision)
    mp = MultivariateNormal(p._flat_mean(), precision_matrix=p.precision)
    torch.testing.assert_close(q.entropy(), mq.entropy(), rtol=1e-12, atol=0)
    theta = q.sample(torch.Generator().manual_seed(2))
    torch.testing.assert_close(q.log_prob(theta), mq.log_prob(_flat(q, theta)), rtol=1e-12, atol=0)
    torch.testing.assert_close(q.kl(p), kl_divergence(mq, mp), rtol=1e-10, atol=0)
    torch.testing.assert_close(q.covariance(), torch.linalg.inv(q.precision), rtol=1e-10, atol=1e-12)


def test_o10_full_sample_covariance_and_transposition_bug():
    """‖Ĉ − S⁻¹‖_F / ‖S⁻¹‖_F < 0.05 for a non-diagonal S; θ = m + L⁻¹z (the bug) fails it."""
    d = 6
    s = _spd(d, 3, cond=50.0)
    post = FullGaussian([vbpc.posterior.MeanEntry("w", torch.zeros(d, dtype=F64))], s)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([post.sample(gen)["w"] for _ in range(20_000)])
    cov = torch.cov(draws.T)
    target = torch.linalg.inv(s)
    assert torch.linalg.norm(cov - target) / torch.linalg.norm(target) < 0.05
    low = torch.linalg.cholesky(s)
    z = torch.randn(20_000, d, generator=gen, dtype=F64)
    buggy = torch.linalg.solve_triangular(low, z.T, upper=False).T  # L^{-1} z
    assert torch.linalg.norm(torch.cov(buggy.T) - target) / torch.linalg.norm(target) > 0.05


def test_full_validation_errors():
    e = [vbpc.posterior.MeanEntry("w", torch.zeros(3, dtype=F64))]
    with pytest.raises(ValueError, match="shape"):
        FullGaussian(e, torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="symmetric"):
        FullGaussian(e, torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]], dtype=F64))
    with pytest.raises(ValueError, match="positive definite"):
        FullGaussian(e, -torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="non-finite"):
        FullGaussian(e, torch.full((3, 3), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="max_dim"):
        FullGaussian.from_module(nn.Linear(100, 100), max_dim=5000)


def test_full_cholesky_cache_follows_in_place_updates():
    e = [vbpc.posterior.MeanEntry("w", torch.zeros(2, dtype=F64))]
    post = FullGaussian(e, torch.eye(2, dtype=F64))
    first = post.entropy()
    post.precision.mul_(4.0)
    torch.testing.assert_close(post.entropy(), first - math.log(4.0), rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- isotropic
def test_isotropic_closed_forms_and_cross_family_kl():
    net = _net()
    q = IsotropicGaussian.from_module(net, sigma=0.3)
    d = q.numel()
    normal = Normal(q._flat_mean(), torch.full((d,), 0.3, dtype=F64))
    torch.testing.assert_close(q.entropy(), normal.entropy().sum(), rtol=1e-12, atol=0)
    theta = q.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(q.log_prob(theta), normal.log_prob(_flat(q, theta)).sum(), rtol=1e-12, atol=0)
    # KL across families: isotropic ≡ diagonal with constant precision ≡ full with S = I/σ²
    diag = DiagonalGaussian.from_module(_net(), precision=2.0)
    full = FullGaussian.from_module(_net(), precision=2.0)
    k_diag = q.kl(diag)
    torch.testing.assert_close(q.kl(full), k_diag, rtol=1e-10, atol=0)
    expected = kl_divergence(normal, Normal(diag._flat_mean(), torch.full((d,), 2.0 ** -0.5, dtype=F64))).sum()
    torch.testing.assert_close(k_diag, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(full.kl(q), diag.kl(q), rtol=1e-10, atol=0)


def test_isotropic_delta_method():
    """σ = 0 (SVRG's delta method): the sample is the mean exactly and uses no random numbers."""
    net = _net()
    q = IsotropicGaussian.from_module(net, sigma=0.0)
    state = torch.get_rng_state()
    theta = q.sample()
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(theta[n], m) for n, m in q.mean.items())
    assert q.precision == math.inf and q.entropy() == -math.inf
    with pytest.raises(ValueError, match="delta"):
        q.log_prob(theta)
    with pytest.raises(ValueError, match="sigma"):
        IsotropicGaussian.from_module(net, sigma=-1.0)


# ----------------------------------------------------------------------------- common interface
@pytest.mark.parametrize("family", ["diagonal", "isotropic", "full"])
def test_state_dict_roundtrip_sampled_restore_for_every_family(family):
    net = _net()
    if family == "diagonal":
        post = DiagonalGaussian.from_module(net, precision=50.0)
    elif family == "isotropic":
        post = IsotropicGaussian.from_module(net, sigma=0.1, learn_sigma=True)
    else:
        post = FullGaussian.from_module(net, precision=_spd(11, 4))
    assert isinstance(post, GaussianPosterior) and post.family == family
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="boom"):
        with post.sampled(net):
            raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    sd = post.state_dict()
    fresh = _net()
    loaded = GaussianPosterior.from_state_dict(sd, fresh)
    assert type(loaded) is type(post) and loaded.names == post.names
    with post.sampled(generator=torch.Generator().manual_seed(9)):
        y1 = net(x)
    with loaded.sampled(generator=torch.Generator().manual_seed(9)):
        y2 = fresh(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    torch.testing.assert_close(loaded.entropy(), post.entropy(), rtol=1e-14, atol=0)

    # load_state_dict into an existing posterior: mismatches are rejected before any write
    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    target = {"diagonal": DiagonalGaussian.from_module, "isotropic": IsotropicGaussian.from_module,
              "full": FullGaussian.from_module}[family]
    kw = {"precision": 1.0} if family != "isotropic" else {"sigma": 1.0}
    tgt = target(other, **kw)
    bad = dict(sd, names=list(reversed(sd["names"])))
    snapshot = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(vbpc.StateDictMismatchError):
        tgt.load_state_dict(bad)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, other.parameters()))
    tgt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_from_state_dict_rejects_unknown_family():
    with pytest.raises(vbpc.StateDictMismatchError, match="unknown posterior family"):
        GaussianPosterior.from_state_dict({"family": "laplace"})
