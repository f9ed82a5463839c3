"""VSGD-PoCo and its special cases: SVRG (P1), α-SVRG (P2), α=0 (P3), refresh identity (P4),
unbiasedness (P5), variance reduction, bad input and resume (docs/algorithms.md §4, §5, §10.13-18)."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from helpers import poco_loop
from torch import nn

import vbpc
from vbpc.inference.poco import alpha_at

F64 = torch.float64


# ----------------------------------------------------------------------------- logistic regression
def _data(n=50, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = np.where(X @ w + 0.5 * rng.normal(size=n) > 0, 1.0, -1.0)
    return X, y


def _np_grad(theta, X, y):
    """∇ of mean log(1 + exp(-y xᵀθ))."""
    s = 1.0 / (1.0 + np.exp(y * (X @ theta)))
    return -(X * (y * s)[:, None]).mean(0)


def _torch_problem(X, y, theta0):
    w = nn.Parameter(torch.tensor(theta0, dtype=F64))
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def loss_fn(idx):
        idx = torch.as_tensor(idx)
        return nn.functional.softplus(-yt[idx] * (Xt[idx] @ w)).mean()

    return w, loss_fn


def _batches(n, b, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=b, replace=False) for _ in range(steps)]


def _run_vbpc(opt, w, loss_fn, batches, anchor_chunks):
    out = []
    for idx in batches:
        if opt.refresh_due:
            opt.refresh(loss_fn, anchor_chunks, progress=False)

        def closure(idx=idx):
            opt.zero_grad()
            loss = loss_fn(idx)
            loss.backward()
            return loss

        opt.step(closure, batch_size=len(idx))
        out.append(w.detach().numpy().copy())
    return np.array(out)


@pytest.mark.parametrize("form", ["mean", "paper"])
def test_p1_svrg_parity_with_numpy(form):
    """200 inner steps, 3 refreshes, |B| = 5, full-data anchor in chunks; rtol 1e-10 (O13)."""
    X, y = _data()
    n, d = X.shape
    steps, T, delta, rho = 200, 67, 1e-2, 0.5
    theta0 = np.zeros(d)
    batches = _batches(n, 5, steps)
    theta, ref = theta0.copy(), []
    if form == "paper":  # sum scale, unit prior N(0, I), step η: ρ = ηN, δ = 1/N (eq. 4)
        eta = rho / n
        for t, B in enumerate(batches):
            if t % T == 0:
                theta_out = theta.copy()
                full = n * _np_grad(theta_out, X, y)  # Σ_j ∇ℓ_j(θ_out)
            g = n * _np_grad(theta, X[B], y[B]) - n * _np_grad(theta_out, X[B], y[B]) + full + theta
            theta = theta - eta * g
            ref.append(theta.copy())
        lr, wd = eta * n, 1.0 / n
    else:
        for t, B in enumerate(batches):
            if t % T == 0:
                theta_out, gbar = theta.copy(), _np_grad(theta, X, y)
            g = _np_grad(theta, X[B], y[B]) - _np_grad(theta_out, X[B], y[B]) + gbar + delta * theta
            theta = theta - rho * g
            ref.append(theta.copy())
        lr, wd = rho, delta
    w, loss_fn = _torch_problem(X, y, theta0)
    opt = vbpc.SVRG([w], lr=lr, anchor_period=T, weight_decay=wd)
    chunks = [np.arange(i, min(i + 15, n)) for i in range(0, n, 15)]  # short last chunk: weighted mean
    got = _run_vbpc(opt, w, loss_fn, batches, chunks)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-10, atol=1e-12)
    assert opt.anchor.refreshes == 3
    # cost counters (§6.4, O29): 2 passes per corrected step, refreshes counted separately
    assert opt.counters == {"inner_passes": 2 * steps, "refresh_passes": 3 * len(chunks),
                            "inner_examples": 2 * steps * 5, "refresh_examples": 3 * n, "clipped_steps": 0}


def test_p2_alpha_svrg_parity_megabatch_linear_schedule():
    X, y = _data(seed=3)
    n, d = X.shape
    steps, T, delta, rho, alpha0 = 200, 40, 1e-2, 0.5, 0.75
    K = math.ceil(steps / T)
    alphas = np.linspace(alpha0, 0.0, K)
    M = np.arange(30)  # the mega-batch: 30 of the 50 examples
    batches = _batches(n, 5, steps, seed=4)
    theta, ref = np.zeros(d), []
    for t, B in enumerate(batches):
        if t % T == 0:
            k = t // T
            theta_out, gbar = theta.copy(), _np_grad(theta, X[M], y[M])
        a = alphas[k]
        g = _np_grad(theta, X[B], y[B]) - a * (_np_grad(theta_out, X[B], y[B]) - gbar) + delta * theta
        theta = theta - rho * g
        ref.append(theta.copy())
    w, loss_fn = _torch_problem(X, y, np.zeros(d))
    opt = vbpc.AlphaSVRG([w], lr=rho, anchor_period=T, alpha=alpha0, total_steps=steps, weight_decay=delta)
    got = _run_vbpc(opt, w, loss_fn, batches, [M[:10], M[10:20], M[20:]])
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-10, atol=1e-12)


def test_linear_alpha_schedule_values():
    assert [alpha_at(0.75, "linear", k, 4) for k in range(5)] == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0])
    assert alpha_at(0.75, "linear", 0, 1) == 0.75
    assert alpha_at(0.6, "constant", 7, None) == 0.6
    with pytest.raises(ValueError, match="total_steps"):
        alpha_at(0.5, "linear", 0, None)


# ----------------------------------------------------------------------------- stochastic nets
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def _xy(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


_loop = poco_loop


@pytest.mark.parametrize("noise", ["shared", "independent"])
@pytest.mark.parametrize("force", [False, True])
def test_p3_alpha_zero_is_vsgd_bitwise(noise, force):
    """α=0: bit-identical to VSGD with dropout in the model, refreshes running (RNG-neutral)."""
    x, y = _xy()
    results = []
    for kind in ("vsgd", "poco"):
        model = _mlp()
        if kind == "vsgd":
            opt = vbpc.VSGD(model.parameters(), lr=0.1, sigma=0.05, weight_decay=1e-3, momentum=0.5)
        else:
            opt = vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.05, weight_decay=1e-3, momentum=0.5, alpha=0.0,
                                anchor_period=4, anchor_noise=noise, force_anchor_pass=force)
        torch.manual_seed(7)
        _loop(model, opt, x, y, 12)
        results.append([p.detach().clone() for p in model.parameters()])
        if kind == "poco":
            assert opt.anchor.refreshes == 3
            assert opt.counters["inner_passes"] == (24 if force else 12)  # forced: an anchor pass every step
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_p4_refresh_identity_exact_and_general_alpha():
    x, y = _xy()
    model = _mlp()
    opt = vbpc.VSGDPoCo(model.parameters(), lr=0.05, sigma=0.02, alpha=1.0, anchor_period=5, track_stats=True)
    torch.manual_seed(0)
    _loop(model, opt, x, y, 5)  # refresh at t=0, then 4 more steps: t=5 is due
    _loop(model, opt, x, y, 1)  # refresh at t=5 and the first step after it
    for gt, gb in zip(opt.last_stats["g_tilde"], opt.anchor.grad):
        assert torch.equal(gt, gb)  # exact: same batch, shared noise, replayed dropout
    opt2 = vbpc.VSGDPoCo(model.parameters(), lr=0.05, sigma=0.02, alpha=0.4, anchor_period=5, track_stats=True)
    torch.manual_seed(1)
    _loop(model, opt2, x, y, 1)
    s = opt2.last_stats
    for gt, gi, gb in zip(s["g_tilde"], s["g_in"], opt2.anchor.grad):
        torch.testing.assert_close(gt, 0.6 * gi + 0.4 * gb, rtol=1e-12, atol=1e-15)


def _corrected_at_every_batch(alpha, steps_before=2):
    """g̃ for every size-2 subset of N=6 examples at the same (m, m_out); σ = 0 (delta)."""
    x, y = _xy(n=6, seed=2)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = vbpc.VSGDPoCo(model.parameters(), lr=0.3, sigma=0.0, alpha=alpha, anchor_period=100, track_stats=True)
    torch.manual_seed(0)
    _loop(model, opt, x, y, steps_before, bs=2)
    if opt.refresh_due:  # steps_before = 0: the anchor is the current mean
        opt.refresh(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), [(x, y)], progress=False)
    full = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    out = []
    for B in itertools.combinations(range(6), 2):
        m2, o2 = copy.deepcopy((model, opt))  # one memo: o2 refers to m2's parameters
        assert o2.anchor.params[0] is next(m2.parameters())
        idx = list(B)

        def closure(idx=idx, m2=m2, o2=o2):
            o2.zero_grad()
            loss = nn.functional.cross_entropy(m2(x[idx]), y[idx])
            loss.backward()
            return loss

        o2.step(closure)
        out.append(o2.last_stats)
    return out, full


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_p5_unbiasedness_over_all_15_batches(alpha):
    stats, full = _corrected_at_every_batch(alpha)
    assert len(stats) == 15
    for j, f in enumerate(full):
        mean = torch.stack([s["g_tilde"][j] for s in stats]).mean(0)
        torch.testing.assert_close(mean, f, rtol=0, atol=1e-12)


def test_variance_reduction_zero_at_anchor_and_small_near_it():
    at_anchor, _ = _corrected_at_every_batch(1.0, steps_before=0)  # step 0: m = m_out
    var = torch.stack([s["g_tilde"][0] for s in at_anchor]).var(0)
    assert float(var.max()) == 0.0
    near, _ = _corrected_at_every_batch(1.0, steps_before=1)
    v_tilde = torch.stack([s["g_tilde"][0] for s in near]).var(0).sum()
    v_plain = torch.stack([s["g_in"][0] for s in near]).var(0).sum()
    assert float(v_tilde) < 0.05 * float(v_plain)


# ----------------------------------------------------------------------------- reliability
def test_resume_mid_interval_is_bitwise(tmp_path):
    x, y = _xy()
    model = _mlp()
    opt = vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.05, alpha=0.5, anchor_period=4, momentum=0.3,
                        anchor_noise="independent")
    torch.manual_seed(3)
    _loop(model, opt, x, y, 6)
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")
    _loop(model, opt, x, y, 6)
    ck = torch.load(tmp_path / "c.pt", weights_only=False)
    model2 = _mlp(seed=5)
    model2.load_state_dict(ck["m"])
    opt2 = vbpc.VSGDPoCo(model2.parameters(), lr=0.1, sigma=0.05, alpha=0.5, anchor_period=4, momentum=0.3,
                         anchor_noise="independent", anchor_seed=99)
    opt2.load_state_dict(ck["o"])
    torch.set_rng_state(ck["rng"])
    _loop(model2, opt2, x, y, 6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert opt2.t == 12 and opt2.anchor.refreshes == opt.anchor.refreshes


def test_bad_input_errors_leave_state_untouched():
    x, y = _xy()
    model = _mlp()
    with pytest.raises(ValueError, match="alpha"):
        vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.0, alpha=1.5, anchor_period=3)
    with pytest.raises(ValueError, match="anchor_period"):
        vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.0, alpha=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        vbpc.AlphaSVRG(model.parameters(), lr=0.1, anchor_period=3)
    opt = vbpc.VSGDPoCo(model.parameters(), lr=0.1, sigma=0.01, alpha=1.0, anchor_period=3)
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match="empty iterable"):
        opt.refresh(loss_fn, [], progress=False)
    assert not opt.anchor.ready
    with pytest.raises(vbpc.SamplingError, match="refresh is due"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    opt.refresh(loss_fn, [(x, y)], model=model, progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    anchor = [a.clone() for a in opt.anchor.grad]

    def nan_closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(vbpc.NonFiniteError, match="non-finite loss"):
        opt.step(nan_closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(anchor, opt.anchor.grad)) and opt.t == 0
    with pytest.raises(vbpc.NonFiniteError):
        opt.refresh(lambda b: loss_fn(b) * float("inf"), [(x, y)], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(anchor, opt.anchor.grad))
    # an anchor of the wrong shape is rejected before anything changes
    sd = opt.state_dict()
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    oopt = vbpc.VSGDPoCo(other.parameters(), lr=0.1, sigma=0.01, alpha=1.0, anchor_period=3)
    with pytest.raises(vbpc.StateDictMismatchError, match="shape"):
        oopt.load_state_dict(sd)
    assert not oopt.anchor.ready and oopt.t == 0


def test_refresh_keeps_batchnorm_statistics_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    x, y = _xy()
    opt = vbpc.SVRG(model.parameters(), lr=0.1, anchor_period=10)
    stats = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    opt.refresh(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), [(x[:8], y[:8]), (x[8:], y[8:])],
                model=model, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    assert opt.counters["refresh_passes"] == 2 and opt.counters["refresh_examples"] == 24
