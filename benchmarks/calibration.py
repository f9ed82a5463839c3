"""Uncertainty against the field: LeNet-5 on real Fashion-MNIST, ten methods, five paired seeds,
every choice made on a validation split, evaluated in distribution, under dataset shift and
out of distribution.

Protocol (the README's "Uncertainty against the field" section reads the results):

* **Data.**  5,000 of the 60,000 training images (a fixed permutation, ``--split-seed``) are the
  validation split; the networks train on the other 55,000.  Test: the 10,000 test images.
  Shift: the first ``--shift-size`` test images under :mod:`vbpc.data.shift`'s four corruption
  families (rotation 0–180° in 8 steps, Gaussian noise, contrast and blur at 5 levels each).  OOD:
  the sklearn digits (28×28, real), plus inverted Fashion-MNIST and uniform noise, labelled
  *synthetic*.
* **Methods.**  Trained: AdamW, SGD (momentum 0.9), MC dropout (AdamW, p 0.25), vbpc IVON,
  vbpc IVON-PoCo (α 0.75 linear, one anchor per epoch, a 32-batch mega-batch, the corrected
  gradient clipped at norm 1 as in the LM study: unclipped, it diverged at lr 0.4 here) and Pyro
  Bayes-by-backprop.  Post hoc on each AdamW network: temperature scaling (T fitted on the
  validation split) and laplace-torch's last-layer KFAC Laplace (prior precision by the marginal
  likelihood on the training split, probit predictive).  Ensembles of the five seeds' networks:
  a deep ensemble (5 AdamW) and MultiIVON (5 IVON posteriors, each averaged over its samples).
* **Selection.**  Each trained method gets the same budget: ``len(grid)`` learning rates, each
  trained on seed 0 at the full epoch budget and scored by the validation NLL of its predictive;
  the winner's seed-0 run is reused and seeds 1..4 are trained with it.  The grids, every grid
  point's validation scores, the fitted temperatures and prior precisions are in the json.
* **Pairing.**  Seed s gives every method the same initial weights and the same data order.
  Single-network methods: mean ± std over seeds and the paired difference to AdamW with a 95%
  t-interval.  Ensembles (one per study): 95% bootstrap intervals over test examples, of the
  metric and of its difference to the seeds' mean AdamW metric on the same resample.
* **Metrics** (vbpc's; ``docs/evaluation.md``): accuracy, NLL, ECE (15 bins), Brier; each ECE is
  cross-checked against torchmetrics on the same predictions, and the run fails on a disagreement
  above 1e-5.  OOD AUROC (in-domain positive) by max probability, entropy and mutual information
  (the sample or member disagreement; only where a method has several predictives).
* **Cost.**  Training gradient evaluations (per-example gradients, refreshes and anchor passes
  included) and wall time, each ÷ AdamW's; forward passes and measured milliseconds per test
  example at prediction.
* **Scale check** (``--resnet``): ResNet-20 (FRN), one seed: AdamW, IVON, AdamW + temperature and
  AdamW + last-layer Laplace, selected the same way on two learning rates.

Runs are cached under ``--cache`` (a finished job is never rerun; delete the folder to start
over).  ``--workers N`` runs N single-threaded worker processes.

Run:  python -m benchmarks run calibration [--quick]
Writes <out>.json, <out>.md, <out>.png and <out>_shift_{accuracy,nll,ece,entropy}.png (atomically).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import vbpc
from vbpc.data import load_digits_ood, load_fashion_mnist, make_loader, seed_everything
from vbpc.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from vbpc.evaluation.shift import evaluate_shift, mean_over_shift, plot_shift
from vbpc.io import atomic_write_text
from vbpc.metrics import accuracy, bootstrap_classification, brier, nll, ood_metrics
from vbpc.metrics.classification import bin_index, example_stats
from vbpc.models import LeNet5, ResNet20
from vbpc.predictive import predict_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import ece_cross_check, fit_temperature, laplace_last_layer  # noqa: E402
from lm import _ci, _ms, paired  # noqa: E402

#: trained methods and their learning-rate grids (the same number of points for each)
GRIDS: dict[str, list[float]] = {
    "adamw": [1e-3, 2e-3, 4e-3],
    "sgd": [0.02, 0.05, 0.1],
    "mc-dropout": [1e-3, 2e-3, 4e-3],
    "ivon": [0.1, 0.2, 0.4],
    "ivon-poco": [0.1, 0.2, 0.4],
    "bbb": [1e-3, 3e-3, 1e-2],
}
RESNET_GRIDS: dict[str, list[float]] = {"adamw": [1e-3, 3e-3], "ivon": [0.1, 0.3]}
#: every row of the study, in table order: (name, what it is)
METHODS: dict[str, str] = {
    "adamw": "AdamW (MAP)",
    "sgd": "SGD, momentum 0.9 (MAP)",
    "adamw+temp": "AdamW + temperature scaling (T on validation)",
    "laplace-ll": "AdamW + last-layer KFAC Laplace (laplace-torch, marglik prior, probit)",
    "deep-ensemble": "5 AdamW networks (the five seeds)",
    "ivon": "vbpc IVON, BMA",
    "ivon-poco": "vbpc IVON-PoCo, BMA",
    "multi-ivon": "MultiIVON: 5 IVON posteriors (the five seeds), each BMA",
    "mc-dropout": "MC dropout p 0.25 (AdamW), BMA",
    "bbb": "Pyro Bayes-by-backprop (mean field), BMA",
}
POSTHOC = {"adamw": ("adamw+temp", "laplace-ll")}
ENSEMBLES = {"deep-ensemble": "adamw", "multi-ivon": "ivon"}
BAYES = {"ivon", "ivon-poco", "mc-dropout", "bbb"}
KEYS = ("accuracy", "nll", "ece", "brier")
OOD_SCORES = ("max_prob", "entropy", "mi")


# ----------------------------------------------------------------------------- data
def _normalize(x01: Tensor) -> Tensor:
    return (x01 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


@functools.lru_cache(maxsize=2)
def load_data(train_size: Optional[int], val_size: int, test_size: Optional[int], shift_size: int,
              synthetic_size: int, split_seed: int) -> dict[str, Any]:
    """The splits, normalised like :func:`load_fashion_mnist`; shift images stay in [0, 1]."""
    x, y = load_fashion_mnist("train").tensors
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_size:
        train_idx = train_idx[:train_size]
    xt, yt = load_fashion_mnist("test").tensors
    x01 = load_fashion_mnist("test", normalize=False).tensors[0]
    n_test = test_size or len(xt)
    digits = load_digits_ood().tensors[0]
    noise = torch.rand(synthetic_size, 1, 28, 28, generator=torch.Generator().manual_seed(split_seed + 1))
    return {"train": TensorDataset(x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
            "test": (xt[:n_test], yt[:n_test]), "shift": (x01[:shift_size], yt[:shift_size]),
            "ood": {"digits": digits[: max(synthetic_size, 300)] if test_size else digits,
                    "inverted FMNIST (synthetic)": _normalize(1.0 - x01[-synthetic_size:]),
                    "uniform noise (synthetic)": _normalize(noise)}}


def data_of(args: argparse.Namespace) -> dict[str, Any]:
    return load_data(args.train_size, args.val_size, args.test_size, args.shift_size, args.synthetic_size,
                     args.split_seed)


# ----------------------------------------------------------------------------- training
def make_model(arch: str, dropout: float = 0.0) -> nn.Module:
    if arch == "lenet5":
        return LeNet5(dropout=dropout)
    if arch == "resnet20":
        return ResNet20(in_channels=1, norm="frn")
    raise ValueError(f"unknown arch {arch!r}")


def train(arch: str, method: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one network; returns its weights, posterior (or None), cost and per-epoch validation curve."""
    data = data_of(args)
    train_set, (xv, yv) = data["train"], data["val"]
    epochs = args.epochs if arch == "lenet5" else args.resnet_epochs
    dev = torch.device(args.device)
    seed_everything(seed)
    model = make_model(arch, 0.25 if method == "mc-dropout" else 0.0).to(dev)
    n = len(train_set)
    loaders = [make_loader(train_set, args.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(1000 * seed + e)) for e in range(epochs)]
    steps = epochs * len(loaders[0])
    curve: list[dict[str, float]] = []
    examples = 0

    def record(epoch: int) -> None:
        with torch.no_grad():
            model.eval()
            p = torch.cat([F.softmax(model(xv[i:i + 1000].to(dev)), -1).cpu()
                           for i in range(0, len(xv), 1000)]).double()
            curve.append({"epoch": epoch, "val_acc_at_mean": accuracy(p, yv), "val_nll_at_mean": nll(p, yv)})
            model.train()

    t0 = time.perf_counter()
    post = None
    if method == "bbb":
        from vbpc.integrations.pyro import BayesByBackprop

        bbb = BayesByBackprop(model, ess=n, weight_decay=args.weight_decay, lr=lr)
        for e, loader in enumerate(loaders):
            bbb.fit(loader, epochs=1, progress=False)
            examples += n
            bbb.copy_to(model)
            record(e + 1)
        post = bbb.posterior()
        counters = {}
    else:
        if method == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
        elif method in ("adamw", "mc-dropout"):
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        elif method == "ivon":
            opt = vbpc.IVON(model.parameters(), lr=lr, ess=n, hess_init=args.hess_init, beta2=0.999,
                            weight_decay=args.weight_decay)
        elif method == "ivon-poco":
            opt = vbpc.IVONPoCo(model.parameters(), lr=lr, ess=n, hess_init=args.hess_init, beta2=0.999,
                                weight_decay=args.weight_decay, alpha=0.75, alpha_schedule="linear",
                                total_steps=steps, anchor_period=len(loaders[0]),
                                megabatch_size=32 * args.batch_size, clip_grad_norm=args.poco_clip or None)
        else:
            raise ValueError(f"unknown method {method!r}")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        model.train()

        def loss_fn(b: tuple[Tensor, Tensor]) -> Tensor:
            return F.cross_entropy(model(b[0].to(dev)), b[1].to(dev))
        for e, loader in enumerate(loaders):
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                if getattr(opt, "refresh_due", False):
                    opt.refresh(loss_fn, make_loader(train_set, args.batch_size, shuffle=True,
                                                     generator=torch.Generator().manual_seed(10_000 + opt.t)),
                                progress=False)

                def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                    nonlocal examples
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    examples += len(y)
                    return loss
                opt.step(closure)
                sched.step()
            record(e + 1)
        counters = dict(getattr(opt, "counters", {}))
        if method == "ivon-poco":  # the refresh's passes are not closure calls
            examples += int(counters.get("refresh_examples", 0))
        if method in ("ivon", "ivon-poco"):
            post = opt.posterior(model)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return {"arch": arch, "method": method, "lr": lr, "seed": seed, "state": state, "posterior": post,
            "train_seconds": time.perf_counter() - t0, "grad_examples": examples, "steps": steps,
            "epochs": epochs, "val_curve": curve, "counters": counters}


