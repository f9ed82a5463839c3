"""BatchNorm under weight noise (docs/algorithms.md §12 pitfall 14, oracle §10.30 second half).

vbpc's policy: with ``model=`` a learner lets the first MC pass of a step update the running
statistics; extra MC passes and every anchor pass (and anchor refreshes) leave them bit for bit
untouched.  ``recalibrate_batchnorm`` re-estimates them at the current (sampled) weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.models import ResNet20
from vbpc.nn import preserved_running_stats, recalibrate_batchnorm, running_stat_buffers


@pytest.fixture(scope="module")
def data():
    ds = load_fashion_mnist("test")
    return ds.tensors[0][:48].clone(), ds.tensors[1][:48].clone()


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResNet20(in_channels=1, norm="bn", width=1, depth=8)


def stats(model):
    return [b.clone() for b in running_stat_buffers(model)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def recording_closure(model, opt, x, y, log):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        log.append(stats(model))
        return loss
    return closure


def make(cls, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls(model.parameters(), model=model, **kw)


@pytest.mark.parametrize("policy", ["first", "all", "none"])
def test_ivon_extra_mc_passes(data, policy):
    x, y = data
    model = bn_net()
    s0 = stats(model)
    opt = make(vbpc.IVON, model, lr=0.1, ess=1000, mc_samples=3, norm_update=policy)
    log = []
    opt.step(recording_closure(model, opt, x[:16], y[:16], log))
    assert len(log) == 3 and not same(log[0], s0)
    final = stats(model)
    if policy == "first":
        assert same(final, log[0])  # only the first pass counted
    elif policy == "all":
        assert same(final, log[2]) and not same(final, log[0])
    else:
        assert same(final, s0)


def test_first_pass_equals_single_sample_step(data):
    """mc_samples=3 with the default policy leaves the statistics of an mc_samples=1 step, bitwise."""
    x, y = data
    finals = []
    for mc in (1, 3):
        model = bn_net()
        opt = make(vbpc.IVON, model, lr=0.1, ess=1000, mc_samples=mc)
        torch.manual_seed(5)
        opt.step(recording_closure(model, opt, x[:16], y[:16], []))
        finals.append(stats(model))
    assert same(*finals)


@pytest.mark.parametrize("learner", ["ivon_poco", "vsgd_poco"])
def test_anchor_pass_and_refresh_leave_stats(data, learner):
    x, y = data
    model = bn_net()
    if learner == "ivon_poco":
        opt = make(vbpc.IVONPoCo, model, lr=0.1, ess=1000, anchor_period=100)
    else:
        opt = make(vbpc.VSGDPoCo, model, lr=0.1, sigma=0.01, anchor_period=100)
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    s0 = stats(model)
    opt.refresh(loss_fn, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)], progress=False)  # model= from ctor
    assert same(stats(model), s0)
    log = []
    opt.step(recording_closure(model, opt, x[:16], y[:16], log))
    assert len(log) == 2  # current pass + anchor pass (IVON-PoCo runs the anchor pass first)
    anchor, current = (log[0], log[1]) if learner == "ivon_poco" else (log[1], log[0])
    assert not same(anchor, s0)  # the anchor pass did run in train mode...
    assert same(stats(model), current) and not same(current, s0)  # ...and its update was undone


def test_without_model_the_anchor_pass_leaks(data):
    """Why model= matters: without it the learner cannot see the statistics."""
    x, y = data
    model = bn_net()
    opt = vbpc.IVONPoCo(model.parameters(), lr=0.1, ess=1000, anchor_period=100)
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    opt.refresh(loss_fn, [(x[:16], y[:16])], progress=False)
    log = []
    opt.step(recording_closure(model, opt, x[:16], y[:16], log))
    assert same(stats(model), log[1]) and not same(log[1], log[0])


def test_warning_and_bad_policy():
    model = bn_net()
    with pytest.warns(UserWarning, match="BatchNorm"):
        vbpc.IVON(model.parameters(), lr=0.1, ess=10, model=model)
    with pytest.raises(ValueError, match="norm_update"):
        vbpc.IVON(model.parameters(), lr=0.1, ess=10, model=model, norm_update="sometimes")
    with pytest.raises(TypeError, match="nn.Module"):
        vbpc.IVON(model.parameters(), lr=0.1, ess=10, model="resnet")
    frn = ResNet20(in_channels=1, depth=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vbpc.IVON(frn.parameters(), lr=0.1, ess=10, model=frn)  # FRN: nothing to warn about


def test_preserved_running_stats_on_exception(data):
    x, _ = data
    model = bn_net().train()
    s0 = stats(model)
    with pytest.raises(RuntimeError):
        with preserved_running_stats(model):
            model(x[:8])
            raise RuntimeError("boom")
    assert same(stats(model), s0)


def test_recalibrate_batchnorm_is_exact_average(data):
    """momentum=None: running mean = mean of batch means, running var = mean of unbiased batch vars,
    computed at the weights in force (here a posterior sample)."""
    x, _ = data
    model = bn_net().eval()
    bn = model.stem[1][0]
    inputs = []
    handle = bn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    post = vbpc.DiagonalGaussian.from_module(model, precision=50.0)
    batches = [(x[i:i + 12], None) for i in range(0, 48, 12)]
    with post.sampled(model, generator=torch.Generator().manual_seed(0)):
        n = recalibrate_batchnorm(model, batches, num_batches=3)
        sampled_var = bn.running_var.clone()
    handle.remove()
    assert n == 3 and len(inputs) == 3
    means = torch.stack([a.mean(dim=(0, 2, 3)) for a in inputs])
    vars_ = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in inputs])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sampled_var, vars_.mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not bn.training and int(bn.num_batches_tracked) == 3
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(ResNet20(in_channels=1, depth=8), batches)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, [])
