r"""``vbpc continual``: continual learning on real Fashion-MNIST task sequences (docs/algorithms.md §8).

Scenarios:

* ``split``: classes (0,1), (2,3), ... as ``n_tasks`` two-class tasks; one 10-way head whose
  logits are masked to the task's classes in training and evaluation (task-incremental).
* ``permuted``: all ten classes, task ``t`` applies a fixed pixel permutation (``t=0``: none).

Methods, all IVON-based unless noted:

* ``naive``: one IVON run continued over the tasks (naive finetuning; the original isotropic prior);
* ``vcl``: the old posterior (IVON's) becomes the new prior (:class:`~vbpc.ContinualIVON`, ``correction=False``);
* ``laplace``: online Laplace/EWC, prior-focused like ``vcl`` but the old posterior comes from a curvature
  pass at the end of each task, :math:`p_t=p_{t-1}+N_t\bar h_t(q_t)`, :math:`p_0=\lambda_1(h_0+\delta)` (IVON's
  initial posterior; :func:`~vbpc.inference.curvature.laplace_posterior`);
* ``poco``: the prior plus the posterior-correction term of eq. (29) on a replay memory of
  ``memory_per_task`` examples per old task (:class:`~vbpc.ContinualIVON`, ``correction=True``), weighted
  by the unbiased :math:`N_{old}` (``tasks.memory_weight`` overrides); the old posterior at the end of
  each task per ``tasks.old_posterior``: ``curvature`` (default; :meth:`~vbpc.ContinualIVON.laplace_posterior`,
  the precision (29) assumes, and the correction's :math:`\bar h_{\mathcal M}(q_{old})` is the old-data part of
  that precision per old example, :meth:`~vbpc.ContinualIVON.set_memory_curvature_from`), ``converge``
  (more IVON epochs until :math:`h` converged,
  :func:`~vbpc.inference.curvature.converge_hessian`) or ``ivon`` (IVON's EMA as it is, which needs
  ``tasks.clamp_memory_curvature`` and a tempered weight to stay stable);
* ``poco-tempered``: ``poco`` with :math:`N_{old}` = ``tasks.tempered_weight`` (reported next to it);
* ``adamw``: AdamW naive finetuning (a non-Bayesian reference).

With ``curvature`` the next prior of ``poco`` (the unbiased :math:`N_{old}`) is the old posterior at the
fixed point (29) assumes (``tasks.old_mean``, default ``newton``): its mean moved by :math:`-r/p_{old}`, with
:math:`r` the learner's gradient at :math:`m_{old}` (:meth:`~vbpc.ContinualIVON.residual`,
:func:`~vbpc.inference.curvature.newton_mean`), while the correction stays anchored at :math:`q_{old}`.  After
one epoch :math:`r\ne0`; the correction subtracts :math:`\bar g_{\mathcal M}(q_{old})` as if it were zero, and
with the unbiased :math:`N_{old}` the dropped gradients grow from task to task until the run diverges
(permuted Fashion-MNIST, ``final``) [vbpc, measured].

With ``curvature`` and ``converge`` the correction's :math:`\bar h_{\mathcal M}(q_{old})` is the old-data part
of :math:`p_{old}` per old example (the first task's prior subtracted); with ``ivon`` it is a Price estimate
on the memory, re-drawn every ``tasks.memory_curvature_every`` steps (running mean,
:meth:`~vbpc.ContinualIVON.set_memory_curvature`), clamped with ``tasks.clamp_memory_curvature``.

After each task the run evaluates every seen task (BMA over ``test_samples`` posterior samples)
and logs the accuracy matrix :math:`R_{t,j}`, the average accuracy :math:`A_t=\frac1t\sum_{j\le t}R_{t,j}`,
the forgetting :math:`F_t=\frac1{t-1}\sum_{j<t}\big(\max_{l<t}R_{l,j}-R_{t,j}\big)` and the ECE over the
seen tasks' test sets.  Outputs in ``out``: ``metrics.jsonl``, ``results.json``, ``results.md``
(mean ± std over seeds), ``continual.png``, and each method's final posterior
(``<method>_seed<s>.safetensors``, a :mod:`vbpc.checkpoint`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..config import ConfigError, ContinualConfig, to_dict
from ..data import load_fashion_mnist, seed_everything
from ..inference.curvature import converge_hessian, laplace_posterior, mean_gradient, newton_mean
from ..inference.registry import get_learner
from ..io import atomic_write_text, run_lock
from ..metrics import ece as ece_metric
from ..models import build_model
from ..posterior import DiagonalGaussian, Entry
from ..reporting import JsonlLog, markdown_table, mean_std, pm, save_figure, subplots, write_json

__all__ = ["METHODS", "SCENARIOS", "Task", "evaluate_tasks", "forgetting", "frozen_posterior", "make_tasks",
           "preflight", "prepare_out", "run_continual", "task_loss"]

METHODS = ("naive", "vcl", "laplace", "poco", "poco-tempered", "adamw")
CORRECTED = ("poco", "poco-tempered")
OLD_POSTERIORS = ("curvature", "converge", "ivon")
SCENARIOS = ("split", "permuted")


@dataclass
class Task:
    """One task: inputs, global labels and, per example, the head columns it may use."""

    name: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    cols: Tensor  #: (n_cols,) the classes of this task (logits are masked to them)

    def __len__(self) -> int:
        return len(self.y)


def make_tasks(scenario: str, n_tasks: int, *, root: Optional[str] = None, train_size: Optional[int] = None,
               test_size: Optional[int] = None, seed: int = 0) -> list[Task]:
    """The task sequence on real Fashion-MNIST (the permutations are drawn from ``seed``)."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"tasks.scenario={scenario!r}: expected one of {SCENARIOS}")
    tr, te = load_fashion_mnist("train", root), load_fashion_mnist("test", root)
    x, y = tr.tensors
    xt, yt = te.tensors
    tasks = []
    if scenario == "split":
        if not 1 <= n_tasks <= 5:
            raise ConfigError(f"tasks.n_tasks={n_tasks}: split Fashion-MNIST has at most 5 two-class tasks")
        for t in range(n_tasks):
            cols = torch.tensor([2 * t, 2 * t + 1])
            keep, keep_t = (y == cols[0]) | (y == cols[1]), (yt == cols[0]) | (yt == cols[1])
            tasks.append(Task(f"{2 * t}/{2 * t + 1}", x[keep][:train_size], y[keep][:train_size],
                              xt[keep_t][:test_size], yt[keep_t][:test_size], cols))
    else:
        if n_tasks < 1:
            raise ConfigError(f"tasks.n_tasks={n_tasks}: must be >= 1")
        g = torch.Generator().manual_seed(10_000 + seed)
        d = x[0].numel()
        for t in range(n_tasks):
            perm = torch.arange(d) if t == 0 else torch.randperm(d, generator=g)

            def apply(a: Tensor, perm: Tensor = perm) -> Tensor:
                return a.reshape(len(a), -1)[:, perm].reshape(a.shape)

            tasks.append(Task(f"perm{t}", apply(x[:train_size]), y[:train_size], apply(xt[:test_size]),
                              yt[:test_size], torch.arange(10)))
    return tasks


