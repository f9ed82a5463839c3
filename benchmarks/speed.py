"""Speed table: the step-time ratios of ``step_overhead.py`` and the BMA ratios of ``bma_speed.py``,
run in one go and combined into one ``speed.md`` with the earlier issues' targets checked.

* whole train step IVON ÷ AdamW (target ≤ 1.05× on the CNN/GPT-mini, 1.8× on the MLP), ÷ the
  reference IVON (``ivon-opt``), and IVON-PoCoMo ÷ IVON (target ≤ 2.05×);
* BMA over S = 32 samples, vectorised (``vmap``) ÷ loop, and each ÷ (S × one plain forward)
  (target ≤ 0.5);
* persistent optimizer state in bytes per parameter, on the MLP, the CNN and GPT-mini.

Every ratio is the median over interleaved rounds in one process, with the min–max over rounds.

Run:  python -m benchmarks run speed [--quick]      (about 6 minutes on 2 cores)
Writes ``speed.{json,md}`` (and the two parts' own files) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).parent))
import bma_speed  # noqa: E402
import step_overhead  # noqa: E402

from vbpc.io import atomic_write_text  # noqa: E402

#: (label, ratio key, model filter, target): whole-step targets of issues 2 and 6
STEP_TARGETS = [
    ("whole step IVON ÷ AdamW ≤ 1.05× (CNN, GPT-mini)", "whole_vbpc/adamw", ("cnn", "gpt2"), 1.05),
    ("whole step IVON ÷ AdamW ≤ 1.8× (MLP)", "whole_vbpc/adamw", ("mlp",), 1.8),
    ("IVON-PoCoMo ÷ IVON ≤ 2.05×", "whole_ivon-poco/vbpc", ("mlp", "cnn", "gpt2"), 2.05),
    ("optimizer step IVON ÷ ivon-opt ≤ 0.7×", "opt_vbpc/ivon-opt", ("mlp", "cnn", "gpt2"), 0.7),
]
BMA_TARGET = 0.5


def _verdict(value: float, target: float) -> str:
    """``1.26× (**missed** by 20%)``; three digits and a decimal when it is missed by under 1%."""
    if value <= target:
        return f"{value:.2f}× (met)"
    miss = 100 * (value / target - 1)
    return f"{value:.3f}× (**missed** by {miss:.1f}%)" if miss < 1 else f"{value:.2f}× (**missed** by {miss:.0f}%)"


def targets(step: list[dict[str, Any]], bma: list[dict[str, Any]]) -> str:
    """One line per target of the earlier issues, met or missed and by how much (medians)."""
    lines = ["Targets of the earlier issues (medians):", ""]
    for label, key, models, target in STEP_TARGETS:
        cells = [f"{r['model']} {_verdict(r['ratios'][key]['median'], target)}" for r in step
                 if r["model"] in models and r["ratios"].get(key)]
        if cells:
            lines.append(f"* {label}: " + ", ".join(cells))
    if bma:
        cells = []
        for r in bma:
            best = min(r["ratios"]["vmap/(S*forward)"]["median"], r["ratios"]["loop/(S*forward)"]["median"])
            cells.append(f"{r['model']} batch {r['batch']} {_verdict(best, BMA_TARGET)}")
        lines.append(f"* BMA (faster of vmap and loop) ÷ (S × forward) ≤ {BMA_TARGET}: " + ", ".join(cells))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: MLP only, 2 rounds, 2 BMA samples")
    ap.add_argument("--models", default="mlp,cnn,gpt2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bma-rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.quick:
        args.models, args.rounds, args.steps, args.bma_rounds = "mlp", 2, 1, 1
    common = ["--threads", str(args.threads), "--out", str(out)]
    step_overhead.main(["--rounds", str(args.rounds), "--steps", str(args.steps), "--models", args.models, *common])
    bma_models = ",".join(m for m in args.models.split(",") if m in bma_speed.MODELS)
    bma_args = ["--samples", "2", "--batches", "16"] if args.quick else []
    if bma_models:
        bma_speed.main(["--models", bma_models, "--rounds", str(args.bma_rounds), *bma_args, *common])
    step = json.loads((out / "step_overhead.json").read_text())
    bma = json.loads((out / "bma_speed.json").read_text()) if bma_models else {"results": [], "meta": {}}
    md = "\n".join([
        f"Whole train step and optimizer step, median (min–max) of per-round ratios over {args.rounds} interleaved "
        f"rounds of {args.steps} steps (torch {step['meta']['torch']}, {args.threads} threads, CPU):", "",
        step_overhead.to_markdown(step["results"]),
        f"BMA over S = {bma['meta'].get('samples', 32)} samples on real Fashion-MNIST test batches, median (min–max) "
        f"over {args.bma_rounds} rounds:", "",
        bma_speed.to_markdown(bma["results"]) if bma["results"] else "(no BMA model selected)\n",
        targets(step["results"], bma["results"]),
    ])
    print(md)
    atomic_write_text(out / "speed.json", json.dumps({"step": step, "bma": bma, "settings": vars(args)}, indent=1))
    atomic_write_text(out / "speed.md", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
