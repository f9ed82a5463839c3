"""``vbpc.evaluation.shift`` on a network trained on real Fashion-MNIST: the clean point equals the
metrics computed directly, corruption degrades accuracy, every method sees the same corrupted images,
and the figure is written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vbpc.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from vbpc.evaluation.shift import METRICS, evaluate_shift, mean_over_shift, plot_shift
from vbpc.metrics import accuracy, ece, nll


def _normalize(x):
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


@pytest.fixture(scope="module")
def trained():
    x, y = load_fashion_mnist("train", normalize=False).tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(0, 6000, 100):
        opt.zero_grad()
        F.cross_entropy(model(_normalize(x[i:i + 100])), y[i:i + 100]).backward()
        opt.step()
    xt, yt = load_fashion_mnist("test", normalize=False).tensors
    return model, xt[:800], yt[:800]


def test_curves_start_clean_and_degrade(trained):
    model, x, y = trained
    predict = lambda v: F.softmax(model(v), 1)  # noqa: E731
    curves = evaluate_shift(predict, x, y, transform=_normalize, batch_size=300)
    assert set(curves) == {"rotation", "gaussian_noise", "contrast", "blur"}
    p = predict(_normalize(x)).detach().double()
    for c in curves.values():
        assert c["accuracy"][0] == accuracy(p, y) and c["nll"][0] == pytest.approx(nll(p, y), rel=1e-12)
        assert c["ece"][0] == pytest.approx(ece(p, y), rel=1e-12)
        assert set(c) == {"level", *METRICS} and len(c["level"]) == len(c["accuracy"])
    assert curves["rotation"]["accuracy"][4] < curves["rotation"]["accuracy"][0] - 0.3  # 90 degrees
    assert curves["gaussian_noise"]["nll"][-1] > curves["gaussian_noise"]["nll"][0]
    assert curves["contrast"]["level"][0] == 1.0 and curves["contrast"]["level"][-1] == 0.05
    m = mean_over_shift(curves)
    assert 0.0 < m < 1.0 and m != curves["rotation"]["ece"][0]


def test_the_same_corrupted_images_for_every_method(trained):
    model, x, y = trained
    seen = []

    def predict(v):
        seen.append(v.clone())
        return F.softmax(model(v), 1)
    evaluate_shift(predict, x[:50], y[:50], families=["gaussian_noise"], seed=3)
    first = seen[:]
    seen.clear()
    evaluate_shift(predict, x[:50], y[:50], families=["gaussian_noise"], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, seen))


def test_plot_writes_a_png(trained, tmp_path):
    model, x, y = trained
    predict = lambda v: F.softmax(model(_normalize(v)), 1)  # noqa: E731
    runs = [evaluate_shift(predict, x[:100], y[:100], families=["rotation", "blur"], seed=s) for s in (0, 1)]
    plot_shift({"adamw": runs}, "ece", tmp_path / "shift_ece.png", title="ECE under shift")
    assert (tmp_path / "shift_ece.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown metric"):
        plot_shift({"adamw": runs}, "brier")
