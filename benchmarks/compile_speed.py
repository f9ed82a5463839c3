"""torch.compile with vbpc: whole IVON train steps of an eager vs a compiled (inductor) model.

Run:  python benchmarks/compile_speed.py [--rounds 10] [--steps 10] [--backend inductor]

The model is compiled once (``torch.compile(model)``); IVON writes its weight samples into the
parameters in place, which the compiled graph reads as inputs (no recompilation per sample;
``tests/test_compile.py`` checks the iterates equal eager mode).  Prints the median (min-max)
per-step time ratio compiled ÷ eager over interleaved rounds, for an MLP on Fashion-MNIST-sized
inputs and a GPT-2 4 x 256, plus the first-step (compile) time; and, separately, the optimizer
update alone (the fused ``_foreach`` kernel of ``vbpc.functional``) eager vs compiled.
Writes benchmarks/results/compile_speed.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vbpc
from vbpc.io import atomic_write_text


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 500), torch.nn.ReLU(), torch.nn.Linear(500, 300),
                                torch.nn.ReLU(), torch.nn.Linear(300, 10))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return model, lambda m: F.cross_entropy(m(x), y)


def _gpt():
    from vbpc.models import char_gpt2

    torch.manual_seed(0)
    model = char_gpt2(100, block_size=128, n_layer=4, n_embd=256, n_head=4)
    x = torch.randint(0, 100, (16, 128))
    return model, lambda m: m(input_ids=x, labels=x).loss


def bench(name: str, make, rounds: int, steps: int, backend: str) -> dict:
    model, loss_of = make()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    runs = {}
    for kind, params_of, fwd in (("eager", eager, eager), ("compiled", model, compiled)):
        opt = vbpc.IVON(params_of.parameters(), lr=0.05, ess=1e5, hess_init=0.1)

        def step(opt=opt, fwd=fwd):
            def closure():
                opt.zero_grad()
                loss = loss_of(fwd)
                loss.backward()
                return loss
            opt.step(closure)
        t0 = time.perf_counter()
        step()
        runs[kind] = {"step": step, "first_s": time.perf_counter() - t0, "times": []}
    for r in runs.values():
        for _ in range(2):
            r["step"]()
    for _ in range(rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(steps):
                r["step"]()
            r["times"].append((time.perf_counter() - t0) / steps)
    ratios = [c / e for c, e in zip(runs["compiled"]["times"], runs["eager"]["times"])]
    return {"model": name, "backend": backend, "eager_step_s": statistics.median(runs["eager"]["times"]),
            "compiled_step_s": statistics.median(runs["compiled"]["times"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "compile_first_step_s": runs["compiled"]["first_s"]}


def update_bench(rounds: int, steps: int, backend: str) -> dict:
    """The optimizer update alone: ``vbpc.functional.ivon_update_fast_`` (foreach) on the MLP's
    tensors, eager vs ``torch.compile``-d (not an option of ``vbpc.IVON`` yet)."""
    from vbpc.functional import ivon_update_fast_

    torch.manual_seed(0)
    shapes = [(500, 784), (500,), (300, 500), (300,), (10, 300), (10,)]
    m, g, gh, st = ([torch.randn(s) for s in shapes] for _ in range(4))
    h = [torch.rand(s) + 0.5 for s in shapes]
    hw = [x + 1e-4 for x in h]
    r = [x.rsqrt() for x in hw]
    kw = dict(ess=6e4, eta=0.05, beta1=0.9, beta2=0.99999, weight_decay=1e-4, clip_radius=float("inf"),
              bias_correction=0.5, price=True, foreach=True)

    def update(m, g, h, gh, st, hw, r):
        ivon_update_fast_(m, g, h, gh, st, hw, r, **kw)

    compiled = torch.compile(update, backend=backend)
    fns = {"eager": update, "compiled": compiled}
    t0 = time.perf_counter()
    compiled(m, g, h, gh, [x.clone() for x in st], hw, r)
    first = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                f(m, g, h, gh, [x.clone() for x in st], hw, r)
            times[k].append((time.perf_counter() - t0) / steps)
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    return {"model": "mlp (update only)", "backend": backend, "eager_step_s": statistics.median(times["eager"]),
            "compiled_step_s": statistics.median(times["compiled"]), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "compile_first_step_s": first}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--models", default="mlp,gpt2")
    ap.add_argument("--out", default="benchmarks/results/compile_speed")
    args = ap.parse_args(argv)
    makers = {"mlp": _mlp, "gpt2": _gpt}
    rows = [bench(m, makers[m], args.rounds, args.steps, args.backend) for m in args.models.split(",")]
    if "mlp" in args.models.split(","):
        rows.append(update_bench(args.rounds, args.steps, args.backend))
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}", "",
             "| model | eager step (ms) | compiled step (ms) | compiled ÷ eager, median (min–max) | first step (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {1e3 * r['eager_step_s']:.1f} | {1e3 * r['compiled_step_s']:.1f} | "
                     f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
                     f"{r['compile_first_step_s']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1))
    atomic_write_text(out.with_suffix(".md"), table)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
