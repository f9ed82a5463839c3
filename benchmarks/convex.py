"""Convex study: ℓ2-regularised multinomial logistic regression on the real Fashion-MNIST.

f(θ) = mean cross-entropy over the 60,000 training images + (δ/2)‖θ‖², θ = (W, b) with 7,850
parameters, features scaled to unit norm, float64.  f* comes from full-batch L-BFGS.  Every
method is tracked by relative suboptimality (f(m) − f*)/f* of its mean against *passes over
the data* = gradient evaluations ÷ N (inner passes count twice for corrected learners;
anchor refreshes count too: docs/algorithms.md §6.4, eq. 24).

Methods: SGD, SVRG, α-SVRG (linear α from 0.75), VSGD-PoCo (σ > 0, α = 1), IVON and IVON-PoCo
(α = 1), all with batch 128 and an anchor period of one epoch (a full-data refresh, chunked).
A binary sub-problem (T-shirt vs shirt, 785 parameters) runs VON and VON-PoCo with exact
Hessians.  Target (issue): the PoCo variants reach 1e-6 where the uncorrected ones plateau,
in fewer passes than SVRG.

Run:  python benchmarks/convex.py [--quick] [--epochs 30] [--seeds 1]
Writes benchmarks/results/convex.json, convex.md and convex.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.errors import NonFiniteError

sys.path.insert(0, str(Path(__file__).parent))
from step_overhead import atomic_write  # noqa: E402

F64 = torch.float64


def load(quick: bool, binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_fashion_mnist("train", normalize=False)
    x, y = ds.tensors
    x = x.reshape(len(x), -1).to(F64)
    if binary:  # T-shirt/top (0) vs shirt (6)
        keep = (y == 0) | (y == 6)
        x, y = x[keep], (y[keep] == 6).long()
    if quick:
        x, y = (x[:1000], y[:1000]) if binary else (x[:3000], y[:3000])
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x, y


class Problem:
    """f(θ) = mean CE + δ/2 ‖θ‖² for a linear classifier (the prior δ is applied by the learners)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, delta: float):
        self.x, self.y, self.delta = x, y, delta
        self.n, self.d_in = x.shape
        self.k = int(y.max()) + 1

    def model(self) -> nn.Linear:
        m = nn.Linear(self.d_in, self.k).to(F64)
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
        return m

    def loss(self, model: nn.Module, idx: Any = None) -> torch.Tensor:
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def objective(self, model: nn.Module) -> float:
        reg = sum(float((p.double() ** 2).sum()) for p in model.parameters())
        return float(self.loss(model)) + 0.5 * self.delta * reg

    def optimum(self, iters: int = 400) -> float:
        model = self.model()
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, history_size=50, tolerance_grad=1e-12,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            f = self.loss(model) + 0.5 * self.delta * sum((p ** 2).sum() for p in model.parameters())
            f.backward()
            return f

        for _ in range(3):
            opt.step(closure)
        return self.objective(model)


