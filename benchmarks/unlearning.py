"""Unlearning on real Fashion-MNIST: eq. (32) alone, eq. (32) + corrected steps, finetuning on the retained
data, against the gold standard of retraining from scratch without the forgotten examples.

Protocol (docs/adaptation.md, "Unlearning"; paired seeds: the same initialisation and data order for
every method at a seed):

* **original**: IVON on the training split (the first ``--train`` of the 60k images; the other
  ``60k - --train`` are the validation split), ``--epochs`` epochs; its old posterior is made a real
  posterior by a curvature pass at the final mean (exact GGN diagonal, the estimator eq. (32) then
  uses for the forget set), next to IVON's own :math:`h`;
* **forget sets**: (a) every training image of one class (``--forget-class``), (b) a random 1%;
* **methods**: ``eq32 (IVON h)`` eq. (32) on IVON's posterior as it is; ``eq32`` on the curvature-pass
  posterior; ``eq32+poco`` followed by ``--steps`` corrected steps on retained batches (eq. 29, anchor
  at the old posterior); ``finetune``: IVON continued on the retained data for 2×``--steps`` steps (the
  same per-example gradient evaluations); ``retrain``: IVON from scratch on the retained data
  (``--epochs``, the gold standard), and once more with another seed (initialisation, data order
  and noise): the floor of the KL metric, how far two retrainings land from each other;
* **tuning**: the learning rate of ``eq32+poco`` and of ``finetune`` from the same grid
  (``--lrs``), on seed 0, by the validation NLL on the retained classes (never the test set);
* **metrics**: accuracy and NLL on the forget set and the test set (the forgotten class's test images
  excluded from "test (kept)"), the mean KL(retrain ‖ method) of the predictive on the test set and on
  the forget set, and a loss-based membership-inference AUROC (forget examples against held-out test
  examples of the same classes; 0.5 = indistinguishable); predictions at the posterior mean
  (``--test-samples 0``) or by BMA; costs in per-example gradient evaluations.

Run:  python -m benchmarks run unlearning [--quick]
Writes ``unlearning.json``, ``unlearning.md``, ``unlearning_headline.md`` and ``unlearning.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.inference.unlearning import forget_statistics, unlearn
from vbpc.io import atomic_write_text
from vbpc.metrics.ood import auroc
from vbpc.models import build_model
from vbpc.posterior import DiagonalGaussian, Entry
from vbpc.reporting import markdown_table, save_figure, subplots, write_json

sys.path.insert(0, str(Path(__file__).parent))
from lm import _ci, _ms, paired  # noqa: E402

METHODS = ("original", "eq32 (GGN pass)", "eq32", "eq32+poco", "poco from old", "finetune", "retrain",
           "retrain (other seed)")
TUNED = ("eq32+poco", "poco from old", "finetune")
SCENARIOS = ("class", "random")


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--train", type=int, default=55000, help="training images (the rest of the 60k: validation)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256])
    ap.add_argument("--lr", type=float, default=0.5, help="IVON learning rate (training and retraining)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--forget-class", type=int, default=3)
    ap.add_argument("--forget-fraction", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=300, help="corrected steps after eq. (32)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.1, 0.5],
                    help="learning-rate grid for eq32+poco and finetune (the same for both)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test-samples", type=int, default=0, help="BMA samples (0: the posterior mean)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="a CI-size run (small data, one seed)")
    return ap


class Data:
    def __init__(self, args: argparse.Namespace):
        x, y = load_fashion_mnist("train").tensors
        self.x, self.y = x[: args.train], y[: args.train]
        self.xv, self.yv = x[args.train:], y[args.train:]
        self.xt, self.yt = load_fashion_mnist("test").tensors
        if args.quick:
            self.xt, self.yt = self.xt[:1000], self.yt[:1000]
            self.xv, self.yv = self.xv[:500], self.yv[:500]


def forget_set(scenario: str, data: Data, args: argparse.Namespace, seed: int) -> Tensor:
    if scenario == "class":
        return torch.nonzero(data.y == args.forget_class).flatten()
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randperm(len(data.y), generator=g)[: round(args.forget_fraction * len(data.y))].sort().values


def batches(n: int, bs: int, g: torch.Generator, epochs: int) -> list[Tensor]:
    return [perm[i:i + bs] for _ in range(epochs) for perm in [torch.randperm(n, generator=g)]
            for i in range(0, n, bs)]


def ivon(model: nn.Module, n: int, lr: float) -> vbpc.IVON:
    return vbpc.IVON(model.parameters(), lr=lr, ess=float(n), hess_init=0.5, weight_decay=1e-4, beta2=0.999)


def fit(model: nn.Module, opt: Any, x: Tensor, y: Tensor, order: list[Tensor]) -> int:
    for idx in order:
        def closure(idx: Tensor = idx) -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss
        opt.step(closure)
    return sum(len(i) for i in order)


def curvature_posterior(post: DiagonalGaussian, model: nn.Module, x: Tensor, y: Tensor) -> tuple[DiagonalGaussian, int]:
    """The old posterior made a posterior: its mean, precision :math:`\\lambda(\\bar h_{GGN}+\\delta)` from an exact
    GGN pass over the training data at the mean (eq. 30's curvature pass with the estimator of eq. 32)."""
    chunks = [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, len(y), 1000)]
    _, h, n, evals = forget_statistics(post, model, lambda b: F.cross_entropy(model(b[0]), b[1]), chunks,
                                       curvature="ggn", mc_samples=0)
    entries = [Entry(e.name, e.mean.clone(), hh.to(e.hess.dtype), e.ess, e.weight_decay)
               for e, hh in zip(post._entries, h)]
    return DiagonalGaussian(entries).bind(model), evals


