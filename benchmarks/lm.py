"""LM benchmark: character-level GPT-mini pretraining on Shakespeare's complete works, AdamW vs
IVON vs IVON-PoCoMo, several seeds, compared at equal steps, equal gradient evaluations and equal
wall clock.

Model: :func:`vbpc.models.char_gpt2` (random init; default 4 layers x 128 wide, 4 heads, context
128), batch 16 x 128 characters, warm-up then cosine decay to 0, the real corpus split 90/10.
Methods (one ``--steps`` budget; hyperparameters of ``vbpc gpt`` / ALGORITHMS.md §11 scaled down):

* ``adamw``: nanoGPT-style AdamW, lr 2e-3, betas (0.9, 0.95), weight decay 0.1 on >=2-D weights,
  gradient-norm clipping 1.0;
* ``ivon``: vbpc IVON, a = 100, h0 = 1e-2, beta1 0.9, beta2 0.999, ξ = 1e-3, δ = 1e-6 on >=2-D
  weights, ess = 10 x the training tokens;
* ``ivon-pocomo``: IVON-PoCoMo (ALGORITHMS.md §6, eqs. 21-22) with the same IVON settings,
  α0 = 0.75 decaying linearly to 0 over the anchor intervals, anchor refreshed after the warm-up
  and then every ``--anchor-period`` steps on a fresh mega-batch of ``--megabatch`` sequences
  (512 = 32 batches, §6.2's example; the error of the mega-batch mean is the same for all T steps
  of a period, so a small one biases the whole period: see the ``ablation`` benchmark);
  two gradient evaluations per step (current + anchor, same batch, shared noise);
* ``ivon-pocomo-matched``: the same learner with its step budget cut so that its gradient
  evaluations (inner passes + refreshes) equal the others' (its own full cosine schedule).

Gradient evaluations are counted in sequences (one forward/backward of one 128-character block):
``steps x batch`` for AdamW/IVON, ``counters["inner_examples"] + counters["refresh_examples"]`` for
PoCoMo.  Wall clock is training time only (evaluation excluded), measured per run in one process.
Every ``--eval-every`` steps the validation loss/perplexity and the token-level ECE (15 bins,
ALGORITHMS.md §9) are measured at the posterior mean on ``--eval-blocks`` fixed validation blocks;
at the end also by BMA over ``--test-samples`` posterior samples (eq. 33).

Run:  python -m benchmarks run lm [--quick|--full]     (or python benchmarks/lm.py ...)
Writes ``lm.json``, ``lm.md`` and ``lm_{steps,evals,wallclock}.png`` into ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

import vbpc
from vbpc.data import CharTokenizer, RandomBlocks, SequentialBlocks, load_corpus, split_tokens
from vbpc.data.loading import seed_everything
from vbpc.inference.poco import alpha_at
from vbpc.io import atomic_write_text
from vbpc.metrics import token_metrics
from vbpc.models import causal_lm_loss, char_gpt2
from vbpc.training import warmup_cosine_scheduler

METHODS = ("adamw", "ivon", "ivon-pocomo", "ivon-pocomo-matched")
LABELS = {"adamw": "AdamW", "ivon": "IVON", "ivon-pocomo": "IVON-PoCoMo",
          "ivon-pocomo-matched": "IVON-PoCoMo (equal grad. evals)"}


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--quick", action="store_true", help="CI size: 1 seed, 24 steps, a 2 x 64 model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-blocks", type=int, default=48)
    ap.add_argument("--test-samples", type=int, default=4)
    ap.add_argument("--adamw-lr", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=100.0, help="IVON learning rate a")
    ap.add_argument("--hess-init", type=float, default=1e-2)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--clip-radius", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-6)
    # IVON-PoCoMo options (the ablation varies these)
    ap.add_argument("--alpha", type=float, default=0.75)
    ap.add_argument("--alpha-schedule", default="linear", choices=["constant", "linear"])
    ap.add_argument("--anchor-period", type=int, default=100)
    ap.add_argument("--megabatch", type=int, default=512,
                    help="sequences per refresh (32 batches, as ALGORITHMS.md §6.2 suggests)")
    ap.add_argument("--anchor-noise", default="shared", choices=["shared", "independent"])
    ap.add_argument("--no-correct-hessian", dest="correct_hessian", action="store_false")
    ap.add_argument("--proximal", action="store_true")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes (GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--from-json", action="store_true",
                    help="rebuild lm.md and the figures from --out/lm.json without retraining")
    return ap


def quick(args: argparse.Namespace) -> argparse.Namespace:
    """Shrink ``args`` to the CI size (every code path, seconds of work)."""
    args.seeds = args.seeds[:1]
    args.steps, args.warmup, args.eval_every, args.eval_blocks, args.test_samples = 24, 4, 8, 4, 2
    args.n_layer, args.n_embd, args.n_head, args.batch_size, args.block_size = 2, 64, 2, 4, 32
    args.anchor_period, args.megabatch = 8, 8
    return args


class Data:
    """The corpus, the tokenizer, the training stream and fixed validation blocks."""

    def __init__(self, args: argparse.Namespace):
        self.device = device_of(args)
        text = load_corpus("shakespeare")
        self.tok = CharTokenizer(text)
        train, val = split_tokens(self.tok.encode(text), 0.1)
        self.train = train.to(self.device)
        blocks = SequentialBlocks(val[: args.eval_blocks * args.block_size + 1], args.block_size)
        x, y = blocks[list(range(len(blocks)))]
        self.val = (x.to(self.device), y.to(self.device))
        self.n_chars = len(text)


def device_of(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _clock(device: torch.device) -> float:
    """``time.perf_counter`` after the device's queued work (CUDA kernels are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """Weight decay on >=2-D weights only (ALGORITHMS.md §11)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(method: str, model: nn.Module, args: argparse.Namespace, ess: float,
                   steps: int) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(_groups(model, 0.1), lr=args.adamw_lr, betas=(0.9, 0.95))
    ivon = dict(lr=args.lr, ess=ess, hess_init=args.hess_init, beta1=0.9, beta2=args.beta2,
                clip_radius=args.clip_radius)
    if method == "ivon":
        return vbpc.IVON(_groups(model, args.weight_decay), **ivon)
    return vbpc.IVONPoCo(_groups(model, args.weight_decay), **ivon, alpha=args.alpha,
                         alpha_schedule=args.alpha_schedule, total_steps=steps, anchor_period=args.anchor_period,
                         warmup_steps=args.warmup, anchor_noise=args.anchor_noise,
                         correct_hessian=args.correct_hessian, proximal=args.proximal)


