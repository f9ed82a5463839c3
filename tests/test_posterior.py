"""DiagonalGaussian: closed forms against torch.distributions, sampling, serialization."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import train_steps
from torch import nn
from torch.distributions import Normal, kl_divergence

import vbpc
from vbpc.posterior import DiagonalGaussian, Entry

F64 = torch.float64


def _post(seed=0, ess=20.0, wd=0.05):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (3, 4), "b": (5,), "c": ()}
    return DiagonalGaussian([
        Entry(n, torch.randn(s, generator=g, dtype=F64), torch.rand(s, generator=g, dtype=F64) + 0.1, ess, wd)
        for n, s in shapes.items()
    ])


def _normals(post):
    return {n: Normal(post.mean[n], post.std[n]) for n in post.names}


def test_precision_std_follow_eq3():
    post = _post()
    for n in post.names:
        torch.testing.assert_close(post.precision[n], 20.0 * (post.hess[n] + 0.05), rtol=0, atol=0)
        torch.testing.assert_close(post.std[n], 1 / torch.sqrt(20.0 * (post.hess[n] + 0.05)), rtol=1e-15, atol=0)


def test_entropy_log_prob_kl_match_torch_distributions():
    q, p = _post(0), _post(1, ess=7.0, wd=0.3)
    nq, np_ = _normals(q), _normals(p)
    ent = sum(d.entropy().sum() for d in nq.values())
    torch.testing.assert_close(q.entropy(), ent, rtol=1e-12, atol=0)
    theta = q.sample(torch.Generator().manual_seed(5))
    lp = sum(nq[n].log_prob(theta[n]).sum() for n in q.names)
    torch.testing.assert_close(q.log_prob(theta), lp, rtol=1e-12, atol=0)
    kl = sum(kl_divergence(nq[n], np_[n]).sum() for n in q.names)
    torch.testing.assert_close(q.kl(p), kl, rtol=1e-12, atol=0)
    assert float(q.kl(q)) == pytest.approx(0.0, abs=1e-12)


def test_kl_to_prior_of_objective():
    q = _post()
    prior = q.prior()
    for n in q.names:
        torch.testing.assert_close(prior.precision[n], torch.full_like(q.mean[n], 20.0 * 0.05))
    expected = sum(kl_divergence(Normal(q.mean[n], q.std[n]),
                                 Normal(torch.zeros_like(q.mean[n]), torch.full_like(q.mean[n], (1.0) ** 0.5)
                                        / math.sqrt(20.0 * 0.05))).sum() for n in q.names)
    torch.testing.assert_close(q.kl(prior), expected, rtol=1e-12, atol=0)


def test_sample_moments():
    q = _post()
    gen = torch.Generator().manual_seed(0)
    draws = [q.sample(gen) for _ in range(20_000)]
    for n in q.names:
        x = torch.stack([d[n] for d in draws])
        var = x.var(0)
        assert torch.all((var / q.variance[n] - 1).abs() < 0.05)
        se = q.std[n] / math.sqrt(len(draws))
        assert torch.all((x.mean(0) - q.mean[n]).abs() < 5 * se)


def test_generator_reproducibility():
    q = _post()
    a = q.sample(torch.Generator().manual_seed(3))
    b = q.sample(torch.Generator().manual_seed(3))
    assert all(torch.equal(a[n], b[n]) for n in q.names)


def test_state_dict_roundtrip_and_prediction_without_optimizer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=50.0, hess_init=0.2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    train_steps(model, opt, 3, x, y)
    post = opt.posterior(model)
    torch.save({"model": model.state_dict(), "posterior": post.state_dict()}, tmp_path / "p.pt")

    ck = torch.load(tmp_path / "p.pt", weights_only=True)  # plain data: safe to load
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fresh.load_state_dict(ck["model"])
    loaded = DiagonalGaussian.from_state_dict(ck["posterior"], fresh)
    assert loaded.names == post.names
    for n in post.names:
        assert torch.equal(loaded.mean[n], post.mean[n]) and torch.equal(loaded.precision[n], post.precision[n])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with post.sampled(generator=g1):
        out1 = model(x)
    with loaded.sampled(generator=g2):
        out2 = fresh(x)
    assert torch.equal(out1, out2)
    assert torch.equal(model(x), fresh(x))  # restored


def test_load_state_dict_mismatch_is_rejected_without_change():
    q = _post()
    before = {n: q.mean[n].clone() for n in q.names}
    bad = _post(1).state_dict()
    bad["mean"]["a"] = torch.zeros(2, 2, dtype=F64)
    bad["hess"]["a"] = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(vbpc.StateDictMismatchError, match="shape"):
        q.load_state_dict(bad)
    renamed = _post(1).state_dict()
    renamed["names"] = ["a", "b", "zz"]
    renamed["mean"]["zz"] = renamed["mean"].pop("c")
    renamed["hess"]["zz"] = renamed["hess"].pop("c")
    renamed["ess"]["zz"] = renamed["ess"].pop("c")
    renamed["weight_decay"]["zz"] = renamed["weight_decay"].pop("c")
    with pytest.raises(vbpc.StateDictMismatchError, match="names differ"):
        q.load_state_dict(renamed)
    with pytest.raises(vbpc.StateDictMismatchError, match="family"):
        q.load_state_dict({"family": "full"})
    assert all(torch.equal(before[n], q.mean[n]) for n in q.names)
    good = _post(1).state_dict()
    q.load_state_dict(good)
    assert torch.equal(q.mean["a"], good["mean"]["a"])


def test_from_module_shares_parameters_and_binds():
    model = nn.Linear(3, 2)
    post = DiagonalGaussian.from_module(model, precision=4.0)
    assert post.mean["weight"] is model.weight
    torch.testing.assert_close(post.precision["weight"], torch.full((2, 3), 4.0))
    with pytest.raises(ValueError, match="precision"):
        DiagonalGaussian.from_module(model, precision=0.0)
    other = nn.Linear(3, 5)
    with pytest.raises(vbpc.StateDictMismatchError, match="shape"):
        post.bind(other)
    detached = DiagonalGaussian.from_state_dict(post.state_dict())
    with pytest.raises(vbpc.SamplingError, match="not bound"):
        with detached.sampled():
            pass


def test_sampled_restores_bitwise_and_rejects_nesting():
    model = nn.Linear(3, 2).double()
    before = [p.detach().clone() for p in model.parameters()]
    post = DiagonalGaussian.from_module(model, precision=10.0)
    with post.sampled() as theta:
        assert torch.equal(model.weight, theta["weight"])
        with pytest.raises(vbpc.SamplingError, match="nested"):
            with post.sampled():
                pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ZeroDivisionError):
        with post.sampled():
            raise ZeroDivisionError("inside")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
