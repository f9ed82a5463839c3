"""``vbpc cnn``: a CNN on real Fashion-MNIST trained three ways: IVON, AdamW and Pyro Bayes-by-backprop.

All three train the same architecture (``model: lenet``, default, or ``resnet20`` with
FilterResponseNorm) for the same number of epochs and batches, in one process; the test set is
scored at the mean weights and, for the two Bayesian methods, by Bayesian model averaging over
``test_samples`` posterior samples (docs/algorithms.md eq. 33)::

    vbpc cnn                                  # LeNet-5, 2 epochs each, a few minutes on 2 cores
    vbpc cnn --set 'methods=[ivon, adamw]' --set epochs=5
    vbpc cnn --set test_samples=32 --set report=results/uncertainty   # + digits OOD report

The options are a :class:`CnnConfig` (a YAML file and ``--set key=value``, :mod:`vbpc.config`).
Needs ``apt-get install dataset-fashion-mnist`` (or ``root``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import each, existing_dir, nonneg, one_of, path, positive, seed, setting, unit
from ..data import load_fashion_mnist
from ..data.loading import seed_everything
from ..inference.registry import get_learner
from ..models import LeNet5, ResNet20
from ..training import evaluate, make_loader, train_epoch

__all__ = ["CnnConfig", "METHODS", "build", "run_cnn"]

METHODS = ("ivon", "adamw", "bbb")


@dataclass
class CnnConfig:
    """``vbpc cnn``: one CNN trained by each method on Fashion-MNIST."""

    model: str = setting("lenet", check=one_of("lenet", "resnet20"))
    methods: list[str] = setting(default_factory=lambda: list(METHODS), check=each(one_of(*METHODS)))
    epochs: int = setting(2, check=positive)
    batch_size: int = setting(128, check=positive)
    train_size: Optional[int] = setting(None, check=positive, help="the first N training images (None: all)")
    ivon_lr: float = setting(0.5, check=positive)
    hess_init: float = setting(0.5, check=positive)
    beta2: float = setting(0.999, check=unit, help="0.99999 for long runs")
    adamw_lr: float = setting(4e-3, check=positive)
    bbb_lr: float = setting(3e-3, check=positive)
    weight_decay: float = setting(1e-4, check=nonneg, help="δ (IVON, BBB prior) and AdamW's decay")
    test_samples: int = setting(16, check=nonneg, help="posterior samples of the BMA (0: mean weights)")
    report: Optional[str] = setting(None, check=path, help="write every method's uncertainty report here")
    ood: str = setting("digits", help="OOD dataset of the report (vbpc.data.load_dataset name)")
    n_boot: int = setting(1000, check=positive, help="bootstrap resamples of the report's intervals")
    save_dir: Optional[str] = setting(None, check=path, help="save each method's model + posterior here")
    root: Optional[str] = setting(None, check=existing_dir, help="directory with the Fashion-MNIST IDX files")
    seed: int = setting(0, check=seed)
    threads: Optional[int] = setting(None, check=positive, help="torch CPU threads (None: torch's)")
    progress: bool = setting(True, help="tqdm progress bars")


def build(name: str) -> nn.Module:
    """The network; checkpoints record it as ``{"name": name, "kwargs": {"in_channels": 1}}``
    (:func:`vbpc.models.build_model` rebuilds it: the defaults are FRN and 10 classes)."""
    return LeNet5(num_classes=10, in_channels=1) if name == "lenet" else ResNet20(in_channels=1, norm="frn")


def run_cnn(cfg: CnnConfig) -> dict[str, dict[str, Any]]:
    """Train and score every method; prints the comparison table; returns per-method metrics."""
    methods = list(dict.fromkeys(cfg.methods))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = load_fashion_mnist("train", root=cfg.root)
    test = load_fashion_mnist("test", root=cfg.root)
    if cfg.train_size:
        train = torch.utils.data.TensorDataset(*(t[: cfg.train_size] for t in train.tensors))
    n = len(train)
    test_loader = make_loader(test, 1000)
    print(f"data: {n} train / {len(test)} test Fashion-MNIST images; model {cfg.model}; device {device}")
    results: dict[str, dict[str, Any]] = {}
    reports = []
    for method in methods:
        seed_everything(cfg.seed)
        model = build(cfg.model).to(device)
        loaders = [make_loader(train, cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(
            cfg.seed + e), device=device) for e in range(cfg.epochs)]
        t0 = time.perf_counter()
        post = _fit(method, cfg, model, loaders, n)
        secs = time.perf_counter() - t0
        res: dict[str, Any] = {f"mean_{k}": v for k, v in evaluate(model, test_loader).items()}
        if post is not None and cfg.test_samples > 0:
            res.update({f"bma_{k}": v for k, v in evaluate(model, test_loader, posterior=post,
                                                            n_samples=cfg.test_samples).items()})
        res["train_seconds"] = secs
        results[method] = res
        if cfg.save_dir:
            from .. import checkpoint

            checkpoint.save(Path(cfg.save_dir) / f"{cfg.model}-{method}.safetensors", model, post,
                            spec={"name": cfg.model, "kwargs": {"in_channels": 1}}, extra={"method": method, **res})
        if cfg.report:
            from ..data import load_dataset
            from ..evaluation import evaluate_uncertainty

            ood = make_loader(load_dataset(cfg.ood, cfg.root), 1000, device=device)
            reports.append(evaluate_uncertainty(model, test_loader, post, cfg.test_samples, ood_data=ood,
                                                label=method, n_boot=cfg.n_boot, seed=cfg.seed,
                                                progress=cfg.progress))
    print(f"\n{'method':<8}{'train s':>9}{'acc (mean)':>12}{'NLL (mean)':>12}"
          f"{'acc (BMA)':>11}{'NLL (BMA)':>11}")
    for method, r in results.items():
        bma = (f"{r['bma_accuracy']:>11.4f}{r['bma_nll']:>11.4f}" if "bma_accuracy" in r else f"{'-':>11}{'-':>11}")
        print(f"{method:<8}{r['train_seconds']:>9.0f}{r['mean_accuracy']:>12.4f}{r['mean_nll']:>12.4f}{bma}")
    if reports:
        from ..evaluation import markdown_table, write_report

        paths = write_report(reports, str(cfg.report))
        print(f"\nuncertainty report (S = {cfg.test_samples} for the Bayesian methods, OOD = {cfg.ood}, "
              f"95% bootstrap intervals):\n" + markdown_table(reports) + "wrote " + ", ".join(map(str, paths.values())))
        for rep in reports:
            results[rep.label]["report"] = rep.metrics
    return results


def _fit(method: str, cfg: CnnConfig, model: nn.Module, loaders: list, n: int) -> Any:
    """Train ``model`` with ``method``; returns its posterior (None for AdamW)."""
    if method == "bbb":
        from .. import BayesByBackprop

        bbb = BayesByBackprop(model, ess=n, weight_decay=cfg.weight_decay, lr=cfg.bbb_lr)
        for loader in loaders:
            bbb.fit(loader, epochs=1, progress=cfg.progress)
        bbb.copy_to(model)
        return bbb.posterior()
    if method == "ivon":
        opt = get_learner("ivon").build(model.parameters(), lr=cfg.ivon_lr, ess=n, hess_init=cfg.hess_init,
                                        weight_decay=cfg.weight_decay, beta2=cfg.beta2)
    else:
        opt = get_learner("adamw").build(model.parameters(), lr=cfg.adamw_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(loaders[0]))
    for e, loader in enumerate(loaders):
        train_epoch(model, opt, loader, F.cross_entropy, progress=cfg.progress,
                    desc=f"{method} epoch {e + 1}/{cfg.epochs}", scheduler=sched)
    return opt.posterior(model) if method == "ivon" else None
