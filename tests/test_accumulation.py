"""Gradient accumulation semantics: micro-batches as MC samples or as one sample of the whole
batch, and the same inside an ``accelerate`` loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_one_sample_over_the_whole_batch_equals_the_concatenated_batch():
    model, x, y = _setup()
    ref = copy.deepcopy(model)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=16)
    ropt = vbpc.IVON(ref.parameters(), lr=0.1, ess=16)
    for t in range(3):
        torch.manual_seed(t)
        with opt.sampled_params(train=True):  # one weight sample, two micro-batches of 8
            opt.zero_grad()
            for i in (0, 8):
                (F.cross_entropy(model(x[i:i + 8]), y[i:i + 8]) / 2).backward()
        opt.step()
        torch.manual_seed(t)
        with ropt.sampled_params(train=True):
            ropt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
        ropt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _accelerate_reference(model, x, y):
    ref = copy.deepcopy(model)
    ropt = vbpc.IVON(ref.parameters(), lr=0.1, ess=16)
    torch.manual_seed(5)
    for t in range(2):  # 2 steps, each 2 micro-batches = 2 MC samples
        for i in (0, 4):
            with ropt.sampled_params(train=True):
                ropt.zero_grad()
                j = 8 * t + i
                F.cross_entropy(ref(x[j:j + 4]), y[j:j + 4]).backward()
        ropt.step()
    return ref


def _accelerated(accelerate, model):
    """An Accelerator with 2 accumulation steps, an IVON, and accelerate's wrappers of both."""
    acc = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=16)
    return (acc, opt, *acc.prepare(model, opt))


def test_micro_batches_as_samples_in_an_accelerate_loop():
    accelerate = pytest.importorskip("accelerate")
    model, x, y = _setup()
    ref = _accelerate_reference(model, x, y)
    acc, opt, m, o = _accelerated(accelerate, model)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    torch.manual_seed(5)
    for xb, yb in batches:
        with acc.accumulate(m):
            with opt.sampled_params(train=True, zero_grad=True):  # accelerate skips zero_grad mid-accumulation
                # accelerate divides the loss by the accumulation count; a sample's loss is undivided
                acc.backward(F.cross_entropy(m(xb), yb) * acc.gradient_accumulation_steps)
            o.step()  # a no-op until the accumulation boundary
            o.zero_grad()
    assert opt.current_step == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_accelerates_documented_loop_is_refused():
    """accelerate's own loop skips zero_grad mid-accumulation: the second sample would carry the first
    micro-batch's gradient.  The foreign-gradient check refuses it, naming accelerate."""
    accelerate = pytest.importorskip("accelerate")
    model, x, y = _setup()
    acc, opt, m, o = _accelerated(accelerate, model)
    with pytest.raises(vbpc.SamplingError, match="accelerate"):
        for i in range(0, 16, 4):
            with acc.accumulate(m):
                with opt.sampled_params(train=True):
                    acc.backward(F.cross_entropy(m(x[i:i + 4]), y[i:i + 4]))
                o.step()
                o.zero_grad()
    assert opt.current_step == 0


def test_the_accelerate_helper_equals_the_plain_loop_bitwise():
    accelerate = pytest.importorskip("accelerate")
    from vbpc.integrations.accelerate import sample

    model, x, y = _setup()
    ref = _accelerate_reference(model, x, y)
    acc, opt, m, o = _accelerated(accelerate, model)
    torch.manual_seed(5)
    for i in range(0, 16, 4):
        with sample(acc, m, o) as backward:
            backward(F.cross_entropy(m(x[i:i + 4]), y[i:i + 4]))
        o.step()
        o.zero_grad()
    assert opt.current_step == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="vbpc learner"):
        with sample(acc, m, torch.optim.SGD(model.parameters(), lr=0.1)):
            pass