def pocomo_cost(args: argparse.Namespace, steps: int) -> int:
    r"""Gradient evaluations (sequences) of an IVON-PoCoMo run of ``steps`` steps: :math:`B` per step,
    :math:`B` more per step whose :math:`\alpha_t>0` (the anchor pass; none in the warm-up nor in
    the last interval of the linear schedule) and an antithetic pair per mega-batch sequence at each
    of the :math:`K=\lceil(S-t_w)/T\rceil` refreshes (eq. 24)."""
    b, tw, t, m = args.batch_size, args.warmup, args.anchor_period, args.megabatch
    k = max(0, math.ceil((steps - tw) / t))
    corrected = sum(min(t, steps - tw - i * t) for i in range(k)
                    if alpha_at(args.alpha, args.alpha_schedule, i, k) > 0)
    return b * steps + b * corrected + 2 * m * k


def matched_steps(args: argparse.Namespace) -> int:
    """Steps of ``ivon-pocomo-matched``: the most steps whose :func:`pocomo_cost` does not exceed the
    others' ``steps x batch`` gradient evaluations."""
    budget = args.batch_size * args.steps
    return max(s for s in range(1, args.steps + 1) if pocomo_cost(args, s) <= budget)


def logits_of(model: nn.Module, x: Tensor, bf16: bool = False) -> Tensor:
    """The model's logits, under bf16 autocast when asked (the optimizer state stays fp32)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).logits


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, posterior: Optional[vbpc.GaussianPosterior] = None,
             samples: int = 0, seed: int = 0, bf16: bool = False) -> dict[str, float]:
    """Token metrics on the validation blocks (labels already shifted), at the weights or by BMA
    (a running ``logaddexp`` of the per-sample log-probabilities, eq. 33)."""
    model.eval()
    if posterior is None or samples == 0:
        logits = logits_of(model, x, bf16).float()
        m = token_metrics(logits, y, shift=False)
    else:
        g = torch.Generator(device=x.device).manual_seed(seed)
        acc: Optional[Tensor] = None
        for _ in range(samples):
            with posterior.sampled(model, generator=g):
                lp = torch.log_softmax(logits_of(model, x, bf16).float(), -1)
            acc = lp if acc is None else torch.logaddexp(acc, lp)
        assert acc is not None
        m = token_metrics(acc - math.log(samples), y, shift=False, inputs="log_probs")
    model.train()
    return {"val_loss": m["nll"], "val_ppl": m["perplexity"], "val_ece": m["ece"], "val_acc": m["accuracy"]}


def run_one(method: str, seed: int, args: argparse.Namespace, data: Data) -> dict[str, Any]:
    """Train one method from one seed; returns its evaluation curve and summary."""
    steps = matched_steps(args) if method == "ivon-pocomo-matched" else args.steps
    seed_everything(seed)
    model = char_gpt2(data.tok.vocab_size, args.block_size, args.n_layer, args.n_embd, args.n_head).to(data.device)
    ess = 10.0 * data.train.numel()
    opt = make_optimizer(method, model, args, ess, steps)
    sched = warmup_cosine_scheduler(opt, args.warmup, steps)
    batches = RandomBlocks(data.train, args.block_size, args.batch_size, steps, seed=seed)
    mega = torch.Generator().manual_seed(10_000 + seed)
    poco = isinstance(opt, vbpc.IVONPoCo)

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        return causal_lm_loss(logits_of(model, batch[0], args.bf16), batch[1])

    curve: list[dict[str, float]] = []
    train_s, evals = 0.0, 0

    def record(step: int) -> None:
        ge = (opt.counters["inner_examples"] + opt.counters["refresh_examples"]) if poco else evals
        curve.append({"step": step, "grad_evals": int(ge), "seconds": train_s,
                      **evaluate(model, *data.val, bf16=args.bf16)})

    record(0)
    for step, (x, y) in enumerate(batches, 1):
        t0 = _clock(data.device)
        if poco and opt.refresh_due:  # type: ignore[attr-defined]
            mb = RandomBlocks(data.train, args.block_size, args.batch_size,
                              math.ceil(args.megabatch / args.batch_size), generator=mega)
            opt.refresh(loss_fn, list(mb), model=model, progress=False)  # type: ignore[attr-defined]

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            opt.zero_grad()
            loss = causal_lm_loss(logits_of(model, x, args.bf16), y)
            loss.backward()
            if method == "adamw":
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            return loss

        loss = opt.step(closure, batch_size=len(x)) if poco else opt.step(closure)  # type: ignore[call-arg]
        sched.step()
        evals += len(x)
        train_s += _clock(data.device) - t0
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{method} seed {seed}: loss {float(loss.detach())} at step {step}")
        if step % args.eval_every == 0 or step == steps:
            record(step)
            if not args.no_progress:
                c = curve[-1]
                print(f"  {method} seed {seed} step {step}/{steps}: val ppl {c['val_ppl']:.3f}, "
                      f"ECE {c['val_ece']:.4f}, {c['grad_evals']} grad evals, {c['seconds']:.0f} s", flush=True)
    final = dict(curve[-1])
    if method != "adamw" and args.test_samples > 0:
        bma = evaluate(model, *data.val, opt.posterior(model), args.test_samples, seed,  # type: ignore[attr-defined]
                       bf16=args.bf16)
        final.update({f"{k}_bma": v for k, v in bma.items()})
    return {"method": method, "seed": seed, "steps": steps, "curve": curve, "final": final}


def interp(curve: list[dict[str, float]], axis: str, at: float, key: str = "val_ppl") -> float:
    """``key`` linearly interpolated at ``axis == at`` (NaN beyond the curve's end)."""
    xs = [c[axis] for c in curve]
    if at > xs[-1] + 1e-9:
        return float("nan")
    for (x0, c0), (x1, c1) in zip(zip(xs, curve), zip(xs[1:], curve[1:])):
        if x0 <= at <= x1:
            w = 0.0 if x1 == x0 else (at - x0) / (x1 - x0)
            return c0[key] + w * (c1[key] - c0[key])
    return curve[0][key]


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd)}"