@torch.no_grad()
def predict(model: nn.Module, post: Optional[DiagonalGaussian], x: Tensor, samples: int, seed: int) -> Tensor:
    """Predictive probabilities: at the posterior mean (``samples=0``) or the BMA of ``samples`` draws."""
    model.eval()
    if post is None or samples == 0:
        if post is None:
            return F.softmax(model(x).double(), -1)
        with post.sampled(model, theta=post.mean):
            return F.softmax(model(x).double(), -1)
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(len(x), 10, dtype=torch.float64)
    for _ in range(samples):
        with post.sampled(model, generator=g):
            p += F.softmax(model(x).double(), -1)
    return p / samples


def metrics(p: Tensor, y: Tensor) -> dict[str, float]:
    lp = p[torch.arange(len(y)), y].clamp_min(1e-300).log()
    return {"acc": float((p.argmax(1) == y).double().mean()), "nll": float(-lp.mean())}


def kl(p: Tensor, q: Tensor) -> float:
    """Mean KL(p ‖ q) over examples (nats)."""
    return float(torch.special.xlogy(p, p).sum(1).sub((p * q.clamp_min(1e-300).log()).sum(1)).mean())


def membership_auroc(p_forget: Tensor, y_forget: Tensor, p_held: Tensor, y_held: Tensor) -> float:
    """Loss-based membership inference: score −loss, members = forgotten examples, non-members =
    held-out examples; 0.5 = the attack cannot tell them apart."""
    def score(p: Tensor, y: Tensor) -> Tensor:
        return p[torch.arange(len(y)), y].clamp_min(1e-300).log()
    return auroc(score(p_forget, y_forget), score(p_held, y_held))


