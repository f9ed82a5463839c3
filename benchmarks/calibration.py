"""Calibration benchmark: LeNet-5 on real Fashion-MNIST, six methods x seeds, with the sklearn
digits (upsampled to 28 x 28) as the out-of-distribution set.

Methods, each trained for the same epochs and batches (cosine LR where the method has one):
SGD (momentum 0.9), AdamW, vbpc IVON, vbpc IVON-PoCo (α = 0.75, anchor = one epoch, mega-batch
32 batches), Pyro Bayes-by-backprop and MC dropout (p = 0.25 before each hidden dense layer).
Metrics (ALGORITHMS.md §9): accuracy, NLL, ECE (15 bins), Brier and OOD AUROC (max probability,
in-domain positive), by BMA over ``--samples`` posterior or dropout samples for the Bayesian
methods and at the weights for SGD/AdamW; mean ± std over seeds.

Run:  python benchmarks/calibration.py [--quick] [--seeds 0 1 2] [--epochs 2]
Writes benchmarks/results/calibration.{json,md} and calibration.png (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import load_digits_ood, load_fashion_mnist, make_loader, seed_everything
from vbpc.inference.svi import BayesByBackprop
from vbpc.io import atomic_write_text
from vbpc.metrics import accuracy, brier, ece, nll, ood_metrics
from vbpc.models import LeNet5

METHODS = ("sgd", "adamw", "ivon", "ivon-poco", "bbb", "mc-dropout")
LR = {"sgd": 0.05, "adamw": 4e-3, "ivon": 0.5, "ivon-poco": 0.5, "bbb": 3e-3, "mc-dropout": 4e-3}


@torch.no_grad()
def _probs(model, x: torch.Tensor, post, samples: int, mc_dropout: bool, seed: int) -> torch.Tensor:
    if mc_dropout:
        model.train()  # dropout on at test time
        torch.manual_seed(seed)
        p = torch.stack([F.softmax(model(x), -1) for _ in range(samples)]).mean(0)
        model.eval()
        return p
    model.eval()
    if post is None:
        return F.softmax(model(x), -1)
    g = torch.Generator().manual_seed(seed)
    acc = torch.zeros(len(x), 10)
    for _ in range(samples):
        with post.sampled(model, generator=g):
            acc += F.softmax(model(x), -1)
    return acc / samples


def run_one(method: str, seed: int, args, train, test, ood) -> dict:
    seed_everything(seed)
    model = LeNet5(dropout=0.25 if method == "mc-dropout" else 0.0)
    n = len(train)
    loaders = [make_loader(train, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed + e))
               for e in range(args.epochs)]
    steps = args.epochs * len(loaders[0])
    t0 = time.perf_counter()
    post = None
    if method == "bbb":
        bbb = BayesByBackprop(model, ess=n, weight_decay=args.weight_decay, lr=LR[method])
        for loader in loaders:
            bbb.fit(loader, epochs=1, progress=False)
        bbb.copy_to(model)
        post = bbb.posterior()
    else:
        if method == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=LR[method], momentum=0.9, weight_decay=args.weight_decay)
        elif method in ("adamw", "mc-dropout"):
            opt = torch.optim.AdamW(model.parameters(), lr=LR[method], weight_decay=args.weight_decay)
        elif method == "ivon":
            opt = vbpc.IVON(model.parameters(), lr=LR[method], ess=n, hess_init=0.5, beta2=0.999,
                            weight_decay=args.weight_decay)
        else:
            opt = vbpc.IVONPoCo(model.parameters(), lr=LR[method], ess=n, hess_init=0.5, beta2=0.999, beta1=0.9,
                                weight_decay=args.weight_decay, alpha=0.75, alpha_schedule="linear",
                                total_steps=steps, anchor_period=len(loaders[0]),
                                megabatch_size=32 * args.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
        model.train()
        for loader in loaders:
            for x, y in loader:
                if getattr(opt, "refresh_due", False):
                    opt.refresh(loss_fn, make_loader(train, args.batch_size, shuffle=True,
                                                     generator=torch.Generator().manual_seed(10_000 + opt.t)),
                                progress=False)

                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
                sched.step()
        if method in ("ivon", "ivon-poco"):
            post = opt.posterior(model)
    secs = time.perf_counter() - t0
    (xt, yt), (xo,) = test.tensors, ood.tensors[:1]
    bayes = method in ("ivon", "ivon-poco", "bbb", "mc-dropout")
    s = args.samples if bayes else 0
    p_in = _probs(model, xt, post, s, method == "mc-dropout", seed)
    p_out = _probs(model, xo, post, s, method == "mc-dropout", seed + 1)
    return {"method": method, "seed": seed, "train_seconds": secs, "accuracy": accuracy(p_in, yt),
            "nll": nll(p_in, yt), "ece": ece(p_in, yt), "brier": brier(p_in, yt),
            "ood_auroc": ood_metrics(p_in, p_out)["auroc"], "samples": s}


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(rows: list[dict], seeds: list[int], args) -> str:
    keys = ("accuracy", "nll", "ece", "brier", "ood_auroc")
    lines = [f"LeNet-5, Fashion-MNIST ({args.train_size or 60000} train / {args.test_size or 10000} test), "
             f"{args.epochs} epoch(s), seeds {seeds}, mean ± std; BMA over {args.samples} samples for the "
             "Bayesian methods; OOD: sklearn digits", "",
             "| method | accuracy | NLL | ECE | Brier | OOD AUROC | train s |", "|---|---|---|---|---|---|---:|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == m]
        cells = [("{:.4f} ± {:.4f}".format(*_ms([r[k] for r in sel]))) for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {statistics.mean(r['train_seconds'] for r in sel):.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vbpc.evaluation.plots import save_figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("nll", "ece", "ood_auroc"), ("test NLL", "ECE", "OOD AUROC (digits)")):
        stats = [_ms([r[key] for r in rows if r["method"] == m]) for m in methods]
        colors = [f"C{i}" for i in range(len(methods))]
        bars = ax.bar(methods, [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3, color=colors)
        ax.set_ylabel(label)
        ax.set_xlabel("method")
        ax.tick_params(axis="x", rotation=40)
    axes[1].legend(bars, methods, fontsize=7, loc="upper left")
    fig.suptitle("LeNet-5 on Fashion-MNIST: mean ± std over seeds (error bars: std)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images, 1 epoch, 1 seed, 2 methods: CI size")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--out", default="benchmarks/results/calibration")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.seeds, args.samples = 2000, 500, 1, [0], 2
        if args.methods == list(METHODS):
            args.methods = ["adamw", "ivon-poco", "mc-dropout"]
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    if args.train_size:
        train = torch.utils.data.TensorDataset(*(t[: args.train_size] for t in train.tensors))
    if args.test_size:
        test = torch.utils.data.TensorDataset(*(t[: args.test_size] for t in test.tensors))
    ood = load_digits_ood()
    rows = []
    for seed in args.seeds:
        for m in args.methods:
            r = run_one(m, seed, args, train, test, ood)
            rows.append(r)
            print(f"{m:>10} seed {seed}: acc {r['accuracy']:.4f} NLL {r['nll']:.4f} ECE {r['ece']:.4f} "
                  f"Brier {r['brier']:.4f} AUROC {r['ood_auroc']:.4f} ({r['train_seconds']:.0f} s)", flush=True)
    md = table(rows, args.seeds, args)
    print(md, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"args": vars(args), "rows": rows}, indent=1))
    atomic_write_text(out.with_suffix(".md"), md)
    plot(rows, out.with_suffix(".png"))
    assert all(math.isfinite(r["nll"]) for r in rows)
    return {"rows": rows, "table": md}


if __name__ == "__main__":
    main()
