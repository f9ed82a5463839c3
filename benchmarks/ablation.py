"""Ablation of IVON-PoCo(Mo) on the LM task and on the convex task: one option changed at a time.

Options (docs/algorithms.md §6.2): α schedule (constant vs linear decay), anchor period T, mega-batch
size M, shared vs independent anchor noise (§6.3), Hessian correction on/off (eq. 22 for h̃) and
the proximal term on/off (eq. 23).  Plain IVON (no correction) is the reference row.

* **LM**: the ``lm`` benchmark's char GPT-mini and the IVON-PoCoMo configuration its study selected
  on the validation split (``--lm-defaults selected``; ``fixed``: α0 = 0.75 linear, T = 100, a = 100,
  β2 = 0.999), M = 512 sequences, shared noise, Hessian corrected, no proximal term, gradient-norm
  clip 1.0; the rows add the mega-batch remedies (optimal α, running anchor mean); ``--lm-steps`` steps,
  ``--lm-seeds``; perplexity and token ECE at the posterior mean on the study's validation split (the
  test blocks are left to the ``lm`` finals), and gradient
  evaluations.  The seed-to-seed std of the ``lm`` benchmark is the noise level to compare
  differences against.
* **Convex**: the ``convex`` benchmark's multiclass logistic regression on Fashion-MNIST
  (7,850 parameters, f* by L-BFGS), IVON-PoCo with α = 1 constant, T = one epoch, full-data
  refresh, shared noise, Hessian corrected, no proximal term; ``--convex-epochs`` epochs,
  ``--convex-seeds`` seeds; passes over the data to relative suboptimality 1e-3 and 1e-6.

Run:  python -m benchmarks run ablation [--quick|--full]
Writes ``ablation.json``, ``ablation.md``, ``ablation_lm.png`` and ``ablation_convex.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import vbpc

sys.path.insert(0, str(Path(__file__).parent))
import convex  # noqa: E402
import lm  # noqa: E402

from vbpc.io import atomic_write_text  # noqa: E402

#: LM variants: name -> overrides of the ``lm`` benchmark's arguments (``method`` picks the learner)
LM_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "α constant": {"alpha_schedule": "constant"},
    "T = 50": {"anchor_period": 50},
    "T = 100": {"anchor_period": 100},
    "T = 200": {"anchor_period": 200},
    "M = 128": {"megabatch": 128},
    "M = 2048": {"megabatch": 2048},
    "independent noise": {"anchor_noise": "independent"},
    "no Hessian correction": {"correct_hessian": False},
    "proximal on": {"proximal": True},
    "no remedy (scheduled α, frozen anchor mean)": {"alpha_mode": "scheduled", "anchor_update": "frozen"},
    "optimal α (control variate), frozen mean": {"alpha_mode": "optimal", "anchor_update": "frozen"},
    "running anchor mean, scheduled α": {"alpha_mode": "scheduled", "anchor_update": "running"},
    "optimal α + running anchor": {"alpha_mode": "optimal", "anchor_update": "running"},
    "IVON (no correction)": {"method": "ivon"},
    "IVON, the default's gradient evaluations": {"method": "ivon", "steps": "match"},
}
"""Absolute settings: a variant whose settings equal the default's is the default's own row and is not rerun."""

#: the IVON-PoCoMo options of the ``lm`` benchmark that the LM variants change (recorded as the default)
LM_OPTIONS = ("alpha", "alpha_schedule", "anchor_period", "megabatch", "anchor_noise", "correct_hessian", "proximal",
              "clip_grad_norm", "lr", "beta2", "alpha_mode", "anchor_update")

#: convex variants: name -> IVON-PoCo keyword overrides; ``megabatch``/``period``/``method`` are special
CONVEX_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "α linear": {"alpha_schedule": "linear"},
    "α = 0.75 constant": {"alpha": 0.75},
    "T = ½ epoch": {"period": 0.5},
    "T = 2 epochs": {"period": 2.0},
    "M = 32 batches": {"megabatch": 32 * 128},
    "M = 8 batches": {"megabatch": 8 * 128},
    "independent noise": {"anchor_noise": "independent"},
    "no Hessian correction": {"correct_hessian": False},
    "proximal on": {"proximal": True},
    "optimal α (control variate)": {"alpha_mode": "optimal"},
    "running anchor mean": {"anchor_update": "running"},
    "IVON (no correction)": {"method": "ivon"},
}


def describe_default(d: dict[str, Any]) -> str:
    """The LM default in words, from the recorded :data:`LM_OPTIONS` of the run."""
    a = f"{d['alpha']:g}"
    alpha = f"α0 = {a} with linear decay" if d["alpha_schedule"] == "linear" else f"α = {a} constant"
    hess = "Hessian corrected" if d["correct_hessian"] else "gradient only"
    clip = f"gradient-norm clip {d['clip_grad_norm']:g}" if d.get("clip_grad_norm") else "no gradient clip"
    remedies = [r for r in (d.get("alpha_mode") == "optimal" and "optimal α",
                            d.get("anchor_update") == "running" and "running anchor mean") if r]
    lr = f"IVON a = {d['lr']:g}, β2 = {d['beta2']:g}; " if "lr" in d else ""
    return (lr + f"IVON-PoCoMo, {alpha}, anchor period T = {d['anchor_period']} steps, mega-batch M = {d['megabatch']} "
            f"sequences, {d['anchor_noise']} anchor noise, {hess}, {'with' if d['proximal'] else 'no'} proximal term, "
            f"{clip} (IVON: each sample; PoCoMo: the corrected gradient)"
            + (f", {' and '.join(remedies)}" if remedies else ""))


def lm_selected(out: str) -> Optional[dict[str, Any]]:
    """IVON-PoCoMo's configuration selected by the ``lm`` study on its validation split (learning
    rate, β2, α0, T and any remedy), or ``None`` while that selection is incomplete."""
    study = lm.add_arguments(argparse.ArgumentParser()).parse_args(["--out", out])
    if not (Path(out) / "lm_runs").is_dir():
        return None
    sel = lm.Jobs(study).selected()
    return None if sel is None else dict(sel["ivon-pocomo"]["best"])


def lm_base(args: argparse.Namespace) -> argparse.Namespace:
    """The ``lm`` benchmark's settings every LM variant starts from: the study's selected IVON-PoCoMo
    configuration when its selection is complete (``--lm-defaults selected``), else the fixed
    defaults of ``benchmarks/lm.py``."""
    base = lm.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--steps", str(args.lm_steps), "--out", args.out, "--no-progress", "--test-samples", "0",
         "--eval-every", str(max(1, args.lm_steps // 8)), "--threads", str(args.threads)])
    if args.quick:
        return lm.quick(base)
    if args.lm_defaults == "selected":
        chosen = lm_selected(args.out)
        if chosen is None:
            print("ablation: the lm study's selection is incomplete; using the fixed lm defaults", flush=True)
        else:
            base = lm.settings_of(base, chosen)
    return base


def run_lm(args: argparse.Namespace, base: argparse.Namespace) -> list[dict[str, Any]]:
    data = lm.Data(base)
    runs = []
    for name, over in LM_VARIANTS.items():
        cfg = argparse.Namespace(**{**vars(base), **{k: v for k, v in over.items() if k not in ("method", "steps")}})
        if over.get("steps") == "match":  # plain IVON, as many steps as the default's gradient evaluations buy
            evals = statistics.mean(r["final"]["grad_evals"] for r in runs if r["variant"] == "default")
            cfg.steps = max(1, round(evals / base.batch_size))
            cfg.eval_every = max(1, cfg.steps // 8)
        if name != "default" and "method" not in over and not args.quick and vars(cfg) == vars(base):
            print(f"lm     {name:24s} is the default's own setting; not rerun", flush=True)
            continue
        if args.quick and "anchor_period" in over:  # the same ratios to the quick defaults
            cfg.anchor_period = max(2, base.anchor_period * over["anchor_period"] // 100)
        if args.quick and "megabatch" in over:
            cfg.megabatch = max(1, base.megabatch * over["megabatch"] // 512)
        for seed in args.lm_seeds[:1] if args.quick else args.lm_seeds:
            r = lm.run_one(over.get("method", "ivon-pocomo"), seed, cfg, data, split="tune")
            r["variant"] = name
            runs.append(r)
            f = r["final"]
            print(f"lm     {name:24s} seed {seed}: val ppl {f['val_ppl']:.3f}, ECE {f['val_ece']:.4f}, "
                  f"{f['grad_evals']:,} grad evals, {f['seconds']:.0f} s", flush=True)
    return runs


def convex_make(over: dict[str, Any], n: int, epochs: int, batch: int, delta: float,
                ivon_lr: float) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    period = max(1, round(over.get("period", 1.0) * (n // batch)))
    common = dict(lr=ivon_lr, ess=float(n), hess_init=0.05, beta2=0.999, weight_decay=delta)
    if over.get("method") == "ivon":
        return lambda m: vbpc.IVON(m.parameters(), beta1=0.9, **common)
    kw = {k: v for k, v in over.items() if k not in ("period", "megabatch", "method")}
    kw = {"alpha": 1.0, "anchor_period": period, "total_steps": epochs * (n // batch), **kw}
    return lambda m: vbpc.IVONPoCo(m.parameters(), beta1=0.0, **common, **kw)


def run_convex(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    x, y = convex.load(args.quick)
    prob = convex.Problem(x, y, 1e-2)
    f_star = prob.optimum()
    epochs = 2 if args.quick else args.convex_epochs
    runs = []
    for name, over in CONVEX_VARIANTS.items():
        make = convex_make(over, prob.n, epochs, 128, 1e-2, 0.5)
        for seed in range(1 if args.quick else args.convex_seeds):
            r = convex.run_method(name, prob, make, epochs, 128, seed, f_star, megabatch=over.get("megabatch"))
            r["variant"] = name
            runs.append(r)
            last = r["curve"][-1]
            print(f"convex {name:24s} seed {seed}: {last['passes']:.1f} passes, rel. subopt "
                  f"{last['rel_subopt']:.2e}", flush=True)
    return runs, f_star


def _ms(vals: list[float], fmt: str) -> str:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def lm_table(runs: list[dict[str, Any]], default: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    spread = "mean ± std over the seeds" if len(seeds) > 1 else "one seed, no spread"
    lines = [f"LM (char GPT-mini, {runs[0]['steps']} steps, seeds {seeds}, {spread}; validation at the posterior mean)",
             "",
             f"Default: {describe_default(default)}.", "",
             "| variant | steps | val ppl | token ECE | grad. evals (sequences) | ÷ IVON's evals | mean α* | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ivon = [r["final"]["grad_evals"] for r in runs if r["variant"] == "IVON (no correction)"]
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        f = [r["final"] for r in rs]
        evals = statistics.mean(x["grad_evals"] for x in f)
        ratio = f"{evals / statistics.mean(ivon):.2f}×" if ivon else "n/a"
        alpha = [r["alpha_star_mean"] for r in rs if "alpha_star_mean" in r]
        lines.append(f"| {v} | {rs[0].get('steps', '')} | {_ms([x['val_ppl'] for x in f], '{:.3f}')} | "
                     f"{_ms([x['val_ece'] for x in f], '{:.4f}')} | {evals:,.0f} | {ratio} | "
                     f"{_ms(alpha, '{:.2f}') if alpha else '–'} | {statistics.mean(x['seconds'] for x in f):.0f} |")
    lines += ["", "mean α*: the control-variate estimate Cov(ĝ_in, ĝ_out)/Var(ĝ_out), averaged over tensors at the "
              "end (optimal-α rows only)."]
    return "\n".join(lines) + "\n"


def convex_table(runs: list[dict[str, Any]]) -> str:
    n_seeds = len({r["seed"] for r in runs})
    lines = [f"Convex (multiclass logistic regression, {runs[0]['curve'][-1]['passes']:.0f} passes of the default, "
             f"{n_seeds} seed(s); passes: mean ± std over the seeds that reached the level, k/S)", "",
             "| variant | passes to 1e-3 | passes to 1e-6 | final rel. suboptimality (median) |",
             "|---|---:|---:|---:|"]
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        cells = []
        for level in (1e-3, 1e-6):
            hit = [p for p in (convex.passes_to(r["curve"], level) for r in rs) if p is not None]
            cells.append(f"{_ms(hit, '{:.1f}')} ({len(hit)}/{len(rs)})" if hit else "not reached")
        finals = [r["curve"][-1]["rel_subopt"] for r in rs]
        final = f"{statistics.median(finals):.1e}" if all(math.isfinite(f) for f in finals) else "diverged"
        lines.append(f"| {v} | {cells[0]} | {cells[1]} | {final} |")
    return "\n".join(lines) + "\n"


def plot(lm_runs: list[dict[str, Any]], convex_runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vbpc.evaluation.plots import save_figure

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        save_figure(fig, out / name)

    if lm_runs:
        plot_lm(lm_runs, out, save, plt)
    if convex_runs:
        plot_convex(convex_runs, out, save, plt)


def plot_lm(lm_runs: list[dict[str, Any]], out: Path, save: Any, plt: Any) -> None:
    from vbpc.evaluation.plots import log_yaxis

    fig, ax = plt.subplots(figsize=(7, 4.4))
    seed = min(r["seed"] for r in lm_runs)
    for r in (r for r in lm_runs if r["seed"] == seed):
        c = r["curve"][1:]
        ax.plot([p["step"] for p in c], [p["val_ppl"] for p in c], marker=".", label=r["variant"],
                ls="--" if r["variant"].startswith("IVON") else "-")
    log_yaxis(ax)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("validation perplexity (per character)")
    ax.set_title(f"IVON-PoCoMo ablation, char GPT-mini on Shakespeare (seed {seed})")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "ablation_lm.png")


def plot_convex(convex_runs: list[dict[str, Any]], out: Path, save: Any, plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for r in (r for r in convex_runs if r["seed"] == 0):
        xs = [p["passes"] for p in r["curve"]]
        ys = [min(max(p["rel_subopt"], 1e-16), 1e3) if math.isfinite(p["rel_subopt"]) else 1e3 for p in r["curve"]]
        ax.semilogy(xs, ys, marker=".", label=r["variant"], ls="--" if r["variant"].startswith("IVON") else "-")
    ax.axhline(1e-6, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("passes over the data (gradient evaluations / N)")
    ax.set_ylabel("relative suboptimality (f - f*) / f*")
    ax.set_title("IVON-PoCo ablation, logistic regression on Fashion-MNIST (seed 0)")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "ablation_convex.png")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: the lm and convex --quick problems, 1 seed")
    ap.add_argument("--lm-steps", type=int, default=400)
    ap.add_argument("--lm-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--convex-epochs", type=int, default=10)
    ap.add_argument("--convex-seeds", type=int, default=3)
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--lm-defaults", default="selected", choices=["selected", "fixed"],
                    help="the LM default: the lm study's selected IVON-PoCoMo (when complete) or lm.py's defaults")
    ap.add_argument("--skip-convex", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--from-json", action="store_true",
                    help="rebuild ablation.md and the figures from --out/ablation.json without rerunning")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.from_json:
        return rebuild(out)
    report: dict[str, Any] = {"settings": vars(args)}
    if not args.skip_lm:
        base = lm_base(args)
        report["lm_default"] = {k: getattr(base, k) for k in LM_OPTIONS}
        report["lm"] = run_lm(args, base)
    if not args.skip_convex:
        report["convex"], report["convex_f_star"] = run_convex(args)
    atomic_write_text(out / "ablation.json", json.dumps(report, indent=1))
    write_outputs(report, out)
    return 0


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """``ablation.md`` and the figures from a report (``lm`` and/or ``convex`` runs)."""
    md = []
    if report.get("lm"):
        md.append(lm_table(report["lm"], report["lm_default"]))
    if report.get("convex"):
        md.append(convex_table(report["convex"]))
    text = "\n".join(md)
    print(text)
    plot(report.get("lm", []), report.get("convex", []), out)
    atomic_write_text(out / "ablation.md", text)


def rebuild(out: Path) -> int:
    """Rewrite ``ablation.md`` and the figures from an existing ``ablation.json`` (``--from-json``)."""
    path = out / "ablation.json"
    if not path.is_file():
        raise FileNotFoundError(f"--from-json: {path} does not exist; run the ablation first")
    write_outputs(json.loads(path.read_text()), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
