"""IVON-PoCo mega-batch remedies: ``anchor_update="running"`` and ``alpha_mode="optimal"``.

Float64 hand references of the running anchor mean (a size-weighted mean of the refresh's
ḡ_out and the anchor-pass means of the corrected steps since), of the control-variate moments
and the per-tensor α_j, of the bias of the corrected gradient (α times the anchor mean's error,
eq. (22)), plus bad input, α=0 ≡ IVON bit for bit and a mid-run state-dict round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ce_closure
from torch import nn

import vbpc

F64 = torch.float64
KW = dict(lr=0.05, ess=200.0, hess_init=0.5, beta1=0.9, beta2=0.999, weight_decay=1e-3)
N = 24
CHUNKS = (5, 8, 11)  # an unequal mega-batch split of the N examples
SIZES = (3, 5, 4, 6, 2)  # batch sizes of the steps, cycled


def _mlp(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()


def _xy(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def _loss_fn(model):
    return lambda b: nn.functional.cross_entropy(model(b[0]), b[1])


def _chunks(x, y, sizes=CHUNKS):
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    assert i == len(x)
    return out


def _batch(x, y, t):
    """Step t's batch: SIZES[t % 5] consecutive examples (wrapping), so sizes vary."""
    b = SIZES[t % len(SIZES)]
    idx = (torch.arange(b) + 7 * t) % len(x)
    return x[idx], y[idx], b


def _run(model, opt, x, y, t0, steps):
    """Steps t0 .. t0+steps-1 with varying batch sizes, refreshing over the unequal chunks when due."""
    for t in range(t0, t0 + steps):
        if opt.refresh_due:
            opt.refresh(_loss_fn(model), _chunks(x, y), model=model, progress=False)
        xb, yb, b = _batch(x, y, t)
        opt.step(ce_closure(model, opt, xb, yb), batch_size=b)


def _rel(a, b):
    """Relative error ‖a − b‖ / ‖b‖ (absolute when b = 0)."""
    return float((a - b).norm()) / max(float(b.norm()), 1e-300)


def _clone(ts):
    return [t.detach().clone() for t in ts]


# ---------------------------------------------------------------------------------------------
# 1. running anchor: hand-computed size-weighted mean, previous mean used by each step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mc", [1, 2])
def test_running_anchor_is_the_size_weighted_mean_and_each_step_uses_the_previous_one(mc):
    """20 steps: warm-up (t<2), two corrected intervals of 6 steps (α=0.8, 0.4; refreshes at t=2, 8),
    the last linear interval (α=0, refresh at t=14).  After every corrected step ḡ_out is the
    float64 size-weighted mean of the refresh's ḡ (weight 24) and the anchor-pass means ĝ_out of the
    steps since (weight b), to 1e-12; each step's g̃ used the mean before its own fold; the anchor's
    example count grows by b per corrected step and is reset by a refresh; at α=0 nothing is folded."""
    x, y = _xy()
    model = _mlp()
    opt = vbpc.IVONPoCo(model.parameters(), mc_samples=mc, alpha=0.8, alpha_schedule="linear", total_steps=20,
                        warmup_steps=2, anchor_period=6, anchor_update="running", track_stats=True, **KW)
    torch.manual_seed(7)
    terms: list[tuple[int, list[torch.Tensor]]] = []  # (weight, mean) of the current period
    corrected, alphas = 0, []
    for t in range(20):
        if opt.refresh_due:
            opt.refresh(_loss_fn(model), _chunks(x, y), model=model, progress=False)
            assert opt.anchor.examples == N  # reset by the refresh, whatever was folded before
            terms = [(N, _clone(opt.anchor.grad))]
        alpha_t = opt.alpha
        alphas.append(alpha_t)
        g_prev = _clone(opt.anchor.grad) if opt.anchor.ready else None
        n_prev = opt.anchor.examples
        xb, yb, b = _batch(x, y, t)
        opt.step(ce_closure(model, opt, xb, yb), batch_size=b)
        if alpha_t == 0.0:  # warm-up or the last linear interval: IVON's step, no fold
            assert opt.last_stats is None
            assert opt.anchor.examples == n_prev
            if g_prev is not None:
                assert all(torch.equal(g, p) for g, p in zip(opt.anchor.grad, g_prev))
            continue
        corrected += 1
        s = opt.last_stats
        for gt, gi, go, gp in zip(s["g_tilde"], s["g_in"], s["g_out"], g_prev):
            assert _rel(gt, (gi - alpha_t * go) + alpha_t * gp) <= 1e-12  # the mean before the fold
        assert opt.anchor.examples == n_prev + b
        terms.append((b, _clone(s["g_out"])))
        total = sum(w for w, _ in terms)
        assert opt.anchor.examples == total
        for j, got in enumerate(opt.anchor.grad):
            want = sum(w * g[j] for w, g in terms) / total
            assert _rel(got, want) <= 1e-12, (t, j)
        assert _rel(got, g_prev[-1]) > 1e-8  # the fold did move the mean
    assert alphas[:2] == [0.0, 0.0] and set(alphas[2:8]) == {0.8} and set(alphas[8:14]) == {0.4}
    assert set(alphas[14:]) == {0.0}
    assert corrected == 12 and opt.anchor.refreshes == 3 and opt.anchor.examples == N


