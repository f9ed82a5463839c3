"""Per-step overhead of vbpc.IVON against AdamW (foreach) and the reference IVON.

Prints, for an MLP, a small CNN and a GPT-2-mini, medians over interleaved rounds in one
process of:

* whole train step (zero_grad, sampling, forward, backward, optimizer update) ratios
  ``vbpc.IVON / AdamW`` and ``vbpc.IVON / ivon-opt``;
* optimizer-step-only ratios (sampling in/out plus update, no forward/backward)
  ``vbpc.IVON / ivon-opt`` and ``vbpc.IVON / AdamW``.

Run:  python benchmarks/step_overhead.py [--rounds 15] [--steps 5] [--models mlp,cnn,gpt2]
Writes benchmarks/results/step_overhead.json and .md (atomically).  No timing is asserted
anywhere in the test suite: absolute times on a shared CPU are noise, ratios are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import vbpc
from vbpc.inference.registry import get_learner
from vbpc.io import atomic_write_text

try:
    import ivon as ivon_ref  # optional GPL oracle, used only as a baseline here
except ImportError:  # pragma: no cover
    ivon_ref = None


def make_mlp():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(),
                          nn.Linear(300, 10))
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    return model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


def make_cnn():
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    return model, (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 256, (16, 128))
    return model, (ids,), lambda m, b: m(input_ids=b[0], labels=b[0]).loss


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "gpt2": make_gpt2}


def runners(model: nn.Module, batch, loss_fn) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """For each method: (whole train step, optimizer-only step)."""
    params = list(model.parameters())
    out = {}

    adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def adam_step():
        adamw.zero_grad()
        loss_fn(model, batch).backward()
        adamw.step()

    out["adamw"] = (adam_step, adamw.step)

    vb = vbpc.IVON(params, lr=1e-4, ess=1e6, hess_init=1.0)

    def vb_closure():
        vb.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    def vb_step():
        vb.step(vb_closure)

    fixed: list[torch.Tensor] = []

    def vb_opt_only():  # the update alone: a fixed gradient handed to each sample (fresh tensor objects,
        if not fixed:   # so that the foreign-gradient check does not take it for a stale one)
            fixed.extend(torch.randn_like(p) * 1e-3 for p in params)
        with vb.sampled_params(train=True):
            for p, g in zip(params, fixed):
                p.grad = g.detach()
        vb.step()

    out["vbpc"] = (vb_step, vb_opt_only)

    poco = vbpc.IVONPoCo(params, lr=1e-4, ess=1e6, hess_init=1.0, beta1=0.9, alpha=0.75, anchor_period=10**9)
    poco.refresh(lambda b: loss_fn(model, b), [batch], progress=False)  # the anchor pass is timed, the refresh not

    def poco_closure():
        poco.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    out["ivon-poco"] = (lambda: poco.step(poco_closure), None)

    if ivon_ref is not None:
        ref = ivon_ref.IVON(params, lr=1e-4, ess=1e6, hess_init=1.0)

        def ref_step():
            with ref.sampled_params(train=True):
                ref.zero_grad()
                loss_fn(model, batch).backward()
            ref.step()

        def ref_opt_only():
            with ref.sampled_params(train=True):
                pass
            ref.step()

        out["ivon-opt"] = (ref_step, ref_opt_only)
    return out


def state_bytes_per_param(model: nn.Module, batch, loss_fn) -> dict[str, float]:
    """Persistent optimizer-state bytes per parameter after one step (anchors included;
    transient workspaces excluded), for each learner."""
    import copy

    def nbytes(obj) -> int:
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size() if obj.dim() else 0
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    out = {}
    n = sum(p.numel() for p in model.parameters())
    far = 10**9  # no refresh after the first: the state of a corrected learner mid-period
    makers = {  # label -> (registry name, options)
        "sgd-momentum": ("sgd", dict(lr=1e-4, momentum=0.9)),
        "adamw": ("adamw", dict(lr=1e-4)),
        "ivon": ("ivon", dict(lr=1e-4, ess=1e6)),
        "ivon-poco (beta1=0)": ("ivon-poco", dict(lr=1e-4, ess=1e6, anchor_period=far)),
        "ivon-pocomo": ("ivon-pocomo", dict(lr=1e-4, ess=1e6, anchor_period=far)),
        "svrg": ("svrg", dict(lr=1e-4, anchor_period=far)),
    }
    for name, (learner, options) in makers.items():
        m = copy.deepcopy(model)
        opt = get_learner(learner).build(list(m.parameters()), **options)
        if hasattr(opt, "refresh"):
            opt.refresh(lambda b: loss_fn(m, b), [batch], progress=False)

        def closure():
            opt.zero_grad()
            loss = loss_fn(m, batch)
            loss.backward()
            return loss

        opt.step(closure)
        total = nbytes(opt.state) + (nbytes(opt.anchor.state_dict()) if hasattr(opt, "anchor") else 0)
        out[name] = total / n
    return out


def timed(fn: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def bench_model(name: str, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[name]()
    run = runners(model, batch, loss_fn)
    # the optimizer-only runs need gradients present
    loss_fn(model, batch).backward()
    for whole, only in run.values():  # warm-up
        whole()
        if only is not None:
            only()
    whole_t = {k: [] for k in run}
    only_t = {k: [] for k in run}
    for r in range(rounds):
        order = list(run) if r % 2 == 0 else list(reversed(run))
        for k in order:
            whole_t[k].append(timed(run[k][0], steps))
        for k in order:
            if run[k][1] is not None:
                only_t[k].append(timed(run[k][1], steps * 4))
    res = {"model": name, "params": sum(p.numel() for p in model.parameters()), "rounds": rounds,
           "steps": steps, "whole_ms": {}, "opt_ms": {}}
    for k in run:
        res["whole_ms"][k] = {"median": 1e3 * statistics.median(whole_t[k]), "min": 1e3 * min(whole_t[k]),
                              "max": 1e3 * max(whole_t[k])}
        if only_t[k]:
            res["opt_ms"][k] = {"median": 1e3 * statistics.median(only_t[k]), "min": 1e3 * min(only_t[k]),
                                "max": 1e3 * max(only_t[k])}
    res["state_bytes_per_param"] = state_bytes_per_param(model, batch, loss_fn)

    def ratio(table, a, b):
        # per-round ratios (rounds are interleaved, so drift cancels): median, min and max
        if a not in table or b not in table or not table[a] or not table[b]:
            return None
        rs = [x / y for x, y in zip(table[a], table[b])]
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}

    res["ratios"] = {
        "whole_vbpc/adamw": ratio(whole_t, "vbpc", "adamw"),
        "whole_vbpc/ivon-opt": ratio(whole_t, "vbpc", "ivon-opt"),
        "whole_ivon-opt/adamw": ratio(whole_t, "ivon-opt", "adamw"),
        "opt_vbpc/ivon-opt": ratio(only_t, "vbpc", "ivon-opt"),
        "opt_vbpc/adamw": ratio(only_t, "vbpc", "adamw"),
        "whole_ivon-poco/vbpc": ratio(whole_t, "ivon-poco", "vbpc"),
    }
    return res


def fmt_ratio(q: dict | None) -> str:
    """``median× (min–max)`` of a ratio record, or n/a."""
    return "n/a" if q is None else f"{q['median']:.2f}× ({q['min']:.2f}–{q['max']:.2f})"


def to_markdown(results: list[dict]) -> str:
    lines = [
        "| model | params | whole step IVON ÷ AdamW | whole step IVON ÷ ivon-opt | IVON-PoCoMo ÷ IVON (whole step) | "
        "ivon-opt ÷ AdamW | opt step IVON ÷ ivon-opt | opt step IVON ÷ AdamW | IVON whole step (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        q = r["ratios"]
        cells = [fmt_ratio(q[k]) for k in ("whole_vbpc/adamw", "whole_vbpc/ivon-opt", "whole_ivon-poco/vbpc",
                                           "whole_ivon-opt/adamw", "opt_vbpc/ivon-opt", "opt_vbpc/adamw")]
        lines.append(f"| {r['model']} | {r['params']:,} | " + " | ".join(cells)
                     + f" | {r['whole_ms']['vbpc']['median']:.1f} |")
    names = list(results[0]["state_bytes_per_param"]) if results else []
    lines += ["", "Persistent optimizer state, bytes per parameter (fp32 parameters; anchors included):", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['state_bytes_per_param'][k]:.0f}" for k in names) + " |")
    return "\n".join(lines) + "\n"


atomic_write = atomic_write_text  # the benchmarks write their results atomically (vbpc.io)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="mlp,cnn,gpt2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if ivon_ref is None:
        print("note: ivon-opt is not installed; reference ratios are skipped", file=sys.stderr)
    results = []
    for name in args.models.split(","):
        r = bench_model(name, args.rounds, args.steps)
        results.append(r)
        print(f"{name}: " + ", ".join(f"{k}={fmt_ratio(v)}" for k, v in r["ratios"].items()), flush=True)
    md = to_markdown(results)
    print(md)
    meta = {"torch": torch.__version__, "threads": args.threads, "device": "cpu"}
    atomic_write(Path(args.out) / "step_overhead.json", json.dumps({"meta": meta, "results": results}, indent=2))
    atomic_write(Path(args.out) / "step_overhead.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