def run_method(name: str, prob: Problem, make: Callable, epochs: int, batch: int, seed: int, f_star: float,
               chunk: int = 4000, megabatch: int | None = None) -> dict:
    """Train ``make(model)`` for ``epochs``; anchor refreshes pass over all the data, or over a fresh
    random ``megabatch`` of examples each time."""
    torch.manual_seed(seed)
    model = prob.model()
    opt = make(model)
    gen = torch.Generator().manual_seed(seed)
    mega_gen = torch.Generator().manual_seed(1_000 + seed)
    steps_per_epoch = prob.n // batch
    anchor_data = [torch.arange(i, min(i + chunk, prob.n)) for i in range(0, prob.n, chunk)]
    evals, curve = 0, []
    t0 = time.perf_counter()

    def record():
        curve.append({"passes": evals / prob.n, "rel_subopt": (prob.objective(model) - f_star) / f_star,
                      "seconds": time.perf_counter() - t0})

    record()
    for _ in range(epochs):
        perm = torch.randperm(prob.n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            if getattr(opt, "refresh_due", False):
                if megabatch is not None:
                    sub = torch.randperm(prob.n, generator=mega_gen)[:megabatch]
                    anchor_data = [sub[i:i + chunk] for i in range(0, len(sub), chunk)]
                before = opt.counters["refresh_examples"]
                opt.refresh(lambda b: prob.loss(model, b), anchor_data, progress=False)
                evals += opt.counters["refresh_examples"] - before

            def closure(idx=idx):
                opt.zero_grad()
                loss = prob.loss(model, idx)
                if not isinstance(opt, vbpc.VONPoCo):
                    loss.backward()
                return loss

            try:
                if "inner_examples" in getattr(opt, "counters", {}):  # the corrected learners count passes
                    before = opt.counters["inner_examples"]
                    opt.step(closure, batch_size=len(idx))
                    evals += opt.counters["inner_examples"] - before
                else:
                    opt.step(closure)
                    evals += len(idx) * getattr(opt, "mc_samples", 1)
            except (NonFiniteError, FloatingPointError) as e:  # diverged: recorded, not fatal to the study
                curve.append({"passes": evals / prob.n, "rel_subopt": float("inf"),
                              "seconds": time.perf_counter() - t0})
                return {"method": name, "seed": seed, "curve": curve, "diverged": str(e)}
        record()
    return {"method": name, "seed": seed, "curve": curve}


def passes_to(curve: list[dict], target: float) -> float | None:
    for point in curve:
        if point["rel_subopt"] <= target:
            return point["passes"]
    return None


def multiclass_methods(n: int, delta: float, epochs: int, batch: int, lr: float, ivon_lr: float,
                       ess_factor: float = 1.0) -> dict[str, Callable]:
    T = n // batch
    return {
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=lr, weight_decay=delta),
        "SVRG": lambda m: vbpc.SVRG(m.parameters(), lr=lr, anchor_period=T, weight_decay=delta),
        "α-SVRG": lambda m: vbpc.AlphaSVRG(m.parameters(), lr=lr, anchor_period=T, alpha=0.75,
                                           total_steps=epochs * T, weight_decay=delta),
        "VSGD-PoCo": lambda m: vbpc.VSGDPoCo(m.parameters(), lr=lr, sigma=1e-3, weight_decay=delta, alpha=1.0,
                                             anchor_period=T),
        "IVON": lambda m: vbpc.IVON(m.parameters(), lr=ivon_lr, ess=ess_factor * n, hess_init=0.05, beta1=0.9,
                                    beta2=0.999, weight_decay=delta),
        "IVON-PoCo": lambda m: vbpc.IVONPoCo(m.parameters(), lr=ivon_lr, ess=ess_factor * n, hess_init=0.05, beta1=0.0,
                                             beta2=0.999, weight_decay=delta, alpha=1.0, anchor_period=T),
        "IVON-PoCo (gradient only)": lambda m: vbpc.IVONPoCo(
            m.parameters(), lr=ivon_lr, ess=ess_factor * n, hess_init=0.05, beta1=0.0, beta2=0.999,
            weight_decay=delta, alpha=1.0, anchor_period=T, correct_hessian=False),
    }


