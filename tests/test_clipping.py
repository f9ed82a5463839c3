"""``clip_grad_norm`` in every learner: IVON clips each Monte-Carlo sample's gradient (what
``torch.nn.utils.clip_grad_norm_`` inside the closure does, bit for bit); the corrected learners
clip the corrected gradient g̃ of eqs. (20), (22) and (29) after the correction, leave h̃, the
anchor pass and the refresh unclipped, and at α=0 are IVON (clip included) bit for bit.  The
full multi-step float64 reference with clipping is in ``test_poco_reference.py``; the 2-rank
gloo runs are in ``test_distributed.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import ce_closure, poco_loop
from torch import nn

import vbpc

F64 = torch.float64
KW = dict(lr=0.05, ess=200.0, hess_init=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-3)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _xy(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64) * 3, torch.randint(0, 3, (n,), generator=g)


def _groups(model: nn.Module) -> list[dict]:
    """Two groups (weights, biases) so the norm must be global across groups."""
    ps = list(model.parameters())
    return [{"params": [p for p in ps if p.dim() > 1]}, {"params": [p for p in ps if p.dim() == 1],
                                                         "weight_decay": 0.0}]


def _state(model, opt):
    ps = list(model.parameters())
    return ([p.detach().clone() for p in ps] + [opt.state[p]["hess"].clone() for p in ps]
            + [opt.state[p]["momentum"].clone() for p in ps])


def _norm(ts) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in ts))


@pytest.mark.parametrize("mc", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ivon_clip_is_clip_grad_norm_in_the_closure_bitwise(mc, dtype):
    """IVON(clip_grad_norm=r) ≡ IVON with ``clip_grad_norm_(params, r)`` inside the closure (every
    MC sample clipped by its own factor before it is accumulated, Price statistic included)."""
    x, y = _xy()
    x = x.to(dtype)
    r = 0.4
    runs, counts = [], []
    for inside in (False, True):
        model = _mlp().to(dtype)
        opt = vbpc.IVON(_groups(model), mc_samples=mc, clip_grad_norm=None if inside else r, **KW)
        torch.manual_seed(3)
        for t in range(8):
            xb, yb = x[3 * t:3 * t + 6], y[3 * t:3 * t + 6]

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                if inside:  # in the learner's parameter order: the same summation order of the norm
                    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], r)
                return loss
            opt.step(closure)
        runs.append(_state(model, opt))
        counts.append(opt.counters["clipped_steps"])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert 1 <= counts[0] <= 8 and counts[1] == 0  # active, and counted only by the learner's own clip


def test_ivon_clip_changes_the_hessian_statistic_too():
    """Per-sample clipping scales n⊙ĝ (the Price statistic) with the gradient: a run whose clip is
    always active differs from the unclipped one in h, not only in m."""
    x, y = _xy()
    hs = []
    for clip in (None, 1e-3):
        model = _mlp()
        opt = vbpc.IVON(model.parameters(), clip_grad_norm=clip, **KW)
        torch.manual_seed(0)
        opt.step(ce_closure(model, opt, x, y))
        hs.append([opt.state[p]["hess"].clone() for p in model.parameters()])
        if clip:
            assert opt.counters["clipped_steps"] == 1
    assert not any(torch.allclose(a, b) for a, b in zip(*hs))


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_poco_alpha_zero_with_clip_is_ivon_with_clip_bitwise(force, noise):
    """IVON-PoCo(α=0, clip) ≡ IVON(clip), m, g, h and the clip count, at mc_samples=1 (refreshes
    running, anchor pass skipped or forced)."""
    x, y = _xy()
    runs, counts = [], []
    for kind in ("ivon", "poco"):
        model = _mlp()
        if kind == "ivon":
            opt = vbpc.IVON(_groups(model), clip_grad_norm=0.3, **KW)
        else:
            opt = vbpc.IVONPoCo(_groups(model), alpha=0.0, anchor_period=4, anchor_noise=noise,
                                force_anchor_pass=force, clip_grad_norm=0.3, **KW)
        torch.manual_seed(11)
        poco_loop(model, opt, x, y, 10)
        runs.append(_state(model, opt))
        counts.append(opt.counters["clipped_steps"])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert counts[0] == counts[1] >= 3


def _one_step_semantics(make, step):
    """One step from a fresh state with and without the clip: the clipped learner's momentum is
    (1−β1)·c·g̃ with c = min(1, r/(‖g̃‖+1e-6)) from the *corrected* g̃ (before clipping), and h
    is the unclipped learner's (h̃ is never scaled)."""
    out = []
    for clip in (None, 0.01):
        model, opt = make(clip)
        torch.manual_seed(5)
        step(model, opt)
        out.append((model, opt))
    (m0, o0), (m1, o1) = out
    g_tilde = o0.last_stats["g_tilde"]
    c = min(1.0, 0.01 / (_norm(g_tilde) + 1e-6))
    assert c < 0.5  # the clip is active
    assert o1.counters["clipped_steps"] == 1 and o0.counters["clipped_steps"] == 0
    order = lambda opt: [p for g in opt.param_groups for p in g["params"]]  # noqa: E731  (g̃'s order)
    for p0, p1, gt in zip(order(o0), order(o1), g_tilde):
        torch.testing.assert_close(o1.state[p1]["momentum"], (1 - 0.9) * c * gt, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(o1.state[p1]["hess"], o0.state[p0]["hess"], rtol=1e-14, atol=0.0)
    # the mean moved by the clipped step: differs from the unclipped one
    assert not all(torch.allclose(a, b) for a, b in zip(m0.parameters(), m1.parameters()))


def test_ivon_poco_clips_the_corrected_gradient():
    x, y = _xy()
    data = [(x[:10], y[:10]), (x[10:], y[10:])]

    def make(clip):
        model = _mlp()
        opt = vbpc.IVONPoCo(_groups(model), alpha=0.75, anchor_period=4, track_stats=True, beta1=0.9,
                            clip_grad_norm=clip, **{k: v for k, v in KW.items() if k != "beta1"})
        return model, opt

    def step(model, opt):
        loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
        opt.refresh(loss_fn, data, progress=False)
        opt.step(ce_closure(model, opt, x[:6], y[:6]))
    _one_step_semantics(make, step)


def test_continual_ivon_clips_the_corrected_gradient():
    x, y = _xy(48)
    prior_model = _mlp(1)
    prior = vbpc.IVON(prior_model.parameters(), **KW).posterior(prior_model)

    def make(clip):
        model = _mlp()
        opt = vbpc.ContinualIVON(model.parameters(), prior=prior, model=model, correction=True, memory_weight=100.0,
                                 track_stats=True, clip_grad_norm=clip, **{k: v for k, v in KW.items() if k != "beta1"})
        return model, opt

    def step(model, opt):
        opt.step(ce_closure(model, opt, x[:8], y[:8]), memory=ce_closure(model, opt, x[24:32], y[24:32]))
    _one_step_semantics(make, step)


def test_vsgd_poco_clip_matches_hand_svrg():
    """SVRG (σ=0, α=1) with clip_grad_norm against a float64 NumPy hand reference of
    θ ← θ − ρ[c·g̃ + δθ], g̃ = ∇ℓ_B(θ) − ∇ℓ_B(θ_out) + ∇ℓ(θ_out), c = min(1, r/(‖g̃‖+1e-6))."""
    rng = np.random.default_rng(0)
    n, d, rho, delta, r, period = 30, 5, 0.5, 1e-2, 0.2, 5
    X = rng.normal(size=(n, d)) * 2
    yv = (rng.random(n) < 0.5).astype(float)

    def grad(theta, idx):
        z = X[idx] @ theta
        return X[idx].T @ (1 / (1 + np.exp(-z)) - yv[idx]) / len(idx)

    theta = np.zeros(d)
    w = torch.zeros(d, dtype=F64, requires_grad=True)
    opt = vbpc.SVRG([w], lr=rho, anchor_period=period, weight_decay=delta, clip_grad_norm=r)
    Xt, yt = torch.tensor(X), torch.tensor(yv)
    loss_fn = lambda b: nn.functional.binary_cross_entropy_with_logits(Xt[b] @ w, yt[b])  # noqa: E731
    clipped = 0
    for t in range(15):
        if t % period == 0:
            snap, full = theta.copy(), grad(theta, np.arange(n))
            opt.refresh(loss_fn, [np.arange(0, 17), np.arange(17, n)], batch_size=len, progress=False)
        idx = np.array([(3 * t + k) % n for k in range(4)])
        g = grad(theta, idx) - grad(snap, idx) + full
        c = min(1.0, r / (np.linalg.norm(g) + 1e-6))
        clipped += c < 1.0
        theta = theta - rho * (c * g + delta * theta)

        def closure(idx=idx):
            opt.zero_grad()
            loss = loss_fn(idx)
            loss.backward()
            return loss
        opt.step(closure)
        np.testing.assert_allclose(w.detach().numpy(), theta, rtol=1e-10, atol=1e-13)
    assert opt.counters["clipped_steps"] == clipped and 3 <= clipped < 15


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1.0"])
@pytest.mark.parametrize("kind", ["ivon", "poco", "continual", "vsgd"])
def test_bad_clip_grad_norm_is_refused_by_name(kind, bad):
    model = _mlp()
    with pytest.raises(ValueError, match="clip_grad_norm"):
        if kind == "ivon":
            vbpc.IVON(model.parameters(), clip_grad_norm=bad, **KW)
        elif kind == "poco":
            vbpc.IVONPoCoMo(model.parameters(), lr=0.1, ess=10.0, anchor_period=2, clip_grad_norm=bad)
        elif kind == "continual":
            prior = vbpc.IVON(model.parameters(), **KW).posterior(model)
            vbpc.ContinualIVON(model.parameters(), lr=0.1, ess=10.0, prior=prior, clip_grad_norm=bad)
        else:
            vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.0, anchor_period=2, clip_grad_norm=bad)