def test_running_anchor_sample_then_step_folds_like_step_with_closure():
    """``sample(closure)``·2 + ``step(batch_size=b)`` folds exactly as ``step(closure, batch_size=b)``
    with ``mc_samples=2`` (the fold uses the anchor pass's MC mean), bit for bit."""
    x, y = _xy()
    runs = []
    for mode in ("closure", "sample"):
        model = _mlp()
        opt = vbpc.IVONPoCo(model.parameters(), mc_samples=2, alpha=0.7, anchor_period=4,
                            anchor_update="running", **KW)
        torch.manual_seed(1)
        for t in range(6):
            if opt.refresh_due:
                opt.refresh(_loss_fn(model), _chunks(x, y), model=model, progress=False)
            xb, yb, b = _batch(x, y, t)
            closure = ce_closure(model, opt, xb, yb)
            if mode == "closure":
                opt.step(closure, batch_size=b)
            else:
                opt.sample(closure)
                opt.sample(closure)
                opt.step(batch_size=b)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(o1.anchor.grad, o2.anchor.grad))
    assert o1.anchor.examples == o2.anchor.examples == N + SIZES[4] + SIZES[0]  # folds of t=4, 5 since the refresh


# ---------------------------------------------------------------------------------------------
# 2. the bias: α times the anchor mean's error (frozen and running, scheduled and optimal α)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["scheduled", "optimal"])
@pytest.mark.parametrize("update", ["frozen", "running"])
def test_bias_is_alpha_times_the_anchor_mean_error(update, mode):
    """At a fixed state (a refresh plus 3 steps), g̃ averaged over the 4 batches of an equal-size
    partition of the data (same state, same z, shared anchor noise) equals the full-data
    ĝ_in + α_j(ḡ_out,t − ĝ_out) to 1e-12: the only bias is α times the error of the anchor mean
    the step used (the running mean before this step's fold, or the frozen mega-batch mean)."""
    x, y = _xy(n=12, seed=3)
    model = _mlp(dropout=0.0)  # dropout masks depend on the batch's composition
    opt = vbpc.IVONPoCo(model.parameters(), alpha=0.6, anchor_period=100, anchor_noise="shared",
                        anchor_update=update, alpha_mode=mode, track_stats=True, **KW)
    torch.manual_seed(0)
    opt.refresh(_loss_fn(model), [(x[:5], y[:5]), (x[5:], y[5:])], model=model, progress=False)
    g_refresh = _clone(opt.anchor.grad)
    for t in range(3):
        idx = torch.arange(4 * t, 4 * t + 4)
        opt.step(ce_closure(model, opt, x[idx], y[idx]), batch_size=4)
    g_anchor = _clone(opt.anchor.grad)
    if update == "running":
        assert opt.anchor.examples == 12 + 3 * 4
        assert any(_rel(a, b) > 1e-8 for a, b in zip(g_anchor, g_refresh))
    else:
        assert opt.anchor.examples == 12
        assert all(torch.equal(a, b) for a, b in zip(g_anchor, g_refresh))

    def corrected(idx):
        m2, o2 = copy.deepcopy((model, opt))
        torch.manual_seed(42)  # the same z for every batch
        o2.step(ce_closure(m2, o2, x[idx], y[idx]), batch_size=len(idx))
        return o2.last_stats, o2.last_alpha

    full, full_alpha = corrected(torch.arange(12))
    parts = [corrected(torch.arange(i, i + 3)) for i in range(0, 12, 3)]
    n = len(full["g_in"])
    if mode == "optimal":  # α_j comes from the moments of the previous steps: the same for every batch
        alpha = [float(a) for a in full_alpha]
        for _, pa in parts:
            assert all(torch.equal(a, b) for a, b in zip(pa, full_alpha))
        assert all(0.0 <= a <= 1.0 for a in alpha)
    else:
        alpha = [0.6] * n
    for j in range(n):
        mean = torch.stack([s["g_tilde"][j] for s, _ in parts]).mean(0)
        bias = alpha[j] * (g_anchor[j] - full["g_out"][j])
        torch.testing.assert_close(mean, full["g_in"][j] + bias, rtol=0, atol=1e-12)
        # the partition's ĝ_out averages to the full-data one (the identity the bias rests on)
        torch.testing.assert_close(torch.stack([s["g_out"][j] for s, _ in parts]).mean(0), full["g_out"][j],
                                   rtol=0, atol=1e-12)
    assert max(float((alpha[j] * (g_anchor[j] - full["g_out"][j])).abs().max()) for j in range(n)) > 1e-6


