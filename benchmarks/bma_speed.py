"""Bayesian-model-averaging speed: S=32 weight samples vs 32 plain forwards (issue 5 target ≤ 0.5).

For the MLP (784-500-300-10) and a CNN (LeNet-5) on real Fashion-MNIST test batches, times

* ``forward``: one plain forward at the mean weights (the denominator uses 32 × this),
* ``bma[vmap]``: :func:`vbpc.predictive.sample_logits` with ``vectorize="vmap"`` (one batched call),
* ``bma[loop]``: the same draws, one in-place forward per sample,
* ``draws``: generating the 32 samples alone (``posterior.sample_stack``),

as medians over interleaved rounds in one process, and prints the ratios.  Writes
benchmarks/results/bma_speed.{json,md} atomically.  No timing is asserted anywhere.

    python benchmarks/bma_speed.py                 # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import vbpc
from vbpc.data import load_fashion_mnist
from vbpc.io import atomic_write_text
from vbpc.models import MLP, LeNet5
from vbpc.predictive import sample_logits

MODELS: dict[str, Callable[[], torch.nn.Module]] = {"mlp": lambda: MLP(), "cnn": lambda: LeNet5()}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, batch: int, samples: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = load_fashion_mnist("test").tensors[0][:batch]
    post = vbpc.DiagonalGaussian.from_module(model, precision=1e4)
    cases = {
        "forward": lambda: model(x),
        "bma[vmap]": lambda: sample_logits(model, x, post, samples, vectorize="vmap"),
        "bma[loop]": lambda: sample_logits(model, x, post, samples, vectorize="loop"),
        "draws": lambda: post.sample_stack(samples),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(rounds):
            for k, fn in cases.items():
                times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str, scale: int = 1) -> dict[str, float]:
        rs = [x / (scale * y) for x, y in zip(times[a], times[b])]  # per round (interleaved)
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}

    return {"model": name, "batch": batch, "samples": samples, "params": sum(p.numel() for p in model.parameters()),
            "ms": {k: 1e3 * v for k, v in med.items()},
            "ratios": {"vmap/(S*forward)": ratio("bma[vmap]", "forward", samples),
                       "loop/(S*forward)": ratio("bma[loop]", "forward", samples),
                       "draws/(S*forward)": ratio("draws", "forward", samples),
                       "vmap/loop": ratio("bma[vmap]", "bma[loop]")}}


def fmt(q: dict[str, float]) -> str:
    return f"{q['median']:.2f} ({q['min']:.2f}–{q['max']:.2f})"


def to_markdown(results: list[dict]) -> str:
    lines = ["| model | batch | forward ms | BMA vmap ÷ loop | vmap ÷ (S×forward) | loop ÷ (S×forward) | "
             "draws ÷ (S×forward) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        q = r["ratios"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']['forward']:.2f} | {fmt(q['vmap/loop'])} | "
                     f"{fmt(q['vmap/(S*forward)'])} | {fmt(q['loop/(S*forward)'])} | {fmt(q['draws/(S*forward)'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--batches", default="128,1000")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [bench(m, int(b), args.samples, args.rounds) for m in args.models.split(",")
               for b in args.batches.split(",")]
    md = to_markdown(results)
    print(f"S = {args.samples}, torch threads = {args.threads}\n" + md)
    meta = {"torch": torch.__version__, "threads": args.threads, "samples": args.samples, "rounds": args.rounds}
    atomic_write_text(Path(args.out) / "bma_speed.json", json.dumps({"meta": meta, "results": results}, indent=2))
    atomic_write_text(Path(args.out) / "bma_speed.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