def binary_methods(n: int, delta: float, batch: int) -> dict[str, Callable]:
    T = n // batch
    return {
        "VON": lambda m: vbpc.VON(m.parameters(), lr=0.5, ess=float(n), weight_decay=delta, expectation="mean"),
        "VON-PoCo": lambda m: vbpc.VONPoCo(m.parameters(), lr=0.5, ess=float(n), weight_decay=delta,
                                           expectation="mean", alpha=1.0, anchor_period=T),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in results:
        xs = [p["passes"] for p in r["curve"]]
        ys = [min(max(p["rel_subopt"], 1e-16), 1e3) if math.isfinite(p["rel_subopt"]) else 1e3
              for p in r["curve"]]  # divergence is drawn at the top edge
        ax.semilogy(xs, ys, label=r["method"], marker=".")
    ax.axhline(1e-6, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("passes over the data (gradient evaluations / N)")
    ax.set_ylabel("relative suboptimality (f - f*) / f*")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def at_passes(curve: list[dict], passes: float) -> float:
    """Relative suboptimality at the last recorded point with at most ``passes`` passes."""
    return [p for p in curve if p["passes"] <= passes + 1e-9][-1]["rel_subopt"]


def to_markdown(report: dict[str, Any], seeds: int) -> str:
    """The passes-to-level table, with every method also read at equal passes: the smallest
    number of passes any method of the problem ran (the uncorrected learners' budget)."""
    lines = [f"{seeds} seed(s) (mini-batch order and weight noise); passes: mean ± std over the seeds that "
             "reached the level (k/S reached); equal passes: every method read at the smallest budget any "
             "method of the problem ran", "",
             "| problem | method | passes to 1e-3 | passes to 1e-6 | final rel. suboptimality (median) | passes run | "
             "rel. suboptimality at equal passes (median) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key in ("multiclass", "binary"):
        if not report.get(key):
            continue
        budget = min(r["curve"][-1]["passes"] for r in report[key])
        for name in dict.fromkeys(r["method"] for r in report[key]):
            runs = [r for r in report[key] if r["method"] == name]
            cells = []
            for level in (1e-3, 1e-6):
                hit = [p for p in (passes_to(r["curve"], level) for r in runs) if p is not None]
                if not hit:
                    cells.append("not reached")
                    continue
                sd = statistics.stdev(hit) if len(hit) > 1 else 0.0
                cells.append(f"{statistics.mean(hit):.1f} ± {sd:.1f} ({len(hit)}/{len(runs)})")
            finals = [r["curve"][-1]["rel_subopt"] for r in runs]
            final = statistics.median(finals)
            final_s = f"{final:.1e}" if all(math.isfinite(f) for f in finals) else "diverged"
            equal = statistics.median(at_passes(r["curve"], budget) for r in runs)
            ran = runs[0]["curve"][-1]["passes"]
            lines.append(f"| {key} | {name} | {cells[0]} | {cells[1]} | {final_s} | {ran:.1f} | "
                         f"{equal:.1e} at {budget:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3,000 (binary: 1,000) images, 3 (1) epochs: CI size")
    ap.add_argument("--epochs", type=int, default=None, help="multiclass epochs (default 20; 3 with --quick)")
    ap.add_argument("--binary-epochs", type=int, default=None, help="binary epochs (default 4; 2 with --quick)")
    ap.add_argument("--skip-binary", action="store_true", help="run only the multiclass problem")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--delta", type=float, default=1e-2)
    ap.add_argument("--lr", type=float, default=1.0, help="step of SGD, SVRG, α-SVRG, VSGD-PoCo")
    ap.add_argument("--ivon-lr", type=float, default=0.5)
    ap.add_argument("--ess-factor", type=float, default=1.0,
                    help="IVON's ess = factor × N: the MAP objective is unchanged (δ is per ess), the weight "
                         "noise shrinks by the factor, so the mean can approach θ*")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--from-json", action="store_true", help="only rebuild convex.md from <out>/convex.json")
    args = ap.parse_args(argv)
    if args.from_json:
        report = json.loads((Path(args.out) / "convex.json").read_text())
        seeds = len({r["seed"] for r in report["multiclass"]})
        atomic_write(Path(args.out) / "convex.md", to_markdown(report, seeds))
        return 0
    torch.set_num_threads(args.threads)
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 20)
    bepochs = args.binary_epochs if args.binary_epochs is not None else (1 if args.quick else 4)
    out = Path(args.out)
    report: dict[str, Any] = {"settings": vars(args), "multiclass": [], "binary": []}

    problems = [("multiclass", False, epochs)] + ([] if args.skip_binary else [("binary", True, bepochs)])
    for key, binary, ep in problems:
        x, y = load(args.quick, binary)
        prob = Problem(x, y, args.delta)
        f_star = prob.optimum()
        report[f"{key}_f_star"] = f_star
        report[f"{key}_params"] = prob.d_in * prob.k + prob.k
        methods = (binary_methods(prob.n, args.delta, args.batch) if binary
                   else multiclass_methods(prob.n, args.delta, ep, args.batch, args.lr, args.ivon_lr, args.ess_factor))
        for name, make in methods.items():
            for seed in range(args.seeds):
                r = run_method(name, prob, make, ep, args.batch, seed, f_star)
                report[key].append(r)
                last = r["curve"][-1]
                print(f"{key:10s} {name:10s} seed {seed}: {last['passes']:6.1f} passes, rel. subopt "
                      f"{last['rel_subopt']:.2e}, {last['seconds']:.1f} s", flush=True)
        plot([r for r in report[key] if r["seed"] == 0], out / f"convex_{key}.png",
             f"{key}: {prob.n} images, {report[f'{key}_params']} parameters")

    md = to_markdown(report, args.seeds)
    print(md)
    atomic_write(out / "convex.json", json.dumps(report, indent=1))
    atomic_write(out / "convex.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
