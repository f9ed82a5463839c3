"""The old posterior as the fixed point that the replay correction (29) assumes (docs/algorithms.md §8):
an unconverged old mean leaves a gradient r of the old objective at m_old that the correction drops
(it subtracts ḡ_M(q_old) as if r = 0); newton_mean puts it back into the prior."""

from __future__ import annotations

import copy

import pytest
import torch
from test_continual_kprior import _ce_map, _two_class_tasks  # the shared fixtures
from torch import nn
from torch.nn import functional as F

import vbpc
from vbpc.inference.curvature import mean_gradient, newton_mean
from vbpc.posterior.base import Entry

N, WD = 200, 1e-2


def _tasks():
    return _two_class_tasks(N)


def _map(parts) -> nn.Module:
    """argmin Σ_parts Σ_i CE_i + (N δ/2)‖θ‖² (the base prior N(0, Nδ))."""
    return _ce_map(parts, WD, N)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _old_posterior(model: nn.Module, x1, y1):
    """An unconverged old posterior: the task-1 MAP moved by ±1.5, precision p_base + N h̄ with h̄ the exact
    diagonal Hessian of the mean CE there; the base prior N(0, Nδ) (as a DiagonalGaussian with hess 0)."""
    with torch.no_grad():
        for p in model.parameters():  # opposite shifts of the two classes (a common one leaves CE unchanged)
            p[0].add_(1.5)
            p[1].sub_(1.5)
        p = F.softmax(model(x1), -1)
        pk = p * (1 - p)
        h_bar = [(pk.T @ x1.square()) / N, pk.mean(0)]
    old = vbpc.DiagonalGaussian([Entry(nm, q.detach().clone(), h.clone(), float(N), WD)
                                 for (nm, q), h in zip(model.named_parameters(), h_bar)])
    base = vbpc.DiagonalGaussian([Entry(nm, torch.zeros_like(q), torch.zeros_like(q), float(N), WD)
                                  for nm, q in model.named_parameters()])
    return old, base


def _loss(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1])


def _old_residual(model, old, x1, y1, seed):
    """r = N ḡ_1(q_old) + p_base ⊙ m_old: the old objective's gradient at m_old (the same draws as the
    learner's anchor pass of ``residual(seed=seed)``)."""
    means = [e.mean for e in old._entries]
    sigma = [e.precision().rsqrt() for e in old._entries]
    g = mean_gradient(list(model.parameters()), _loss(model), [(x1, y1)], means=means, sigma=sigma, seed=seed + 1,
                      model=model)
    return [gi * N + N * WD * m for gi, m in zip(g, means)]


def _learner(model, old, base, r, newton: bool, **kw):
    prior = newton_mean(old, r) if newton else copy.deepcopy(old)
    opt = vbpc.ContinualIVON(model.parameters(), lr=kw.pop("lr", 0.3), ess=float(N), prior=prior.bind(model),
                             anchor=old.bind(model) if newton else None, model=model, correction=True,
                             memory_weight=float(N), data_size=float(N), weight_decay=WD, **kw)
    opt.set_memory_curvature_from(base)
    return opt


