"""ContinualIVON(anchor=...): the correction of eq. (29) at a posterior other than the prior, and
``data_size=0`` (the memory alone, ``step(None, memory=...)``); docs/algorithms.md §8."""

from __future__ import annotations

import copy

import pytest
import torch
from test_continual import _closure, _data, _grad, _model  # the shared float64 fixtures
from torch.nn import functional as F

import vbpc
from vbpc.errors import SamplingError, StateDictMismatchError


def _posterior(model, seed: int, steps: int = 30) -> vbpc.DiagonalGaussian:
    x, y = _data(seed)
    opt = vbpc.IVON(model.parameters(), lr=0.3, ess=40, hess_init=0.5, weight_decay=1e-2, beta2=0.99)
    for _ in range(steps):
        opt.step(_closure(model, opt, x, y))
    return copy.deepcopy(opt.posterior(model)).bind(model)


@pytest.mark.parametrize("data_size", [0.0, 25.0])
@pytest.mark.parametrize("memory_curvature", [False, True])
def test_anchor_terms_at_the_anchor_and_prior_terms_at_the_prior(data_size, memory_curvature):
    """Three steps against a float64 reference of (29) + IVON (7)-(10): the memory's second pass at
    m_anc + σ_anc z, ĥ_M(q_anc) ⊙ (m − m_anc), and the prior term δ_v ⊙ (m − m_0) with δ_v = p_prior/λ."""
    model = _model()
    anc = _posterior(model, 1)  # q_old: the memory's sites were formed here
    prior = _posterior(copy.deepcopy(model), 7, steps=10)  # e.g. q_rm of eq. (32): another mean and precision
    m_anc = [t.clone() for t in anc.mean.values()]
    sig_anc = [1 / p.sqrt() for p in anc.precision.values()]
    m0 = [t.clone() for t in prior.mean.values()]
    assert all(not torch.allclose(a, b) for a, b in zip(m_anc, m0))
    x, y = _data(2)
    xm, ym = _data(1, n=12)
    lam, wd, h0, lr, b1, b2, n_old = 40.0, 1e-2, 0.3, 0.2, 0.9, 0.95, 30.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    opt = vbpc.ContinualIVON(model.parameters(), lr=lr, ess=lam, prior=prior, anchor=anc, model=model, hess_init=h0,
                             weight_decay=wd, beta1=b1, beta2=b2, correction=True, memory_weight=n_old,
                             data_size=data_size)
    if memory_curvature:
        opt.set_memory_curvature(lambda b: F.cross_entropy(model(b[0]), b[1]), [(xm, ym)], mc_samples=2, clamp=False)
    dv = [p / lam for p in prior.precision.values()]
    m = [p.detach().clone() for p in model.parameters()]
    g = [torch.zeros_like(t) for t in m]
    h = [torch.full_like(t, h0) for t in m]
    eta = lr * (h0 + wd)
    w_new, w_old = data_size / lam, n_old / lam
    for t in range(1, 4):
        rec, rec_m = [], []
        new = _closure(model, opt, x, y, rec) if data_size else None
        opt.step(new, memory=_closure(model, opt, xm, ym, rec_m))
        theta = rec[0] if data_size else rec_m[1]
        sig = [1 / (lam * (hh + d)).sqrt() for hh, d in zip(h, dv)]
        z = [(th - mm) / s for th, mm, s in zip(theta, m, sig)]
        theta_anc = [mo + so * zz for mo, so, zz in zip(m_anc, sig_anc, z)]
        for a, b in zip(rec_m[0], theta_anc):  # the anchor pass is at m_anc + σ_anc z (shared noise)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        g_new = _grad(model, theta, x, y)
        gq, go = _grad(model, theta, xm, ym), _grad(model, theta_anc, xm, ym)
        gt, ht = [], []
        for i in range(len(m)):
            hq, ho = gq[i] * z[i] / sig[i], go[i] * z[i] / sig_anc[i]
            h_grad = opt.memory_hess[i] if memory_curvature else ho
            gt.append(w_new * g_new[i] + w_old * (gq[i] - go[i] - h_grad * (m[i] - m_anc[i])))
            ht.append(w_new * g_new[i] * z[i] / sig[i] + w_old * (hq - ho))
        c_t = 1 - b1 ** t
        for i in range(len(m)):
            g[i] = b1 * g[i] + (1 - b1) * gt[i]
            hw = h[i] + dv[i]
            h[i] = b2 * h[i] + (1 - b2) * ht[i] + 0.5 * (1 - b2) ** 2 * (h[i] - ht[i]) ** 2 / hw
            m[i] = m[i] - eta * (g[i] / c_t + dv[i] * (m[i] - m0[i])) / (h[i] + dv[i])
    for p, mm, hh, d in zip(model.parameters(), m, h, dv):
        torch.testing.assert_close(p.detach(), mm, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(opt.state[p]["hess"], hh + d - wd, rtol=1e-9, atol=1e-10)
    for a, b in zip(opt.prior().mean.values(), m0):  # prior() is the prior, not the anchor
        assert torch.equal(a, b)
    passes = 2 if data_size == 0 else 3
    assert opt.counters["inner_passes"] == 3 * passes


def test_anchor_equal_to_the_prior_is_the_default_bit_for_bit():
    """anchor = a copy of the prior takes the separate-anchor path and gives the default's iterates exactly."""
    runs = []
    for sep in (False, True):
        model = _model()
        old = _posterior(model, 1)
        x, y = _data(2)
        xm, ym = _data(1, n=12)
        kw = {"anchor": copy.deepcopy(old).bind(model)} if sep else {}
        opt = vbpc.ContinualIVON(model.parameters(), lr=0.2, ess=40, prior=old, model=model, correction=True,
                                 memory_weight=30, weight_decay=1e-2, **kw)
        assert opt.separate_anchor is sep
        torch.manual_seed(3)
        for _ in range(4):
            opt.step(_closure(model, opt, x, y), memory=_closure(model, opt, xm, ym))
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [opt.state[p]["hess"].clone() for p in model.parameters()]))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