# ----------------------------------------------------------------------------- predictives
Predictor = Callable[[Tensor], Tensor]  # images (N, 1, 28, 28) -> probabilities (S, N, C), float64


def _batched(pred: Predictor, x: Tensor, chunk: int = 1000) -> Tensor:
    """``pred`` over ``x`` in chunks; the stack comes back on the CPU."""
    return torch.cat([pred(x[i:i + chunk]).cpu() for i in range(0, len(x), chunk)], 1)


def own_predictor(run: dict[str, Any], args: argparse.Namespace) -> tuple[Predictor, int]:
    """The trained method's own predictive and its forward passes per example: BMA over the posterior
    (IVON, IVON-PoCo, BBB), dropout samples (MC dropout) or the network at its weights."""
    method, seed, dev = run["method"], run["seed"], torch.device(args.device)
    model = load_model(run, args, dropout=0.25 if method == "mc-dropout" else 0.0)
    samples = args.samples if run["arch"] == "lenet5" else args.resnet_samples
    if method in ("ivon", "ivon-poco", "bbb"):
        post = run["posterior"]  # on the device it was trained on
        gen = torch.Generator(device=dev)

        @torch.no_grad()
        def bma(x: Tensor) -> Tensor:
            gen.manual_seed(seed)  # the same draws for every chunk
            _, stack = predict_batch(model, x.to(dev), post, samples, generator=gen, return_samples=True)
            return stack.double().exp()
        return bma, samples
    if method == "mc-dropout":
        @torch.no_grad()
        def dropout(x: Tensor) -> Tensor:
            torch.manual_seed(seed)
            model.train()  # dropout on; LeNet-5 has no normalisation layer
            try:
                return torch.stack([F.softmax(model(x.to(dev)), -1) for _ in range(samples)]).double()
            finally:
                model.eval()
        return dropout, samples

    @torch.no_grad()
    def at_weights(x: Tensor) -> Tensor:
        return F.softmax(model(x.to(dev)), -1).double()[None]
    return at_weights, 1


