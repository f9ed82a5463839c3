"""vbpc.metrics bad input: every case is a ValueError naming the problem (docs/algorithms.md §9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vbpc.metrics as M

F64 = torch.float64
P = torch.tensor([[.95, .05], [.35, .65]], dtype=F64)
Y = torch.tensor([0, 1])

BAD_CLASSIFICATION = [
    ("rows do not sum to 1", dict(pred=torch.tensor([[.9, .05], [.35, .65]]))),
    ("rows do not sum to 1", dict(pred=torch.tensor([[2.0, 1.0], [0.5, 3.0]]))),  # logits passed as probs
    ("negative probabilities", dict(pred=torch.tensor([[1.1, -0.1], [.35, .65]], dtype=F64))),
    ("contains NaN", dict(pred=torch.tensor([[math.nan, 1.0], [.35, .65]]))),
    ("contains Inf", dict(pred=torch.tensor([[math.inf, 0.0], [.35, .65]]))),
    ("must have shape \\(N, C\\)", dict(pred=torch.tensor([.5, .5]))),
    ("is empty", dict(pred=torch.zeros(0, 2), labels=torch.zeros(0, dtype=torch.long))),
    ("out of range: found 2", dict(labels=torch.tensor([0, 2]))),
    ("out of range: found -1", dict(labels=torch.tensor([-1, 0]))),
    ("must be integer class indices", dict(labels=torch.tensor([0.0, 1.0]))),
    ("must be integer class indices", dict(labels=torch.tensor([True, False]))),
    ("labels has shape \\(3,\\)", dict(labels=torch.tensor([0, 1, 1]))),
    ("not normalised log-probabilities", dict(pred=torch.tensor([[0.0, 0.0], [-1.0, -1.0]]), inputs="log_probs")),
    ("positive log-probabilities", dict(pred=torch.tensor([[0.5, -1.0], [-1.0, -1.0]]), inputs="log_probs")),
    ("invalid inputs", dict(inputs="softmax")),
]


@pytest.mark.parametrize("fn", [M.accuracy, M.nll, M.brier, M.ece, M.adaptive_ece, M.aurc,
                                M.misclassification_auroc, M.classification_metrics, M.bootstrap_classification])
@pytest.mark.parametrize("match,kw", BAD_CLASSIFICATION)
def test_bad_classification_input(fn, match, kw):
    kw = dict(kw)
    pred, labels = kw.pop("pred", P), kw.pop("labels", Y)
    with pytest.raises(ValueError, match=match):
        fn(pred, labels, **kw)


def test_tolerances_accept_float32_softmax_and_numpy():
    g = torch.Generator().manual_seed(0)
    probs = (5 * torch.randn(64, 1000, generator=g)).softmax(-1)  # float32, many classes
    y = torch.randint(0, 1000, (64,), generator=g)
    assert 0 <= M.ece(probs, y) <= 1
    assert M.accuracy(probs.numpy(), y.numpy()) == M.accuracy(probs, y)
    assert M.nll(P.tolist(), [0, 1]) == M.nll(P, Y)
    assert M.accuracy(torch.tensor([[1, 0], [0, 1]]), Y) == 1.0  # integer one-hot probabilities
    half = probs.half()
    half = half / half.sum(-1, keepdim=True)
    assert 0 <= M.brier(half, y) <= 2  # 16-bit: tolerance scales with eps * C


def test_bad_n_bins_and_options():
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="n_bins must be an int >= 1"):
            M.ece(P, Y, n_bins=bad)
    with pytest.raises(ValueError, match="n_bins"):
        M.ClassificationMetrics(n_bins=0)
    with pytest.raises(ValueError, match="n_bins"):
        M.TokenMetrics(n_bins=0)
    with pytest.raises(ValueError, match="n_bins"):
        M.reliability_diagram(P, Y, 0)
    with pytest.raises(ValueError, match="invalid norm"):
        M.calibration_error(P, Y, norm="l2")
    with pytest.raises(ValueError, match="invalid binning"):
        M.calibration_error(P, Y, binning="quantile")
    assert M.calibration_error(P, Y, binning="ADAPTIVE") == M.adaptive_ece(P, Y)  # case-insensitive


def test_bad_sample_stacks():
    stack = torch.stack([P, P])
    with pytest.raises(ValueError, match="sample_stack has shape \\(2, 3, 2\\) but the predictive"):
        M.uncertainty_decomposition(torch.full((2, 3, 2), 0.5), P)
    with pytest.raises(ValueError, match="sample-first"):
        M.uncertainty_decomposition(P, P)
    with pytest.raises(ValueError, match="must have shape \\(S, N, C\\)"):
        M.uncertainty_decomposition(P)
    with pytest.raises(ValueError, match="sample_stack rows do not sum to 1"):
        M.uncertainty_decomposition(stack * 2, P)
    with pytest.raises(ValueError, match="sample_stack has shape"):
        M.classification_metrics(P, Y, sample_stack=torch.full((2, 2, 3), 1 / 3))
    with pytest.raises(ValueError, match="sample_stack has shape"):
        M.ClassificationMetrics().update(P, Y, torch.full((2, 1, 2), 0.5))
    with pytest.raises(ValueError, match="sample_stack has shape"):
        M.ood_metrics(P, P, score="mi", sample_stack_in=stack, sample_stack_out=stack[:, :1])


def test_bad_ood_input():
    with pytest.raises(ValueError, match="scores_in is empty"):
        M.ood_metrics_from_scores([], [0.1])
    with pytest.raises(ValueError, match="negative is empty"):
        M.auroc([0.1], np.zeros(0))
    with pytest.raises(ValueError, match="contains NaN"):
        M.auroc([0.1, math.nan], [0.2])
    with pytest.raises(ValueError, match="must be 1-D"):
        M.average_precision([[0.1]], [0.2])
    with pytest.raises(ValueError, match="tpr must be in \\(0, 1\\]"):
        M.fpr_at_tpr([0.1], [0.2], tpr=0.0)
    with pytest.raises(ValueError, match="rows do not sum to 1"):
        M.OODMetrics().update_in(torch.ones(3, 2))


def test_bad_token_input():
    logits = torch.randn(2, 4, 3)
    labels = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="shape \\(B, T, V\\)"):
        M.token_metrics(logits[0], labels)
    with pytest.raises(ValueError, match="labels has shape"):
        M.token_metrics(logits, labels[:, :3])
    with pytest.raises(ValueError, match="integer token ids"):
        M.token_metrics(logits, labels.float())
    with pytest.raises(ValueError, match="out of range: found 3"):
        M.token_metrics(logits, torch.full((2, 4), 3))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        M.token_metrics(logits, labels, torch.ones(2, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.token_metrics(logits, labels, torch.full((2, 4), 2))
    bad = logits.clone()
    bad[0, 1, 0] = math.nan
    with pytest.raises(ValueError, match="contains NaN"):
        M.token_metrics(bad, labels)
    with pytest.raises(ValueError, match="not normalised"):
        M.token_metrics(logits - 10, labels, inputs="log_probs")
    with pytest.raises(ValueError, match="is empty"):
        M.token_metrics(torch.zeros(0, 4, 3), torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no target tokens"):
        M.TokenMetrics().compute()
    # an out-of-range id where the target is ignored or masked is fine
    ok = labels.clone()
    ok[0, 2], ok[1, 3] = -100, 99
    mask = torch.ones(2, 4)
    mask[1, 3] = 0
    assert M.token_metrics(logits, ok, mask)["n_tokens"] == 4
