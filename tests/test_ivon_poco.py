"""IVON-PoCo / IVON-PoCoMo oracles (docs/algorithms.md §4 P3-P5, §6, §10.15-18)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import poco_loop
from torch import nn

import vbpc

F64 = torch.float64


def _mlp(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def _xy(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


_loop = poco_loop


def _state(model, opt):
    ps = list(model.parameters())
    return ([p.detach().clone() for p in ps] + [opt.state[p]["hess"].clone() for p in ps]
            + [opt.state[p]["momentum"].clone() for p in ps])


KW = dict(lr=0.05, ess=200.0, hess_init=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-3)


@pytest.mark.parametrize("noise", ["shared", "independent"])
@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("mc", [1, 2])
def test_p3_alpha_zero_is_ivon_bitwise(noise, force, mc):
    """α=0 (anchor pass skipped or forced, refreshes running) ≡ vbpc.IVON: m, g, h bitwise."""
    x, y = _xy()
    runs = []
    for kind in ("ivon", "poco"):
        model = _mlp()
        if kind == "ivon":
            opt = vbpc.IVON(model.parameters(), mc_samples=mc, **KW)
        else:
            opt = vbpc.IVONPoCo(model.parameters(), mc_samples=mc, alpha=0.0, anchor_period=4,
                                anchor_noise=noise, force_anchor_pass=force, **KW)
        torch.manual_seed(11)
        _loop(model, opt, x, y, 10)
        runs.append(_state(model, opt))
        if kind == "poco":
            assert opt.anchor.refreshes == 3
            assert opt.counters["inner_passes"] == 10 * mc * (2 if force else 1)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_p4_first_step_after_refresh_is_exact():
    """Shared noise, same batch, replayed dropout: g̃ = ḡ_out and h̃ = h̄_out bitwise at α=1."""
    x, y = _xy()
    model = _mlp()
    opt = vbpc.IVONPoCo(model.parameters(), alpha=1.0, anchor_period=5, track_stats=True, **KW)
    torch.manual_seed(0)
    _loop(model, opt, x, y, 6)  # refreshes at t=0 and t=5; the last step is the first after a refresh
    s = opt.last_stats
    for gt, gb in zip(s["g_tilde"], opt.anchor.grad):
        assert torch.equal(gt, gb)
    for ht, hb in zip(s["h_tilde"], opt.anchor.hess):
        assert torch.equal(ht, hb)
    # general α: g̃ = (1-α) ĝ_in + α ḡ_out up to rounding
    opt2 = vbpc.IVONPoCo(model.parameters(), alpha=0.3, anchor_period=5, track_stats=True, **KW)
    torch.manual_seed(1)
    _loop(model, opt2, x, y, 1)
    s = opt2.last_stats
    for gt, gi, gb in zip(s["g_tilde"], s["g_in"], opt2.anchor.grad):
        torch.testing.assert_close(gt, 0.7 * gi + 0.3 * gb, rtol=1e-10, atol=1e-13)
    for ht, hi, hb in zip(s["h_tilde"], s["h_in"], opt2.anchor.hess):
        torch.testing.assert_close(ht, 0.7 * hi + 0.3 * hb, rtol=1e-10, atol=1e-10)


def test_p5_unbiased_over_all_batches_with_exact_anchor_statistics():
    """N=6, |B|=2, all 15 subsets, the same z: with ḡ_out, h̄_out the exact full-data means at the
    anchor sample, the mean corrected g̃, h̃ equal the full-batch ĝ_in, ĥ_in (1e-12)."""
    x, y = _xy(n=6, seed=3)
    model = _mlp(dropout=0.0)
    opt = vbpc.IVONPoCo(model.parameters(), alpha=0.6, anchor_period=100, track_stats=True, **KW)
    torch.manual_seed(0)
    _loop(model, opt, x, y, 2, bs=2)  # the mean has moved away from the anchor

    def corrected(idx, anchor_stats=None):
        m2, o2 = copy.deepcopy((model, opt))
        if anchor_stats is not None:
            o2.anchor.grad, o2.anchor.hess = anchor_stats

        def closure():
            o2.zero_grad()
            loss = nn.functional.cross_entropy(m2(x[idx]), y[idx])
            loss.backward()
            return loss

        torch.manual_seed(42)  # the same z for every batch
        o2.step(closure)
        return o2.last_stats

    full = corrected(list(range(6)))
    exact = ([g.clone() for g in full["g_out"]], [h.clone() for h in full["h_out"]])
    stats = [corrected(list(b), exact) for b in itertools.combinations(range(6), 2)]
    for j in range(len(full["g_in"])):
        torch.testing.assert_close(torch.stack([s["g_tilde"][j] for s in stats]).mean(0), full["g_in"][j],
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.stack([s["h_tilde"][j] for s in stats]).mean(0), full["h_in"][j],
                                   rtol=1e-10, atol=1e-9)


def test_variance_reduction_near_the_anchor():
    x, y = _xy(n=6, seed=3)
    model = _mlp(dropout=0.0)
    opt = vbpc.IVONPoCo(model.parameters(), alpha=1.0, anchor_period=100, track_stats=True, **KW)
    torch.manual_seed(0)
    _loop(model, opt, x, y, 1, bs=2)
    gt, gi = [], []
    for b in itertools.combinations(range(6), 2):
        m2, o2 = copy.deepcopy((model, opt))
        idx = list(b)

        def closure(idx=idx, m2=m2, o2=o2):
            o2.zero_grad()
            loss = nn.functional.cross_entropy(m2(x[idx]), y[idx])
            loss.backward()
            return loss

        torch.manual_seed(5)
        o2.step(closure)
        gt.append(o2.last_stats["g_tilde"][0])
        gi.append(o2.last_stats["g_in"][0])
    assert float(torch.stack(gt).var(0).sum()) < 0.1 * float(torch.stack(gi).var(0).sum())


def test_poco_mo_trains_and_counts_costs():
    """IVON-PoCoMo on a small problem: loss decreases; costs follow eq. (24)."""
    x, _ = _xy(n=48, seed=1)
    y = (x @ torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)).argmax(1)  # learnable
    model = _mlp(dropout=0.0)
    opt = vbpc.IVONPoCoMo(model.parameters(), lr=0.2, ess=480.0, hess_init=0.5, alpha=0.75, anchor_period=8,
                          weight_decay=1e-3)
    before = float(nn.functional.cross_entropy(model(x), y).detach())
    torch.manual_seed(0)
    _loop(model, opt, x, y, 40, bs=6, chunks=16)
    after = float(nn.functional.cross_entropy(model(x), y).detach())
    assert after < 0.6 * before
    assert opt.defaults["beta1"] == 0.9
    # 5 refreshes × 3 chunks × an antithetic pair; 2 passes per corrected step (eq. 24)
    assert opt.counters["inner_passes"] == 80 and opt.counters["refresh_passes"] == 5 * 3 * 2
    assert opt.counters["refresh_examples"] == 5 * 48 * 2


def test_resume_mid_interval_bitwise(tmp_path):
    x, y = _xy()
    model = _mlp()
    kw = dict(alpha=0.5, anchor_period=4, anchor_noise="independent", proximal=True, **KW)
    opt = vbpc.IVONPoCo(model.parameters(), **kw)
    torch.manual_seed(3)
    _loop(model, opt, x, y, 6)
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")
    _loop(model, opt, x, y, 6)
    ck = torch.load(tmp_path / "c.pt", weights_only=False)
    model2 = _mlp(seed=5)
    model2.load_state_dict(ck["m"])
    opt2 = vbpc.IVONPoCo(model2.parameters(), **{**kw, "anchor_seed": 123})
    opt2.load_state_dict(ck["o"])
    torch.set_rng_state(ck["rng"])
    _loop(model2, opt2, x, y, 6)
    assert all(torch.equal(a, b) for a, b in zip(_state(model, opt), _state(model2, opt2)))


def test_bad_input():
    model = _mlp()
    x, y = _xy()
    with pytest.raises(ValueError, match="alpha"):
        vbpc.IVONPoCo(model.parameters(), alpha=-0.1, anchor_period=3, **KW)
    with pytest.raises(ValueError, match="hess_approx"):
        vbpc.IVONPoCo(model.parameters(), anchor_period=3, hess_approx="gradsq", **KW)
    with pytest.raises(ValueError, match="parity"):
        vbpc.IVONPoCo(model.parameters(), anchor_period=3, parity=True, **KW)
    opt = vbpc.IVONPoCo(model.parameters(), alpha=1.0, anchor_period=3, **KW)
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match="empty iterable"):
        opt.refresh(loss_fn, [], progress=False)
    with pytest.raises(vbpc.SamplingError, match="refresh is due"):
        opt.step(lambda: loss_fn((x, y)))
    opt.refresh(loss_fn, [(x, y)], model=model, progress=False)
    snap = _state(model, opt)

    def nan_closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(vbpc.NonFiniteError):
        opt.step(nan_closure)
    assert all(torch.equal(a, b) for a, b in zip(snap, _state(model, opt))) and opt.t == 0
    other = _mlp()
    other[0] = nn.Linear(4, 8, bias=False).double()
    o2 = vbpc.IVONPoCo(other.parameters(), alpha=1.0, anchor_period=3, **KW)
    with pytest.raises(vbpc.StateDictMismatchError):
        o2.load_state_dict(opt.state_dict())
    assert not o2.anchor.ready


def test_antithetic_refresh_cancels_the_gradient_term_of_the_price_estimate():
    """With ±z' pairs the mega-batch Price h̄_out has far less spread than with single draws
    (the z'⊙∇ℓ̄(m_out)/σ term cancels), at the same mean gradient ḡ_out up to sampling noise."""
    x, y = _xy(n=48, seed=4)
    model = _mlp(dropout=0.0)
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]
    spread = {}
    for anti in (False, True):
        hs = []
        for seed in range(6):
            opt = vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=1e4, alpha=1.0, anchor_period=10,
                                refresh_antithetic=anti, anchor_seed=seed)
            opt.refresh(loss_fn, data, model=model, progress=False)
            hs.append(torch.cat([h.flatten() for h in opt.anchor.hess]))
        spread[anti] = float(torch.stack(hs).std(0).mean())
    assert spread[True] < 0.2 * spread[False]


