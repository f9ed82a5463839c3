r"""``vbpc merge-eval``: model merging by posterior multiplication (docs/algorithms.md §8, eq. 31),
evaluated on each task, next to task arithmetic.

1. A base posterior :math:`q_0=(m_0,p_0)`: IVON on ``base_size`` Fashion-MNIST images of all classes.
2. One finetuned posterior per task :math:`q_t=(m_t,p_t)`: :class:`~vbpc.ContinualIVON` from
   :math:`m_0` with :math:`q_0` as prior, on that task only (split: two-class tasks with the head
   masked to the task's classes; permuted: a pixel permutation per task), so
   :math:`p_t=p_0+\lambda_t h_t`.
3. Merges of the :math:`T` posteriors with the prior counted once: ``precision`` (eq. 31),
   ``hessian`` (:math:`p_0\to0`), ``average`` (task arithmetic with :math:`1/T`, the equal-isotropic
   case) and task arithmetic with scale 1 (:func:`vbpc.posterior.task_arithmetic`).

Every model is scored at its mean weights on every task's test set (the head masked to the
task's classes).  Writes ``results.md``/``results.json`` (mean ± std over seeds), ``metrics.jsonl`` and
``merging.png``.

``vbpc merge BASE CK1 CK2 ...`` (:func:`merge_checkpoints`) merges saved posteriors the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError, MergeConfig, to_dict
from ..data import seed_everything
from ..inference.registry import get_learner
from ..io import atomic_write_text, run_lock
from ..models import build_model
from ..posterior.merging import merge_posteriors, task_arithmetic
from ..reporting import JsonlLog, markdown_table, pm, save_figure, subplots, write_json
from .continual import Task, evaluate_tasks, frozen_posterior, make_tasks, preflight, prepare_out, task_loss

__all__ = ["run_merging", "merge_checkpoints", "MERGES"]

MERGES = ("precision", "hessian", "average", "task-arithmetic")


def _fit(model: nn.Module, opt: Any, task: Task, epochs: int, bs: int, g: torch.Generator, desc: str,
         progress: bool) -> None:
    x, y = task.x, task.y
    steps = epochs * math.ceil(len(y) / bs)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]

            def closure(idx: torch.Tensor = idx) -> torch.Tensor:
                opt.zero_grad()
                loss = task_loss(model, x[idx], y[idx], task.cols)
                loss.backward()
                return loss
            opt.step(closure)
            bar.update(1)
    bar.close()


@torch.no_grad()
def _load_mean(model: nn.Module, mean: dict[str, torch.Tensor]) -> nn.Module:
    params = dict(model.named_parameters())
    for n, m in mean.items():
        params[n].copy_(m)
    return model


def _one_seed(cfg: MergeConfig, seed: int, tasks: list[Task]) -> dict[str, list[float]]:
    tc, lc = cfg.tasks, cfg.learner
    kw = dict(lc.kwargs)
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    base_task = make_tasks("permuted", 1, root=tc.root, train_size=cfg.base_size, seed=seed)[0]
    named = list(model.named_parameters())
    opt = get_learner("ivon").build(named, lr=lc.lr, ess=float(len(base_task)), weight_decay=lc.weight_decay,
                                    model=model, **kw)
    _fit(model, opt, base_task, cfg.base_epochs, tc.batch_size, g, f"base s{seed}", cfg.progress)
    base = frozen_posterior(opt.posterior(model))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = []
    accs: dict[str, list[float]] = {"base": evaluate_tasks(model, tasks, None, 0, seed)["acc"]}
    individual = []
    for t, task in enumerate(tasks):
        model.load_state_dict(base_state)
        ft = get_learner("continual-ivon").build(list(model.named_parameters()), lr=lc.lr, ess=float(len(task)),
                                                 prior=base, model=model, weight_decay=lc.weight_decay, **kw)
        _fit(model, ft, task, tc.epochs, tc.batch_size, g, f"task {t + 1} s{seed}", cfg.progress)
        tuned.append(frozen_posterior(ft.posterior(model)))
        individual.append(evaluate_tasks(model, [task], None, 0, seed)["acc"][0])
    accs["individual"] = individual
    for how in ("precision", "hessian", "average"):
        merged = merge_posteriors(base, tuned, weights=how)
        model.load_state_dict(base_state)
        accs[how] = evaluate_tasks(_load_mean(model, merged.mean), tasks, None, 0, seed)["acc"]
    model.load_state_dict(base_state)
    ta = task_arithmetic(base.mean, [q.mean for q in tuned], scale=1.0)
    accs["task-arithmetic"] = evaluate_tasks(_load_mean(model, ta), tasks, None, 0, seed)["acc"]
    return accs


#: the files a merging run writes
RESULT_FILES = ("metrics.jsonl", "results.json", "results.md", "merging.png")


def run_merging(cfg: MergeConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Base, per-task finetunes and their merges for every seed; table of per-task accuracies.

    The whole config is checked before ``out`` is touched; ``out`` is locked for the run, and
    earlier results there are replaced only with ``overwrite``."""
    if not cfg.seeds:
        raise ConfigError("seeds: at least one seed")
    preflight(cfg, continual=False)
    out = Path(cfg.out)
    with run_lock(out, "vbpc merge-eval"):
        prepare_out(out, overwrite, RESULT_FILES)
        return _run_merging(cfg, out)