def load_model(run: dict[str, Any], args: argparse.Namespace, dropout: float = 0.0) -> nn.Module:
    """A trained network, on ``--device``, in eval mode."""
    model = make_model(run["arch"], dropout)
    model.load_state_dict(run["state"])
    return model.to(args.device).eval()


def predictors(run: dict[str, Any], args: argparse.Namespace) -> dict[str, tuple[Predictor, int, dict[str, Any]]]:
    """``{row name: (predictor, forward passes per example, extras)}`` for one trained network: the
    method itself, plus the post-hoc rows on an AdamW network."""
    method = run["method"]
    pred, passes = own_predictor(run, args)
    out: dict[str, tuple[Predictor, int, dict[str, Any]]] = {method: (pred, passes, {})}
    if method == "adamw":
        model, dev = load_model(run, args), torch.device(args.device)
        xv, yv = data_of(args)["val"]
        with torch.no_grad():
            logits_v = torch.cat([model(xv[i:i + 1000].to(dev)).cpu() for i in range(0, len(xv), 1000)])
        temp = fit_temperature(logits_v, yv)

        @torch.no_grad()
        def scaled(x: Tensor) -> Tensor:
            return F.softmax(model(x.to(dev)).double() / temp, -1)[None]
        out["adamw+temp"] = (scaled, 1, {"temperature": temp})
        t0 = time.perf_counter()
        la_predict, prior = laplace_last_layer(model, make_loader(data_of(args)["train"], 256, shuffle=False))

        def laplace(x: Tensor) -> Tensor:
            return la_predict(x.to(dev)).double()[None]
        out["laplace-ll"] = (laplace, 1, {"prior_precision": prior, "fit_seconds": time.perf_counter() - t0})
    return out


# ----------------------------------------------------------------------------- evaluation
def predictions(pred: Predictor, args: argparse.Namespace, shift: bool) -> dict[str, Any]:
    """The predictive (probabilities, and the per-sample stack where it has several) on every set."""
    data = data_of(args)
    xt = data["test"][0]
    t0 = time.perf_counter()
    st = _batched(pred, xt)
    ms = 1000 * (time.perf_counter() - t0) / len(xt)
    out: dict[str, Any] = {"test": st, "val": _batched(pred, data["val"][0]), "predict_ms_per_example": ms,
                           "ood": {k: _batched(pred, x) for k, x in data["ood"].items()}}
    if shift:
        calls: list[Tensor] = []

        def record(x01: Tensor) -> Tensor:
            p = _batched(pred, _normalize(x01)).mean(0)
            calls.append(p.float())
            return p
        x01, ys = data["shift"]
        evaluate_shift(record, x01, ys, seed=args.split_seed, batch_size=len(x01))
        out["shift"] = calls
    return out


def _mean(stack: Tensor) -> Tensor:
    p = stack.double().mean(0)
    return p / p.sum(-1, keepdim=True)


