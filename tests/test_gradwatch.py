"""The foreign-gradient safety net (``vbpc/inference/gradwatch.py``) in both directions: every way a gradient
computed outside a weight sample can reach its statistics is refused (state untouched), and the
documented protocols, ivon-opt's included, raise nothing and give the plain loop's numbers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc
from vbpc.errors import SamplingError


def _setup(cls=vbpc.IVON, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    opt = cls(model.parameters(), lr=0.1, ess=12.0, **kw)
    return model, opt, x, y


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _same(model, opt, snap):
    params, sd = snap
    now = opt.state_dict()
    return (all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
            and all(torch.equal(a["hess"], b["hess"]) and torch.equal(a["momentum"], b["momentum"])
                    for a, b in zip(now["state"].values(), sd["state"].values())))


def _one_sample(model, opt, x, y) -> None:
    with opt.sampled_params(train=True):
        opt.zero_grad()
        _loss(model, x, y).backward()


def _plain(steps: int = 3, mc: int = 1):
    model, opt, x, y = _setup()
    torch.manual_seed(7)
    for _ in range(steps):
        for _ in range(mc):
            _one_sample(model, opt, x, y)
        opt.step()
    return model


# ----------------------------------------------------------------------------- no false alarm
def test_ivon_opt_protocol_leftover_gradients_at_entry_cleared_inside():
    """ivon-opt's README loop: zero_grad() inside sampled_params, the previous step's gradients present at entry."""
    model, opt, x, y = _setup()
    torch.manual_seed(7)
    for _ in range(3):
        for _ in range(2):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                _loss(model, x, y).backward()
        opt.step()
    ref = _plain(mc=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_cleared_before_the_sample_either_way(set_to_none):
    model, opt, x, y = _setup()
    torch.manual_seed(7)
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)  # zeros at entry are no foreign gradient
        with opt.sampled_params(train=True):
            _loss(model, x, y).backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _plain().parameters()))


def test_several_backward_passes_inside_one_sample():
    """One sample of the whole batch over two micro-batches (losses / 2): both backward passes are the sample's."""
    model, opt, x, y = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.sampled_params(train=True):
            opt.zero_grad()
            for i in (0, 6):
                (_loss(model, x[i:i + 6], y[i:i + 6]) / 2).backward()
        opt.step()


def test_closures_that_clear_raise_nothing_with_mc_samples():
    model, opt, x, y = _setup(mc_samples=3)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss
    _loss(model, x, y).backward()  # a gradient at the mean before the step: the closure clears it
    for _ in range(2):
        opt.step(closure)


# ----------------------------------------------------------------------------- refused
def test_carried_gradient_from_the_previous_micro_batch_is_refused():
    model, opt, x, y = _setup()
    snap = _state(model, opt)
    with opt.sampled_params(train=True):
        opt.zero_grad()
        _loss(model, x[:6], y[:6]).backward()
    with pytest.raises(SamplingError, match="added its gradient to a gradient computed outside"):
        with opt.sampled_params(train=True):  # no zero_grad: micro-batch 1's gradient is still there
            _loss(model, x[6:], y[6:]).backward()
    assert opt._count == 0  # the step's samples were dropped
    opt.zero_grad()
    with pytest.raises(SamplingError, match="no collected sample"):
        opt.step()
    assert _same(model, opt, snap)


def test_gradients_at_the_mean_before_a_closure_step_are_refused():
    """Lightning's accumulation without VBCallback: a micro-batch's backward at the mean weights, then
    step(closure) whose closure does not clear."""
    model, opt, x, y = _setup()
    snap = _state(model, opt)
    _loss(model, x[:6], y[:6]).backward()

    def closure():
        loss = _loss(model, x[6:], y[6:])
        loss.backward()
        return loss
    with pytest.raises(SamplingError, match="VBCallback"):
        opt.step(closure)
    assert _same(model, opt, snap) and opt._count == 0


def test_stale_gradient_without_backward_inside_the_sample_is_refused():
    model, opt, x, y = _setup()
    _loss(model, x, y).backward()
    with pytest.raises(SamplingError, match="no backward pass inside the sample reached it"):
        with opt.sampled_params(train=True):
            pass


