"""Mixed precision: fp32 optimizer state under bf16 (autocast and bf16 weights), and the fp16
``torch.amp.GradScaler`` recipe where an overflowing step leaves the posterior bitwise unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _xy(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)


def test_bf16_weights_keep_fp32_state_and_h_moves_with_beta2_near_one():
    model = _model(torch.bfloat16)
    x, y = _xy(torch.bfloat16)
    h0 = 0.5
    opt = vbpc.IVON(model.parameters(), lr=0.05, ess=32, hess_init=h0, beta2=0.99999)
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            return loss
        opt.step(closure)
    for p in model.parameters():
        st = opt.state[p]
        assert p.dtype == torch.bfloat16
        assert st["hess"].dtype == st["momentum"].dtype == st["mean"].dtype == torch.float32
        moved = st["hess"] != h0
        assert bool(moved.any())  # (1-β2)ĥ = 1e-5·ĥ survives in fp32 ...
        assert bool((st["hess"].to(torch.bfloat16).float() == h0).all())  # ... and would vanish in bf16
        assert torch.equal(p, st["mean"].to(torch.bfloat16))  # the bf16 weights are the rounded fp32 masters


def test_bf16_autocast_trains_with_fp32_state():
    model = _model()
    x, y = _xy()
    opt = vbpc.IVON(model.parameters(), lr=0.05, ess=32, hess_init=0.5)
    for _ in range(3):
        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert all(opt.state[p]["hess"].dtype == torch.float32 and p.dtype == torch.float32 for p in model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _scaled_step(model, opt, scaler, x, y, boost=1.0):
    with opt.sampled_params(train=True, skip_nonfinite=True):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * boost
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_overflow_leaves_the_posterior_bitwise_unchanged():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    x, y = _xy()
    model = _model()
    opt = vbpc.IVON(model.parameters(), lr=0.05, ess=32, hess_init=0.5)
    ref_model = copy.deepcopy(model)
    ref = vbpc.IVON(ref_model.parameters(), lr=0.05, ess=32, hess_init=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    _scaled_step(model, opt, scaler, x, y, boost=1e36)  # a loss spike: the scaled gradients overflow
    assert opt.skipped_samples == 1 and opt.current_step == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
    assert not opt.state or all(torch.equal(a, b) for a, b in zip(
        [s["hess"] for s in opt.state_dict()["state"].values()], [s["hess"] for s in before[0]["state"].values()]))
    assert scaler.get_scale() == 2.0 ** 15  # the scaler backed off
    # the following steps equal IVON without a scaler bit for bit (power-of-two scales unscale exactly)
    for t in range(3):
        torch.manual_seed(10 + t)
        _scaled_step(model, opt, scaler, x, y)
        torch.manual_seed(10 + t)
        with ref.sampled_params(train=True):
            ref.zero_grad()
            F.cross_entropy(ref_model(x), y).backward()
        ref.step()
    assert opt.current_step == 3
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["hess"], ref.state[q]["hess"])