def _masked(logits: Tensor, cols: Tensor) -> Tensor:
    """Logits of the task's classes (``cols`` per example, (B, k), or shared, (k,))."""
    if cols.dim() == 1:
        return logits[:, cols]
    return logits.gather(1, cols)


def _local(y: Tensor, cols: Tensor) -> Tensor:
    c = cols if cols.dim() == 2 else cols.expand(len(y), -1)
    return (c == y[:, None]).to(torch.int64).argmax(1)


def task_loss(model: nn.Module, x: Tensor, y: Tensor, cols: Tensor) -> Tensor:
    """Mean cross-entropy over the task's classes."""
    return F.cross_entropy(_masked(model(x), cols), _local(y, cols))


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, cols: Tensor, posterior: Any, samples: int, seed: int) -> Tensor:
    """BMA probabilities over the task's classes (mean weights if ``samples == 0``)."""
    if posterior is None or samples == 0:
        return F.softmax(_masked(model(x), cols), -1)
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(len(x), len(cols))
    for _ in range(samples):
        with posterior.sampled(model, generator=g):
            probs += F.softmax(_masked(model(x), cols), -1)
    return probs / samples


def forgetting(acc: list[list[float]]) -> float:
    r""":math:`F_t=\frac1{t-1}\sum_{j<t}(\max_{l<t}R_{l,j}-R_{t,j})` of the last row of the accuracy matrix."""
    t = len(acc)
    if t < 2:
        return 0.0
    return sum(max(acc[k][j] for k in range(j, t - 1)) - acc[t - 1][j] for j in range(t - 1)) / (t - 1)