def score(preds: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """vbpc's metrics of one method's predictions (``preds["test"]`` etc. are stacks ``(S, N, C)``); the
    ECE is cross-checked against torchmetrics (an exception on disagreement)."""
    data = data_of(args)
    m: dict[str, Any] = {}
    for split in ("test", "val"):
        p, y = _mean(preds[split]), data[split][1]
        e = ece_cross_check(p, y, tol=1e-5)
        vals = {"accuracy": accuracy(p, y), "nll": nll(p, y), "ece": e, "brier": brier(p, y)}
        m.update(vals if split == "test" else {f"val_{k}": v for k, v in vals.items()})
    st_in = preds["test"].double()
    p_in = _mean(st_in)
    m["ood"] = {}
    for name, st_out in preds["ood"].items():
        p_out = _mean(st_out)
        row = {}
        for s in OOD_SCORES:
            if s == "mi" and st_in.shape[0] < 2:
                continue
            kw = {"sample_stack_in": st_in, "sample_stack_out": st_out.double()} if s == "mi" else {}
            row[s] = ood_metrics(p_in, p_out, score=s, **kw)["auroc"]
        m["ood"][name] = row
    if "shift" in preds:
        calls = iter(preds["shift"])
        x01, ys = data["shift"]
        m["shift"] = evaluate_shift(lambda x: next(calls).double(), x01, ys, seed=args.split_seed,
                                    batch_size=len(x01))
        m["mean_shift_ece"] = mean_over_shift(m["shift"], "ece")
        m["mean_shift_accuracy"] = mean_over_shift(m["shift"], "accuracy")
    m["predict_ms_per_example"] = preds.get("predict_ms_per_example", float("nan"))
    return m


# ----------------------------------------------------------------------------- jobs (run in workers)
#: settings that change a cached run (everything but where results go and how many processes run them)
_NOT_RUN_SETTINGS = ("workers", "cache", "out", "n_boot", "quick", "resnet", "lenet", "max_widen", "plateau_epochs")


def _cache(args: argparse.Namespace) -> Path:
    return Path(args.cache)


def open_cache(args: argparse.Namespace) -> None:
    """Create the run cache, or refuse one written under other settings (its runs would be reused silently)."""
    p = _cache(args)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_RUN_SETTINGS}
    f = p / "settings.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SystemExit(f"calibration: the run cache {p} was written with other settings ({', '.join(diff)}); "
                             "delete it or pass another --cache")
        return
    p.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f, json.dumps(settings, indent=1))