def run_seed(seed: int, data: Data, args: argparse.Namespace, lrs: dict[str, float],
             scenarios: tuple[str, ...] = SCENARIOS, val_only: bool = False) -> dict[str, Any]:
    """Every method on every forget set at one seed; ``val_only`` returns the validation NLLs of the
    tuned methods for each learning rate (the tuning pass)."""
    out: dict[str, Any] = {}
    torch.manual_seed(seed)
    init = build_model("mlp", hidden=args.hidden).state_dict()
    order_g = torch.Generator().manual_seed(seed)
    model = build_model("mlp", hidden=args.hidden)
    model.load_state_dict(init)
    opt = ivon(model, len(data.y), args.lr)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train_evals = fit(model, opt, data.x, data.y, batches(len(data.y), args.batch_size, order_g, args.epochs))
    t_train = time.perf_counter() - t0
    ivon_post = DiagonalGaussian.from_state_dict(opt.posterior(model).state_dict()).bind(model)
    t0 = time.perf_counter()
    q_ggn, refit_evals = curvature_posterior(ivon_post, model, data.x, data.y)
    t_refit = time.perf_counter() - t0
    opt_state = opt.state_dict()

    def loss_fn(b: Any) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    for scenario in scenarios:
        rm = forget_set(scenario, data, args, seed)
        keep = torch.ones(len(data.y), dtype=torch.bool)
        keep[rm] = False
        kept = torch.nonzero(keep).flatten()
        xf, yf = data.x[rm], data.y[rm]
        chunks = [(xf[i:i + 1000], yf[i:i + 1000]) for i in range(0, len(rm), 1000)]
        g = torch.Generator().manual_seed(2000 + seed)
        retain = [(data.x[kept[i]], data.y[kept[i]]) for i in
                  [torch.randint(len(kept), (args.batch_size,), generator=g) for _ in range(args.steps)]]
        posts: dict[str, Any] = {}
        costs: dict[str, int] = {}
        seconds: dict[str, float] = {}
        cls_mask_v = data.yv != args.forget_class if scenario == "class" else torch.ones_like(data.yv, dtype=torch.bool)

        def val_nll(post: DiagonalGaussian) -> float:
            return metrics(predict(model, post, data.xv[cls_mask_v], args.test_samples, seed),
                           data.yv[cls_mask_v])["nll"]

        def eq32(post: DiagonalGaussian, steps: int = 0, lr: float = 0.0,
                 start: str = "eq32") -> tuple[Any, int, float]:
            t = time.perf_counter()
            r = unlearn(post, model, loss_fn, chunks, curvature="ggn", mc_samples=0, data_size=float(len(data.y)),
                        retain_data=retain if steps else None, retain_size=len(kept), steps=steps, lr=lr, seed=seed,
                        start=start)
            return r, r.grad_evals, time.perf_counter() - t

        def finetune(lr: float) -> tuple[Any, int, float]:
            t = time.perf_counter()
            m2 = build_model("mlp", hidden=args.hidden)
            m2.load_state_dict(model.state_dict())
            o2 = ivon(m2, len(kept), lr)
            o2.load_state_dict(opt_state)
            for gr in o2.param_groups:
                gr["lr"], gr["ess"] = lr, float(len(kept))
            gen = torch.Generator().manual_seed(3000 + seed)
            order = [torch.randint(len(kept), (args.batch_size,), generator=gen) for _ in range(2 * args.steps)]
            torch.manual_seed(seed)
            ev = fit(m2, o2, data.x[kept], data.y[kept], order)
            post = DiagonalGaussian.from_state_dict(o2.posterior(m2).state_dict()).bind(model)
            return post, ev, time.perf_counter() - t

        if val_only:
            out[scenario] = {
                "eq32+poco": {lr: val_nll(eq32(ivon_post, args.steps, lr)[0].posterior) for lr in args.lrs},
                "poco from old": {lr: val_nll(eq32(ivon_post, args.steps, lr, "old")[0].posterior) for lr in args.lrs},
                "finetune": {lr: val_nll(finetune(lr)[0]) for lr in args.lrs},
            }
            continue
        posts["original"], costs["original"], seconds["original"] = ivon_post, train_evals, t_train
        r, costs["eq32 (GGN pass)"], seconds["eq32 (GGN pass)"] = eq32(q_ggn)
        costs["eq32 (GGN pass)"] += refit_evals
        seconds["eq32 (GGN pass)"] += t_refit
        posts["eq32 (GGN pass)"] = r.posterior
        clamped = {"eq32 (GGN pass)": r.clamped}
        r, costs["eq32"], seconds["eq32"] = eq32(ivon_post)
        posts["eq32"], clamped["eq32"] = r.posterior, r.clamped
        r, costs["eq32+poco"], seconds["eq32+poco"] = eq32(ivon_post, args.steps, lrs[f"{scenario}/eq32+poco"])
        posts["eq32+poco"], clamped["eq32+poco"] = r.posterior, r.clamped
        r, costs["poco from old"], seconds["poco from old"] = eq32(ivon_post, args.steps,
                                                                   lrs[f"{scenario}/poco from old"], "old")
        posts["poco from old"], clamped["poco from old"] = r.posterior, r.clamped
        posts["finetune"], costs["finetune"], seconds["finetune"] = finetune(lrs[f"{scenario}/finetune"])
        for name, s_ in (("retrain", seed), ("retrain (other seed)", seed + 100)):
            # the gold standard; with another seed (initialisation, data order, noise), the floor of the KL metric
            t = time.perf_counter()
            torch.manual_seed(s_)
            gold = build_model("mlp", hidden=args.hidden)
            if s_ == seed:
                gold.load_state_dict(init)
            gopt = ivon(gold, len(kept), args.lr)
            torch.manual_seed(s_)
            costs[name] = fit(gold, gopt, data.x[kept], data.y[kept],
                              batches(len(kept), args.batch_size, torch.Generator().manual_seed(s_), args.epochs))
            seconds[name] = time.perf_counter() - t
            posts[name] = DiagonalGaussian.from_state_dict(gopt.posterior(gold).state_dict()).bind(model)
        test_keep = data.yt != args.forget_class if scenario == "class" else torch.ones_like(data.yt, dtype=torch.bool)
        held = data.yt == args.forget_class if scenario == "class" else torch.ones_like(data.yt, dtype=torch.bool)
        preds = {m: {"forget": predict(model, posts[m], xf, args.test_samples, seed),
                     "test": predict(model, posts[m], data.xt, args.test_samples, seed)} for m in METHODS}
        rows = {}
        for m in METHODS:
            pf, pt = preds[m]["forget"], preds[m]["test"]
            rows[m] = {
                **{f"forget_{k}": v for k, v in metrics(pf, yf).items()},
                **{f"test_{k}": v for k, v in metrics(pt[test_keep], data.yt[test_keep]).items()},
                "kl_test": kl(preds["retrain"]["test"], pt), "kl_forget": kl(preds["retrain"]["forget"], pf),
                "mia_auroc": membership_auroc(pf, yf, pt[held], data.yt[held]),
                "grad_evals": costs[m], "seconds": seconds[m], "clamped": clamped.get(m, 0),
            }
        out[scenario] = {"n_forget": len(rm), "rows": rows}
    return out