@pytest.mark.parametrize("newton", [True, False])
def test_newton_prior_with_all_old_data_gives_the_joint_gradient(newton):
    """All of task 1 as the memory, the K-prior identity (set_memory_curvature_from): with the prior at
    newton_mean(q_old, r) the learner's objective has the joint objective's gradient at every mean,
    N ḡ_2(q) + N ḡ_1(q) + p_base ⊙ m (to rounding); with q_old itself it is off by the old residual r."""
    (x1, y1), (x2, y2) = _tasks()
    model = _map([(x1, y1)])
    old, base = _old_posterior(model, x1, y1)
    r = _old_residual(model, old, x1, y1, seed=5)
    assert float(_flat(r).norm()) > 50.0  # not a fixed point
    opt = _learner(model, old, base, r, newton)
    with torch.no_grad():
        for p, d in zip(model.parameters(), (0.3, -0.2)):
            p.add_(d)
    got = opt.residual(_loss(model), [(x2, y2)], memory=[(x1, y1)], seed=5, mc_samples=2)
    post = opt.posterior(model)
    means, sigma = [e.mean for e in post._entries], [e.precision().rsqrt() for e in post._entries]
    params = list(model.parameters())
    g2 = mean_gradient(params, _loss(model), [(x2, y2)], means=means, sigma=sigma, seed=5, mc_samples=2, model=model)
    g1 = mean_gradient(params, _loss(model), [(x1, y1)], means=means, sigma=sigma, seed=6, mc_samples=2, model=model)
    # the anchor pass of residual() used 2 draws, _old_residual 1: redo r with the learner's draws
    old_means = [e.mean for e in old._entries]
    g1_old = mean_gradient(params, _loss(model), [(x1, y1)], means=old_means,
                           sigma=[e.precision().rsqrt() for e in old._entries], seed=6, mc_samples=2, model=model)
    r2 = [gi * N + N * WD * m for gi, m in zip(g1_old, old_means)]
    joint = [N * a + N * b + N * WD * m for a, b, m in zip(g2, g1, means)]
    gap = [a - b for a, b in zip(got, joint)]
    if newton:
        # the prior was formed from r (1 draw); r2 uses the learner's 2: the gap is exactly r − r2
        for d, ra, rb in zip(gap, r, r2):
            torch.testing.assert_close(d, ra - rb, rtol=1e-9, atol=1e-9)
    else:
        for d, rb in zip(gap, r2):
            torch.testing.assert_close(d, -rb, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_newton_prior_lands_at_the_joint_map():
    """IVON with the replay correction on all old data from an unconverged old posterior: the prior at
    newton_mean(q_old, r) lands at the joint MAP (Polyak mean of the second half of 600 steps, measured 0.17,
    the IVON noise floor), q_old itself at the minimiser of an objective tilted by r (measured 0.76)."""
    (x1, y1), (x2, y2) = _tasks()
    joint = _flat(_map([(x1, y1), (x2, y2)]).parameters())

    def run(newton: bool) -> float:
        model = _map([(x1, y1)])
        old, base = _old_posterior(model, x1, y1)
        r = _old_residual(model, old, x1, y1, seed=0)
        opt = _learner(model, old, base, r, newton, hess_init=1e-3, beta2=0.99999)

        def closure(x, y):
            def f():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            return f
        torch.manual_seed(0)
        avg, k = torch.zeros_like(joint), 0
        for t in range(600):
            opt.step(closure(x2, y2), memory=closure(x1, y1))
            if t >= 300:
                avg += _flat(model.parameters())
                k += 1
        return float((avg / k - joint).norm())

    fixed, plain = run(True), run(False)
    assert fixed < 0.25 and plain > 0.5 and plain > 3 * fixed


@pytest.mark.parametrize("old_mean", ["newton", "final"])
def test_workflow_moves_the_unbiased_poco_prior_to_the_fixed_point(tmp_path, old_mean):
    """vbpc continual: with old_mean=newton (the default) poco's next prior is newton_mean(q_old, r) with the
    correction anchored at q_old (the residual of each task is computed and logged); poco-tempered (a
    tempered N_old) and old_mean=final keep q_old as the prior."""
    import json

    from vbpc.cli import main

    tiny = ["tasks.train_size=256", "tasks.test_size=100", "tasks.memory_per_task=16", "tasks.memory_batch_size=16",
            "tasks.batch_size=32", "seeds=[0]", "test_samples=1", "progress=false", "model.kwargs={hidden: [16]}",
            "tasks.n_tasks=2", "methods=[poco, poco-tempered]", f"tasks.old_mean={old_mean}", f"out={tmp_path}"]
    assert main(["continual", "examples/configs/continual_permuted.yaml", *sum((["--set", s] for s in tiny), [])]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    newton = old_mean == "newton"
    assert all(("residual_norm" in r) == (newton and r["method"] == "poco") for r in rows)
    assert all(r["residual_norm"] > 0 for r in rows if "residual_norm" in r)
