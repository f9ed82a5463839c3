"""LM study: character-level GPT-mini on Shakespeare's complete works, AdamW vs IVON vs IVON-PoCoMo,
tuned on a validation split, then compared over paired seeds at equal steps, equal gradient
evaluations and equal wall clock.

**Data.**  The real corpus is split 90/10 into training and test text (contiguous).  The last
``--tune-blocks`` x 128 characters of the training text are held out as the **validation
split**: no run trains on them, and every hyperparameter is chosen there.  The final runs are
scored on ``--eval-blocks`` (256) fixed blocks of the test text, never used for selection.

**Model.**  :func:`vbpc.models.char_gpt2` (random init; 4 layers x 128, 4 heads, context 128), batch
16 x 128 characters, warm-up then cosine decay to 0.

**Methods** (grids of the issue; every method gets 6 configurations x ``--select-seeds`` runs of
``--select-steps`` steps):

* ``adamw``: nanoGPT-style AdamW (betas 0.9/β2, weight decay 0.1 on >=2-D weights, gradient-norm
  clip 1.0 in the closure): lr in {1e-3, 2e-3, 4e-3} x β2 in {0.95, 0.99};
* ``ivon``: vbpc IVON (h0 1e-2, β1 0.9, ξ = 1e-3, δ = 1e-6 on >=2-D weights, ess = 10 x training
  tokens, ``clip_grad_norm=1.0`` inside the learner: each MC sample's gradient, the reference GPT-2
  recipe): a in {50, 100, 200} x β2 in {0.999, 0.99999};
* ``ivon-pocomo``: IVON-PoCoMo (eqs. 21-22) from IVON's selected (a, β2), linear α, mega-batch of
  ``--megabatch`` sequences, shared noise, Hessian corrected, clip on the corrected gradient:
  α0 in {0.5, 0.75} x T in {50, 100}, then at the best (α0, T) the two mega-batch remedies
  (``alpha_mode="optimal"``, ``anchor_update="running"``);
* ``ivon-pocomo-matched``: the selected PoCoMo with its step budget cut so that its gradient
  evaluations (inner passes + refreshes) do not exceed IVON's (its own full schedule).

A learning-rate grid whose best value sits on an edge is widened by a factor 2, up to
:data:`MAX_WIDEN` times, by the same rule for AdamW and IVON (:func:`widen`).

**Final runs.**  ``--steps`` (1600) steps for each method at each of ``--seeds`` (0-4): at a given
seed every method starts from the same initial weights and sees the same batches (paired).

**Axes.**  Gradient evaluations are counted in sequences (one forward/backward of one block).  Wall
clock is a cost model: the seconds per AdamW step, IVON step, corrected PoCoMo step and refresh
sequence are measured once, interleaved in one process (``--phase timing``), and each curve's
time is its step counts times those costs, so a busy machine cannot bias the comparison; every
run's raw training seconds are kept in its file too.

**Report.**  Paired differences of test perplexity against IVON and against AdamW, mean with a
95% t-interval over the seeds, at equal steps, at the smallest final gradient-evaluation count
and at the smallest final modelled wall clock of the compared pair; token ECE; the BMA effect
(perplexity by BMA over ``--test-samples`` samples minus at the posterior mean).

**Jobs.**  Every run is one job whose result is a JSON file under ``--runs`` (the study resumes
from them; a finished job is never rerun).  ``--workers N`` runs N worker processes of one thread
each; a job is claimed through an exclusive lock file, and a job that depends on a selection waits
for it.  ``--phase`` picks ``select``, ``final``, ``timing``, ``report`` or ``all``.

Run:  python -m benchmarks run lm [--quick|--full]     (or python benchmarks/lm.py ...)
Writes ``lm.json``, ``lm.md`` and ``lm_{steps,evals,wallclock}.png`` into ``--out`` (atomically).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

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
#: the hyperparameters a configuration may set (everything else comes from the command line)
TUNED = ("adamw_lr", "adamw_beta2", "lr", "beta2", "alpha", "anchor_period", "alpha_mode", "anchor_update")


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--quick", action="store_true", help="CI size: tiny model, grids of one, 2 seeds")
    ap.add_argument("--phase", default="all", choices=["select", "final", "timing", "report", "all"])
    ap.add_argument("--workers", type=int, default=1, help="worker processes (one thread each when > 1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--select-steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-blocks", type=int, default=256, help="test blocks of the final runs")
    ap.add_argument("--tune-blocks", type=int, default=256, help="validation blocks held out of the training text")
    ap.add_argument("--test-samples", type=int, default=4)
    # defaults of every configuration (a grid overrides the TUNED ones)
    ap.add_argument("--adamw-lr", type=float, default=2e-3)
    ap.add_argument("--adamw-beta2", type=float, default=0.95)
    ap.add_argument("--lr", type=float, default=100.0, help="IVON learning rate a")
    ap.add_argument("--hess-init", type=float, default=1e-2)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--clip-radius", type=float, default=1e-3)
    ap.add_argument("--clip-grad-norm", type=float, default=1.0, help="IVON/PoCoMo in-learner clip (0: off)")
    ap.add_argument("--weight-decay", type=float, default=1e-6)
    ap.add_argument("--alpha", type=float, default=0.75)
    ap.add_argument("--alpha-schedule", default="linear", choices=["constant", "linear"])
    ap.add_argument("--anchor-period", type=int, default=100)
    ap.add_argument("--megabatch", type=int, default=512,
                    help="sequences per refresh (32 batches)")
    ap.add_argument("--anchor-noise", default="shared", choices=["shared", "independent"])
    ap.add_argument("--no-correct-hessian", dest="correct_hessian", action="store_false")
    ap.add_argument("--proximal", action="store_true")
    ap.add_argument("--alpha-mode", default="scheduled", choices=list(vbpc.inference.ivon_poco.ALPHA_MODES))
    ap.add_argument("--anchor-update", default="frozen", choices=list(vbpc.inference.ivon_poco.ANCHOR_UPDATES))
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes (GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-rounds", type=int, default=7)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--runs", default=None, help="job results (default: OUT/lm_runs)")
    ap.add_argument("--from-json", action="store_true",
                    help="rebuild lm.md and the figures from --out/lm.json without retraining")
    return ap


def quick(args: argparse.Namespace) -> argparse.Namespace:
    """Shrink ``args`` to the CI size (every code path, seconds of work)."""
    args.seeds, args.select_seeds = args.seeds[:2], args.select_seeds[:1]
    args.steps, args.select_steps, args.warmup, args.eval_every = 24, 12, 4, 8
    args.eval_blocks, args.tune_blocks, args.test_samples = 4, 4, 2
    args.n_layer, args.n_embd, args.n_head, args.batch_size, args.block_size = 2, 64, 2, 4, 32
    args.anchor_period, args.megabatch, args.timing_rounds = 8, 8, 2
    return args


# ---------------------------------------------------------------------------------------------- grids
def grids(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The selection grids (method -> configurations); PoCoMo's stage-1 grid (its remedies are added
    by :func:`pocomo_stage2` once stage 1 is selected).  ``--quick``: one configuration each."""
    if args.quick:
        return {"adamw": [{"adamw_lr": 2e-3, "adamw_beta2": 0.95}], "ivon": [{"lr": 100.0, "beta2": 0.999}],
                "ivon-pocomo": [{"alpha": 0.75, "anchor_period": args.anchor_period}]}
    return {"adamw": [{"adamw_lr": lr, "adamw_beta2": b2} for lr in (1e-3, 2e-3, 4e-3) for b2 in (0.95, 0.99)],
            "ivon": [{"lr": lr, "beta2": b2} for lr in (50.0, 100.0, 200.0) for b2 in (0.999, 0.99999)],
            "ivon-pocomo": [{"alpha": a, "anchor_period": t} for a in (0.5, 0.75) for t in (50, 100)]}