# ---------------------------------------------------------------------------------------------
# 3. optimal α: float64 hand reference of the moments and α_j
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("update", ["frozen", "running"])
def test_optimal_alpha_matches_a_float64_hand_reference(update):
    """15 steps, linear α (0.8, 0.4, 0 over intervals of 5): c_j, v_j and α_j = clip(c_j/v_j)·α_t/α_0
    (from the moments before the step; exactly α_t at the first corrected step, α_0 = 0.8 ≠ 1 so that
    α_t and α_t/α_0 differ) against the state, last_alpha, alpha_estimates and g̃ to 1e-12; h̃ keeps
    the scalar α_t; at α=0 (last interval) nothing changes."""
    x, y = _xy()
    model = _mlp()
    beta, a0 = 0.7, 0.8
    opt = vbpc.IVONPoCo(model.parameters(), alpha=a0, alpha_schedule="linear", total_steps=15, anchor_period=5,
                        alpha_mode="optimal", alpha_smoothing=beta, anchor_update=update, track_stats=True, **KW)
    params = list(model.parameters())
    names = opt._names(params)
    c = [torch.zeros((), dtype=F64) for _ in params]
    v = [torch.zeros((), dtype=F64) for _ in params]
    torch.manual_seed(3)
    corrected, factor_seen = 0, False
    for t in range(15):
        if opt.refresh_due:
            opt.refresh(_loss_fn(model), _chunks(x, y), model=model, progress=False)
        alpha_t = opt.alpha
        g_prev, h_bar = _clone(opt.anchor.grad), _clone(opt.anchor.hess)
        moments = [opt.state[p][k].clone() for p in params for k in ("cv_cov", "cv_var") if k in opt.state[p]]
        xb, yb, b = _batch(x, y, t)
        opt.step(ce_closure(model, opt, xb, yb), batch_size=b)
        if alpha_t == 0.0:  # last linear interval: no correction, moments untouched
            assert t >= 10 and opt.last_stats is None and len(moments) == 2 * len(params)
            after = [opt.state[p][k] for p in params for k in ("cv_cov", "cv_var")]
            assert all(torch.equal(a, b) for a, b in zip(moments, after))
            continue
        s, used = opt.last_stats, opt.last_alpha
        assert len(used) == len(params)
        for j, p in enumerate(params):
            if corrected == 0:  # no estimate yet: exactly α_t
                ratio, a_j = None, alpha_t
                assert float(v[j]) == 0.0 and float(used[j]) == alpha_t
            else:
                ratio = min(1.0, max(0.0, float(c[j] / v[j])))
                a_j = ratio * alpha_t / a0  # the schedule's decay factor α_t/α_0
            assert abs(float(used[j]) - a_j) <= 1e-12 * a_j
            assert 0.0 <= float(used[j]) <= 1.0
            factor_seen |= alpha_t == 0.4 and ratio is not None and ratio > 0.0
            gi, go, gp = s["g_in"][j], s["g_out"][j], g_prev[j]
            assert _rel(s["g_tilde"][j], (gi - a_j * go) + a_j * gp) <= 1e-12
            want_h = (s["h_in"][j] - alpha_t * s["h_out"][j]) + alpha_t * h_bar[j]  # scalar α_t
            assert _rel(s["h_tilde"][j], want_h) <= 1e-12
            d = go - gp  # against the anchor mean the step used (before a running fold)
            c[j] = beta * c[j] + (1 - beta) * (gi * d).sum()
            v[j] = beta * v[j] + (1 - beta) * (d * d).sum()
            cov, var = opt.state[p]["cv_cov"], opt.state[p]["cv_var"]
            assert cov.dtype == var.dtype == F64 and cov.dim() == var.dim() == 0
            assert abs(float(cov - c[j])) <= 1e-12 * abs(float(c[j])) and abs(float(var - v[j])) <= 1e-12 * float(v[j])
        est = opt.alpha_estimates()
        assert set(est) == set(names)
        for j, nm in enumerate(names):
            assert abs(est[nm] - min(1.0, max(0.0, float(c[j] / v[j])))) <= 1e-12
        corrected += 1
    assert corrected == 10 and factor_seen


