"""One entry point for the benchmark suite:

    python -m benchmarks list
    python -m benchmarks run <name>|all [--quick|--full] [extra args for that benchmark]
    python -m benchmarks readme

Each benchmark writes ``benchmarks/results/<name>.json``, a markdown table and its figures; a
full run then regenerates the README's tables from those files (``readme`` does only that, see
``benchmarks/readme.py``).  ``--quick`` runs the CI-size version (what
``tests/test_benchmarks.py`` checks for well-formed results), ``--full`` the README's.  No timing is
asserted anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _module(name: str) -> Callable[[list[str]], object]:
    return lambda argv: importlib.import_module(name).main(argv)


def _cli(*args: str) -> Callable[[list[str]], object]:
    def run(argv: list[str]) -> int:
        return subprocess.call([sys.executable, "-m", "vbpc.cli", *args, *argv])
    return run


QUICK = "benchmarks/results/quick"  # --quick never overwrites the README's results

#: name -> (runner, quick args, full args, what it measures)
SUITE: dict[str, tuple[Callable[[list[str]], object], list[str], list[str], str]] = {
    "speed": (_module("speed"), ["--quick", "--out", QUICK], [],
              "step ÷ AdamW, ÷ ivon-opt, PoCoMo ÷ IVON, BMA vmap ÷ loop, state bytes; targets checked"),
    "bma": (_module("bma_speed"), ["--models", "mlp", "--batches", "16", "--samples", "2", "--rounds", "1",
                                   "--out", QUICK], [], "BMA vectorised ÷ loop"),
    "compile": (_module("compile_speed"), ["--rounds", "1", "--steps", "1", "--models", "mlp", "--backend",
                                           "aot_eager", "--out", f"{QUICK}/compile_speed"], [],
                "torch.compile ÷ eager, whole step and the update alone"),
    "convex": (_module("convex"), ["--quick", "--out", QUICK], ["--seeds", "3"],
               "logistic regression on Fashion-MNIST: passes to 1e-6 (SVRG, alpha-SVRG, IVON-PoCo, ...)"),
    "calibration": (_module("calibration"), ["--quick", "--out", f"{QUICK}/calibration"], [],
                    "uncertainty study: 10 methods (ensembles, Laplace, temperature, MC dropout, BBB, IVON, "
                    "IVON-PoCo, ...) x 5 seeds, validation selection, shift curves, OOD; ResNet-20 check"),
    "continual": (_cli("continual", "examples/configs/continual_split.yaml", "--overwrite"),
                  ["--set", "seeds=[0]", "--set", "tasks.train_size=512", "--set", "tasks.n_tasks=2",
                   "--set", "progress=false", "--set", f"out={QUICK}/continual"],
                  ["--set", "out=benchmarks/results/continual_split"], "continual-learning table (split)"),
    "continual-permuted": (_cli("continual", "examples/configs/continual_permuted.yaml", "--overwrite"),
                           ["--set", "seeds=[0]", "--set", "tasks.train_size=512", "--set", "tasks.n_tasks=2",
                            "--set", "progress=false", "--set", f"out={QUICK}/continual_permuted"],
                           ["--set", "out=benchmarks/results/continual_permuted"],
                           "continual-learning table (permuted)"),
    "unlearning": (_module("unlearning"), ["--quick", "--out", QUICK], [],
                   "Fashion-MNIST unlearning: eq. (32), + corrected steps, finetune vs retraining (3 paired seeds)"),
    "merge": (_cli("merge-eval", "examples/configs/merge_permuted.yaml", "--overwrite"),
              ["--set", "seeds=[0]", "--set", "tasks.train_size=500", "--set", "base_size=500",
               "--set", "tasks.n_tasks=2", "--set", "progress=false", "--set", f"out={QUICK}/merge"],
              ["--set", "out=benchmarks/results/merge_permuted"], "merging table"),
    "finetune": (_cli("finetune"), ["--train-per-class", "8", "--eval-size", "16", "--batch-size", "8",
                                    "--methods", "ivon", "--no-progress", "--out", f"{QUICK}/finetune"],
                 ["--config", "examples/configs/finetune_minilm.yaml", "--out", "benchmarks/results/finetune_minilm"],
                 "MiniLM finetuning table"),
    "lm": (_module("lm"), ["--quick", "--out", QUICK], ["--workers", "2", "--no-progress"],
           "char GPT-mini on Shakespeare: AdamW, IVON, IVON-PoCoMo tuned on a validation split, 5 paired seeds, "
           "paired differences at equal steps/evals/wall clock (resumable)"),
    "peft": (_module("peft_lora"), ["--quick", "--out", QUICK], [],
             "MiniLM + PEFT LoRA: AdamW-LoRA vs IVON-LoRA (lr tuned on validation NLL), 3 paired seeds"),
    "ablation": (_module("ablation"), ["--quick", "--out", QUICK], [],
                 "IVON-PoCo(Mo) options one at a time (mega-batch remedies included), on the LM and the convex task"),
    "gpu": (_module("gpu_check"), [], [], "CUDA/bf16 checks and GPU timings (exits cleanly without CUDA)"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    sub.add_parser("readme", help="regenerate the README's tables from benchmarks/results")
    r = sub.add_parser("run")
    r.add_argument("name", choices=[*SUITE, "all"])
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    args, extra = ap.parse_known_args(argv)  # anything unknown goes to the benchmark itself
    if args.cmd == "list":
        for name, (_, _, _, what) in SUITE.items():
            print(f"{name:<19} {what}")
        return 0
    if args.cmd == "readme":
        return importlib.import_module("readme").main()
    names = list(SUITE) if args.name == "all" else [args.name]
    extra = [a for a in extra if a != "--"]
    for name in names:
        runner, quick, full, _ = SUITE[name]
        print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
        rc = runner((quick if args.quick else full) + extra)
        if isinstance(rc, int) and rc != 0:
            return rc
    if not args.quick:
        importlib.import_module("readme").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