def pocomo_stage2(best: dict[str, Any]) -> list[dict[str, Any]]:
    """The mega-batch remedies at the selected (α0, T)."""
    return [{**best, "alpha_mode": "optimal"}, {**best, "anchor_update": "running"}]


#: how many times a learning-rate grid is widened when its best value sits on an edge
MAX_WIDEN = 4


def widen(cfgs: list[dict[str, Any]], best: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The configurations one factor-2 step beyond the grid's edge in ``key`` when the ``best``
    configuration sits on that edge (the others of its row kept), else ``[]``."""
    values = sorted({c[key] for c in cfgs})
    if len(values) < 2:
        return []
    if best[key] == values[-1]:
        new = values[-1] * 2
    elif best[key] == values[0]:
        new = values[0] / 2
    else:
        return []
    rows = [c for c in cfgs if c[key] == best[key]]
    return [{**c, key: new} for c in rows]


def cfg_name(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={cfg[k]:g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}" for k in sorted(cfg))


def settings_of(args: argparse.Namespace, cfg: dict[str, Any]) -> argparse.Namespace:
    bad = set(cfg) - set(TUNED)
    if bad:
        raise ValueError(f"configuration sets untunable {sorted(bad)}")
    return argparse.Namespace(**{**vars(args), **cfg})


# ----------------------------------------------------------------------------------------------- data
class Data:
    """The corpus, the tokenizer, the training stream (validation split held out), the validation
    blocks and the test blocks."""

    def __init__(self, args: argparse.Namespace):
        self.device = device_of(args)
        text = load_corpus("shakespeare")
        self.tok = CharTokenizer(text)
        train, test = split_tokens(self.tok.encode(text), 0.1)
        n_tune = args.tune_blocks * args.block_size + 1
        if n_tune >= train.numel() // 2:
            raise ValueError(f"--tune-blocks {args.tune_blocks} would hold out half the training text")
        self.train = train[:-n_tune].to(self.device)  # the validation split is never trained on
        self.splits = {"tune": self._blocks(train[-n_tune:], args.tune_blocks, args.block_size),
                       "test": self._blocks(test, args.eval_blocks, args.block_size)}
        self.n_chars = len(text)

    def _blocks(self, tokens: Tensor, n: int, block: int) -> tuple[Tensor, Tensor]:
        blocks = SequentialBlocks(tokens[: n * block + 1], block)
        if len(blocks) < n:
            raise ValueError(f"only {len(blocks)} blocks of {block} characters available, {n} asked")
        x, y = blocks[list(range(n))]
        return x.to(self.device), y.to(self.device)


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
    """Weight decay on >=2-D weights only (the GPT-2 recipes)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(method: str, model: nn.Module, args: argparse.Namespace, ess: float,
                   steps: int) -> torch.optim.Optimizer:
    if method == "adamw":
        return torch.optim.AdamW(_groups(model, 0.1), lr=args.adamw_lr, betas=(0.9, args.adamw_beta2))
    ivon = dict(lr=args.lr, ess=ess, hess_init=args.hess_init, beta1=0.9, beta2=args.beta2,
                clip_radius=args.clip_radius, clip_grad_norm=args.clip_grad_norm or None)
    if method == "ivon":
        return vbpc.IVON(_groups(model, args.weight_decay), **ivon)
    return vbpc.IVONPoCo(_groups(model, args.weight_decay), **ivon, alpha=args.alpha,
                         alpha_schedule=args.alpha_schedule, total_steps=steps, anchor_period=args.anchor_period,
                         warmup_steps=args.warmup, anchor_noise=args.anchor_noise,
                         correct_hessian=args.correct_hessian, proximal=args.proximal,
                         alpha_mode=getattr(args, "alpha_mode", "scheduled"),
                         anchor_update=getattr(args, "anchor_update", "frozen"))


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


def matched_steps(args: argparse.Namespace, budget_steps: Optional[int] = None) -> int:
    """Steps of ``ivon-pocomo-matched``: the most steps whose :func:`pocomo_cost` does not exceed the
    others' ``steps x batch`` gradient evaluations."""
    steps = args.steps if budget_steps is None else budget_steps
    budget = args.batch_size * steps
    return max(s for s in range(1, steps + 1) if pocomo_cost(args, s) <= budget)


def logits_of(model: nn.Module, x: Tensor, bf16: bool = False) -> Tensor:
    """The model's logits, under bf16 autocast when asked (the optimizer state stays fp32)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(x).logits


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, posterior: Optional[vbpc.GaussianPosterior] = None,
             samples: int = 0, seed: int = 0, bf16: bool = False, chunk: int = 64) -> dict[str, float]:
    """Token metrics on fixed blocks (labels already shifted), at the weights or by BMA (a running
    ``logaddexp`` of the per-sample log-probabilities, eq. 33); blocks go through in chunks."""
    model.eval()

    def log_probs() -> Tensor:
        return torch.cat([torch.log_softmax(logits_of(model, x[i:i + chunk], bf16).float(), -1)
                          for i in range(0, len(x), chunk)])

    if posterior is None or samples == 0:
        lp = log_probs()
    else:
        g = torch.Generator(device=x.device).manual_seed(seed)
        acc: Optional[Tensor] = None
        for _ in range(samples):
            with posterior.sampled(model, generator=g):
                cur = log_probs()
            acc = cur if acc is None else torch.logaddexp(acc, cur)
        assert acc is not None
        lp = acc - math.log(samples)
    m = token_metrics(lp, y, shift=False, inputs="log_probs")
    model.train()
    return {"val_loss": m["nll"], "val_ppl": m["perplexity"], "val_ece": m["ece"], "val_acc": m["accuracy"]}


def run_one(method: str, seed: int, args: argparse.Namespace, data: Data, split: str = "test",
            steps: Optional[int] = None) -> dict[str, Any]:
    """Train one method from one seed; returns its evaluation curve (on ``split``) and summary.

    Every curve point records the step counts of the wall-clock model: ``plain_steps`` (one pass),
    ``corrected_steps`` (current + anchor pass) and ``refresh_seqs`` (mega-batch sequences)."""
    if steps is None:
        steps = matched_steps(args) if method == "ivon-pocomo-matched" else args.steps
    seed_everything(seed)  # the same initial weights for every method at this seed
    model = char_gpt2(data.tok.vocab_size, args.block_size, args.n_layer, args.n_embd, args.n_head).to(data.device)
    ess = 10.0 * data.train.numel()
    opt = make_optimizer(method, model, args, ess, steps)
    sched = warmup_cosine_scheduler(opt, args.warmup, steps)
    batches = RandomBlocks(data.train, args.block_size, args.batch_size, steps, seed=seed)  # the same batches
    mega = torch.Generator().manual_seed(10_000 + seed)
    poco = isinstance(opt, vbpc.IVONPoCo)
    x_eval, y_eval = data.splits[split]

    def loss_fn(batch: tuple[Tensor, Tensor]) -> Tensor:
        return causal_lm_loss(logits_of(model, batch[0], args.bf16), batch[1])

    curve: list[dict[str, float]] = []
    train_s, evals, corrected = 0.0, 0, 0

    def record(step: int) -> None:
        ge = (opt.counters["inner_examples"] + opt.counters["refresh_examples"]) if poco else evals
        refresh_seqs = opt.counters["refresh_examples"] // 2 if poco else 0  # antithetic pairs
        curve.append({"step": step, "grad_evals": int(ge), "seconds": train_s, "plain_steps": step - corrected,
                      "corrected_steps": corrected, "refresh_seqs": int(refresh_seqs),
                      **evaluate(model, x_eval, y_eval, bf16=args.bf16)})

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
            if method == "adamw":  # torch's AdamW has no clip of its own
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            return loss

        if poco:
            passes = opt.counters["inner_passes"]  # type: ignore[attr-defined]
            loss = opt.step(closure, batch_size=len(x))  # type: ignore[call-arg]
            corrected += int(opt.counters["inner_passes"] - passes == 2)  # type: ignore[attr-defined]
        else:
            loss = opt.step(closure)
        sched.step()
        evals += len(x)
        train_s += _clock(data.device) - t0
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{method} seed {seed}: loss {float(loss.detach())} at step {step}")
        if step % args.eval_every == 0 or step == steps:
            record(step)
            if not args.no_progress:
                c = curve[-1]
                print(f"  {method} seed {seed} step {step}/{steps}: {split} ppl {c['val_ppl']:.3f}, "
                      f"ECE {c['val_ece']:.4f}, {c['grad_evals']} grad evals, {c['seconds']:.0f} s", flush=True)
    final = dict(curve[-1])
    if method != "adamw" and args.test_samples > 0:
        bma = evaluate(model, x_eval, y_eval, opt.posterior(model), args.test_samples, seed,  # type: ignore[attr-defined]
                       bf16=args.bf16)
        final.update({f"{k}_bma": v for k, v in bma.items()})
    extra = {"clipped_steps": opt.counters["clipped_steps"]} if hasattr(opt, "counters") else {}
    if poco and getattr(opt, "alpha_mode", "") == "optimal":
        est = opt.alpha_estimates()  # type: ignore[attr-defined]
        extra["alpha_star_mean"] = statistics.mean(est.values()) if est else float("nan")
    return {"method": method, "seed": seed, "steps": steps, "split": split, "curve": curve, "final": final, **extra}


# ------------------------------------------------------------------------------------------------ jobs
def _guarded(run: Callable[[], dict[str, Any]], method: str, seed: int, cfg: dict[str, Any],
             split: str) -> dict[str, Any]:
    """A run, or its divergence recorded as an infinite final perplexity (a diverged configuration
    loses the selection instead of stopping the study)."""
    try:
        r = run()
    except (FloatingPointError, vbpc.errors.NonFiniteError) as e:
        inf = float("inf")
        r = {"method": method, "seed": seed, "split": split, "diverged": str(e), "curve": [],
             "final": {"val_ppl": inf, "val_loss": inf, "val_ece": float("nan"), "val_acc": float("nan")}}
    r["config"] = cfg
    return r


class Jobs:
    """The study as jobs whose results are files: ``select`` runs of every configuration, ``final``
    runs of each method's selected configuration, a ``timing`` calibration.  A job is claimed with
    an exclusive lock file, so several workers share one list without running a job twice."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dir = Path(args.runs or Path(args.out) / "lm_runs")
        self.dir.mkdir(parents=True, exist_ok=True)
        key = json.dumps({k: v for k, v in sorted(vars(args).items()) if k in FINGERPRINT}, sort_keys=True)
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:10]

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def load(self, key: str) -> Optional[dict[str, Any]]:
        p = self.path(key)
        if not p.is_file():
            return None
        r = json.loads(p.read_text())
        if r.get("fingerprint") != self.fingerprint:
            raise RuntimeError(f"{p} was produced with other study settings (fingerprint {r.get('fingerprint')} != "
                               f"{self.fingerprint}); move the folder away or pass --runs DIR")
        return r

    # selection ------------------------------------------------------------------------------------
    def select_key(self, method: str, cfg: dict[str, Any], seed: int) -> str:
        return f"select-{method}-{cfg_name(cfg)}-s{seed}"

    def selection(self, method: str, cfgs: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The configuration with the lowest mean validation perplexity (None until all ran)."""
        scores = []
        for cfg in cfgs:
            rs = [self.load(self.select_key(method, cfg, s)) for s in self.args.select_seeds]
            if any(r is None for r in rs):
                return None
            ppl = [r["final"]["val_ppl"] for r in rs]  # type: ignore[index]
            scores.append({"config": cfg, "val_ppl": ppl, "mean": statistics.mean(ppl)})
        best = min(scores, key=lambda s: s["mean"])
        return {"best": best["config"], "scores": scores}

    def widened(self, method: str, cfgs: list[dict[str, Any]], key: str) -> tuple[list[dict[str, Any]], bool]:
        """``cfgs`` widened while the best ``key`` (a learning rate) sits on the grid's edge (at most
        :data:`MAX_WIDEN` times, by a factor 2 each); ``(configurations, final)``.  The same rule for
        every method's learning rate."""
        cfgs = list(cfgs)
        for i in range(MAX_WIDEN + 1):
            sel = self.selection(method, cfgs)
            if sel is None:
                return cfgs, False
            extra = widen(cfgs, sel["best"], key) if i < MAX_WIDEN else []
            if not extra:
                return cfgs, True
            cfgs += extra
        return cfgs, True

    def stage_configs(self) -> dict[str, tuple[Optional[list[dict[str, Any]]], bool]]:
        """Every selection configuration known so far, with whether the method's selection is final
        (PoCoMo's wait on IVON's final selection and on their own stage 1)."""
        g = grids(self.args)
        out: dict[str, tuple[Optional[list[dict[str, Any]]], bool]] = {
            "adamw": self.widened("adamw", g["adamw"], "adamw_lr"), "ivon": self.widened("ivon", g["ivon"], "lr")}
        ivon_cfgs, ivon_final = out["ivon"]
        if not ivon_final:
            out["ivon-pocomo"] = (None, False)
            return out
        best = self.selection("ivon", ivon_cfgs)["best"]  # type: ignore[arg-type,index]
        stage1 = [{**best, **c} for c in g["ivon-pocomo"]]
        s1 = self.selection("ivon-pocomo", stage1)
        if s1 is None:
            out["ivon-pocomo"] = (stage1, False)
        else:
            every = stage1 + pocomo_stage2(s1["best"])
            out["ivon-pocomo"] = (every, self.selection("ivon-pocomo", every) is not None)
        return out

    def selected(self) -> Optional[dict[str, dict[str, Any]]]:
        cfgs = self.stage_configs()
        if not all(final for _, final in cfgs.values()):
            return None
        return {m: self.selection(m, c) for m, (c, _) in cfgs.items()}  # type: ignore[misc,arg-type]

    def pending(self, phase: str) -> tuple[list[tuple[str, Callable[[], dict[str, Any]]]], bool]:
        """``(runnable jobs, more will become runnable)`` for ``phase``."""
        jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        waiting = False
        a = self.args
        if phase in ("select", "all"):
            for method, (cfgs, _) in self.stage_configs().items():
                if cfgs is None:
                    waiting = True
                    continue
                for cfg in cfgs:
                    for s in a.select_seeds:
                        key = self.select_key(method, cfg, s)
                        jobs.append((key, lambda m=method, c=cfg, s=s: self._select_run(m, c, s)))
            if self.selected() is None:
                waiting = True
        if phase in ("final", "all"):
            sel = self.selected()
            if sel is None:
                waiting = True
            else:
                for s in a.seeds:
                    for method in a.methods:
                        base = "ivon-pocomo" if method == "ivon-pocomo-matched" else method
                        cfg = sel[base]["best"]
                        jobs.append((f"final-{method}-s{s}", lambda m=method, c=cfg, s=s: self._final_run(m, c, s)))
        if phase in ("timing", "all") and a.workers <= 1:
            sel = self.selected()
            if sel is not None:
                jobs.append(("timing", lambda sel=sel: timing(a, self.data, {m: v["best"] for m, v in sel.items()})))
        return [(k, f) for k, f in jobs if not self.path(k).is_file()], waiting

    def _select_run(self, method: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        a = settings_of(self.args, cfg)
        a.eval_every = a.select_steps
        return _guarded(lambda: run_one(method, seed, a, self.data, split="tune", steps=a.select_steps),
                        method, seed, cfg, "tune")

    def _final_run(self, method: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
        return _guarded(lambda: run_one(method, seed, settings_of(self.args, cfg), self.data, split="test"),
                        method, seed, cfg, "test")

    def work(self, phase: str) -> int:
        """Run jobs until none is left (or only others' claimed ones); returns the number run."""
        self.data = Data(self.args)
        done = 0
        while True:
            jobs, waiting = self.pending(phase)
            claimed = False
            for key, fn in jobs:
                lock = self.dir / f"{key}.lock"
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    continue
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                try:
                    if self.path(key).is_file():
                        continue
                    t0 = time.perf_counter()
                    result = fn()
                    result.update(key=key, fingerprint=self.fingerprint, wall_s=time.perf_counter() - t0)
                    atomic_write_text(self.path(key), json.dumps(result, indent=1))
                    done += 1
                    f = result.get("final")
                    what = f"ppl {f['val_ppl']:.3f}" if f else json.dumps(result.get("seconds"))
                    print(f"[{os.getpid()}] {key}: {what} ({result['wall_s']:.0f} s)", flush=True)
                finally:
                    lock.unlink(missing_ok=True)
                claimed = True
                break
            if claimed:
                continue
            if jobs or waiting:  # others hold the runnable jobs, or a selection is still running
                if not jobs and not self._others_running():
                    return done  # nothing runnable and nobody working: the phase needs another phase first
                time.sleep(5)
                continue
            return done

    def _others_running(self) -> bool:
        """A live worker holds a lock (a lock left by a dead process is removed)."""
        alive = False
        for lock in self.dir.glob("*.lock"):
            try:
                pid = int(lock.read_text() or "0")
                os.kill(pid, 0)
                alive = True
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
            except PermissionError:
                alive = True
        return alive


#: settings that change a run's numbers (a result file from other settings is refused)
FINGERPRINT = ("steps", "select_steps", "warmup", "batch_size", "block_size", "n_layer", "n_embd", "n_head",
               "eval_every", "eval_blocks", "tune_blocks", "test_samples", "hess_init", "clip_radius",
               "clip_grad_norm", "weight_decay", "alpha_schedule", "megabatch", "anchor_noise", "correct_hessian",
               "proximal", "bf16", "quick", "device")


# ---------------------------------------------------------------------------------------------- timing
def timing(args: argparse.Namespace, data: Data, best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Seconds per AdamW step, IVON step, corrected PoCoMo step and refresh sequence (the selected
    configurations), interleaved over ``--timing-rounds`` rounds in this process; medians."""
    torch.set_num_threads(args.threads)
    kinds = {"adamw": ("adamw", best["adamw"]), "ivon": ("ivon", best["ivon"]),
             "pocomo": ("ivon-pocomo", best["ivon-pocomo"])}
    setups = {}
    for name, (method, cfg) in kinds.items():
        a = settings_of(args, cfg)
        a.warmup, a.anchor_period, a.alpha_schedule = 0, 10 ** 6, "constant"  # every timed step corrected
        seed_everything(0)
        model = char_gpt2(data.tok.vocab_size, a.block_size, a.n_layer, a.n_embd, a.n_head).to(data.device)
        opt = make_optimizer(method, model, a, 10.0 * data.train.numel(), 10 ** 6)
        setups[name] = (model, opt, a)
    batches = list(RandomBlocks(data.train, args.block_size, args.batch_size, 6, seed=0))
    per: dict[str, list[float]] = {"adamw": [], "ivon": [], "pocomo": [], "refresh_seq": []}
    for _ in range(args.timing_rounds):
        for name, (model, opt, _) in setups.items():
            poco = isinstance(opt, vbpc.IVONPoCo)

            def loss_fn(b: tuple[Tensor, Tensor], model: nn.Module = model) -> Tensor:
                return causal_lm_loss(logits_of(model, b[0], args.bf16), b[1])
            if poco:  # one refresh per round, timed per sequence
                mb = list(RandomBlocks(data.train, args.block_size, args.batch_size,
                                       math.ceil(args.megabatch / args.batch_size), seed=1))
                t0 = _clock(data.device)
                opt.refresh(loss_fn, mb, model=model, progress=False)  # type: ignore[attr-defined]
                per["refresh_seq"].append((_clock(data.device) - t0) / (len(mb) * args.batch_size))
            t0 = _clock(data.device)
            for x, y in batches[1:]:
                def closure(x: Tensor = x, y: Tensor = y, model: nn.Module = model, opt: Any = opt) -> Tensor:
                    opt.zero_grad()
                    loss = causal_lm_loss(logits_of(model, x, args.bf16), y)
                    loss.backward()
                    if name == "adamw":
                        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    return loss
                opt.step(closure, batch_size=len(x)) if poco else opt.step(closure)
            per[name].append((_clock(data.device) - t0) / (len(batches) - 1))
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"seconds": med, "rounds": per, "threads": args.threads,
            "clock": torch.cuda.get_device_name(data.device) if data.device.type == "cuda"
            else f"CPU, {args.threads} threads"}


def modelled_seconds(point: dict[str, Any], method: str, t: dict[str, float]) -> float:
    """The wall-clock model: plain steps at the method's step cost, corrected steps at PoCoMo's and
    refresh sequences at their cost."""
    plain = t["adamw"] if method == "adamw" else t["ivon"]
    return point["plain_steps"] * plain + point["corrected_steps"] * t["pocomo"] + point["refresh_seqs"] * t[
        "refresh_seq"]


# ---------------------------------------------------------------------------------------------- report
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


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # the table for small df, else the normal quantile
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        return table.get(df, 1.96)


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of the paired differences ``a - b`` with a 95% t-interval (NaN with fewer than 2 pairs)."""
    d = [x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(d) < 2:
        return {"n": len(d), "mean": d[0] if d else float("nan"), "lo": float("nan"), "hi": float("nan")}
    m, sd = statistics.mean(d), statistics.stdev(d)
    h = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
    return {"n": len(d), "mean": m, "lo": m - h, "hi": m + h, "diffs": d}


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    """``mean ± std`` (the std unsigned), or the value alone for one seed."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.replace('+', '').format(statistics.stdev(vals))}"


def _ci(p: dict[str, Any], n: Optional[int] = None) -> str:
    """``mean [lo, hi]`` (``*`` when the interval excludes 0); ``(k of n seeds)`` when a seed is
    missing from the pairs (a diverged run is never averaged in silently)."""
    if not math.isfinite(p["mean"]):
        return "n/a"
    few = f" ({p['n']} of {n} seeds)" if n is not None and p["n"] < n else ""
    if not math.isfinite(p["lo"]):
        return f"{p['mean']:+.3f}{few}"
    sig = " *" if p["lo"] > 0 or p["hi"] < 0 else ""
    return f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]{sig}{few}"


def summarize(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The markdown report and its numbers from the final runs, the selection and the timing."""
    runs, t = report["runs"], report["timing"]["seconds"]
    for r in runs:
        for c in r["curve"]:
            c["model_s"] = modelled_seconds(c, r["method"], t)
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    by = {m: {r["seed"]: r for r in runs if r["method"] == m} for m in methods}
    seeds = sorted(set.intersection(*(set(v) for v in by.values())))
    rows, table = [], {}
    for m in methods:
        rs = [by[m][s] for s in seeds]
        f = [r["final"] for r in rs]
        row = {"steps": rs[0]["steps"], "grad_evals": statistics.mean(x["grad_evals"] for x in f),
               "model_s": statistics.mean(r["curve"][-1]["model_s"] for r in rs),
               "val_ppl": [x["val_ppl"] for x in f], "val_ppl_bma": [x.get("val_ppl_bma", math.nan) for x in f],
               "val_ece": [x["val_ece"] for x in f], "bma_effect": [x.get("val_ppl_bma", math.nan) - x["val_ppl"]
                                                                   for x in f]}
        table[m] = row
        rows.append(f"| {LABELS[m]} | {row['steps']} | {row['grad_evals']:,.0f} | {row['model_s']:.0f} | "
                    f"{_ms(row['val_ppl'])} | {_ms(row['val_ece'], '{:.4f}')} | {_ms(row['bma_effect'], '{:+.3f}')} |")
    cost = {m: {"grad_evals": table[m]["grad_evals"] / table["adamw"]["grad_evals"],
                "wall_clock": table[m]["model_s"] / table["adamw"]["model_s"]} for m in methods if "adamw" in table}
    comparisons = []
    pairs = [("ivon", "adamw"), ("ivon-pocomo", "adamw"), ("ivon-pocomo", "ivon"), ("ivon-pocomo-matched", "ivon"),
             ("ivon-pocomo-matched", "adamw")]
    cmp_rows = []
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        ra, rb = [by[a][s] for s in seeds], [by[b][s] for s in seeds]
        g_star = min(min(r["curve"][-1]["grad_evals"] for r in ra), min(r["curve"][-1]["grad_evals"] for r in rb))
        t_star = min(min(r["curve"][-1]["model_s"] for r in ra), min(r["curve"][-1]["model_s"] for r in rb))
        res = {"a": a, "b": b, "g_star": g_star, "t_star": t_star,
               "steps": paired([r["final"]["val_ppl"] for r in ra], [r["final"]["val_ppl"] for r in rb]),
               "evals": paired([interp(r["curve"], "grad_evals", g_star) for r in ra],
                               [interp(r["curve"], "grad_evals", g_star) for r in rb]),
               "wall": paired([interp(r["curve"], "model_s", t_star) for r in ra],
                              [interp(r["curve"], "model_s", t_star) for r in rb])}
        comparisons.append(res)
        n = len(seeds)
        cmp_rows.append(f"| {LABELS[a]} − {LABELS[b]} | {_ci(res['steps'], n)} | {_ci(res['evals'], n)} at "
                        f"{g_star:,} | {_ci(res['wall'], n)} at {t_star:.0f} s |")
    sel_rows = []
    for m, sel in report["selection"].items():
        for sc in sorted(sel["scores"], key=lambda s: s["mean"]):
            mark = " **selected**" if sc["config"] == sel["best"] else ""
            sel_rows.append(f"| {LABELS[m]} | {cfg_name(sc['config'])} | {_ms(sc['val_ppl'])}{mark} |")
    s = report["settings"]
    lines = [
        f"char GPT-mini {s['n_layer']}x{s['n_embd']} on Shakespeare; final runs: {s['steps']} steps, seeds {seeds} "
        f"(paired: same initial weights and batches per seed); test perplexity per character on {s['eval_blocks']} "
        f"blocks at the posterior mean; selection on {s['tune_blocks']} validation blocks held out of the training "
        f"text ({s['select_steps']} steps, seeds {s['select_seeds']}).", "",
        "| method | steps | grad. evals (sequences) | modelled train s | test ppl | token ECE | BMA − mean ppl |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Paired differences of test perplexity (negative: the first is better), mean [95% t-interval] over the "
        "seeds; * marks an interval that excludes 0.  Equal grad. evals and equal wall clock read both curves at "
        "the smaller final value of the pair.", "",
        "| comparison | equal steps | equal grad. evals | equal wall clock |", "|---|---|---|---|", *cmp_rows, "",
        "Cost relative to AdamW (gradient evaluations; modelled wall clock from the timing calibration: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()) + f", {report['timing']['clock']}):", "",
        "| method | grad. evals ÷ AdamW | wall clock ÷ AdamW |", "|---|---:|---:|",
        *[f"| {LABELS[m]} | {c['grad_evals']:.2f}× | {c['wall_clock']:.2f}× |" for m, c in cost.items()], "",
        "Selection (validation perplexity, mean ± std over the selection seeds):", "",
        "| method | configuration | validation ppl |", "|---|---|---:|", *sel_rows, ""]
    return "\n".join(lines), {"methods": table, "comparisons": comparisons, "cost": cost, "seeds": seeds}


def plot(runs: list[dict[str, Any]], out: Path, title: str, clock: str = "CPU") -> list[Path]:
    """One figure per compute axis (steps, gradient evaluations, modelled wall clock): test
    perplexity and token ECE, the seed mean as a line and the seed min-max as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vbpc.evaluation.plots import log_yaxis, save_figure

    axes = {"steps": ("step", "optimizer steps"), "evals": ("grad_evals", "gradient evaluations (sequences)"),
            "wallclock": ("model_s", f"modelled training wall clock (s, {clock})")}
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
        a1.set_ylabel("test perplexity (per character)")
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
    """``lm.md`` and the three figures from a report (``settings``, ``selection``, ``timing``, ``runs``)."""
    s = report["settings"]
    md, summary = summarize(report)
    report["summary"] = summary
    print(md)
    title = f"char GPT-mini {s['n_layer']}x{s['n_embd']} on Shakespeare, seeds {summary['seeds']}"
    plot(report["runs"], out, title, report["timing"]["clock"])
    atomic_write_text(out / "lm.md", md)


def rebuild(out: Path) -> int:
    """Rewrite ``lm.md`` and the figures from an existing ``lm.json`` without retraining (``--from-json``)."""
    path = out / "lm.json"
    if not path.is_file():
        raise FileNotFoundError(f"--from-json: {path} does not exist; run the benchmark first")
    write_outputs(json.loads(path.read_text()), out)
    return 0


def progress_md(args: argparse.Namespace, jobs: Jobs) -> str:
    """``lm.md`` while the study is incomplete: the finished selection runs and final runs, labelled as
    such (no comparison is drawn from an incomplete set)."""
    lines = ["**Study in progress** (`python -m benchmarks run lm` resumes it from `benchmarks/results/lm_runs/`); "
             "no comparison is drawn until every final run and the timing calibration exist.", "",
             f"Selection runs finished ({args.select_steps} steps, validation perplexity on {args.tune_blocks} blocks "
             "held out of the training text):", "", "| method | configuration | seed | validation ppl |",
             "|---|---|---:|---:|"]
    finals = []
    for p in sorted(jobs.dir.glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("fingerprint") != jobs.fingerprint or "final" not in r:
            continue
        if r["key"].startswith("select-"):
            lines.append(f"| {LABELS[r['method']]} | {cfg_name(r['config'])} | {r['seed']} | "
                         f"{r['final']['val_ppl']:.3f} |")
        else:
            finals.append(f"| {LABELS[r['method']]} | {r['seed']} | {r.get('steps', 'diverged')} | "
                          f"{r['final']['val_ppl']:.3f} |")
    sel = jobs.selected()
    if sel is not None:
        lines += ["", "Selected (lowest mean validation perplexity; the final runs use these):", "",
                  "| method | configuration | validation ppl |", "|---|---|---:|"]
        for m, v in sel.items():
            best = next(sc for sc in v["scores"] if sc["config"] == v["best"])
            lines.append(f"| {LABELS[m]} | {cfg_name(v['best'])} | {_ms(best['val_ppl'])} |")
    lines += ["", f"Final runs finished ({len(finals)} of {len(args.seeds) * len(args.methods)}; test perplexity on "
              f"{args.eval_blocks} blocks):", "", "| method | seed | steps | test ppl |", "|---|---:|---:|---:|",
              *finals, ""]
    return "\n".join(lines)


def report_from_runs(args: argparse.Namespace, jobs: Jobs) -> Optional[dict[str, Any]]:
    sel = jobs.selected()
    tim = jobs.load("timing")
    finals = [jobs.load(f"final-{m}-s{s}") for s in args.seeds for m in args.methods]
    if sel is None or tim is None or any(r is None for r in finals):
        missing = [f"final-{m}-s{s}" for s in args.seeds for m in args.methods if jobs.load(f"final-{m}-s{s}") is None]
        print(f"lm: report not written: selection {'done' if sel else 'incomplete'}, timing "
              f"{'done' if tim else 'missing'}, {len(missing)} final runs missing {missing[:4]}", flush=True)
        return None
    settings = {k: v for k, v in vars(args).items() if k not in ("from_json", "phase", "workers")}
    return {"settings": settings, "seeds": list(args.seeds), "selection": sel, "timing": tim,
            "runs": finals}


def main(argv: Optional[list[str]] = None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    if args.from_json:
        return rebuild(Path(args.out))
    if args.quick:
        args = quick(args)
    out = Path(args.out)
    jobs = Jobs(args)
    if args.workers > 1 and args.phase != "report":
        import subprocess

        child = list(argv if argv is not None else sys.argv[1:])
        for flag in ("--workers", "--phase", "--threads"):  # set per child below
            while flag in child:
                i = child.index(flag)
                del child[i:i + 2]
        for lock in jobs.dir.glob("*.lock"):  # this run owns the job folder: locks of a killed run are stale
            lock.unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, *child, "--workers", "1", "--threads", "1",
                                   "--phase", "select" if args.phase == "all" else args.phase], env=env)
                 for _ in range(args.workers)]
        rc = max(p.wait() for p in procs)
        if rc or args.phase != "all":
            return rc
        # the final phase in parallel once the selection is done, then the timing alone (2 threads)
        procs = [subprocess.Popen([sys.executable, __file__, *child, "--workers", "1", "--threads", "1",
                                   "--phase", "final"], env=env) for _ in range(args.workers)]
        rc = max(p.wait() for p in procs)
        if rc:
            return rc
        args.phase, args.workers = "timing", 1
    torch.set_num_threads(args.threads)
    if args.phase != "report":
        jobs.work(args.phase)
        if args.phase != "all" and args.phase != "timing":
            return 0
    report = report_from_runs(args, jobs)
    if report is None:
        if args.phase == "report":  # the README shows the study's state, never a stale table
            atomic_write_text(out / "lm.md", progress_md(args, jobs))
        return 0 if args.phase in ("report", "timing") else 1
    write_outputs(report, out)
    atomic_write_text(out / "lm.json", json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