def test_optimal_alpha_clamps_to_zero_and_one():
    """Hand-set moments (constant α_t = α_0 = 0.8, so α_j = clip(c_j/v_j)): c < 0 → α_j = 0 (g̃_j = ĝ_in
    bit for bit), c > v → 1, c = v/4 → 1/4, c = v → 1; the Hessian is still corrected with α_t = 0.8;
    alpha_estimates reports the clipped ratios."""
    x, y = _xy()
    model = _mlp()
    opt = vbpc.IVONPoCo(model.parameters(), alpha=0.8, anchor_period=50, alpha_mode="optimal",
                        track_stats=True, **KW)
    params = list(model.parameters())
    names = opt._names(params)
    torch.manual_seed(0)
    _run(model, opt, x, y, 0, 2)
    ratios = [-2.0, 3.0, 0.25, 1.0]
    for p, r in zip(params, ratios):
        opt.state[p]["cv_cov"].copy_(r * opt.state[p]["cv_var"])
    assert opt.alpha_estimates() == {nm: min(1.0, max(0.0, r)) for nm, r in zip(names, ratios)}
    g_bar, h_bar = _clone(opt.anchor.grad), _clone(opt.anchor.hess)
    xb, yb, b = _batch(x, y, 2)
    opt.step(ce_closure(model, opt, xb, yb), batch_size=b)
    s = opt.last_stats
    assert [float(a) for a in opt.last_alpha] == [0.0, 1.0, 0.25, 1.0]
    assert torch.equal(s["g_tilde"][0], s["g_in"][0])  # α_j = 0: the uncorrected gradient
    for j, a in enumerate([0.0, 1.0, 0.25, 1.0]):
        want = (s["g_in"][j] - a * s["g_out"][j]) + a * g_bar[j]
        assert _rel(s["g_tilde"][j], want) <= 1e-12
        want_h = (s["h_in"][j] - 0.8 * s["h_out"][j]) + 0.8 * h_bar[j]
        assert _rel(s["h_tilde"][j], want_h) <= 1e-12