KEYS = [("forget_acc", "forget acc"), ("forget_nll", "forget NLL"), ("test_acc", "test acc (kept)"),
        ("test_nll", "test NLL (kept)"), ("kl_test", "KL to retrain (test)"), ("kl_forget", "KL to retrain (forget)"),
        ("mia_auroc", "MIA AUROC")]


def summarize(report: dict[str, Any], args: argparse.Namespace) -> str:
    parts = []
    for scenario in SCENARIOS:
        runs = [r[scenario] for r in report["runs"].values() if scenario in r]
        if not runs:
            continue
        n_forget = runs[0]["n_forget"]
        head = ["method"] + [lab for _, lab in KEYS] + ["clamped", "grad evals", "seconds"]
        rows = []
        for m in METHODS:
            vals = {k: [r["rows"][m][k] for r in runs] for k, _ in KEYS}
            cost = statistics.mean(r["rows"][m]["grad_evals"] for r in runs)
            secs = statistics.mean(r["rows"][m]["seconds"] for r in runs)
            clamp = statistics.mean(r["rows"][m]["clamped"] for r in runs)
            rows.append([m] + [_ms(vals[k]) for k, _ in KEYS] + [f"{clamp:,.0f}", f"{cost:,.0f}", f"{secs:.1f}"])
        what = (f"class {args.forget_class} ({n_forget:,} images)" if scenario == "class"
                else f"a random {args.forget_fraction:.0%} ({n_forget:,} images)")
        cap = (f"Unlearning {what} from IVON on {args.train:,} Fashion-MNIST images, {len(runs)} seed(s), mean ± std; "
               f"predictions {'at the posterior mean' if args.test_samples == 0 else f'by BMA ({args.test_samples})'}; "
               "learning rates (validation): " + ", ".join(f"{m} {report['lrs'][f'{scenario}/{m}']}" for m in TUNED))
        parts.append(markdown_table(head, rows, cap))
        diffs = []
        for m in ("eq32+poco", "poco from old", "finetune"):
            d = paired([r["rows"][m]["kl_test"] for r in runs], [r["rows"]["eq32"]["kl_test"] for r in runs])
            e = paired([r["rows"][m]["test_acc"] for r in runs], [r["rows"]["eq32"]["test_acc"] for r in runs])
            diffs.append([m, _ci(d, len(runs)), _ci(e, len(runs))])
        parts.append(markdown_table(["method", "KL to retrain (test) − eq32", "test acc (kept) − eq32"], diffs,
                                    f"{what}: paired differences against eq. (32) alone "
                                    "(95% t-intervals; * excludes 0)"))
    return "\n".join(parts)


