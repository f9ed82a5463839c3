"""``vbpc.predictive.predict_ensemble``: deep ensembles and MultiIVON as the equal-weight mixture of the
members' predictives, checked against a float64 hand mixture on real Fashion-MNIST networks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.predictive import predict, predict_ensemble


@pytest.fixture(scope="module")
def members():
    x, y = load_fashion_mnist("train").tensors
    x = F.avg_pool2d(x[:1500], 4).flatten(1)
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(49, 32), nn.Tanh(), nn.Linear(32, 10))
        opt = vbpc.IVON(model.parameters(), lr=0.1, ess=1500.0, hess_init=0.3)
        for i in range(0, 1500, 50):
            def closure(i=i):
                opt.zero_grad()
                loss = F.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
                loss.backward()
                return loss
            opt.step(closure)
        out.append((model, opt.posterior(model)))
    loader = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=100)
    return out, loader


def test_deep_ensemble_is_the_mean_of_the_members_probabilities(members):
    pairs, loader = members
    ens = predict_ensemble([(m, None) for m, _ in pairs], loader)
    ref = torch.stack([F.softmax(m(torch.cat([b[0] for b in loader])).double(), 1) for m, _ in pairs]).mean(0)
    torch.testing.assert_close(ens.probs, ref, rtol=0, atol=1e-6)
    assert ens.sample_log_probs.shape == (3, 300, 10)
    assert torch.equal(ens.labels, torch.cat([b[1] for b in loader]))


def test_multi_ivon_mixes_each_members_bma(members):
    pairs, loader = members
    ens = predict_ensemble(pairs, loader, n_samples=4, seed=10)
    each = [predict(m, loader, post, 4, generator=torch.Generator().manual_seed(10 + k)).probs
            for k, (m, post) in enumerate(pairs)]
    torch.testing.assert_close(ens.probs, torch.stack(each).mean(0), rtol=0, atol=1e-6)
    one = predict_ensemble(pairs[:1], loader, n_samples=4, seed=10)
    torch.testing.assert_close(one.probs, each[0], rtol=0, atol=1e-7)  # one member: its own BMA
    assert not torch.allclose(ens.probs, each[0], atol=1e-3)


def test_members_must_see_the_same_data(members):
    pairs, loader = members
    x, y = loader.dataset.tensors
    shuffled = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="different data"):
        predict_ensemble([(m, None) for m, _ in pairs], shuffled)
    with pytest.raises(ValueError, match="no member"):
        predict_ensemble([], loader)