def test_optimal_alpha_last_alpha_covers_every_param_group():
    """Two param groups: ``last_alpha`` holds one α_j per trainable parameter, in parameter order
    (as ``last_stats``), consistent with g̃ = (ĝ_in − α_j ĝ_out) + α_j ḡ_out."""
    x, y = _xy()
    model = _mlp()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[3].parameters()), "lr": 0.02}]
    opt = vbpc.IVONPoCo(groups, alpha=0.8, anchor_period=50, alpha_mode="optimal", track_stats=True, **KW)
    torch.manual_seed(0)
    _run(model, opt, x, y, 0, 3)
    g_bar = _clone(opt.anchor.grad)
    xb, yb, b = _batch(x, y, 3)
    opt.step(ce_closure(model, opt, xb, yb), batch_size=b)
    s = opt.last_stats
    assert len(s["g_tilde"]) == 4
    assert opt.last_alpha is not None and len(opt.last_alpha) == 4
    for j, a in enumerate(opt.last_alpha):
        a = float(a)
        assert 0.0 <= a <= 1.0
        assert _rel(s["g_tilde"][j], (s["g_in"][j] - a * s["g_out"][j]) + a * g_bar[j]) <= 1e-12


def _ivon_state(model, opt):
    ps = list(model.parameters())
    return ([p.detach().clone() for p in ps] + [opt.state[p]["hess"].clone() for p in ps]
            + [opt.state[p]["momentum"].clone() for p in ps])


@pytest.mark.parametrize("update", ["frozen", "running"])
@pytest.mark.parametrize("force", [False, True])
def test_optimal_alpha_zero_is_ivon_bitwise(update, force):
    """alpha_mode="optimal" with α_0 = 0 (anchor pass skipped or forced, refreshes running) ≡ vbpc.IVON:
    m, h, momentum bit for bit; no moments are created and nothing is folded into the anchor."""
    x, y = _xy()
    runs = []
    for kind in ("ivon", "poco"):
        model = _mlp()
        if kind == "ivon":
            opt = vbpc.IVON(model.parameters(), **KW)
        else:
            opt = vbpc.IVONPoCo(model.parameters(), alpha=0.0, anchor_period=4, alpha_mode="optimal",
                                anchor_update=update, force_anchor_pass=force, track_stats=True, **KW)
        torch.manual_seed(11)
        for t in range(10):
            if getattr(opt, "refresh_due", False):
                opt.refresh(_loss_fn(model), _chunks(x, y), model=model, progress=False)
            xb, yb, b = _batch(x, y, t)
            closure = ce_closure(model, opt, xb, yb)
            opt.step(closure, batch_size=b) if kind == "poco" else opt.step(closure)
        runs.append(_ivon_state(model, opt))
        if kind == "poco":
            assert opt.anchor.refreshes == 3 and opt.anchor.examples == N
            assert opt.counters["inner_passes"] == 10 * (2 if force else 1)
            assert not any("cv_cov" in opt.state[p] or "cv_var" in opt.state[p] for p in model.parameters())
            assert opt.alpha_estimates() == {} and opt.last_stats is None
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------
# 4. bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    ({"alpha_mode": "foo"}, "alpha_mode"),
    ({"alpha_smoothing": 1.0}, "alpha_smoothing"),
    ({"alpha_smoothing": -0.1}, "alpha_smoothing"),
    ({"anchor_update": "bar"}, "anchor_update"),
])
def test_bad_remedy_options(kw, name):
    with pytest.raises(ValueError, match=name):
        vbpc.IVONPoCo(_mlp().parameters(), alpha=0.5, anchor_period=3, **kw, **KW)


