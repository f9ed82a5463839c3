"""Posterior correction as a component (docs/correction.md): ``IVON/VSGD/VON(..., correction=vbpc.PoCo(...))``
and ``IVON(..., prior=q_old, correction=vbpc.ReplayCorrection(N_old))`` are the named learners bit for bit, and
the options are validated once, in :class:`vbpc.PoCo`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vbpc
from vbpc.inference.correction import Correction

X = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
Y = (X @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1).unsqueeze(1)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))


def _run(make, steps: int = 7, seed: int = 0, refresh: bool = True) -> tuple[list[torch.Tensor], dict]:
    """Train ``steps`` steps on fixed batches (dropout on: the replayed RNG matters), refreshing when due."""
    model = _model(seed)
    opt = make(model)
    torch.manual_seed(123)
    for t in range(steps):
        xb, yb = X[(4 * t) % 32:(4 * t) % 32 + 8], Y[(4 * t) % 32:(4 * t) % 32 + 8]
        if refresh and getattr(opt, "refresh_due", False):
            opt.refresh(lambda b: nn.functional.mse_loss(model(b[0]), b[1]), [(X[:16], Y[:16]), (X[16:], Y[16:])],
                        progress=False)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            if not isinstance(opt, vbpc.VONPoCo):
                loss.backward()
            return loss
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()], dict(opt.counters)


def _same(a: tuple, b: tuple) -> None:
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1] == b[1]


def test_ivon_with_poco_is_ivonpoco_bitwise():
    opts = dict(alpha=0.75, alpha_schedule="linear", total_steps=7, anchor_period=3, warmup_steps=1)
    named = _run(lambda m: vbpc.IVONPoCo(m.parameters(), lr=0.05, ess=64.0, **opts))
    component = _run(lambda m: vbpc.IVON(m.parameters(), lr=0.05, ess=64.0, beta1=0.0,
                                         correction=vbpc.PoCo(**opts)))
    _same(named, component)
    assert named[1]["inner_passes"] > 7  # corrected steps ran two passes


def test_ivon_with_alpha_zero_poco_is_ivon_bitwise():
    plain = _run(lambda m: vbpc.IVON(m.parameters(), lr=0.05, ess=64.0, beta1=0.0), refresh=False)
    corrected = _run(lambda m: vbpc.IVON(m.parameters(), lr=0.05, ess=64.0, beta1=0.0,
                                         correction=vbpc.PoCo(alpha=0.0)))
    for x, y in zip(plain[0], corrected[0]):
        assert torch.equal(x, y)


def test_vsgd_with_poco_is_svrg_bitwise():
    named = _run(lambda m: vbpc.SVRG(m.parameters(), lr=0.1, anchor_period=3, weight_decay=1e-3))
    component = _run(lambda m: vbpc.VSGD(m.parameters(), lr=0.1, sigma=0.0, weight_decay=1e-3,
                                         correction=vbpc.PoCo(alpha=1.0, anchor_period=3)))
    _same(named, component)
    assert named[1]["refresh_passes"] == 2 * 3  # refreshes at t = 0, 3, 6 over two chunks


def test_von_with_poco_is_vonpoco_bitwise():
    def small(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 1))
    global _model
    saved, _model = _model, small
    try:
        named = _run(lambda m: vbpc.VONPoCo(m.parameters(), lr=0.5, ess=64.0, weight_decay=0.1, alpha=0.5,
                                            anchor_period=3))
        component = _run(lambda m: vbpc.VON(m.parameters(), lr=0.5, ess=64.0, weight_decay=0.1,
                                            correction=vbpc.PoCo(alpha=0.5, anchor_period=3)))
    finally:
        _model = saved
    _same(named, component)


def test_ivon_with_prior_and_replay_is_continual_ivon_bitwise():
    base = _model(5)
    first = vbpc.IVON(base.parameters(), lr=0.05, ess=64.0)
    def closure() -> torch.Tensor:
        first.zero_grad()
        loss = nn.functional.mse_loss(base(X), Y)
        loss.backward()
        return loss
    for _ in range(3):
        first.step(closure)
    q_old = first.posterior(base)

    def make_named(m):
        return vbpc.ContinualIVON(m.parameters(), lr=0.05, ess=64.0, prior=q_old, model=m, correction=True,
                                  memory_weight=32.0)

    def make_component(m):
        return vbpc.IVON(m.parameters(), lr=0.05, ess=64.0, prior=q_old, model=m,
                         correction=vbpc.ReplayCorrection(memory_weight=32.0))

    results = []
    for make in (make_named, make_component):
        model = _model(5)
        opt = make(model)
        assert type(opt) is vbpc.ContinualIVON and opt.replay
        torch.manual_seed(7)
        for t in range(4):
            def new() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(X[:8] + t), Y[:8])
                loss.backward()
                return loss

            def memory() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(X[8:16]), Y[8:16])
                loss.backward()
                return loss
            opt.step(new, memory=memory)
        results.append(([p.detach().clone() for p in model.parameters()], dict(opt.counters)))
    _same(results[0], results[1])
    assert results[0][1]["inner_passes"] == 4 * 3


def test_prior_focused_spelling():
    base = _model(5)
    q = vbpc.IVON(base.parameters(), lr=0.05, ess=64.0).posterior(base)
    opt = vbpc.IVON(_model(5).parameters(), lr=0.05, ess=64.0, prior=q)
    assert type(opt) is vbpc.ContinualIVON and not opt.replay


def test_options_are_validated_once_with_the_name_of_the_option():
    with pytest.raises(ValueError, match="invalid alpha=1.5"):
        vbpc.PoCo(alpha=1.5, anchor_period=2)
    with pytest.raises(ValueError, match="needs anchor_period"):
        vbpc.PoCo(alpha=0.5)
    with pytest.raises(ValueError, match="needs total_steps"):
        vbpc.PoCo(alpha=0.5, anchor_period=2, alpha_schedule="linear")
    with pytest.raises(ValueError, match="anchor_noise"):
        vbpc.PoCo(alpha=0.0, anchor_noise="fresh")
    with pytest.raises(ValueError, match="memory_weight > 0"):
        vbpc.ReplayCorrection(memory_weight=0.0)
    m = _model()
    with pytest.raises(TypeError, match="given twice"):
        vbpc.IVONPoCo(m.parameters(), lr=0.1, ess=10.0, alpha=0.5, correction=vbpc.PoCo(anchor_period=2))
    with pytest.raises(TypeError, match="must be a vbpc.PoCo"):
        vbpc.IVON(m.parameters(), lr=0.1, ess=10.0, correction={"alpha": 0.5})
    with pytest.raises(TypeError, match="needs prior="):
        vbpc.IVON(m.parameters(), lr=0.1, ess=10.0, correction=vbpc.ReplayCorrection(10.0))
    # options a family does not implement are refused, not ignored
    with pytest.raises(ValueError, match="does not implement the correction option proximal=True"):
        vbpc.VSGD(m.parameters(), lr=0.1, sigma=0.0, correction=vbpc.PoCo(anchor_period=2, proximal=True))
    with pytest.raises(ValueError, match="does not implement the correction option alpha_mode='optimal'"):
        vbpc.VONPoCo(nn.Linear(2, 1).parameters(), lr=0.5, ess=10.0, anchor_period=2, alpha_mode="optimal")


def test_von_default_is_proximal_ivon_is_not():
    assert vbpc.VONPoCo(nn.Linear(2, 1).parameters(), lr=0.5, ess=10.0, anchor_period=2).poco.proximal is True
    assert not vbpc.IVONPoCo(nn.Linear(2, 1).parameters(), lr=0.5, ess=10.0, anchor_period=2).poco.proximal


def test_two_pass_replays_the_random_state_and_leaves_it_after_the_current_pass():
    seen = {}

    def current() -> str:
        seen["current"] = torch.rand(3)
        return "loss"

    def anchor() -> None:
        seen["anchor"] = torch.rand(3)

    for anchor_first in (False, True):
        torch.manual_seed(0)
        expected = torch.rand(3)
        after = torch.rand(3)
        torch.manual_seed(0)
        assert Correction.two_pass(current, anchor, anchor_first=anchor_first) == "loss"
        assert torch.equal(seen["current"], expected) and torch.equal(seen["anchor"], expected)
        assert torch.equal(torch.rand(3), after)  # as if only the current pass had run


def test_two_pass_restores_the_random_state_when_the_anchor_pass_raises():
    torch.manual_seed(0)
    torch.rand(3)
    after_one = torch.rand(3)
    torch.manual_seed(0)

    def anchor() -> None:
        torch.rand(3)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        Correction.two_pass(lambda: torch.rand(3), anchor)
    assert torch.equal(torch.rand(3), after_one)


def test_ivon_with_poco_keeps_ivons_defaults_so_it_is_ivon_pocomo():
    """``vbpc.IVON(..., correction=PoCo(...))`` keeps IVON's β1 = 0.9 (IVON-PoCoMo), not IVONPoCo's β1 = 0."""
    opts = dict(alpha=0.5, anchor_period=3)
    opt = vbpc.IVON(_model().parameters(), lr=0.05, ess=64.0, correction=vbpc.PoCo(**opts))
    assert opt.param_groups[0]["beta1"] == 0.9
    assert vbpc.IVONPoCo(_model().parameters(), lr=0.05, ess=64.0, **opts).param_groups[0]["beta1"] == 0.0
    _same(_run(lambda m: vbpc.IVONPoCoMo(m.parameters(), lr=0.05, ess=64.0, **opts)),
          _run(lambda m: vbpc.IVON(m.parameters(), lr=0.05, ess=64.0, correction=vbpc.PoCo(**opts))))
    assert "_beta1_default" not in opt.__dict__ and "_pre_counters" not in opt.__dict__


def test_replay_options_given_both_ways_are_refused():
    base = _model(5)
    q = vbpc.IVON(base.parameters(), lr=0.05, ess=64.0).posterior(base)
    with pytest.raises(TypeError, match="anchor_noise given twice"):
        vbpc.ContinualIVON(_model(5).parameters(), lr=0.05, ess=64.0, prior=q, anchor_noise="independent",
                           correction=vbpc.ReplayCorrection(memory_weight=10.0))


def test_low_precision_groups_added_later_are_refused_too():
    opt = vbpc.VSGD(nn.Linear(2, 1).parameters(), lr=0.1, sigma=0.0)
    with pytest.raises(TypeError, match="bf16/fp16"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]})
    assert len(opt.param_groups) == 1


def test_refresh_runs_on_the_learner_through_a_forwarding_wrapper():
    """Lightning's LightningOptimizer subclasses the learner's class and copies its ``__dict__`` when it is
    built: a refresh through it must see the learner's live state (here: a sample pending since then)."""
    model = _model()
    opt = vbpc.IVONPoCo(model.parameters(), lr=0.05, ess=64.0, anchor_period=2)

    class Wrapper(type(opt)):
        def __init__(self, inner):
            self.__dict__ = dict(inner.__dict__)  # a snapshot, as LightningOptimizer takes

    w = Wrapper(opt)
    with opt.sampled_params(train=True):  # a pending sample the snapshot does not know about
        nn.functional.mse_loss(model(X), Y).backward()
    assert opt._count == 1 and w.__dict__["_count"] == 0
    with pytest.raises(vbpc.SamplingError, match="samples are pending"):
        w.refresh(lambda b: nn.functional.mse_loss(model(b[0]), b[1]), [(X, Y)], progress=False)


def test_named_parameters_build_the_isotropic_and_full_learners():
    """(name, parameter) pairs, as the workflows pass them, go through the same add_param_group checks."""
    model = nn.Linear(2, 1)
    assert vbpc.VSGD(model.named_parameters(), lr=0.1, sigma=0.0).param_groups[0]["params"][0] is model.weight
    assert vbpc.VON(model.named_parameters(), lr=0.5, ess=10.0).d == 3
    half = nn.Linear(2, 1).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bf16/fp16"):
        vbpc.VON(half.named_parameters(), lr=0.5, ess=10.0)
