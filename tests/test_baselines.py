"""The uncertainty study's baselines (``benchmarks/baselines.py``): temperature scaling against a known
temperature, vbpc's ECE against torchmetrics, and laplace-torch's last-layer Laplace on real Fashion-MNIST."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines  # noqa: E402

from vbpc.data import load_fashion_mnist  # noqa: E402
from vbpc.metrics import ece  # noqa: E402


@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_temperature_scaling_recovers_a_known_temperature(t0):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20000, 10, generator=g, dtype=torch.float64)
    y = torch.multinomial(F.softmax(z / t0, 1), 1, generator=g).squeeze(1)  # labels from softmax(z / t0)
    t = baselines.fit_temperature(z, y)
    assert abs(t - t0) < 0.05 * t0  # 20,000 examples
    with pytest.raises(ValueError, match="NaN"):
        baselines.fit_temperature(z.clone().fill_(float("nan")), y)


def test_ece_cross_check_agrees_with_torchmetrics_and_fails_on_disagreement():
    g = torch.Generator().manual_seed(1)
    p = F.softmax(2 * torch.randn(5000, 10, generator=g), 1)
    y = torch.randint(0, 10, (5000,), generator=g)
    assert baselines.ece_cross_check(p, y) == pytest.approx(ece(p, y), abs=0)
    with pytest.raises(RuntimeError, match="ECE disagreement"):
        baselines.ece_cross_check(p, y, ece_fn=lambda a, b: ece(a, b) + 1e-4)


@pytest.mark.slow
def test_last_layer_laplace_on_a_trained_network():
    pytest.importorskip("laplace")
    x, y = load_fashion_mnist("train").tensors
    x = F.avg_pool2d(x[:2000], 2).flatten(1)
    y = y[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(196, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    predict, prior = baselines.laplace_last_layer(model, DataLoader(TensorDataset(x, y), batch_size=200))
    xt, yt = x[:500], y[:500]
    p = predict(xt)
    p_map = F.softmax(model(xt), 1).detach()
    assert torch.allclose(p.sum(1), torch.ones(500, dtype=p.dtype), atol=1e-5)
    assert prior > 0 and torch.isfinite(torch.tensor(prior))
    ent = lambda q: -(q * q.clamp_min(1e-12).log()).sum(1).mean()  # noqa: E731
    assert ent(p) > ent(p_map)  # the probit predictive is less confident than the MAP network
    assert (p.argmax(1) == yt).float().mean() > 0.7