def test_running_anchor_needs_batch_size():
    """``step(closure)`` without ``batch_size`` raises ValueError naming it, before any state changes
    (at α > 0 and α = 0 alike); the same step with ``batch_size`` then runs and folds."""
    x, y = _xy()
    model = _mlp()
    opt = vbpc.IVONPoCo(model.parameters(), alpha=0.5, anchor_period=3, warmup_steps=1,
                        anchor_update="running", **KW)
    xb, yb, b = _batch(x, y, 0)
    with pytest.raises(ValueError, match="batch_size"):  # warm-up: α = 0
        opt.step(ce_closure(model, opt, xb, yb))
    assert opt.t == 0 and opt.counters["inner_passes"] == 0
    opt.step(ce_closure(model, opt, xb, yb), batch_size=b)
    opt.refresh(_loss_fn(model), _chunks(x, y), model=model, progress=False)
    snap, g_bar = _ivon_state(model, opt), _clone(opt.anchor.grad)
    with pytest.raises(ValueError, match="batch_size"):
        opt.step(ce_closure(model, opt, xb, yb))
    assert all(torch.equal(a, b) for a, b in zip(snap, _ivon_state(model, opt)))
    assert all(torch.equal(a, b) for a, b in zip(g_bar, opt.anchor.grad))
    assert opt.t == 1 and opt.anchor.examples == N
    opt.step(ce_closure(model, opt, xb, yb), batch_size=b)
    assert opt.t == 2 and opt.anchor.examples == N + b


# ---------------------------------------------------------------------------------------------
# 5. state dict round trip mid-run, both remedies on
# ---------------------------------------------------------------------------------------------
def _full_state(model, opt):
    ps = list(model.parameters())
    return (_ivon_state(model, opt) + [opt.state[p]["cv_cov"].clone() for p in ps]
            + [opt.state[p]["cv_var"].clone() for p in ps] + _clone(opt.anchor.grad))


def test_state_dict_round_trip_with_both_remedies_bitwise(tmp_path):
    """Save at t=6 (mid-interval, after folds and moment updates), continue 6 steps; a fresh learner
    (other init, other anchor seed) loaded from the file continues bit for bit: params, hess,
    momentum, cv moments, anchor grad, examples, refreshes, t."""
    x, y = _xy()
    kw = dict(alpha=0.7, anchor_period=4, alpha_mode="optimal", alpha_smoothing=0.8, anchor_update="running",
              track_stats=True, **KW)
    model = _mlp()
    opt = vbpc.IVONPoCo(model.parameters(), **kw)
    torch.manual_seed(3)
    _run(model, opt, x, y, 0, 6)
    assert opt.anchor.examples == N + SIZES[4] + SIZES[0]  # refresh at t=4, folds of t=4, 5
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "c.pt")
    saved = _full_state(model, opt)
    _run(model, opt, x, y, 6, 6)  # a refresh at t=8 (anchor generator), folds, moments
    ck = torch.load(tmp_path / "c.pt", weights_only=False)
    model2 = _mlp(seed=5)
    model2.load_state_dict(ck["m"])
    opt2 = vbpc.IVONPoCo(model2.parameters(), **{**kw, "anchor_seed": 123})
    opt2.load_state_dict(ck["o"])
    loaded = _full_state(model2, opt2)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(saved, loaded))
    assert opt2.anchor.examples == N + SIZES[4] + SIZES[0] and opt2.t == 6
    torch.set_rng_state(ck["rng"])
    _run(model2, opt2, x, y, 6, 6)
    assert all(torch.equal(a, b) for a, b in zip(_full_state(model, opt), _full_state(model2, opt2)))
    assert opt.anchor.examples == opt2.anchor.examples and opt.anchor.refreshes == opt2.anchor.refreshes == 3
    assert opt.t == opt2.t == 12 and opt.counters == opt2.counters