def _run_merging(cfg: MergeConfig, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = []
    names: list[str] = []
    with JsonlLog(out / "metrics.jsonl") as log:
        for seed in cfg.seeds:
            tc = cfg.tasks
            tasks = make_tasks(tc.scenario, tc.n_tasks, root=tc.root, train_size=tc.train_size,
                               test_size=tc.test_size, seed=seed)
            names = [t.name for t in tasks]
            accs = _one_seed(cfg, seed, tasks)
            for method, a in accs.items():
                row = {"seed": seed, "method": method, "acc": a, "mean": sum(a) / len(a)}
                rows.append(row)
                log.write(row)
    table = _table(rows, names, cfg)
    atomic_write_text(out / "results.md", table)
    write_json(out / "results.json", {"config": to_dict(cfg), "rows": rows})
    _plot(rows, names, out / "merging.png")
    return {"out": str(out), "table": table, "rows": rows, "seconds": time.perf_counter() - t0}


def _plot(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    """Grouped bars: mean accuracy over seeds per task and model."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = subplots(figsize=(1.6 * (len(names) + 1) + 2, 3.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        sel = [r for r in rows if r["method"] == m]
        vals = [sum(r["acc"][j] for r in sel) / len(sel) for j in range(len(names))]
        vals.append(sum(r["mean"] for r in sel) / len(sel))
        ax.bar([j + i * width for j in range(len(names) + 1)], vals, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names) + 1)], [*names, "mean"])
    ax.set_ylabel("test accuracy (mean weights)")
    ax.set_xlabel("task")
    ax.set_title("merged posteriors on every task (mean over seeds)")
    ax.legend(fontsize=7, ncol=3)
    save_figure(fig, path)


def _table(rows: list[dict[str, Any]], names: list[str], cfg: MergeConfig) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = ["model"] + [f"task {n}" for n in names] + ["mean"]
    body = []
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        body.append([m] + [pm([r["acc"][j] for r in sel], 3) for j in range(len(names))]
                    + [pm([r["mean"] for r in sel], 3)])
    return markdown_table(head, body, f"Merging {len(names)} finetuned posteriors ({cfg.tasks.scenario} Fashion-MNIST, "
                          f"{len(cfg.seeds)} seed(s), accuracy at the mean weights, mean ± std; 'individual': each "
                          "finetune on its own task)")


def merge_checkpoints(base: Union[str, Path], finetuned: Sequence[Union[str, Path]], out: Union[str, Path],
                      weights: str = "precision") -> dict[str, Any]:
    """``vbpc merge``: merge the posteriors of ``finetuned`` checkpoints that share the base (prior)
    posterior of ``base`` (eq. 31, :func:`vbpc.posterior.merge_posteriors`), load the merged
    mean into the base model and save model + merged posterior to ``out``."""
    from .. import checkpoint

    ck_base = checkpoint.load(base)
    if ck_base.posterior is None:
        raise ValueError(f"{base} holds no posterior (the common prior of the tasks)")
    tuned = []
    for path in finetuned:
        ck = checkpoint.load(path, None if ck_base.spec is not None else ck_base.model)
        if ck.posterior is None:
            raise ValueError(f"{path} holds no posterior")
        tuned.append(ck.posterior)
    merged = merge_posteriors(ck_base.posterior, tuned, weights=weights)  # type: ignore[arg-type]
    model: Optional[nn.Module] = ck_base.model
    assert model is not None
    _load_mean(model, merged.mean)
    checkpoint.save(out, model, merged.bind(model), spec=ck_base.spec,
                    extra={"merged_from": [str(base), *map(str, finetuned)], "weights": weights})
    return {"out": str(out), "merged": len(tuned), "numel": merged.numel(), "weights": weights}
