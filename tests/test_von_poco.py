"""VON / VON-PoCo (full Gaussian, Newton-like): P6, P7 and the α=0 identity (docs/algorithms.md §4, §7, §10.19-20)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vbpc

F64 = torch.float64


def _regression(n=12, d=3, s2=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    y = X @ torch.randn(d, generator=g, dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64)
    return X, y, s2


def _linear_model(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(d, generator=g, dtype=F64))


def _mse(w, X, y, s2):
    return lambda idx: (0.5 / s2 * (y[idx] - X[idx] @ w) ** 2).mean()


def test_p7_conjugate_one_step_exact_posterior():
    """Linear regression, λ=N, η=1, α=1, full-batch anchor, exact Hessians, proximal on, no PD
    correction: from any (m, P), any anchor and any batch one step gives eq. (28), 1e-10."""
    X, y, s2 = _regression()
    n, d = X.shape
    delta = 0.05
    w = _linear_model(d)
    loss = _mse(w, X, y, s2)
    # exact expectations: for a quadratic loss E_q[∇ℓ] = ∇ℓ(m) and E_q[∇²ℓ] = ∇²ℓ (the delta method)
    opt = vbpc.VONPoCo([w], lr=1.0, ess=float(n), weight_decay=delta, hess_init=2.0, expectation="mean",
                       pd_correction=False, proximal=True, alpha=1.0, anchor_period=100)
    g = torch.Generator().manual_seed(5)
    b = torch.randn(d, d, generator=g, dtype=F64)
    opt.P = b @ b.T + torch.eye(d, dtype=F64)  # a non-diagonal anchor precision
    opt.refresh(loss, [torch.arange(0, 5), torch.arange(5, n)], progress=False)  # anchor at the random start
    with torch.no_grad():
        w.add_(torch.randn(d, generator=g, dtype=F64))  # move m away from the anchor
    opt.P = 3.0 * torch.eye(d, dtype=F64)  # and change P: any (m, P)
    batch = torch.tensor([1, 7, 9])
    opt.step(lambda: loss(batch))
    S_exact = delta * n * torch.eye(d, dtype=F64) + X.T @ X / s2
    m_exact = torch.linalg.solve(S_exact, X.T @ y / s2)
    torch.testing.assert_close(opt.precision_matrix(), S_exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.detach(), m_exact, rtol=1e-10, atol=1e-10)


def test_p6_quadratic_hessian_correction_has_zero_variance():
    X, y, s2 = _regression(seed=2)
    n, d = X.shape
    w = _linear_model(d)
    loss = _mse(w, X, y, s2)
    H_bar = X.T @ X / s2 / n
    for batch in ([0, 1], [2, 5, 7], list(range(n))):
        opt = vbpc.VONPoCo([w], lr=0.5, ess=float(n), weight_decay=0.1, anchor_period=100, track_stats=True)
        opt.refresh(loss, [torch.arange(n)], progress=False)
        idx = torch.tensor(batch)
        opt.step(lambda idx=idx: loss(idx))
        torch.testing.assert_close(opt.last_stats["H"], H_bar, rtol=1e-12, atol=1e-12)


def test_alpha_zero_is_von_bitwise_and_converges():
    X, y, s2 = _regression(n=40, seed=4)
    n, d = X.shape
    out = []
    for kind in ("von", "poco"):
        w = _linear_model(d)
        loss = _mse(w, X, y, s2)
        kw = dict(lr=0.3, ess=float(n), weight_decay=0.05, mc_samples=2)
        opt = vbpc.VON([w], **kw) if kind == "von" else vbpc.VONPoCo(
            [w], alpha=0.0, anchor_period=5, force_anchor_pass=True, **kw)
        torch.manual_seed(0)
        for t in range(30):
            if getattr(opt, "refresh_due", False):
                opt.refresh(loss, [torch.arange(n)], progress=False)
            b = torch.tensor([(4 * t + k) % n for k in range(8)])
            opt.step(lambda b=b: loss(b))
        out.append((w.detach().clone(), opt.P.clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    S_exact = 0.05 * n * torch.eye(d, dtype=F64) + X.T @ X / s2
    m_exact = torch.linalg.solve(S_exact, X.T @ y / s2)
    assert torch.linalg.norm(out[0][0] - m_exact) < 0.05 * torch.linalg.norm(m_exact)


def test_price_hessian_with_pd_correction_stays_positive_definite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, yc = torch.randn(32, 3, dtype=F64), torch.randint(0, 2, (32,))
    opt = vbpc.VONPoCo(model.parameters(), lr=0.2, ess=32.0, weight_decay=0.1, hessian="price", mc_samples=2,
                       alpha=0.5, anchor_period=5)
    assert opt.pd_correction
    fn = lambda b: nn.functional.cross_entropy(model(x[b]), yc[b])  # noqa: E731
    for t in range(15):
        if opt.refresh_due:
            opt.refresh(fn, [torch.arange(32)], model=model, progress=False)
        b = torch.arange(8 * (t % 4), 8 * (t % 4) + 8)
        opt.step(lambda b=b: fn(b))
        torch.linalg.cholesky(opt.precision_matrix())  # raises if not PD
    post = opt.posterior(model)
    assert isinstance(post, vbpc.FullGaussian) and post.numel() == opt.d


def test_bad_input():
    with pytest.raises(ValueError, match="max_dim"):
        vbpc.VON(nn.Linear(100, 60).parameters(), lr=0.5, ess=10.0)
    w = _linear_model(3)
    opt = vbpc.VON([w], lr=0.5, ess=10.0)

    def with_backward():
        loss = (w ** 2).sum()
        loss.backward()
        return loss.detach()

    with pytest.raises(vbpc.SamplingError, match="must not call backward"):
        opt.step(with_backward)
    before = w.detach().clone()
    with pytest.raises(vbpc.NonFiniteError):
        opt.step(lambda: (w ** 2).sum() * float("nan"))
    assert torch.equal(before, w.detach()) and opt.t == 0
    with pytest.raises(ValueError, match="empty"):
        vbpc.VONPoCo([w], lr=0.5, ess=10.0, anchor_period=2).refresh(lambda b: (w ** 2).sum(), [], progress=False)
