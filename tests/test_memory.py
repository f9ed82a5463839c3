"""State bytes per parameter (docs/algorithms.md §6.4), exact for fp32 parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc
from vbpc.memory import state_bytes


def _run(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    opt = make(model)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    for _ in range(2):
        if getattr(opt, "refresh_due", False):
            opt.refresh(lambda b: F.cross_entropy(model(b[0]), b[1]), [(x, y)], progress=False)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return state_bytes(opt)


@pytest.mark.parametrize("name,make,per_param", [
    ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), 8.0),  # exp_avg, exp_avg_sq
    ("ivon", lambda m: vbpc.IVON(m.parameters(), lr=0.1, ess=8), 8.0),  # g, h (m is the parameter)
    # + m_out, ḡ_out, h̄_out, h_out, (h_out+δ)^{-1/2}: 5 fp32 buffers
    ("ivon-poco", lambda m: vbpc.IVONPoCo(m.parameters(), lr=0.1, ess=8, anchor_period=5), 28.0),
])
def test_state_bytes_per_parameter(name, make, per_param):
    r = _run(make)
    assert r["params"] == 10 * 20 + 20 + 20 * 3 + 3
    assert r["bytes_per_param"] == per_param, (name, r)


def test_bf16_parameters_add_fp32_masters():
    torch.manual_seed(0)
    model = nn.Linear(10, 3).to(torch.bfloat16)
    opt = vbpc.IVON(model.parameters(), lr=0.1, ess=8)
    x, y = torch.randn(4, 10, dtype=torch.bfloat16), torch.randint(0, 3, (4,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert state_bytes(opt)["bytes_per_param"] == 12.0  # fp32 g, h and master weights