def test_anchor_pass_of_ivon_poco_is_watched():
    model, opt, x, y = _setup(vbpc.IVONPoCo, alpha=0.5, anchor_period=100)
    opt.refresh(lambda b: _loss(model, *b), [(x, y)], progress=False)
    snap = _state(model, opt)
    _loss(model, x, y).backward()

    def closure():  # never clears: the anchor pass adds to the gradient at the mean
        loss = _loss(model, x, y)
        loss.backward()
        return loss
    with pytest.raises(SamplingError, match="computed outside"):
        opt.step(closure)
    assert _same(model, opt, snap)


def test_warn_mode_reports_and_keeps_going():
    model, opt, x, y = _setup(foreign_grads="warn")
    _loss(model, x, y).backward()
    with pytest.warns(RuntimeWarning, match="computed outside"):
        with opt.sampled_params(train=True):
            _loss(model, x, y).backward()
    opt.step()
    with pytest.raises(ValueError, match="foreign_grads"):
        vbpc.IVON(model.parameters(), lr=0.1, ess=1.0, foreign_grads="ignore")


# ----------------------------------------------------------------------------- placeholders and wrappers
def test_a_placeholder_closure_with_collected_samples_uses_them():
    """Lightning's LightningOptimizer.step() under manual optimization passes a closure returning None."""
    model, opt, x, y = _setup()
    torch.manual_seed(7)
    for _ in range(3):
        _one_sample(model, opt, x, y)
        assert opt.step(lambda: None) is None
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _plain().parameters()))


def test_a_real_closure_with_collected_samples_adds_one():
    """Lightning's final micro-batch (VBCallback): the closure is one more sample next to the collected one."""
    model, opt, x, y = _setup()
    torch.manual_seed(7)
    for _ in range(3):
        _one_sample(model, opt, x, y)

        def closure():
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _plain(mc=2).parameters()))


class ForwardingWrapper:
    """What Lightning's LightningOptimizer does: a subclass of the learner's class whose instance forwards
    attribute reads to the learner (writes would land on the wrapper)."""

    def __init__(self, optimizer):
        self._optimizer = optimizer
        self.__class__ = type("Wrapped" + type(optimizer).__name__, (ForwardingWrapper, type(optimizer)), {})

    def __getattr__(self, item):
        return getattr(self._optimizer, item)

    def step(self, closure=None):
        return self._optimizer.step(closure if closure is not None else (lambda: None))


def test_methods_called_on_a_forwarding_wrapper_run_on_the_learner():
    model, opt, x, y = _setup()
    wrapped = ForwardingWrapper(opt)
    assert isinstance(wrapped, vbpc.IVON)
    torch.manual_seed(7)
    for _ in range(3):
        with wrapped.sampled_params(train=True):
            wrapped.zero_grad()
            _loss(model, x, y).backward()
        assert opt._count == 1 and "_count" not in wrapped.__dict__
        wrapped.step()
    assert opt.current_step == 3 == wrapped.current_step
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _plain().parameters()))
    assert wrapped.state_dict()["vbpc"] == opt.state_dict()["vbpc"]


def test_ivon_poco_placeholder_after_sample_equals_step_without_closure():
    """IVON-PoCo under Lightning's manual optimization: sample(closure) per micro-batch, then the wrapper's
    step() passes a placeholder; a real closure with pairs pending is refused."""
    finals = []
    for placeholder in (False, True):
        model, opt, x, y = _setup(vbpc.IVONPoCo, alpha=0.5, anchor_period=100)
        opt.refresh(lambda b: _loss(model, *b), [(x, y)], progress=False)
        torch.manual_seed(7)
        for _ in range(3):
            for i in (0, 6):
                def closure(i=i):
                    opt.zero_grad()
                    loss = _loss(model, x[i:i + 6], y[i:i + 6])
                    loss.backward()
                    return loss
                opt.sample(closure)
            opt.step(lambda: None) if placeholder else opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
    opt.sample(closure)
    with pytest.raises(SamplingError, match="samples pending from sample"):
        opt.step(closure)