def headline(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The README's short table: both forget sets, the four numbers that matter, mean over seeds."""
    head = ["method", "class: forget acc", "class: test acc (kept)", "class: KL to retrain",
            "1%: test acc", "1%: KL to retrain", "grad evals (class)"]
    runs = {sc: [r[sc] for r in report["runs"].values() if sc in r] for sc in SCENARIOS}
    rows = []
    for m in METHODS:
        def mean(sc: str, key: str) -> float:
            return statistics.mean(r["rows"][m][key] for r in runs[sc])
        rows.append([m, f"{mean('class', 'forget_acc'):.3f}", f"{mean('class', 'test_acc'):.3f}",
                     f"{max(0.0, mean('class', 'kl_test')):.3g}", f"{mean('random', 'test_acc'):.3f}",
                     f"{max(0.0, mean('random', 'kl_test')):.3g}", f"{mean('class', 'grad_evals'):,.0f}"])
    n = len(runs["class"])
    return markdown_table(head, rows, f"Unlearning class {args.forget_class} and a random "
                                      f"{args.forget_fraction:.0%} of {args.train:,} Fashion-MNIST images "
                                      f"(mean of {n} seed(s); the full tables with ± std are in docs/benchmarks.md)")


def plot(report: dict[str, Any], path: Path) -> None:
    fig, axes = subplots(1, 4, figsize=(15, 3.4))
    for si, scenario in enumerate(SCENARIOS):
        runs = [r[scenario] for r in report["runs"].values() if scenario in r]
        if not runs:
            continue
        for ax, key in zip(axes, ("forget_acc", "test_acc", "kl_test", "mia_auroc")):
            mu = [statistics.mean(r["rows"][m][key] for r in runs) for m in METHODS]
            if key == "kl_test":
                mu = [max(v, 1e-3) for v in mu]  # log scale: the gold standard's 0 shows as the floor
            xs = [i + (si - 0.5) * 0.38 for i in range(len(METHODS))]
            ax.bar(xs, mu, width=0.38, label=scenario)
    axes[2].set_yscale("log")
    axes[3].set_ylim(0.4, 0.6)
    for ax, lab in zip(axes, ("forget accuracy", "test accuracy (kept classes)", "KL to retrain (test, log)",
                              "membership AUROC (0.5: none)")):
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels(METHODS, rotation=35, ha="right", fontsize=8)
        ax.set_title(lab, fontsize=10)
    axes[3].legend(title="forget set", fontsize=8, loc="upper right")
    fig.suptitle("Unlearning on Fashion-MNIST (mean over seeds; retrain = gold standard)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replot":  # redraw the figure from the saved results
        out = Path(argv[1] if len(argv) > 1 else "benchmarks/results")
        plot(json.loads((out / "unlearning.json").read_text()), out / "unlearning.png")
        return 0
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.seeds, args.steps, args.lrs = 2000, 1, [0], 10, [0.1]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = Data(args)
    t0 = time.perf_counter()
    tuning = run_seed(args.seeds[0], data, args, {}, val_only=True)
    lrs = {f"{s}/{m}": min(v, key=lambda lr: v[lr] if math.isfinite(v[lr]) else math.inf)
           for s in SCENARIOS for m, v in tuning[s].items()}
    report: dict[str, Any] = {"args": vars(args), "tuning": tuning, "lrs": lrs, "runs": {}}
    for seed in args.seeds:
        report["runs"][str(seed)] = run_seed(seed, data, args, lrs)
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    report["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(report, args)
    write_json(out / "unlearning.json", json.loads(json.dumps(report, default=str)))
    atomic_write_text(out / "unlearning.md", table)
    atomic_write_text(out / "unlearning_headline.md", headline(report, args))
    plot(report, out / "unlearning.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
