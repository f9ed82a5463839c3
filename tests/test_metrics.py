"""vbpc.metrics oracles (docs/algorithms.md §9 and §10 oracles 24–27): hand values, closed forms,
scikit-learn and torchmetrics agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vbpc.metrics as M

F64 = torch.float64

# §10.24
P24 = torch.tensor([[.95, .05], [.95, .05], [.35, .65], [.35, .65]], dtype=F64)
Y24 = torch.tensor([0, 1, 1, 1])
# §9 corner case: a saturated confidence of exactly 1.0
P_CORNER = torch.tensor([[1.0, 0.0], [.95, .05]], dtype=F64)
Y_CORNER = torch.tensor([1, 0])
# §10.26, written as decimal literals so that 0.30 and 0.60 tie exactly between the sets
S_IN = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50,
        0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.00]
S_OUT = [0.01, 0.02, 0.03, 0.04, 0.06, 0.07, 0.11, 0.30, 0.60, 0.97]


# ----------------------------------------------------------------------------- §10.24 hand values
def test_o24_hand_values():
    assert M.accuracy(P24, Y24) == 0.75
    assert M.nll(P24, Y24) == pytest.approx(0.9771478500316124, abs=1e-15)
    assert M.brier(P24, Y24) == pytest.approx(0.575, abs=1e-15)
    assert M.ece(P24, Y24) == pytest.approx(0.4, abs=1e-15)
    assert M.mce(P24, Y24) == pytest.approx(0.45, abs=1e-15)
    assert float(M.entropy(P24).mean()) == pytest.approx(0.42298094119025254, abs=1e-15)
    suite = M.classification_metrics(P24, Y24)
    for k, v in {"accuracy": 0.75, "nll": 0.9771478500316124, "brier": 0.575, "ece": 0.4, "mce": 0.45,
                 "entropy": 0.42298094119025254}.items():
        assert suite[k] == pytest.approx(v, abs=1e-15), k


def test_o24_log_probs_and_logits_inputs_agree():
    logp = P24.log()
    assert M.nll(logp, Y24, inputs="log_probs") == pytest.approx(0.9771478500316124, abs=1e-15)
    assert M.nll_from_log_probs(logp, Y24) == pytest.approx(0.9771478500316124, abs=1e-15)
    # logits = log p + an arbitrary per-row constant
    logits = logp + torch.tensor([[3.0], [-1.0], [0.5], [10.0]], dtype=F64)
    for fn, want in [(M.accuracy, 0.75), (M.brier, 0.575), (M.ece, 0.4), (M.mce, 0.45)]:
        assert fn(logits, Y24, inputs="logits") == pytest.approx(want, abs=1e-14)
        assert fn(logp, Y24, inputs="log_probs") == pytest.approx(want, abs=1e-14)


def test_corner_case_confidence_one_vs_torchmetrics():
    """§9: c = 1.0 goes to bin M-1 (0.475/0.475); torchmetrics' bucketize(right=True)-1 puts it in a
    hidden bin M and reports 0.525/1.0.  The two agree elsewhere (oracle 27)."""
    assert M.ece(P_CORNER, Y_CORNER) == pytest.approx(0.475, abs=1e-15)
    assert M.mce(P_CORNER, Y_CORNER) == pytest.approx(0.475, abs=1e-15)
    diagram = M.reliability_diagram(P_CORNER, Y_CORNER)
    assert diagram.count.tolist() == [0] * 14 + [2]
    tm = pytest.importorskip("torchmetrics.functional.classification")
    p32 = P_CORNER.float()
    assert float(tm.multiclass_calibration_error(p32, Y_CORNER, 2, n_bins=15, norm="l1")) == pytest.approx(0.525)
    assert float(tm.multiclass_calibration_error(p32, Y_CORNER, 2, n_bins=15, norm="max")) == pytest.approx(1.0)


def test_bins_follow_eq34_edges():
    """b(c) = min(M-1, floor(cM)): left-closed bins, last one closed."""
    conf = torch.tensor([0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0], dtype=F64)
    assert M.classification.bin_index(conf, 10).tolist() == [0, 1, 3, 5, 9, 9]
    assert M.classification.bin_index(conf, 1).tolist() == [0] * 6


def test_reliability_diagram_data():
    d = M.reliability_diagram(P24, Y24, n_bins=15)
    assert d.edges.shape == (16,) and d.edges[0] == 0 and d.edges[-1] == 1
    assert d.count.tolist() == [0] * 9 + [2, 0, 0, 0, 0, 2]
    assert d.accuracy[9] == 1.0 and d.accuracy[14] == 0.5
    assert d.confidence[9] == pytest.approx(0.65, abs=1e-15) and d.confidence[14] == pytest.approx(0.95, abs=1e-15)
    assert torch.isnan(d.accuracy[0]) and torch.isnan(d.confidence[0])
    assert d.ece == pytest.approx(0.4, abs=1e-15) and d.mce == pytest.approx(0.45, abs=1e-15)


def test_adaptive_ece_hand_cases():
    # conf (= p0, all > .5) and correctness: sorted 0.55 w, 0.6 w, 0.7 c | 0.8 c, 0.9 c (sizes 3, 2)
    p0 = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.55], dtype=F64)
    probs = torch.stack([p0, 1 - p0], 1)
    y = torch.tensor([0, 1, 0, 0, 1])
    assert M.adaptive_ece(probs, y, n_bins=2) == pytest.approx((0.85 + 0.3) / 5, abs=1e-15)
    assert M.calibration_error(probs, y, 2, norm="max", binning="adaptive") == pytest.approx(0.85 / 3, abs=1e-15)
    # stable sort: equal confidences keep input order -> groups {c, w}, {w, c}
    probs = torch.tensor([[.7, .3]] * 4, dtype=F64)
    assert M.adaptive_ece(probs, torch.tensor([0, 1, 1, 0]), n_bins=2) == pytest.approx(0.2, abs=1e-15)
    assert M.adaptive_ece(probs, torch.tensor([0, 0, 1, 1]), n_bins=2) == pytest.approx(0.5, abs=1e-15)
    # fewer examples than groups: one example per group, ECE = mean |corr - c|
    assert M.adaptive_ece(P24[:3], Y24[:3], n_bins=15) == pytest.approx((0.05 + 0.95 + 0.35) / 3, abs=1e-15)
    # group sizes 3,3,2,2 for n=10, M=4
    assert M.classification.adaptive_groups(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_accuracy_ties_go_to_lowest_index():
    probs = torch.tensor([[0.4, 0.4, 0.2], [0.25, 0.375, 0.375], [1 / 3, 1 / 3, 1 / 3]], dtype=F64)
    assert M.accuracy(probs, torch.tensor([0, 1, 0])) == 1.0
    assert M.accuracy(probs, torch.tensor([1, 2, 2])) == 0.0


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("c", [2, 3, 10, 1000])
def test_uniform_and_one_hot_closed_forms(c):
    uniform = torch.full((5, c), 1.0 / c, dtype=F64)
    y = torch.arange(5) % c
    assert M.nll(uniform, y) == pytest.approx(math.log(c), abs=1e-13)
    assert M.brier(uniform, y) == pytest.approx(1 - 1 / c, abs=1e-13)
    assert float(M.entropy(uniform).mean()) == pytest.approx(math.log(c), abs=1e-13)
    one_hot = torch.nn.functional.one_hot(y, c).to(F64)
    assert M.nll(one_hot, y) == 0.0 and M.brier(one_hot, y) == 0.0 and M.ece(one_hot, y) == 0.0
    wrong = (y + 1) % c
    assert M.brier(one_hot, wrong) == 2.0
    assert M.nll(one_hot, wrong) == math.inf  # no epsilon


def test_nll_brier_match_direct_formulas():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(300, 7, generator=g, dtype=F64)
    probs, y = logits.softmax(-1), torch.randint(0, 7, (300,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    assert M.nll(probs, y) == pytest.approx(ce, abs=1e-13)
    assert M.nll(logits, y, inputs="logits") == pytest.approx(ce, abs=1e-13)
    onehot = torch.nn.functional.one_hot(y, 7).to(F64)
    assert M.brier(probs, y) == pytest.approx(((probs - onehot) ** 2).sum(1).mean().item(), abs=1e-13)


# ----------------------------------------------------------------------------- §10.25 mutual information
def test_o25_mutual_information():
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=F64)  # (S, B, C) = (2, 1, 2)
    u = M.uncertainty_decomposition(disagree)
    assert u.epistemic.item() == pytest.approx(0.6931471805599453, abs=1e-15)
    assert u.total.item() == pytest.approx(math.log(2), abs=1e-15) and u.aleatoric.item() == 0.0
    agree = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=F64)
    assert M.uncertainty_decomposition(agree).epistemic.item() == 0.0
    # with p̄ given (e.g. from eq. 33) and a log-prob stack
    u2 = M.uncertainty_decomposition(disagree.log(), torch.tensor([[0.5, 0.5]], dtype=F64).log(), inputs="log_probs")
    assert u2.epistemic.item() == pytest.approx(math.log(2), abs=1e-15)


def test_o25_mutual_information_nonnegative_random():
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        s, n, c = (int(torch.randint(1, 9, (), generator=g)), int(torch.randint(1, 40, (), generator=g)),
                   int(torch.randint(2, 12, (), generator=g)))
        scale = float(torch.rand((), generator=g)) * 30
        stack = (scale * torch.randn(s, n, c, generator=g, dtype=F64)).softmax(-1)
        u = M.uncertainty_decomposition(stack.float())  # float32 stacks: rounding must not go negative
        assert (u.epistemic >= 0).all()
        u64 = M.uncertainty_decomposition(stack)
        assert (u64.epistemic >= 0).all() and (u64.total >= u64.aleatoric - 1e-12).all()
        torch.testing.assert_close(u64.total, u64.aleatoric + u64.epistemic, rtol=0, atol=1e-12)


def test_mutual_information_property_hypothesis():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=40, deadline=None)
    @hyp.given(st.integers(1, 5), st.integers(1, 6), st.integers(2, 6), st.integers(0, 2 ** 31 - 1),
               st.floats(0.0, 50.0))
    def check(s, n, c, seed, scale):
        g = torch.Generator().manual_seed(seed)
        stack = (scale * torch.randn(s, n, c, generator=g, dtype=F64)).softmax(-1)
        assert (M.uncertainty_decomposition(stack).epistemic >= 0).all()

    check()


# ----------------------------------------------------------------------------- §10.26 OOD
def _buggy_fpr95(s_in, s_out):
    """The averaging bug of the public evaluation code: mean FPR over ROC points with TPR <= 0.95."""
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out])
    return float(np.mean(fpr[tpr <= 0.95]))


def test_o26_ood_exact_ties():
    m = M.ood_metrics_from_scores(S_IN, S_OUT)
    assert m["auroc"] == pytest.approx(0.8, abs=1e-15)
    assert m["aupr_in"] == pytest.approx(0.837270472344843, abs=1e-15)
    assert m["aupr_out"] == pytest.approx(0.7813081554460863, abs=1e-15)
    assert m["fpr95"] == 0.4
    assert M.auroc(S_IN, S_OUT) == m["auroc"] and M.average_precision(S_IN, S_OUT) == m["aupr_in"]
    assert M.fpr_at_tpr(S_IN, S_OUT, 0.95) == 0.4
    # k = ceil(0.95 * 20) = 19, tau* = 0.10, OOD scores >= 0.10: .11, .30, .60, .97
    assert M.fpr_at_tpr(S_IN, S_OUT, 1.0) == 0.6  # tau* = 0.05: adds .06, .07
    assert M.fpr_at_tpr(S_IN, S_OUT, 0.5) == 0.2  # k = 10, tau* = 0.55: .60, .97


def test_o26_averaging_bug_differs():
    pytest.importorskip("sklearn")
    buggy = _buggy_fpr95(S_IN, S_OUT)
    assert buggy == pytest.approx(0.236, abs=5e-4)
    assert M.ood_metrics_from_scores(S_IN, S_OUT)["fpr95"] == 0.4 != pytest.approx(buggy, abs=1e-3)


def test_o26_generated_scores_break_ties():
    s_in = [k * 0.05 for k in range(1, 21)]  # 0.3 and 0.6 no longer equal the OOD literals
    m = M.ood_metrics_from_scores(s_in, S_OUT)
    assert m["auroc"] == pytest.approx(0.805, abs=1e-12)
    assert m["aupr_in"] == pytest.approx(0.8438, abs=1e-4)


def test_ood_scores_enum_and_mi():
    probs_in = torch.tensor([[0.9, 0.1], [0.8, 0.2]], dtype=F64)
    probs_out = torch.tensor([[0.5, 0.5], [0.6, 0.4]], dtype=F64)
    torch.testing.assert_close(M.ood_score(probs_in), torch.tensor([0.9, 0.8], dtype=F64))
    torch.testing.assert_close(M.ood_score(probs_in, score="entropy"), -M.entropy(probs_in))
    assert M.ood_metrics(probs_in, probs_out)["auroc"] == 1.0
    assert M.ood_metrics(probs_in, probs_out, score="entropy")["auroc"] == 1.0
    stack_in = probs_in.expand(3, 2, 2)  # agreeing members: MI 0
    stack_out = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.2, 0.8]]], dtype=F64)
    m = M.ood_metrics(probs_in, stack_out.mean(0), score="mi", sample_stack_in=stack_in, sample_stack_out=stack_out)
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0
    with pytest.raises(ValueError, match="score='mi' needs"):
        M.ood_metrics(probs_in, probs_out, score="mi")
    with pytest.raises(ValueError, match="invalid score"):
        M.ood_score(probs_in, score="energy")


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_ap_match_sklearn(ties):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3 + ties)
    for _ in range(30):
        n_in, n_out = rng.integers(1, 300, size=2)
        s_in = rng.normal(0.5, 1.0, n_in)
        s_out = rng.normal(0.0, 1.0, n_out)
        if ties:
            s_in, s_out = np.round(s_in, 1), np.round(s_out, 1)
        y = np.r_[np.ones(n_in), np.zeros(n_out)]
        s = np.r_[s_in, s_out]
        m = M.ood_metrics_from_scores(s_in, s_out)
        assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
        assert m["aupr_in"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)
        assert m["aupr_out"] == pytest.approx(sk.average_precision_score(1 - y, -s), abs=1e-12)
        # FPR95 (36) by brute force
        k = math.ceil(0.95 * n_in - 1e-9)
        tau = np.sort(s_in)[::-1][k - 1]
        assert m["fpr95"] == np.mean(s_out >= tau)


def test_misclassification_auroc_is_separate():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(4)
    probs = (2 * torch.randn(500, 5, generator=g, dtype=F64)).softmax(-1)
    y = torch.randint(0, 5, (500,), generator=g)
    correct = (probs.argmax(1) == y).numpy()
    conf = probs.max(1).values.numpy()
    assert M.misclassification_auroc(probs, y) == pytest.approx(sk.roc_auc_score(correct, conf), abs=1e-12)
    assert math.isnan(M.misclassification_auroc(P24[:2], torch.tensor([0, 0])))  # no errors: undefined


# ----------------------------------------------------------------------------- selective prediction
def test_risk_coverage_and_aurc():
    # confidences .95 (c), .95 (w), .65 (c), .65 (c): stable descending order keeps rows 0,1 then 2,3
    cov, risk = M.risk_coverage_curve(P24, Y24)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.5, 1 / 3, 0.25], dtype=F64), rtol=0, atol=1e-15)
    assert M.aurc(P24, Y24) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4, abs=1e-15)
    perfect = torch.nn.functional.one_hot(Y24, 2).to(F64)
    assert M.aurc(perfect, Y24) == 0.0


# ----------------------------------------------------------------------------- §10.27 torchmetrics
def test_o27_torchmetrics_agreement():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(27)
    worst = 0.0
    for case in range(200):
        n = int(torch.randint(50, 3001, (), generator=g))
        c = int(torch.randint(2, 21, (), generator=g))
        scale = float(torch.empty(()).uniform_(0.1, 6.0, generator=g))
        logits = scale * torch.randn(n, c, generator=g)
        probs = logits.softmax(-1)  # float32
        while (probs.max(-1).values >= 1.0).any():  # oracle 27: no confidence of exactly 1.0
            logits = logits / 2
            probs = logits.softmax(-1)
        # labels: half from the predictive (calibrated), half uniform (overconfident)
        y = torch.where(torch.rand(n, generator=g) < 0.5, torch.multinomial(probs, 1, generator=g).squeeze(1),
                        torch.randint(0, c, (n,), generator=g))
        for norm, ours in (("l1", M.ece), ("max", M.mce)):
            ref = float(tm.multiclass_calibration_error(probs, y, c, n_bins=15, norm=norm))
            got = ours(probs, y)
            worst = max(worst, abs(got - ref))
            assert got == pytest.approx(ref, abs=2e-6), (case, norm)
    assert worst < 2e-6