def _key(arch: str, method: str, lr: float, seed: int) -> str:
    return f"{arch}-{method}-lr{lr:g}-s{seed}"


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _trained(arch: str, method: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    path = _cache(args) / f"train-{_key(arch, method, lr, seed)}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    run = train(arch, method, lr, seed, args)
    _save(run, path)
    return run


def job_select(arch: str, method: str, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """A grid point: train on seed 0, score on the validation split only."""
    path = _cache(args) / f"select-{_key(arch, method, lr, 0)}.json"
    if path.exists():
        return json.loads(path.read_text())
    run = _trained(arch, method, lr, 0, args)
    pred, _ = own_predictor(run, args)
    data = data_of(args)
    p = _mean(_batched(pred, data["val"][0]))
    yv = data["val"][1]
    res = {"arch": arch, "method": method, "lr": lr, "val_nll": nll(p, yv), "val_accuracy": accuracy(p, yv),
           "val_ece": ece_cross_check(p, yv), "val_curve": run["val_curve"]}
    atomic_write_text(path, json.dumps(res))
    return res


def job_plateau(arch: str, method: str, lr: float, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """The selected setting of seed 0 trained for ``epochs`` instead of the budget (cosine over the longer
    run): is the budget at the method's plateau?  Scored on the validation split only; not cached as a model."""
    path = _cache(args) / f"plateau-{_key(arch, method, lr, 0)}-e{epochs}.json"
    if path.exists():
        return json.loads(path.read_text())
    longer = argparse.Namespace(**{**vars(args), "epochs": epochs})
    run = train(arch, method, lr, 0, longer)
    pred, _ = own_predictor(run, args)
    data = data_of(args)
    p = _mean(_batched(pred, data["val"][0]))
    yv = data["val"][1]
    res = {"arch": arch, "method": method, "lr": lr, "epochs": epochs, "val_nll": nll(p, yv),
           "val_accuracy": accuracy(p, yv), "val_curve": run["val_curve"], "train_seconds": run["train_seconds"]}
    atomic_write_text(path, json.dumps(res))
    return res


def job_final(arch: str, method: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """A selected method on one seed: train (or reuse seed 0's grid run), predict everywhere, score."""
    path = _cache(args) / f"final-{_key(arch, method, lr, seed)}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)["rows"]
    run = _trained(arch, method, lr, seed, args)
    rows, preds_all = {}, {}
    for name, (pred, passes, extra) in predictors(run, args).items():
        preds = predictions(pred, args, shift=arch == "lenet5")
        m = score(preds, args)
        cost_extra = extra.get("fit_seconds", 0.0)
        rows[name] = {"arch": arch, "method": name, "trained": method, "lr": lr, "seed": seed, **m, **extra,
                      "train_seconds": run["train_seconds"] + cost_extra, "grad_examples": run["grad_examples"],
                      "steps": run["steps"], "epochs": run["epochs"], "forward_passes": passes,
                      "val_curve": run["val_curve"]}
        preds_all[name] = {"test": _mean(preds["test"]).float(), "val": _mean(preds["val"]).float(),
                           "ood": {k: _mean(v).float() for k, v in preds["ood"].items()},
                           **({"shift": preds["shift"]} if "shift" in preds else {})}
    _save({"rows": rows, "preds": preds_all}, path)
    return rows


def _init_worker() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- ensembles
def _example_stats(p: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """vbpc's per-example statistics plus each example's bin and confidence gap (for resampled ECEs)."""
    st = example_stats(p, p.clamp_min(1e-300).log(), y)
    correct = st["correct"].double()
    return {"correct": correct, "nll": st["nll"], "brier": st["brier"],
            "bin": bin_index(st["confidence"], n_bins), "gap": st["confidence"] - correct}


def _resampled(stats: dict[str, Tensor], idx: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """accuracy, NLL, Brier and ECE on each resample (rows of ``idx``)."""
    b = idx.shape[0]
    gap = torch.zeros(b, n_bins, dtype=torch.float64).scatter_add_(1, stats["bin"][idx], stats["gap"][idx])
    return {"accuracy": stats["correct"][idx].mean(1), "nll": stats["nll"][idx].mean(1),
            "brier": stats["brier"][idx].mean(1), "ece": gap.abs().sum(1) / idx.shape[1]}


def bootstrap_difference(p: Tensor, refs: list[Tensor], y: Tensor, n_boot: int, seed: int = 0,
                         ) -> dict[str, dict[str, float]]:
    """95% percentile intervals of ``metric(p) - mean_k metric(refs[k])``, resampling test examples."""
    gen = torch.Generator().manual_seed(seed)
    sp, sr = _example_stats(p, y), [_example_stats(r, y) for r in refs]
    full = torch.arange(len(y))[None]
    est = {k: float(v[0]) - statistics.mean(float(_resampled(s, full)[k][0]) for s in sr)
           for k, v in _resampled(sp, full).items()}
    diffs: dict[str, list[Tensor]] = {k: [] for k in KEYS}
    for start in range(0, n_boot, 100):
        idx = torch.randint(len(y), (min(100, n_boot - start), len(y)), generator=gen)
        a = _resampled(sp, idx)
        r = [_resampled(s, idx) for s in sr]
        for k in KEYS:
            diffs[k].append(a[k] - torch.stack([ri[k] for ri in r]).mean(0))
    out = {}
    for k in KEYS:
        d = torch.cat(diffs[k]).sort().values
        out[k] = {"n": len(refs), "mean": est[k], "lo": float(d[int(0.025 * (len(d) - 1))]),
                  "hi": float(d[int(math.ceil(0.975 * (len(d) - 1)))])}
    return out


def ensemble_row(name: str, member: str, members: list[dict[str, Any]], adamw: list[dict[str, Any]],
                 args: argparse.Namespace) -> dict[str, Any]:
    """The equal-weight mixture of the members' cached predictives, scored like a single method; MI is
    the members' disagreement."""
    preds = {"test": torch.stack([m["test"] for m in members]), "val": torch.stack([m["val"] for m in members]),
             "ood": {k: torch.stack([m["ood"][k] for m in members]) for k in members[0]["ood"]}}
    if "shift" in members[0]:
        preds["shift"] = [torch.stack([m["shift"][i].double() for m in members]).mean(0)
                          for i in range(len(members[0]["shift"]))]
    row = score(preds, args)
    y = data_of(args)["test"][1]
    p = _mean(preds["test"])
    row["bootstrap"] = {k: {"lo": v.low, "hi": v.high} for k, v in bootstrap_classification(
        p, y, n_boot=args.n_boot, metrics=list(KEYS)).items()}
    row["vs_adamw"] = bootstrap_difference(p, [_mean(a["test"][None]) for a in adamw], y, args.n_boot)
    return row


# ----------------------------------------------------------------------------- driver
def widen(lrs: list[float], best: float, widened: int, max_widen: int) -> Optional[float]:
    """The next grid point when the validation winner sits at an edge of the (sorted) grid: the edge ×2
    or ÷2 (the grids are geometric), at most ``max_widen`` times per method; ``None`` otherwise."""
    if widened >= max_widen or len(lrs) < 2:
        return None
    if best == lrs[-1]:
        return best * 2
    if best == lrs[0]:
        return best / 2
    return None


def run_jobs(args: argparse.Namespace, arch: str, grids: dict[str, list[float]], seeds: list[int],
             pool: Optional[ProcessPoolExecutor]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Selection on seed 0 (every method the same rule: its grid, widened by one point past an edge that
    wins, at most ``--max-widen`` times), then the selected learning rate on every seed; each method's
    finals are submitted as soon as its selection is done."""
    selection: dict[str, Any] = {m: {"grid": [], "initial_grid": list(g), "widened": []} for m, g in grids.items()}
    pending = {m: len(g) for m, g in grids.items()}
    finals: dict[str, list[dict[str, Any]]] = {}
    futs: dict[Future, tuple[str, str]] = {}

    def submit(fn: Callable[..., Any], *a: Any) -> Any:
        if pool is None:
            f: Future = Future()
            f.set_result(fn(*a, args))
            return f
        return pool.submit(fn, *a, args)
    for m, grid in grids.items():
        for lr in grid:
            futs[submit(job_select, arch, m, lr)] = ("select", m)
    while futs:
        done, _ = wait(list(futs), return_when=FIRST_COMPLETED)
        for f in done:
            kind, m = futs.pop(f)
            res = f.result()
            if kind == "select":
                sel = selection[m]
                sel["grid"].append(res)
                pending[m] -= 1
                if pending[m]:
                    continue
                sel["grid"].sort(key=lambda r: r["lr"])
                best = min(sel["grid"], key=lambda r: r["val_nll"])
                nxt = widen([r["lr"] for r in sel["grid"]], best["lr"], len(sel["widened"]), args.max_widen)
                if nxt is not None:
                    sel["widened"].append(nxt)
                    pending[m] += 1
                    print(f"[{arch}] {m}: lr {best['lr']:g} wins at the grid's edge; trying {nxt:g}", flush=True)
                    futs[submit(job_select, arch, m, nxt)] = ("select", m)
                    continue
                lrs = [r["lr"] for r in sel["grid"]]
                sel.update(selected_lr=best["lr"], selected_val_nll=best["val_nll"],
                           at_grid_edge=best["lr"] in (lrs[0], lrs[-1]) and len(lrs) > 2)
                print(f"[{arch}] {m}: selected lr {best['lr']:g} (validation NLL {best['val_nll']:.4f})", flush=True)
                for s in seeds:
                    futs[submit(job_final, arch, m, best["lr"], s)] = ("final", m)
            else:
                for name, row in res.items():
                    finals.setdefault(name, []).append(row)
                    print(f"[{arch}] {name} seed {row['seed']}: acc {row['accuracy']:.4f} NLL {row['nll']:.4f} "
                          f"ECE {row['ece']:.4f}", flush=True)
    for rows in finals.values():
        rows.sort(key=lambda r: r["seed"])
    return selection, finals


def _cached_preds(args: argparse.Namespace, arch: str, method: str, lr: float, seed: int) -> dict[str, Any]:
    return torch.load(_cache(args) / f"final-{_key(arch, method, lr, seed)}.pt", weights_only=False)["preds"]


def lenet_tables(report: dict[str, Any]) -> list[str]:
    """The LeNet-5 study's markdown: in distribution, paired differences, OOD, cost, selection, plateau."""
    a = report["settings"]
    rows, ens = report["rows"], report["ensembles"]
    seeds = a["seeds"]
    adamw = rows["adamw"]
    head = (f"LeNet-5 on Fashion-MNIST ({report['sizes']['train']:,} train / {report['sizes']['val']:,} validation / "
            f"{report['sizes']['test']:,} test), {a['epochs']} epochs of batch {a['batch_size']}, cosine LR, "
            f"seeds {seeds}; BMA over {a['samples']} samples; every choice made on the validation split. "
            "Mean ± std over seeds; ensembles: one mixture of the five seeds' networks, ± half the 95% "
            "bootstrap interval over test examples.")
    lines = [head, "", "| method | accuracy | NLL | ECE | Brier | mean ECE under shift | digits OOD AUROC (max p) |",
             "|---|---|---|---|---|---|---|"]

    def cell(vals: list[float], fmt: str = "{:.4f}") -> str:
        return _ms(vals, fmt)
    for name in METHODS:
        if name in rows:
            r = rows[name]
            c = [cell([x[k] for x in r]) for k in KEYS]
            c += [cell([x["mean_shift_ece"] for x in r]), cell([x["ood"]["digits"]["max_prob"] for x in r])]
        elif name in ens:
            e = ens[name]
            c = [f"{e[k]:.4f} ± {(e['bootstrap'][k]['hi'] - e['bootstrap'][k]['lo']) / 2:.4f}" for k in KEYS]
            c += [f"{e['mean_shift_ece']:.4f}", f"{e['ood']['digits']['max_prob']:.4f}"]
        else:
            continue
        lines.append(f"| {name} | " + " | ".join(c) + " |")
    lines += ["", "Paired differences against AdamW (method − AdamW; 95% t-interval over the seeds, bootstrap "
              "over test examples for the ensembles; `*`: the interval excludes 0):", "",
              "| method | Δ accuracy | Δ NLL | Δ ECE | Δ Brier | Δ mean ECE under shift |", "|---|---|---|---|---|---|"]
    for name in METHODS:
        if name == "adamw":
            continue
        if name in rows:
            c = [_ci(paired([x[k] for x in rows[name]], [x[k] for x in adamw]), len(seeds))
                 for k in (*KEYS, "mean_shift_ece")]
        elif name in ens:
            c = [_ci(ens[name]["vs_adamw"][k]) for k in KEYS]
            c.append(f"{ens[name]['mean_shift_ece'] - statistics.mean(x['mean_shift_ece'] for x in adamw):+.3f}")
        else:
            continue
        lines.append(f"| {name} | " + " | ".join(c) + " |")
    lines += ["", "Out of distribution: AUROC, in-domain test images positive, by max probability / entropy / "
              "mutual information (MI only with several predictives):", "",
              "| method | " + " | ".join(report["ood_sets"]) + " |", "|---|" + "---|" * len(report["ood_sets"])]
    for name in METHODS:
        src = rows.get(name)
        if src is None and name not in ens:
            continue
        cells = []
        for o in report["ood_sets"]:
            parts = []
            for s in OOD_SCORES:
                vals = [x["ood"][o].get(s) for x in src] if src else [ens[name]["ood"][o].get(s)]
                parts.append("—" if vals[0] is None else f"{statistics.mean(vals):.3f}")
            cells.append(" / ".join(parts))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cost (means over seeds, ÷ AdamW's; ensembles: five members' training; wall times shared "
              f"the {a['workers']} worker processes of this run):", "",
              "| method | training grad evals ÷ AdamW | training time ÷ AdamW | forward passes / test example | "
              "predict ms / test example |", "|---|---|---|---|---|"]
    g0 = statistics.mean(x["grad_examples"] for x in adamw)
    t0 = statistics.mean(x["train_seconds"] for x in adamw)
    for name in METHODS:
        if name in rows:
            r = rows[name]
            g, t = statistics.mean(x["grad_examples"] for x in r), statistics.mean(x["train_seconds"] for x in r)
            fp = r[0]["forward_passes"]
            ms = statistics.mean(x["predict_ms_per_example"] for x in r)
            fp_s = f"{fp}" + (" + last-layer GLM" if name == "laplace-ll" else "")
        elif name in ens:
            base = rows[ENSEMBLES[name]]
            k = len(base)
            g = k * statistics.mean(x["grad_examples"] for x in base)
            t = k * statistics.mean(x["train_seconds"] for x in base)
            fp_s = f"{k * base[0]['forward_passes']}"
            ms = k * statistics.mean(x["predict_ms_per_example"] for x in base)
        else:
            continue
        lines.append(f"| {name} | {g / g0:.2f} | {t / t0:.2f} | {fp_s} | {ms:.3f} |")
    sel = report["selection"]
    lines += ["", "Selected on the validation split (NLL of the predictive, seed 0; grids and scores in the json; "
              "`+`: points added past a winning edge): "
              + "; ".join(f"{m} lr {v['selected_lr']:g}" + (f" (+{', '.join(f'{w:g}' for w in v['widened'])})"
                                                            if v.get("widened") else "")
                          + (" (grid edge)" if v.get("at_grid_edge") else "")
                          for m, v in sel.items())
              + f"; temperature {_ms(report['posthoc']['temperature'], '{:.3f}')}; Laplace prior precision "
              f"{_ms(report['posthoc']['prior_precision'], '{:.3g}')} (marginal likelihood, training split)."]
    def last_epoch(c: list[dict[str, float]], k: str) -> str:
        return f"{c[-1][k]:.4f} ({c[-1][k] - c[-2][k]:+.4f})"
    lines += ["", "Plateau (validation split, the network at its mean, selected seed-0 runs; change over the last "
              "epoch): " + "; ".join(
                  f"{m} acc {last_epoch(c, 'val_acc_at_mean')}, NLL {last_epoch(c, 'val_nll_at_mean')}"
                  for m, c in report["plateau"].items() if len(c) > 1) + "."]
    if report.get("plateau_check"):
        pc = report["plateau_check"]
        n = next(iter(pc.values()))["epochs"]
        lines += ["", f"Longer budget (seed 0, the selected learning rate, {n} epochs instead of {a['epochs']}, "
                  "validation NLL / accuracy of the predictive): " + "; ".join(
                      f"{m} {report['selection'][m]['selected_val_nll']:.4f} → {r['val_nll']:.4f} / "
                      f"{next(g['val_accuracy'] for g in report['selection'][m]['grid'] if g['lr'] == r['lr']):.4f} → "
                      f"{r['val_accuracy']:.4f}" for m, r in pc.items()) + "."]
    return lines


def scale_table(report: dict[str, Any]) -> list[str]:
    """The ResNet-20 scale check's markdown."""
    lines: list[str] = []
    if report.get("scale_check"):
        sc = report["scale_check"]
        lines += ["", f"Scale check: ResNet-20 (FRN), {sc['epochs']} epochs, seed 0, selection on two learning "
                  "rates by validation NLL (" + "; ".join(f"{m} lr {v['selected_lr']:g}"
                                                          for m, v in sc["selection"].items()) + "):", "",
                  "| method | accuracy | NLL | ECE | Brier | digits OOD AUROC (max p) | training time ÷ AdamW |",
                  "|---|---|---|---|---|---|---|"]
        ta = sc["rows"]["adamw"][0]["train_seconds"]
        for name in ("adamw", "adamw+temp", "laplace-ll", "ivon"):
            if name in sc["rows"]:
                r = sc["rows"][name][0]
                lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in KEYS)
                             + f" | {r['ood']['digits']['max_prob']:.4f} | {r['train_seconds'] / ta:.2f} |")
        t, prior = sc["rows"]["adamw+temp"][0]["temperature"], sc["rows"]["laplace-ll"][0]["prior_precision"]
        lines += ["", f"Temperature {t:.3f} (validation split); Laplace prior precision {prior:.3g} (marginal "
                  "likelihood).  No shift curves at this scale."]
    return lines


def summarize(report: dict[str, Any]) -> str:
    """The markdown tables of the README section."""
    a = report["settings"]
    lines = lenet_tables(report) if report["rows"] else []
    lines += scale_table(report)
    lines += ["", f"This invocation: {report['wall_minutes']:.0f} min ({a['device']}, {a['workers']} worker "
              "process(es), one thread each; runs found in the cache are not retrained)."]
    return "\n".join(lines) + "\n"


def plot_bars(report: dict[str, Any], path: Path) -> None:
    from vbpc.evaluation.plots import plt, save_figure

    names = [n for n in METHODS if n in report["rows"] or n in report["ensembles"]]

    def vals(n: str, key: str) -> tuple[float, float]:
        if n in report["rows"]:
            xs = [(r["ood"]["digits"]["max_prob"] if key == "auroc" else r[key]) for r in report["rows"][n]]
            return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
        e = report["ensembles"][n]
        return (e["ood"]["digits"]["max_prob"] if key == "auroc" else e[key]), 0.0
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (key, label) in zip(axes, [("nll", "test NLL"), ("ece", "test ECE"),
                                       ("mean_shift_ece", "mean ECE under shift"), ("auroc", "digits OOD AUROC")]):
        st = [vals(n, key) for n in names]
        ax.bar(names, [s[0] for s in st], yerr=[s[1] for s in st], capsize=3,
               color=[f"C{i}" for i in range(len(names))])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle("LeNet-5 on Fashion-MNIST: mean ± std over seeds (ensembles: one mixture)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 1,000 images, 1 epoch, 2 seeds, one grid point")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--shift-size", type=int, default=2000)
    ap.add_argument("--synthetic-size", type=int, default=2000)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--hess-init", type=float, default=0.5)
    ap.add_argument("--poco-clip", type=float, default=1.0,
                    help="IVON-PoCo's clip_grad_norm on the corrected gradient (the LM study's; 0: off)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--plateau-epochs", type=int, default=10,
                    help="retrain each selected seed-0 setting this long to check the budget's plateau (0: skip)")
    ap.add_argument("--max-widen", type=int, default=2, help="grid points added past a winning edge, per method")
    ap.add_argument("--resnet", action=argparse.BooleanOptionalAction, default=True,
                    help="the ResNet-20 one-seed scale check")
    ap.add_argument("--resnet-epochs", type=int, default=3)
    ap.add_argument("--resnet-samples", type=int, default=8)
    ap.add_argument("--lenet", action=argparse.BooleanOptionalAction, default=True,
                    help="the LeNet-5 study (--no-lenet: the scale check alone, e.g. on a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the data stay on the CPU)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (1: in-process)")
    ap.add_argument("--cache", default=None, help="run cache (default: <out>_runs)")
    ap.add_argument("--out", default="benchmarks/results/calibration")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size, args.epochs, args.seeds = 1000, 300, 300, 1, [0, 1]
        args.shift_size, args.synthetic_size, args.samples, args.n_boot, args.resnet = 100, 100, 2, 100, False
        args.max_widen, args.plateau_epochs = 0, 0
        args.workers = 1
    grids = {m: (g[:1] if args.quick else g) for m, g in GRIDS.items()}
    out = Path(args.out)
    args.cache = args.cache or str(out.parent / f"{out.name}_runs")
    open_cache(args)
    t_start = time.perf_counter()
    pool = (ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_init_worker) if args.workers > 1 else None)
    try:
        selection, rows = run_jobs(args, "lenet5", grids, args.seeds, pool) if args.lenet else ({}, {})
        plateau_futs = {}
        if args.lenet and args.plateau_epochs:
            for m, sel in selection.items():
                a = (job_plateau, "lenet5", m, sel["selected_lr"], args.plateau_epochs)
                plateau_futs[m] = pool.submit(*a, args) if pool is not None else a[0](*a[1:], args)
        scale = None
        if args.resnet:
            sel_r, rows_r = run_jobs(args, "resnet20", RESNET_GRIDS, [0], pool)
            scale = {"epochs": args.resnet_epochs, "samples": args.resnet_samples, "grids": RESNET_GRIDS,
                     "selection": sel_r, "rows": rows_r}
        plateau = {m: (f.result() if isinstance(f, Future) else f) for m, f in plateau_futs.items()}
    finally:
        if pool is not None:
            pool.shutdown()
    ensembles = {}
    for name, member in ENSEMBLES.items():
        if member in rows and len(rows[member]) > 1:
            lr = selection[member]["selected_lr"]
            members = [_cached_preds(args, "lenet5", member, lr, s)[member] for s in args.seeds]
            adamw = [_cached_preds(args, "lenet5", "adamw", selection["adamw"]["selected_lr"], s)["adamw"]
                     for s in args.seeds]
            ensembles[name] = ensemble_row(name, member, members, adamw, args)
            print(f"{name}: acc {ensembles[name]['accuracy']:.4f} NLL {ensembles[name]['nll']:.4f} "
                  f"ECE {ensembles[name]['ece']:.4f}", flush=True)
    data = data_of(args)
    report = {
        "settings": vars(args), "grids": grids, "methods": METHODS, "selection": selection,
        "sizes": {"train": len(data["train"]), "val": len(data["val"][1]), "test": len(data["test"][1]),
                  "shift": len(data["shift"][1])},
        "ood_sets": list(data["ood"]),
        "posthoc": {"temperature": [r["temperature"] for r in rows.get("adamw+temp", [])],
                    "prior_precision": [r["prior_precision"] for r in rows.get("laplace-ll", [])],
                    "source": "temperature: validation NLL (L-BFGS over log T); prior precision: laplace-torch "
                              "marginal likelihood on the training split"},
        "plateau": {m: selection[m]["grid"][[g["lr"] for g in selection[m]["grid"]].index(
            selection[m]["selected_lr"])]["val_curve"] for m in selection},
        "plateau_check": plateau, "rows": rows, "ensembles": ensembles, "scale_check": scale,
        "wall_minutes": (time.perf_counter() - t_start) / 60,
    }
    md = summarize(report)
    print(md, end="")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=1, default=float))
    atomic_write_text(out.with_suffix(".md"), md)
    if not rows:
        return {"report": report, "table": md}
    plot_bars(report, out.with_suffix(".png"))
    shift_runs = {n: [r["shift"] for r in rows[n]] for n in METHODS if n in rows}
    shift_runs.update({n: [e["shift"] for e in [ensembles[n]]] for n in METHODS if n in ensembles})
    for metric in ("accuracy", "nll", "ece", "entropy"):
        plot_shift(shift_runs, metric, out.parent / f"{out.name}_shift_{metric}.png",
                   title=f"LeNet-5 on shifted Fashion-MNIST: {metric} (band: ±1 std over seeds)")
    return {"report": report, "table": md}


if __name__ == "__main__":
    main()
