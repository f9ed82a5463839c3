"""Golden parity with the reference IVON (`ivon-opt` 0.1.3), docs/algorithms.md §2.1 and §10.8.

`vbpc.IVON(parity=True)` must give ``torch.equal`` means, ``h`` and momentum at every step.
Skips cleanly when `ivon-opt` (GPL, an optional test oracle only) is not installed.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import vbpc

ivon = pytest.importorskip("ivon", reason="ivon-opt (optional parity oracle) is not installed")


class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.fc1 = nn.Linear(6, 10, dtype=dtype)
        self.fc2 = nn.Linear(10, 4, dtype=dtype)
        self.temp = nn.Parameter(torch.tensor(0.8, dtype=dtype))  # a 0-d parameter

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.temp


def _groups(net, n_groups):
    if n_groups == 2:
        return [
            {"params": [net.fc1.weight, net.fc1.bias, net.temp], "lr": 0.05, "weight_decay": 1e-3,
             "ess": 200.0, "hess_init": 0.5},
            {"params": list(net.fc2.parameters()), "lr": 0.2, "weight_decay": 1e-2, "ess": 50.0,
             "hess_init": 2.0},
        ]
    return [
        {"params": [net.fc1.weight], "lr": 0.05, "weight_decay": 1e-3, "ess": 200.0, "hess_init": 0.5},
        {"params": [net.fc1.bias, net.temp], "lr": 0.3, "weight_decay": 0.0, "ess": 80.0, "hess_init": 0.1},
        {"params": list(net.fc2.parameters()), "lr": 0.2, "weight_decay": 1e-2, "ess": 50.0, "hess_init": 2.0},
    ]


def _state(opt, net, ref: bool):
    means = torch.cat([p.detach().flatten() for p in net.parameters()])
    if ref:
        h = torch.cat([g["hess"] for g in opt.param_groups])
        mom = torch.cat([g["momentum"] for g in opt.param_groups])
    else:
        ps = [p for g in opt.param_groups for p in g["params"]]
        h = torch.cat([opt.state[p]["hess"].flatten() for p in ps])
        mom = torch.cat([opt.state[p]["momentum"].flatten() for p in ps])
    return means.clone(), h.clone(), mom.clone()


def _run(impl, dtype, n_groups, steps, **kw):
    torch.manual_seed(0)
    net = Net(dtype)
    groups = _groups(net, n_groups)
    opt = ivon.IVON(groups, **kw) if impl == "ref" else vbpc.IVON(groups, parity=True, **kw)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (32,), generator=gen)
    torch.manual_seed(1234)
    out = []
    for t in range(steps):
        xb, yb = x[(t % 4) * 8:(t % 4 + 1) * 8], y[(t % 4) * 8:(t % 4 + 1) * 8]
        for _ in range(kw.get("mc_samples", 1)):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
        out.append(_state(opt, net, impl == "ref"))
    return out


def _assert_equal_trajectories(a, b):
    for t, (sa, sb) in enumerate(zip(a, b)):
        for name, ta, tb in zip(("mean", "h", "momentum"), sa, sb):
            assert torch.equal(ta, tb), f"step {t + 1}: {name} differs (max {float((ta - tb).abs().max())})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hess_approx", ["price", "gradsq"])
def test_acceptance_parity_20_steps(dtype, hess_approx):
    """Issue acceptance: 2 groups (different lr/wd/ess/h0), a 0-d parameter, mc=3, finite ξ."""
    kw = dict(lr=0.1, ess=100.0, mc_samples=3, hess_approx=hess_approx, clip_radius=0.05, beta2=0.999)
    _assert_equal_trajectories(_run("ref", dtype, 2, 20, **kw), _run("vbpc", dtype, 2, 20, **kw))


@pytest.mark.parametrize(
    "dtype,mc,clip,debias,rescale",
    [c for c in itertools.product([torch.float32, torch.float64], [1, 3], [float("inf"), 0.02],
                                  [True, False], [True, False])
     if c[2] == float("inf") or (c[3] and c[4])],
)
def test_o8_golden_parity_grid(dtype, mc, clip, debias, rescale):
    kw = dict(lr=0.1, ess=100.0, mc_samples=mc, clip_radius=clip, debias=debias, rescale_lr=rescale, beta2=0.99)
    _assert_equal_trajectories(_run("ref", dtype, 3, 8, **kw), _run("vbpc", dtype, 3, 8, **kw))


def test_reference_style_closure_runs_unchanged():
    """A reference script whose closure opens sampled_params itself runs with vbpc.IVON."""
    results = []
    for impl in ("ref", "vbpc"):
        torch.manual_seed(0)
        net = Net(torch.float64)
        opt = (ivon.IVON(net.parameters(), lr=0.1, ess=100.0) if impl == "ref"
               else vbpc.IVON(net.parameters(), lr=0.1, ess=100.0, parity=True))
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
        torch.manual_seed(3)
        for _ in range(5):
            if impl == "ref":
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            else:
                def closure():  # reference-style: the closure opens the context itself
                    with opt.sampled_params(train=True):
                        opt.zero_grad()
                        loss = nn.functional.cross_entropy(net(x), y)
                        loss.backward()
                    return loss
                opt.step(closure)
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