def summarize(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The markdown table and its numbers: final (equal steps), and every method's curve read at
    the smallest final gradient-evaluation count and the smallest final wall clock of all methods."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    g_star = min(r["curve"][-1]["grad_evals"] for r in runs)
    t_star = min(r["curve"][-1]["seconds"] for r in runs)
    rows, table = [], {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        f = [r["final"] for r in rs]
        row = {
            "steps": rs[0]["steps"],
            "grad_evals": statistics.mean(x["grad_evals"] for x in f),
            "seconds": statistics.mean(x["seconds"] for x in f),
            "val_ppl": [x["val_ppl"] for x in f],
            "val_ppl_bma": [x.get("val_ppl_bma", float("nan")) for x in f],
            "val_ece": [x["val_ece"] for x in f],
            "val_ece_bma": [x.get("val_ece_bma", float("nan")) for x in f],
            "ppl_at_equal_evals": [interp(r["curve"], "grad_evals", g_star) for r in rs],
            "ppl_at_equal_time": [interp(r["curve"], "seconds", t_star) for r in rs],
        }
        table[m] = row
        rows.append(f"| {LABELS[m]} | {row['steps']} | {row['grad_evals']:,.0f} | {row['seconds']:.0f} | "
                    f"{_ms(row['val_ppl'])} | {_ms(row['val_ppl_bma'])} | {_ms(row['val_ece'], '{:.4f}')} | "
                    f"{_ms(row['ppl_at_equal_evals'])} | {_ms(row['ppl_at_equal_time'])} |")
    seeds = sorted({r["seed"] for r in runs})
    head = [f"Seeds {seeds}; mean ± std. Perplexity per character on the validation blocks, at the posterior "
            f"mean (BMA: {{n}} samples); equal grad. evals = every curve read at {g_star:,} sequences, equal "
            f"wall clock = at {t_star:.0f} s of training (the smallest final value of any method).", "",
            "| method | steps | grad. evals (sequences) | train s | val ppl (equal steps) | val ppl BMA | token ECE | "
            "val ppl @ equal grad. evals | val ppl @ equal wall clock |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(head + rows) + "\n", {"g_star": g_star, "t_star": t_star, "methods": table}


def plot(runs: list[dict[str, Any]], out: Path, title: str, clock: str = "CPU") -> list[Path]:
    """One figure per compute axis (steps, gradient evaluations, wall clock): validation
    perplexity and token ECE, the seed mean as a line and the seed min-max as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vbpc.evaluation.plots import log_yaxis, save_figure

    axes = {"steps": ("step", "optimizer steps"), "evals": ("grad_evals", "gradient evaluations (sequences)"),
            "wallclock": ("seconds", f"training wall clock (s, {clock})")}
    paths = []
    for name, (key, xlabel) in axes.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for m in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["method"] == m]
            n = min(len(r["curve"]) for r in rs)
            xs = [statistics.mean(r["curve"][i][key] for r in rs) for i in range(n)]
            for ax, metric in ((a1, "val_ppl"), (a2, "val_ece")):
                ys = [[r["curve"][i][metric] for r in rs] for i in range(n)]
                line, = ax.plot(xs[1:], [statistics.mean(y) for y in ys[1:]], label=LABELS[m], marker=".")
                ax.fill_between(xs[1:], [min(y) for y in ys[1:]], [max(y) for y in ys[1:]],
                                color=line.get_color(), alpha=0.2)
        log_yaxis(a1)
        a1.set_ylabel("validation perplexity (per character)")
        a2.set_ylabel("token-level ECE (15 bins)")
        for ax in (a1, a2):
            ax.set_xlabel(xlabel)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}: against {xlabel.split(' (')[0]}")
        fig.tight_layout()
        path = out / f"lm_{name}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """``lm.md`` and the three figures from a report (``settings``, ``clock`` and ``runs``)."""
    s = report["settings"]
    md = summarize(report["runs"])[0].replace("{n}", str(s["test_samples"]))
    print(md)
    title = f"char GPT-mini {s['n_layer']}x{s['n_embd']} on Shakespeare, seeds {s['seeds']}"
    plot(report["runs"], out, title, report.get("clock", f"CPU, {s['threads']} threads"))
    atomic_write_text(out / "lm.md", md)


def rebuild(out: Path) -> int:
    """Rewrite ``lm.md`` and the figures from an existing ``lm.json`` without retraining (``--from-json``)."""
    path = out / "lm.json"
    if not path.is_file():
        raise FileNotFoundError(f"--from-json: {path} does not exist; run the benchmark first")
    write_outputs(json.loads(path.read_text()), out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    if args.from_json:
        return rebuild(Path(args.out))
    if args.quick:
        args = quick(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = Data(args)
    params = sum(p.numel() for p in char_gpt2(data.tok.vocab_size, args.block_size, args.n_layer, args.n_embd,
                                                args.n_head).parameters())
    print(f"{data.device}{' bf16' if args.bf16 else ''}: Shakespeare: {data.n_chars:,} characters, "
          f"vocab {data.tok.vocab_size}, {data.train.numel():,} train "
          f"tokens; GPT-mini {args.n_layer}x{args.n_embd}, {params:,} parameters; {args.steps} steps "
          f"(matched PoCoMo: {matched_steps(args)})", flush=True)
    runs = []
    for seed in args.seeds:  # interleaved: every method of a seed before the next seed
        for method in args.methods:
            r = run_one(method, seed, args, data)
            runs.append(r)
            f = r["final"]
            print(f"{method:20s} seed {seed}: {r['steps']} steps, val ppl {f['val_ppl']:.3f} "
                  f"(BMA {f.get('val_ppl_bma', float('nan')):.3f}), ECE {f['val_ece']:.4f}, "
                  f"{f['grad_evals']:,} grad evals, {f['seconds']:.0f} s", flush=True)
    dev = data.device
    clock = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    report = {"settings": vars(args), "params": params, "clock": clock, "summary": summarize(runs)[1], "runs": runs}
    atomic_write_text(out / "lm.json", json.dumps(report, indent=1))
    write_outputs(report, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
