"""torch.compile: a compiled model trains under vbpc's in-place weight sampling (no ``p.data``
rebinding), with the same iterates as eager mode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import vbpc


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["ivon", "ivon-poco"])
def test_compiled_model_matches_eager(learner):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    results = []
    for m, fwd in ((eager, eager), (model, compiled)):
        if learner == "ivon":
            opt = vbpc.IVON(m.parameters(), lr=0.1, ess=100)
        else:
            opt = vbpc.IVONPoCo(m.parameters(), lr=0.1, ess=100, alpha=0.5, anchor_period=2)
        torch.manual_seed(1)
        outs = []
        for _ in range(4):
            if getattr(opt, "refresh_due", False):
                opt.refresh(lambda b, fwd=fwd: F.cross_entropy(fwd(b[0]), b[1]), [(x, y)], progress=False)

            def closure(opt=opt, fwd=fwd):
                opt.zero_grad()
                out = fwd(x)
                outs.append(out.detach())
                loss = F.cross_entropy(out, y)
                loss.backward()
                return loss
            opt.step(closure)
        results.append((m, opt, outs))
    (m1, o1, outs1), (m2, o2, outs2) = results
    assert len(outs1) == len(outs2) and not torch.equal(outs1[0], outs1[-1])  # fresh samples each step
    for a, b in zip(outs1, outs2):  # the compiled module saw every in-place weight sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o1.state[p]["hess"], o2.state[q]["hess"], rtol=1e-5, atol=1e-6)
