"""Recipe: a CNN on real Fashion-MNIST trained three ways: vbpc.IVON, AdamW and Pyro Bayes-by-backprop.

All three train the same architecture (``--model lenet``, default, or ``resnet20`` with
FilterResponseNorm) for the same number of epochs and batches, in one process; the test set is
scored at the mean weights and, for the two Bayesian methods, by Bayesian model averaging over
``--test-samples`` posterior samples (docs/algorithms.md eq. 33)::

    vbpc cnn                                  # LeNet-5, 2 epochs each, a few minutes on 2 cores
    python examples/fmnist_cnn.py --methods ivon,adamw --epochs 5
    vbpc cnn --methods adamw,ivon --test-samples 32 --report results/uncertainty   # + digits OOD report

Needs ``apt-get install dataset-fashion-mnist`` (or ``--root``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.data.loading import seed_everything
from vbpc.inference.svi import BayesByBackprop
from vbpc.models import LeNet5, ResNet20
from vbpc.training import evaluate, make_loader, train_epoch
from vbpc.recipes._cli import add_common_arguments, parse_recipe_args

METHODS = ("ivon", "adamw", "bbb")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", choices=["lenet", "resnet20"], default="lenet")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images (default all)")
    p.add_argument("--ivon-lr", type=float, default=0.5)
    p.add_argument("--hess-init", type=float, default=0.5)
    p.add_argument("--beta2", type=float, default=0.999, help="0.99999 for long runs")
    p.add_argument("--adamw-lr", type=float, default=4e-3)
    p.add_argument("--bbb-lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="δ (IVON, BBB prior) and AdamW's decay")
    p.add_argument("--test-samples", type=int, default=16)
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write the uncertainty report (vbpc.evaluation: JSON, table, plots) of every method here")
    p.add_argument("--ood", default="digits", help="OOD dataset of the report (vbpc.data.load_dataset name)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the report's intervals")
    p.add_argument("--save-dir", default=None, help="save each method's model + posterior checkpoint here")
    p.add_argument("--root", default=None, help="directory with the Fashion-MNIST IDX files")
    return add_common_arguments(p)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_recipe_args(__doc__, add_arguments, argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, float]]:
    return run(parse_args(argv))


def build(name: str) -> nn.Module:
    """The network; checkpoints record it as ``{"name": name, "kwargs": {"in_channels": 1}}``
    (:func:`vbpc.models.build_model` rebuilds it: the defaults are FRN and 10 classes)."""
    return LeNet5(num_classes=10, in_channels=1) if name == "lenet" else ResNet20(in_channels=1, norm="frn")


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad}; choose from {METHODS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = load_fashion_mnist("train", root=args.root)
    test = load_fashion_mnist("test", root=args.root)
    if args.train_size:
        train = torch.utils.data.TensorDataset(*(t[: args.train_size] for t in train.tensors))
    n = len(train)
    test_loader = make_loader(test, 1000)
    print(f"data: {n} train / {len(test)} test Fashion-MNIST images; model {args.model}; device {device}")
    results: dict[str, dict[str, float]] = {}
    reports = []
    for method in methods:
        seed_everything(args.seed)
        model = build(args.model).to(device)
        loaders = [make_loader(train, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(
            args.seed + e), device=device) for e in range(args.epochs)]
        t0 = time.perf_counter()
        post = None
        if method == "bbb":
            bbb = BayesByBackprop(model, ess=n, weight_decay=args.weight_decay, lr=args.bbb_lr)
            for loader in loaders:
                bbb.fit(loader, epochs=1, progress=not args.no_progress)
            bbb.copy_to(model)
            post = bbb.posterior()
        else:
            if method == "ivon":
                opt: torch.optim.Optimizer = vbpc.IVON(model.parameters(), lr=args.ivon_lr, ess=n,
                                                       hess_init=args.hess_init, weight_decay=args.weight_decay,
                                                       beta2=args.beta2)
            else:
                opt = torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, weight_decay=args.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loaders[0]))
            for e, loader in enumerate(loaders):
                train_epoch(model, opt, loader, F.cross_entropy, progress=not args.no_progress,
                            desc=f"{method} epoch {e + 1}/{args.epochs}", scheduler=sched)
            if method == "ivon":
                post = opt.posterior(model)  # type: ignore[attr-defined]
        secs = time.perf_counter() - t0
        res = {f"mean_{k}": v for k, v in evaluate(model, test_loader).items()}
        if post is not None and args.test_samples > 0:
            res.update({f"bma_{k}": v for k, v in evaluate(model, test_loader, posterior=post,
                                                            n_samples=args.test_samples).items()})
        res["train_seconds"] = secs
        results[method] = res
        if args.save_dir:
            from vbpc import checkpoint

            checkpoint.save(Path(args.save_dir) / f"{args.model}-{method}.safetensors", model, post,
                            spec={"name": args.model, "kwargs": {"in_channels": 1}}, extra={"method": method, **res})
        if args.report:
            from vbpc.data import load_dataset
            from vbpc.evaluation import evaluate_uncertainty

            ood = make_loader(load_dataset(args.ood, args.root), 1000, device=device)
            reports.append(evaluate_uncertainty(model, test_loader, post, args.test_samples, ood_data=ood,
                                                label=method, n_boot=args.n_boot, seed=args.seed,
                                                progress=not args.no_progress))
    print(f"\n{'method':<8}{'train s':>9}{'acc (mean)':>12}{'NLL (mean)':>12}"
          f"{'acc (BMA)':>11}{'NLL (BMA)':>11}")
    for method, r in results.items():
        bma = (f"{r['bma_accuracy']:>11.4f}{r['bma_nll']:>11.4f}" if "bma_accuracy" in r else f"{'-':>11}{'-':>11}")
        print(f"{method:<8}{r['train_seconds']:>9.0f}{r['mean_accuracy']:>12.4f}{r['mean_nll']:>12.4f}{bma}")
    if reports:
        from vbpc.evaluation import markdown_table, write_report

        paths = write_report(reports, args.report)
        print(f"\nuncertainty report (S = {args.test_samples} for the Bayesian methods, OOD = {args.ood}, "
              f"95% bootstrap intervals):\n" + markdown_table(reports) + "wrote " + ", ".join(map(str, paths.values())))
        for rep in reports:
            results[rep.label]["report"] = rep.metrics  # type: ignore[assignment]
    return results