def evaluate_tasks(model: nn.Module, tasks: list[Task], posterior: Any, samples: int, seed: int) -> dict[str, Any]:
    accs, probs, labels = [], [], []
    model.eval()
    for task in tasks:
        p = _predict(model, task.x_test, task.cols, posterior, samples, seed)
        local = _local(task.y_test, task.cols)
        accs.append(float((p.argmax(1) == local).float().mean()))
        probs.append(p)
        labels.append(local)
    model.train()
    # ECE over the seen tasks (split: two-class predictive of each task; pad to a common width)
    k = max(p.shape[1] for p in probs)
    padded = torch.cat([F.pad(p, (0, k - p.shape[1])) for p in probs])
    return {"acc": accs, "ece": ece_metric(padded, torch.cat(labels))}


def frozen_posterior(post: Any) -> Any:
    """A copy of a diagonal posterior that no longer shares the learner's tensors."""
    from .. import DiagonalGaussian

    return DiagonalGaussian.from_state_dict(post.state_dict())


class _Method:
    """One method's learner over the task sequence."""

    def __init__(self, name: str, cfg: ContinualConfig, model: nn.Module):
        self.name, self.cfg, self.model = name, cfg, model
        self.opt: Any = None
        self.seen: list[Task] = []
        self.memory: list[tuple[Tensor, Tensor, Tensor]] = []  # (x, y, cols per example)
        self.old: Any = None  # the end-of-task posterior of a curvature pass (laplace, poco with curvature)
        self.base: Any = None  # the first task's prior N(0, λ1(h0 + δ)): p_old's part that is not old data
        self.prior_next: Any = None  # old_mean=newton: the old posterior at its fixed point (the next prior)
        self.info: dict[str, Any] = {}  # per-task extras logged in metrics.jsonl

    @property
    def corrected(self) -> bool:
        return self.name in CORRECTED

    def posterior(self) -> Any:
        if self.name == "adamw":
            return None
        return self.old if self.old is not None else self.opt.posterior(self.model)

    def _chunks(self, parts: list[tuple[Tensor, Tensor, Tensor]], bs: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [(x[i:i + bs], y[i:i + bs], c[i:i + bs]) for x, y, c in parts for i in range(0, len(y), bs)]

    def finish(self, task: Task, run_epoch: Callable[[], None], seed: int) -> None:
        """The old posterior at the end of a task (docs/algorithms.md §8): a curvature pass at the
        final mean (laplace; poco with ``old_posterior=curvature``) or IVON epochs until h converged."""
        tc = self.cfg.tasks
        self.info = {}
        if self.name not in ("laplace",) + CORRECTED or (self.corrected and tc.old_posterior == "ivon"):
            return
        if self.corrected and tc.old_posterior == "converge":
            if self.base is None:  # p_old's part that is not old data: IVON's prior N(0, λ1 δ)
                self.base = frozen_posterior(self.opt.posterior(self.model)).prior()
            self.info["converge_epochs"] = converge_hessian(self.opt, run_epoch, tol=tc.converge_tol,
                                                            max_epochs=tc.converge_max_epochs)
            return

        def loss(b: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            return task_loss(self.model, *b)

        data = self._chunks([(task.x, task.y, task.cols.expand(len(task), -1))], 512)
        mc, pass_seed = tc.old_posterior_mc, seed * 1000 + len(self.seen)
        # the unbiased N_old only: a tempered memory weight w < N_old restores the old data's gradient r with w h̄,
        # not N_old h̄, so r would move the mean N_old/w times too far (poco-tempered: 0.49 instead of 0.72)
        newton = self.name == "poco" and tc.memory_weight is None and tc.old_mean == "newton"
        if not hasattr(self.opt, "laplace_posterior"):  # task 1: plain IVON; the prior is its initial posterior
            post = frozen_posterior(self.opt.posterior(self.model)).bind(self.model)
            h0 = float(self.cfg.learner.kwargs.get("hess_init", self.opt.param_groups[0]["hess_init"]))
            start = DiagonalGaussian([Entry(e.name, torch.zeros_like(e.mean), torch.full_like(e.hess, h0), e.ess,
                                            e.weight_decay) for e in post._entries])  # N(0, λ(h0 + δ))
            self.base = start
            self.old, clamped = laplace_posterior(post, start, self.model, loss, data, data_size=len(task),
                                                mc_samples=mc, seed=pass_seed)
            if newton:  # r = N ḡ(q) + λδ m: the gradient of IVON's objective (its prior N(0, λδ)) at m
                named = dict(self.model.named_parameters())
                params: list[Tensor] = [named[e.name] for e in post._entries]
                g = mean_gradient(params, loss, data, means=[e.mean for e in post._entries],
                                  sigma=[e.precision().rsqrt_() for e in post._entries], mc_samples=mc,
                                  seed=pass_seed, names=[e.name for e in post._entries], model=self.model)
                residual = [gi.mul(float(len(task))).add_(e.mean.detach(), alpha=e.ess * e.weight_decay)
                            for gi, e in zip(g, post._entries)]
        else:  # p_t = p_{t-1} + N_t h̄_t(q_t): old data's curvature stays N_j h̄_j(q_j) (online Laplace)
            self.old, clamped = self.opt.laplace_posterior(loss, data, model=self.model,
                                                           mc_samples=mc, seed=pass_seed)
            if newton:
                residual = self.opt.residual(loss, data, memory=self._chunks(self.memory, 512), model=self.model,
                                             mc_samples=mc, seed=pass_seed)
        if newton:  # the fixed point (29) assumes: m_old − r/p_old as the next prior's mean, the anchor at q_old
            self.prior_next = newton_mean(self.old, residual)
            self.info["residual_norm"] = float(torch.cat([r.flatten() for r in residual]).norm())
        self.info["old_posterior_clamped"] = clamped

    def begin(self, task: Task) -> None:
        lc = self.cfg.learner
        kw = dict(lc.kwargs)
        ess = float(kw.pop("ess", len(task)))
        named = [(n, p) for n, p in self.model.named_parameters()]
        if self.name == "adamw":
            if self.opt is None:
                self.opt = get_learner("adamw").build(named, lr=self.cfg.adamw_lr, weight_decay=lc.weight_decay)
            return
        if self.opt is None:  # the first task: plain IVON for every IVON-based method
            self.opt = get_learner("ivon").build(named, lr=lc.lr, ess=ess, weight_decay=lc.weight_decay,
                                                 model=self.model, **kw)
            return
        if self.name == "naive":  # the same IVON run continues
            return
        prior = frozen_posterior(self.old if self.old is not None else self.opt.posterior(self.model))
        anchor, self.old = None, None
        if self.prior_next is not None:  # old_mean=newton: the prior at the fixed point, the correction at q_old
            prior, anchor, self.prior_next = self.prior_next, prior, None
        correction = self.corrected
        n_old = sum(len(t) for t in self.seen)
        tc = self.cfg.tasks
        weight = tc.tempered_weight if self.name == "poco-tempered" else (tc.memory_weight or n_old)
        if correction and not self.memory:
            raise ValueError(f"method {self.name!r} needs a replay memory: tasks.memory_per_task must be >= 1")
        if self.cfg.tasks.ess not in ("task", "all"):
            raise ConfigError(f"tasks.ess={self.cfg.tasks.ess!r}: 'task' or 'all'")
        if self.cfg.tasks.ess == "all":  # λ = every example seen: N_new/λ + N_old/λ = 1
            ess = float(n_old + len(task))
        self.opt = get_learner("continual-ivon").build(
            named, lr=lc.lr, ess=ess, prior=prior, model=self.model, data_size=len(task),
            weight_decay=lc.weight_decay, correction=correction, memory_weight=weight if correction else None,
            **({} if anchor is None else {"anchor": anchor}), **kw)
        if correction and tc.old_posterior != "ivon":  # the K-prior identity: the same h̄ as in p_old
            self.opt.set_memory_curvature_from(self.base, model=self.model)
        elif correction:
            self.opt.set_memory_curvature(lambda b: task_loss(self.model, *b), self._chunks(self.memory,
                                                                                            tc.memory_batch_size),
                                          mc_samples=tc.memory_curvature_mc, clamp=tc.clamp_memory_curvature,
                                          every=tc.memory_curvature_every)

    def step(self, x: Tensor, y: Tensor, cols: Tensor, memory_batch: Optional[Callable[[], tuple]]) -> Tensor:
        model, opt = self.model, self.opt

        def closure() -> Tensor:
            opt.zero_grad()
            loss = task_loss(model, x, y, cols)
            loss.backward()
            return loss

        if self.name == "adamw":
            return opt.step(closure)
        if memory_batch is not None:  # poco from the second task on
            xm, ym, cm = memory_batch()

            def mem() -> Tensor:
                opt.zero_grad()
                loss = task_loss(model, xm, ym, cm)
                loss.backward()
                return loss
            return opt.step(closure, memory=mem)
        return opt.step(closure)

    def remember(self, task: Task, k: int, g: torch.Generator) -> None:
        self.seen.append(task)
        if not self.corrected or k <= 0:
            return
        idx = torch.randperm(len(task), generator=g)[:k]
        self.memory.append((task.x[idx], task.y[idx], task.cols.expand(len(idx), -1)))


def _train_sequence(cfg: ContinualConfig, method: str, seed: int, tasks: list[Task], log: Callable[[dict], None],
                    out: Path) -> list[dict[str, Any]]:
    tc = cfg.tasks
    seed_everything(seed)
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    m = _Method(method, cfg, model)
    g = torch.Generator().manual_seed(seed)
    acc_rows: list[list[float]] = []
    rows = []
    for t, task in enumerate(tasks):
        m.begin(task)
        memory = None
        if m.memory:
            mx = torch.cat([a for a, _, _ in m.memory])
            my = torch.cat([b for _, b, _ in m.memory])
            mc = torch.cat([c for _, _, c in m.memory])

            def memory() -> tuple[Tensor, Tensor, Tensor]:
                i = torch.randint(len(my), (min(tc.memory_batch_size, len(my)),), generator=g)
                return mx[i], my[i], mc[i]
        t0 = time.perf_counter()
        steps = tc.epochs * math.ceil(len(task) / tc.batch_size)
        bar = tqdm(total=steps, desc=f"{method} s{seed} task {t + 1}/{len(tasks)}", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True)
        losses: list[float] = []

        def run_epoch(task: Task = task, memory: Optional[Callable[[], tuple]] = memory) -> None:
            perm = torch.randperm(len(task), generator=g)
            for i in range(0, len(task), tc.batch_size):
                idx = perm[i:i + tc.batch_size]
                loss = m.step(task.x[idx], task.y[idx], task.cols, memory)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")

        for _ in range(tc.epochs):
            run_epoch()
        m.finish(task, run_epoch, seed)
        bar.close()
        m.remember(task, tc.memory_per_task, g)
        ev = evaluate_tasks(model, tasks[:t + 1], m.posterior(), cfg.test_samples, seed)
        acc_rows.append(ev["acc"])
        row = {"method": method, "seed": seed, "task": t + 1, "train_loss": sum(losses[-20:]) / len(losses[-20:]),
               "acc": ev["acc"], "avg_acc": sum(ev["acc"]) / len(ev["acc"]), "forgetting": forgetting(acc_rows),
               "ece": ev["ece"], "seconds": time.perf_counter() - t0, **m.info}
        log(row)
        rows.append(row)
    post = m.posterior()
    prior = m.opt.prior() if hasattr(m.opt, "prior") else (post.prior() if post is not None else None)
    ckpt.save(out / f"{method}_seed{seed}.safetensors", model, post, prior=prior,
              spec={"name": cfg.model.name, "kwargs": cfg.model.kwargs},
              extra={"method": method, "seed": seed, "config": to_dict(cfg)})
    return rows


def summarize(rows: list[dict[str, Any]], methods: list[str], n_tasks: int) -> dict[str, Any]:
    """Per method and task: mean and std over seeds of average accuracy, forgetting and ECE."""
    out: dict[str, Any] = {}
    for meth in methods:
        per = {}
        for t in range(1, n_tasks + 1):
            sel = [r for r in rows if r["method"] == meth and r["task"] == t]
            per[t] = {k: mean_std([r[k] for r in sel]) for k in ("avg_acc", "forgetting", "ece")}
        out[meth] = per
    return out


def markdown(summary: dict[str, Any], n_tasks: int, seeds: list[int], scenario: str) -> str:
    """The README table: final average accuracy, forgetting and ECE, plus A_t after each task."""
    head = ["method", "avg acc (final)", "forgetting (final)", "ECE (final)"]
    head += [f"A_{t}" for t in range(1, n_tasks + 1)]
    rows = [[meth] + [pm(per[n_tasks][k]) for k in ("avg_acc", "forgetting", "ece")]
            + [f"{per[t]['avg_acc'][0]:.3f}" for t in range(1, n_tasks + 1)] for meth, per in summary.items()]
    return markdown_table(head, rows, f"{scenario} Fashion-MNIST, {n_tasks} tasks, {len(seeds)} seeds (mean ± std)")


def _plot(summary: dict[str, Any], n_tasks: int, path: Path, title: str) -> None:
    fig, axes = subplots(1, 3, figsize=(12, 3.4))
    ts = list(range(1, n_tasks + 1))
    for meth, per in summary.items():
        for ax, key in zip(axes, ("avg_acc", "forgetting", "ece")):
            mu = [per[t][key][0] for t in ts]
            sd = [per[t][key][1] for t in ts]
            ax.plot(ts, mu, marker="o", label=meth)
            ax.fill_between(ts, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], alpha=0.2)
    for ax, lab in zip(axes, ("average accuracy", "forgetting", "ECE (seen tasks)")):
        ax.set_xlabel("tasks seen")
        ax.set_ylabel(lab)
        ax.set_xticks(ts)
    axes[0].legend(title="method", fontsize=8)
    fig.suptitle(f"{title} (mean ± std over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def preflight(cfg: Any, *, continual: bool) -> None:
    """Build what a continual or merging run builds (the first seed's tasks, the model, the IVON
    and ContinualIVON learners with ``learner.kwargs``) so that a bad config or input fails before
    any file is created or truncated."""
    if cfg.learner.name != "ivon":
        what = "the continual methods are IVON-based" if continual else "merging uses IVON posteriors"
        raise ConfigError(f"learner.name={cfg.learner.name!r}: {what} ('ivon')")
    tc = cfg.tasks
    tasks = make_tasks(tc.scenario, tc.n_tasks, root=tc.root, train_size=tc.train_size, test_size=tc.test_size,
                       seed=cfg.seeds[0])
    empty = [t.name for t in tasks if len(t) == 0 or len(t.y_test) == 0]
    if empty:
        raise ConfigError(f"task {empty[0]} has no training or test examples (tasks.train_size / tasks.test_size)")
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    kw = dict(cfg.learner.kwargs)
    ess = float(kw.pop("ess", len(tasks[0])))
    named = list(model.named_parameters())
    common = dict(lr=cfg.learner.lr, ess=ess, weight_decay=cfg.learner.weight_decay, model=model, **kw)
    try:
        opt = get_learner("ivon").build(named, **common)
        get_learner("continual-ivon").build(named, prior=opt.posterior(model), **common)
    except TypeError as exc:
        raise ConfigError(f"learner.kwargs: {exc}") from None


def prepare_out(out: Path, overwrite: bool, files: tuple[str, ...]) -> None:
    """Refuse to replace an earlier run's results in ``out`` unless ``overwrite`` (then remove them)."""
    present = [f for f in files if (out / f).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds results ({', '.join(present)}); pass --overwrite to replace "
                              "them or choose another out")
    for f in present:
        (out / f).unlink()


#: the files a continual run writes (besides the posteriors)
RESULT_FILES = ("metrics.jsonl", "results.json", "results.md", "continual.png")


def run_continual(cfg: ContinualConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run every method x seed over the task sequence; write the log, table, plot and posteriors.

    The whole config is checked (:func:`preflight`) before ``out`` is touched; ``out`` is locked
    for the run, and earlier results there are replaced only with ``overwrite``."""
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise ConfigError(f"methods={cfg.methods!r}: each one of {METHODS}")
    if not cfg.seeds:
        raise ConfigError("seeds: at least one seed")
    tc = cfg.tasks
    if any(m in CORRECTED for m in cfg.methods) and tc.memory_per_task < 1:
        raise ConfigError("methods poco/poco-tempered correct on a replay memory: tasks.memory_per_task must be >= 1 "
                          "(an empty memory cannot estimate the correction term of eq. 29)")
    if tc.old_posterior not in OLD_POSTERIORS:
        raise ConfigError(f"tasks.old_posterior={tc.old_posterior!r}: one of {OLD_POSTERIORS}")
    if tc.memory_curvature_every is not None and tc.memory_curvature_every < 1:
        raise ConfigError(f"tasks.memory_curvature_every={tc.memory_curvature_every}: >= 1, or null for once per task")
    if tc.old_posterior_mc < 1 or tc.converge_max_epochs < 1 or not tc.converge_tol > 0:
        raise ConfigError("tasks.old_posterior_mc and tasks.converge_max_epochs must be >= 1, tasks.converge_tol > 0")
    if not tc.tempered_weight > 0 or (tc.memory_weight is not None and not tc.memory_weight > 0):
        raise ConfigError("tasks.tempered_weight and tasks.memory_weight must be > 0 (memory_weight null: the "
                          "unbiased N_old)")
    preflight(cfg, continual=True)
    out = Path(cfg.out)
    with run_lock(out, "vbpc continual"):
        prepare_out(out, overwrite, RESULT_FILES + tuple(f"{m}_seed{s}.safetensors" for m in cfg.methods
                                                         for s in cfg.seeds))
        return _run_continual(cfg, out)


def _run_continual(cfg: ContinualConfig, out: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    jsonl = JsonlLog(out / "metrics.jsonl")

    def log(row: dict) -> None:
        jsonl.write(row)
        if cfg.progress:
            tqdm.write(f"{row['method']:>6} seed {row['seed']} task {row['task']}: avg acc {row['avg_acc']:.4f} "
                       f"forgetting {row['forgetting']:.4f} ECE {row['ece']:.4f} ({row['seconds']:.1f}s)")

    t0 = time.perf_counter()
    with jsonl:
        for seed in cfg.seeds:
            tc = cfg.tasks
            tasks = make_tasks(tc.scenario, tc.n_tasks, root=tc.root, train_size=tc.train_size,
                               test_size=tc.test_size, seed=seed)
            for meth in cfg.methods:
                rows += _train_sequence(cfg, meth, seed, tasks, log, out)
    n = cfg.tasks.n_tasks
    summary = summarize(rows, cfg.methods, n)
    table = markdown(summary, n, cfg.seeds, cfg.tasks.scenario)
    atomic_write_text(out / "results.md", table)
    write_json(out / "results.json", {"config": to_dict(cfg), "summary": summary, "rows": rows})
    _plot(summary, n, out / "continual.png", f"{cfg.tasks.scenario} Fashion-MNIST")
    return {"out": str(out), "table": table, "summary": summary, "seconds": time.perf_counter() - t0}
