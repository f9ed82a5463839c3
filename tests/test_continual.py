"""ContinualIVON (ALGORITHMS.md §8, eq. 29 with the vector prior) and the pretrained anchor (eq. 30)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc
from vbpc.errors import StateDictMismatchError
from vbpc.inference.continual import cycle


def _data(seed: int, n: int = 40, d: int = 5, k: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, k, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, k, generator=g, dtype=dtype)).argmax(1)
    return x, y


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(5, 3).to(dtype)


def _closure(model, opt, x, y, record=None):
    def closure():
        opt.zero_grad()
        if record is not None:
            record.append([p.detach().clone() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _old_posterior(model, steps: int = 30) -> vbpc.DiagonalGaussian:
    x, y = _data(1)
    opt = vbpc.IVON(model.parameters(), lr=0.3, ess=40, hess_init=0.5, weight_decay=1e-2, beta2=0.99)
    for _ in range(steps):
        opt.step(_closure(model, opt, x, y))
    return copy.deepcopy(opt.posterior(model)).bind(model)


def _grad(model, theta, x, y):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, t in zip(m.parameters(), theta):
            p.copy_(t)
    loss = F.cross_entropy(m(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(m.parameters()))]


@pytest.mark.parametrize("correction", [False, True, "memory"])
def test_matches_a_float64_reference_of_eq29_with_the_vector_prior(correction):
    """Three steps against a hand-written reference of (29) + IVON (7)-(10) with δ → δ_v, δm → δ_v(m−m0)."""
    model = _model()
    old = _old_posterior(model)
    m_old = [t.clone() for t in old.mean.values()]
    p_old = [t.clone() for t in old.precision.values()]
    sig_old = [1 / p.sqrt() for p in p_old]
    x, y = _data(2)
    xm, ym = _data(1, n=12)
    lam, wd, h0, lr, b1, b2 = 40.0, 1e-2, 0.3, 0.2, 0.9, 0.95
    n_old = 40.0
    with torch.no_grad():  # move away from m_old so that every term of (29) is active
        for p in model.parameters():
            p.add_(0.05)
    rec, rec_m = [], []
    opt = vbpc.ContinualIVON(model.parameters(), lr=lr, ess=lam, prior=old, model=model, hess_init=h0,
                             weight_decay=wd, beta1=b1, beta2=b2, correction=bool(correction),
                             memory_weight=n_old if correction else None)
    if correction == "memory":  # h̄_M(q_old) once, unclamped, replaces the per-step ĥ_M(q_old) in the gradient
        opt.set_memory_curvature(lambda b: F.cross_entropy(model(b[0]), b[1]), [(xm, ym)], mc_samples=2,
                                 clamp=False)
        assert all(not torch.equal(h, torch.zeros_like(h)) for h in opt.memory_hess)
    dv = [p / lam for p in p_old]
    m = [p.detach().clone() for p in model.parameters()]
    g = [torch.zeros_like(t) for t in m]
    h = [torch.full_like(t, h0) for t in m]
    eta = lr * (h0 + wd)
    for t in range(1, 4):
        rec.clear()
        rec_m.clear()
        opt.step(_closure(model, opt, x, y, rec), memory=_closure(model, opt, xm, ym, rec_m) if correction else None)
        theta = rec[0]
        sig = [1 / (lam * (hh + d)).sqrt() for hh, d in zip(h, dv)]
        z = [(th - mm) / s for th, mm, s in zip(theta, m, sig)]
        g_new = _grad(model, theta, x, y)
        gt = [gg.clone() for gg in g_new]
        ht = [gg * zz / s for gg, zz, s in zip(g_new, z, sig)]
        if correction:
            assert torch.allclose(rec_m[0][0], theta[0]) and len(rec_m) == 2
            theta_old = [mo + so * zz for mo, so, zz in zip(m_old, sig_old, z)]
            for a, b in zip(rec_m[1], theta_old):  # the anchor pass is at m_old + σ_old z (shared noise)
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            gq, go = _grad(model, theta, xm, ym), _grad(model, theta_old, xm, ym)
            w = n_old / lam
            for i in range(len(m)):
                hq, ho = gq[i] * z[i] / sig[i], go[i] * z[i] / sig_old[i]
                h_grad = opt.memory_hess[i] if correction == "memory" else ho
                gt[i] = gt[i] + w * (gq[i] - go[i] - h_grad * (m[i] - m_old[i]))
                ht[i] = ht[i] + w * (hq - ho)
        c_t = 1 - b1 ** t
        for i in range(len(m)):
            g[i] = b1 * g[i] + (1 - b1) * gt[i]
            hw = h[i] + dv[i]
            h[i] = b2 * h[i] + (1 - b2) * ht[i] + 0.5 * (1 - b2) ** 2 * (h[i] - ht[i]) ** 2 / hw
            m[i] = m[i] - eta * (g[i] / c_t + dv[i] * (m[i] - m_old[i])) / (h[i] + dv[i])
    for p, mm, hh, d in zip(model.parameters(), m, h, dv):
        st = opt.state[p]
        torch.testing.assert_close(p.detach(), mm, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(st["hess"], hh + d - wd, rtol=1e-9, atol=1e-10)  # h̃ = h + δ_v − δ
    # the posterior's precision is λh + p_old (new curvature on top of the prior)
    for prec, hh, po in zip(opt.posterior(model).precision.values(), h, p_old):
        torch.testing.assert_close(prec, lam * hh + po, rtol=1e-9, atol=1e-8)


def test_memory_curvature_is_the_antithetic_price_mean_and_is_clamped():
    """set_memory_curvature: the antithetic Price mean at q_old (checked against the same pass done by
    hand with the anchor generator), clamped to 0 ≤ (N_old/λ) h̄ ≤ δ_v − δ."""
    model = _model()
    old = _old_posterior(model)
    xm, ym = _data(1, n=12)
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    kw = dict(lr=0.1, ess=40, prior=old, model=model, weight_decay=1e-2, correction=True, memory_weight=400)
    raw = vbpc.ContinualIVON(model.parameters(), **kw)
    raw.set_memory_curvature(loss_fn, [(xm, ym)], mc_samples=1, clamp=False, seed=3)
    g = torch.Generator().manual_seed(3)
    sig = [1 / p.sqrt() for p in old.precision.values()]
    z = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    h_ref = []
    for i, (_mo, s, zi) in enumerate(zip(old.mean.values(), sig, z)):
        gp = _grad(model, [m + s_ * z_ for m, s_, z_ in zip(old.mean.values(), sig, z)], xm, ym)[i]
        gm = _grad(model, [m - s_ * z_ for m, s_, z_ in zip(old.mean.values(), sig, z)], xm, ym)[i]
        h_ref.append(0.5 * (gp * zi / s + gm * (-zi) / s))
    for a, b in zip(raw.memory_hess, h_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    capped = vbpc.ContinualIVON(model.parameters(), **kw)
    capped.set_memory_curvature(loss_fn, [(xm, ym)], mc_samples=1, seed=3)
    w = 400 / 40
    for p, a, b in zip(model.parameters(), capped.memory_hess, raw.memory_hess):
        cap = capped.state[p]["prior_delta"] - 1e-2
        assert bool((a >= 0).all()) and bool((w * a <= cap * (1 + 1e-12)).all())
        torch.testing.assert_close(a, torch.minimum(b.clamp(min=0), cap / w))


def test_the_isotropic_prior_gives_plain_ivon():
    """q_old = IVON's own prior N(0, 1/(λδ)) and no correction: IVON's iterates (to rounding)."""
    x, y = _data(3)
    kw = dict(lr=0.2, ess=40, hess_init=0.4, weight_decay=1e-2, beta2=0.99)
    a, b = _model(), _model()
    ref = vbpc.IVON(a.parameters(), **kw)
    prior = ref.posterior(a).prior()
    opt = vbpc.ContinualIVON(b.parameters(), prior=prior, model=b, **kw)
    torch.manual_seed(5)
    for _ in range(5):
        ref.step(_closure(a, ref, x, y))
    torch.manual_seed(5)
    for _ in range(5):
        opt.step(_closure(b, opt, x, y))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(ref.state[p]["hess"], opt.state[q]["hess"], rtol=1e-12, atol=1e-13)


def test_correction_vanishes_at_the_old_posterior():
    """At m = m_old and σ = σ_old (h0 → 0) both memory passes see the same θ: (29) reduces to ĝ_new."""
    model = _model()
    old = _old_posterior(model)
    x, y = _data(4)
    xm, ym = _data(1, n=12)
    ests = []
    for corr in (False, True):
        mdl = copy.deepcopy(model)
        opt = vbpc.ContinualIVON(mdl.parameters(), lr=0.1, ess=40, prior=copy.deepcopy(old).bind(mdl), model=mdl,
                                 hess_init=1e-300, weight_decay=1e-2, start="prior", correction=corr,
                                 memory_weight=40 if corr else None, track_stats=True)
        torch.manual_seed(0)
        opt.step(_closure(mdl, opt, x, y), memory=_closure(mdl, opt, xm, ym) if corr else None)
        ests.append(opt.last_stats)
    for a, b in zip(ests[0]["g_tilde"], ests[1]["g_tilde"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(ests[0]["h_tilde"], ests[1]["h_tilde"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_bad_input_and_state_dict_round_trip(tmp_path):
    model = _model(torch.float32)
    old = vbpc.IVON(model.parameters(), lr=0.1, ess=10).posterior(model)
    with pytest.raises(ValueError, match="memory_weight"):
        vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10, prior=old, correction=True)
    opt = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10, prior=old, correction=True, memory_weight=5)
    x, y = _data(0, dtype=torch.float32)
    with pytest.raises(ValueError, match="replay memory"):
        opt.step(_closure(model, opt, x, y))
    with pytest.raises(ValueError, match="empty"):
        next(iter(cycle([])))
    other = nn.Linear(5, 4)
    with pytest.raises(StateDictMismatchError, match="shape"):
        vbpc.ContinualIVON(other.parameters(), lr=0.1, ess=10, prior=old)
    with pytest.raises(TypeError, match="alpha"):
        vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10, prior=old, alpha=0.5)
    # resume bit for bit
    mem = _closure(model, opt, x[:8], y[:8])
    for _ in range(2):
        opt.step(_closure(model, opt, x, y), memory=mem)
    sd = copy.deepcopy(opt.state_dict())
    snap = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    for _ in range(3):
        opt.step(_closure(model, opt, x, y), memory=mem)
    want = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(snap)
    opt2 = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10, prior=old, correction=True, memory_weight=5)
    opt2.load_state_dict(sd)
    torch.set_rng_state(rng)
    mem2 = _closure(model, opt2, x[:8], y[:8])
    for _ in range(3):
        opt2.step(_closure(model, opt2, x, y), memory=mem2)
    for a, b in zip(want, model.parameters()):
        assert torch.equal(a, b)
    nocorr = vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10, prior=old)
    with pytest.raises(StateDictMismatchError, match="correction"):
        nocorr.load_state_dict(sd)


def test_correction_with_all_old_data_tracks_joint_training_better_than_the_prior_alone():
    """Two logistic-regression tasks: with the whole of task 1 as memory, (c) lands nearer to the
    joint IVON solution than (b) (the prior alone drops the non-quadratic part of task 1)."""
    x1, y1 = _data(11, n=200)
    x2, y2 = _data(12, n=200)
    x2 = x2 + 1.5  # a shifted second task
    kw = dict(lr=0.2, hess_init=0.5, weight_decay=1e-3, beta2=0.99)

    def ivon_on(model, x, y, steps, ess):
        opt = vbpc.IVON(model.parameters(), ess=ess, **kw)
        torch.manual_seed(1)
        for _ in range(steps):
            opt.step(_closure(model, opt, x, y))
        return opt

    joint = _model()
    ivon_on(joint, torch.cat([x1, x2]), torch.cat([y1, y2]), 600, 400)
    base = _model()
    old = copy.deepcopy(ivon_on(base, x1, y1, 300, 200).posterior(base))
    dists = {}
    for corr in (False, True):
        m = copy.deepcopy(base)
        opt = vbpc.ContinualIVON(m.parameters(), ess=200, prior=copy.deepcopy(old).bind(m), model=m,
                                 correction=corr, memory_weight=200 if corr else None, **kw)
        torch.manual_seed(2)
        for _ in range(600):
            opt.step(_closure(m, opt, x2, y2), memory=_closure(m, opt, x1, y1) if corr else None)
        dists[corr] = math.sqrt(sum(float((p - q).detach().square().sum())
                                    for p, q in zip(m.parameters(), joint.parameters())))
    assert dists[True] < 0.7 * dists[False], dists


def test_pretrained_posterior_estimates_the_curvature():
    """Eq. (30) on linear regression, whose Hessian is exact: every estimator recovers diag(XᵀX/n)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    y = x @ w.T + 0.1 * torch.randn(4000, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w + 0.3)
    data = [(x[i:i + 200], y[i:i + 200]) for i in range(0, 4000, 200)]
    loss_fn = lambda b: 0.5 * (model(b[0]) - b[1]).square().mean()  # noqa: E731
    want = (x.square().mean(0)).reshape(1, 3)
    rng = torch.get_rng_state()
    post = vbpc.pretrained_posterior(model, loss_fn, data, ess=4000, hess_init=1.0, weight_decay=1e-6,
                                     mc_samples=8, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    h = post.hess["weight"]
    torch.testing.assert_close(h, want, rtol=0.1, atol=0.0)
    assert torch.equal(post.mean["weight"], model.weight.detach())
    newton = vbpc.pretrained_posterior(model, loss_fn, data, ess=4000, weight_decay=1e-6, mean="newton",
                                       mc_samples=8, progress=False)
    torch.testing.assert_close(newton.mean["weight"], w, rtol=0.0, atol=0.15)
    # gradsq: |C| ĝ_C² is the empirical Fisher; at the optimum of a Gaussian likelihood it is
    # E[x² ε²]/... — check it at the true weights, where it equals s² diag(XᵀX/n) (s = 0.1)
    with torch.no_grad():
        model.weight.copy_(w)
    gs = vbpc.pretrained_posterior(model, loss_fn, data, ess=4000, curvature="gradsq", progress=False)
    torch.testing.assert_close(gs.hess["weight"], 0.01 * want, rtol=0.5, atol=0.0)
    with pytest.raises(ValueError, match="curvature"):
        vbpc.pretrained_posterior(model, loss_fn, data, ess=10, curvature="kfac")


def test_pretrained_posterior_fisher_is_the_ggn_diagonal():
    x, y = _data(7, n=600)
    model = _model()
    data = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 600, 100)]
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    post = vbpc.pretrained_posterior(model, loss_fn, data, ess=600, curvature="fisher",
                                     logits_fn=lambda b: model(b[0]), progress=False)
    p = F.softmax(model(x), -1).detach()
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn_w = torch.einsum("nkk,nd->kd", lam, x.square()) / len(x)  # diag of Jᵀ Λ J for the weight
    torch.testing.assert_close(post.hess["weight"], ggn_w, rtol=0.25, atol=1e-3)