@pytest.mark.parametrize("kind", ["ivon", "poco"])
def test_non_finite_gradient_with_clip_is_refused_before_any_change(kind):
    x, y = _xy()
    model = _mlp()
    if kind == "ivon":
        opt = vbpc.IVON(model.parameters(), clip_grad_norm=1.0, **KW)
    else:
        opt = vbpc.IVONPoCo(model.parameters(), alpha=0.5, anchor_period=3, clip_grad_norm=1.0, **KW)
    torch.manual_seed(0)
    poco_loop(model, opt, x, y, 2)
    before = [t.clone() for t in _state(model, opt)] + [torch.tensor(float(opt.counters["clipped_steps"]))]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:6]), y[:6])
        loss.backward()
        next(model.parameters()).grad[0, 0] = float("inf")
        return loss
    with pytest.raises(vbpc.errors.NonFiniteError, match="non-finite"):
        opt.step(closure)
    after = _state(model, opt) + [torch.tensor(float(opt.counters["clipped_steps"]))]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_clip_and_its_counter_survive_the_state_dict():
    x, y = _xy()
    model = _mlp()
    opt = vbpc.IVONPoCoMo(model.parameters(), lr=0.05, ess=200.0, anchor_period=3, alpha=0.5, clip_grad_norm=0.2)
    torch.manual_seed(0)
    poco_loop(model, opt, x, y, 5)
    sd = opt.state_dict()
    assert sd["vbpc"]["clip_grad_norm"] == 0.2 and sd["vbpc"]["poco"]["counters"]["clipped_steps"] >= 1
    model2 = _mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = vbpc.IVONPoCoMo(model2.parameters(), lr=0.05, ess=200.0, anchor_period=3, alpha=0.5)
    opt2.load_state_dict(sd)
    assert opt2.clip_grad_norm == 0.2 and opt2.counters == opt.counters