def test_anchor_and_data_size_zero_refusals_and_state_dict():
    model = _model()
    old = _posterior(model, 1)
    other = _posterior(copy.deepcopy(model), 7, steps=5)
    xm, ym = _data(1, n=12)
    with pytest.raises(ValueError, match="correction=True"):
        vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=other, anchor=old, model=model)
    with pytest.raises(ValueError, match="data_size=0"):
        vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=old, model=model, data_size=0.0)
    with pytest.raises(TypeError, match="DiagonalGaussian"):
        vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=old, anchor={}, model=model, correction=True,
                           memory_weight=5)
    with pytest.raises(ValueError, match="data_size"):
        vbpc.ReplayCorrection(5.0, data_size=-1.0)
    opt = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=other, anchor=old, model=model,
                             correction=True, memory_weight=30, data_size=0.0)
    x, y = _data(2)
    with pytest.raises(ValueError, match="step\\(None, memory"):
        opt.step(_closure(model, opt, x, y), memory=_closure(model, opt, xm, ym))
    with pytest.raises(ValueError, match="memory"):
        opt.step(None)
    opt.step(None, memory=_closure(model, opt, xm, ym))
    sd = opt.state_dict()
    twin = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=other, anchor=old, model=model,
                              correction=True, memory_weight=30, data_size=0.0)
    twin.load_state_dict(sd)
    for a, b in zip(twin.prior().mean.values(), opt.prior().mean.values()):
        assert torch.equal(a, b)
    plain = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=other, model=model, correction=True,
                               memory_weight=30, data_size=0.0)
    with pytest.raises(StateDictMismatchError, match="anchor"):
        plain.load_state_dict(sd)
    full = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=40, prior=old, model=model, correction=True,
                              memory_weight=30)
    with pytest.raises(SamplingError, match="closure"):
        full.step(None, memory=_closure(model, full, xm, ym))