def test_warmup_is_plain_ivon_then_refreshes_on_schedule():
    """t < t_w: α = 0 and no refresh is due (plain IVON, bitwise); refreshes at t_w, t_w + T, ..."""
    x, y = _xy()
    runs = []
    for kind in ("ivon", "poco"):
        model = _mlp()
        opt = (vbpc.IVON(model.parameters(), **KW) if kind == "ivon" else
               vbpc.IVONPoCo(model.parameters(), alpha=0.8, alpha_schedule="linear", total_steps=11,
                             warmup_steps=3, anchor_period=4, **KW))
        torch.manual_seed(2)
        _loop(model, opt, x, y, 3)
        runs.append(_state(model, opt))
        if kind == "poco":
            assert not opt.anchor.ready and opt.refresh_due and opt.alpha == 0.0
            _loop(model, opt, x, y, 8)
            assert opt.anchor.refreshes == 2 and opt.anchor.step == 7  # t = 3 and 7
            assert opt.n_intervals == 2 and opt.alpha == 0.0  # linspace(0.8, 0, 2)[1] in the last interval
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_sample_then_step_equals_step_with_closure_bitwise():
    """``sample(closure)`` k times + ``step()`` (the Trainer protocol) == ``step(closure)`` with
    ``mc_samples=k`` on the same batch and seed (α > 0: the anchor pass runs in both)."""
    import copy

    from helpers import ce_closure

    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    runs = []
    for mode in ("closure", "sample"):
        model = copy.deepcopy(base)
        opt = vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=24, mc_samples=2, alpha=0.5, anchor_period=3)
        loss_fn = lambda b, model=model: torch.nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
        torch.manual_seed(1)
        for t in range(5):
            if opt.refresh_due:
                opt.refresh(loss_fn, [(x[:12], y[:12]), (x[12:], y[12:])], progress=False)
            closure = ce_closure(model, opt, x[t:t + 8], y[t:t + 8])
            if mode == "closure":
                opt.step(closure)
            else:
                opt.sample(closure)
                opt.sample(closure)
                opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(o1.state[p]["hess"], o2.state[q]["hess"])
    assert o1.counters == o2.counters
    with pytest.raises(vbpc.errors.SamplingError, match="sample"):
        o2.step()
