"""``vbpc train``: variational (or baseline) training from a :class:`~vbpc.config.TrainConfig`,
with checkpoints that resume bit for bit.

Every ``run.checkpoint_every`` steps and at each epoch end the run writes
``<run.out>/checkpoint.safetensors`` atomically (:mod:`vbpc.checkpoint`): the model, the learner's
``state_dict`` (step counters, IVON state, the PoCo anchor with its generator), the LR
scheduler, every global RNG state, the step and the config.  ``resume=True`` restores all of it
and skips the batches already seen (the data order of epoch ``e`` is a function of
``run.seed + e``), so a resumed run equals an uninterrupted one bitwise.  A JSONL metrics log
(``metrics.jsonl``) and loss curves (``curves.png``) are written next to it; a summary is printed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .._runtime import restore_rng, rng_from_state_dict, rng_state_dict
from ..config import TrainConfig, to_dict
from ..data import load_dataset, make_loader, seed_everything
from ..inference.registry import get_learner
from ..io import atomic_write_text, run_lock
from ..models import build_model
from ..reporting import plot_curves, read_jsonl, write_json
from ..training import evaluate, warmup_cosine_scheduler

__all__ = ["build_learner", "check_resume_config", "train", "truncate_log"]


def build_learner(cfg: TrainConfig, model: nn.Module, n_train: int, steps_per_epoch: int) -> torch.optim.Optimizer:
    """The learner named by ``cfg.learner`` (:func:`vbpc.inference.registry.get_learner`) over
    ``model``'s trainable parameters.  The context (``ess`` = the training-set size, the anchor
    period one epoch unless set, the run's steps, the model) goes to the learners that take it;
    ``learner.kwargs`` win over it.  SGD's momentum defaults to 0.9."""
    info = get_learner(cfg.learner.name)
    lc = cfg.learner
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    context = dict(ess=float(n_train), model=model, total_steps=cfg.schedule.epochs * steps_per_epoch,
                   anchor_period=cfg.anchor.period or steps_per_epoch, megabatch_size=cfg.anchor.megabatch_size,
                   alpha=cfg.anchor.alpha)
    if info.name == "svrg":
        context.pop("total_steps")  # SVRG's alpha is constant (1)
    kw = dict(lc.kwargs)
    if info.name == "sgd":
        kw.setdefault("momentum", 0.9)
    return info.build_in(params, context, lr=lc.lr, weight_decay=lc.weight_decay, **kw)


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    kind = cfg.schedule.scheduler
    if kind not in ("cosine", "constant"):
        raise ValueError(f"schedule.scheduler must be 'cosine' or 'constant', got {kind!r}")
    return warmup_cosine_scheduler(opt, cfg.schedule.warmup_steps, total, cosine=kind == "cosine")


def _posterior(opt: torch.optim.Optimizer, model: nn.Module) -> Any:
    """The learner's posterior (IVON family, VON), or ``None`` (AdamW, SGD, SVRG)."""
    return opt.posterior(model) if hasattr(opt, "posterior") else None


def _save(path: Path, cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> None:
    extra = {"config": to_dict(cfg), "step": step, "learner": cfg.learner.name}
    tensors_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state_dict()}
    post = _posterior(opt, model)
    ckpt.save(path, model, post, spec={"name": cfg.model.name, "kwargs": cfg.model.kwargs},
              extra=extra, state=tensors_state, prior=_prior(post))


def _prior(post: Any) -> Any:
    """The isotropic prior N(0, 1/(λδ)) of an IVON-family posterior (None where undefined)."""
    try:
        return post.prior() if post is not None and hasattr(post, "prior") else None
    except ValueError:  # weight_decay = 0: an improper prior
        return None


def _train_bbb(cfg: TrainConfig, model: nn.Module, data: Any, n: int, out: Path, path: Path) -> dict[str, Any]:
    """Bayes-by-backprop through Pyro SVI (:class:`vbpc.integrations.pyro.BayesByBackprop`): constant LR,
    a checkpoint (posterior mean in the model, the guide as the posterior) at the end; no resume."""
    from .. import BayesByBackprop

    bbb = BayesByBackprop(model, ess=float(cfg.learner.kwargs.get("ess", n)), weight_decay=cfg.learner.weight_decay,
                          lr=cfg.learner.lr, **{k: v for k, v in cfg.learner.kwargs.items() if k != "ess"})
    t0 = time.perf_counter()
    losses: list[float] = []
    log_path = out / "metrics.jsonl"
    with log_path.open("w", encoding="utf-8") as log:
        for epoch in range(cfg.schedule.epochs):
            loader = make_loader(data, cfg.data.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(cfg.run.seed + epoch))
            losses = bbb.fit(loader, epochs=1, progress=cfg.run.progress)
            log.write(json.dumps({"step": bbb.steps, "epoch": epoch + 1, "loss": float(losses[-1]),
                                  "seconds": time.perf_counter() - t0}) + "\n")
    bbb.copy_to(model)
    post = bbb.posterior()
    ckpt.save(path, model, post, spec={"name": cfg.model.name, "kwargs": cfg.model.kwargs},
              extra={"config": to_dict(cfg), "step": bbb.steps, "learner": "bbb"})
    test = make_loader(load_dataset(f"{cfg.data.name}:test", cfg.data.root), cfg.data.test_batch_size)
    summary: dict[str, Any] = {"step": bbb.steps, "total_steps": bbb.steps, "loss": float(losses[-1]),
                               "seconds": time.perf_counter() - t0, "checkpoint": str(path),
                               "test": evaluate(model, test)}
    if cfg.eval.test_samples > 0:
        summary["test_bma"] = evaluate(model, test, post, cfg.eval.test_samples)
    _curves(log_path, out / "curves.png")
    write_json(out / "summary.json", summary)
    return summary


#: config keys a ``--resume`` may change: they steer logging, checkpoint cadence, where to stop and the
#: final evaluation, never the training itself (``eval.`` covers the whole section)
RESUME_MAY_CHANGE = ("run.max_steps", "run.progress", "run.checkpoint_every", "run.log_every", "run.out", "eval.")

#: the files of a run; a new run refuses to replace them without ``overwrite``
RUN_FILES = ("checkpoint.safetensors", "metrics.jsonl", "summary.json")


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"learner": {"lr": 0.1}}`` -> ``{"learner.lr": 0.1}`` (sections only; ``kwargs`` stay whole)."""
    out: dict[str, Any] = {}
    for section, value in cfg.items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse a ``--resume`` whose config differs from the checkpoint's in anything that changes the
    training (learner, data, model, schedule, anchor, seed): such a change would be recorded but
    not applied, or would silently change a half-finished run."""
    old, new = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(to_dict(cfg))))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
               and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)]
    if changed:
        k = changed[0]
        more = f" (and {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise ValueError(f"--resume: the config changes {k} from {old.get(k)!r} to {new.get(k)!r}{more}; a resumed "
                         "run continues with its checkpoint's settings. Drop the change, or start a new run "
                         "(another run.out, or --overwrite)")


def truncate_log(log_path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to the checkpoint's ``step`` (the steps after it are
    replayed on resume and would otherwise appear twice); a torn line (a kill mid-write) is dropped."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    atomic_write_text(log_path, "".join(keep))


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run ``cfg``; with ``resume`` continue from ``<run.out>/checkpoint.safetensors``.  Returns the summary.

    Everything (data, model, learner, schedule) is built and checked before any file is touched.
    The run directory is locked for the run (:func:`vbpc.io.run_lock`).  A directory that already
    holds a run is refused unless ``resume`` (continue it; a finished run is left as it is and its
    summary returned with ``"already_finished": True``) or ``overwrite`` (replace it)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in run.out and --overwrite replaces it; pass one of them")
    out = Path(cfg.run.out)
    path = out / "checkpoint.safetensors"
    seed_everything(cfg.run.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset(f"{cfg.data.name}:train", cfg.data.root)
    if cfg.data.train_size:
        if cfg.data.train_size > len(data):
            raise ValueError(f"data.train_size={cfg.data.train_size} exceeds the {len(data):,} training examples "
                             f"of {cfg.data.name!r}")
        data = torch.utils.data.TensorDataset(*(t[: cfg.data.train_size] for t in data.tensors))
    n = len(data)
    spe = math.ceil(n / cfg.data.batch_size)
    total = cfg.schedule.epochs * spe
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
    if cfg.learner.name == "bbb" and resume:
        raise ValueError("--resume is not supported for learner 'bbb' (Pyro's optimizer state is not "
                         "checkpointed); rerun it from the start")
    opt = build_learner(cfg, model, n, spe) if cfg.learner.name != "bbb" else None
    sched = _scheduler(cfg, opt, total) if opt is not None else None
    if resume and not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    with run_lock(out, "vbpc train"):
        present = [f for f in RUN_FILES if (out / f).exists()]
        if present and not (resume or overwrite):
            raise FileExistsError(f"{out} already holds a run ({', '.join(present)}); pass --resume to continue it "
                                  "or --overwrite to replace it")
        if overwrite:
            for f in present:
                (out / f).unlink()
        if opt is None:
            return _train_bbb(cfg, model, data, n, out, path)
        return _train(cfg, model, opt, sched, data, spe, total, out, path, device, resume)


def _train(cfg: TrainConfig, model: nn.Module, opt: Any, sched: Any, data: Any, spe: int,
           total: int, out: Path, path: Path, device: torch.device, resume: bool) -> dict[str, Any]:
    """The training loop of :func:`train` (under the run lock, after every check)."""
    step = 0
    log_path = out / "metrics.jsonl"
    if resume:
        loaded = ckpt.load(path, model, device=device)
        extra = loaded.extra
        if extra.get("learner") != cfg.learner.name:
            raise ValueError(f"--resume: the checkpoint was written by learner {extra.get('learner')!r}, "
                             f"the config asks for {cfg.learner.name!r}")
        if isinstance(extra.get("config"), dict):
            check_resume_config(extra["config"], cfg)
        step = int(extra["step"])
        if step >= total:
            summary_path = out / "summary.json"
            done = json.loads(summary_path.read_text()) if summary_path.is_file() else {"step": step}
            return {**done, "already_finished": True}
        opt.load_state_dict(loaded.state["optimizer"])
        sched.load_state_dict(loaded.state["scheduler"])
        restore_rng(rng_from_state_dict(loaded.state["rng"]))
        truncate_log(log_path, step)
    elif log_path.exists():
        log_path.unlink()
    log = log_path.open("a", encoding="utf-8")
    info = get_learner(cfg.learner.name)
    corrected = info.anchored
    mega = make_loader(data, cfg.data.test_batch_size) if corrected else None
    loss_fn = (lambda b: F.cross_entropy(model(b[0].to(device)), b[1].to(device))) if corrected else None
    test_cache: list = []

    def test_loader() -> Any:
        if not test_cache:
            test_cache.append(make_loader(load_dataset(f"{cfg.data.name}:test", cfg.data.root),
                                          cfg.data.test_batch_size))
        return test_cache[0]

    t0 = time.perf_counter()
    stop = total if cfg.run.max_steps is None else min(total, cfg.run.max_steps)
    bar = tqdm(total=stop, initial=step, desc=f"train {cfg.learner.name}", disable=not cfg.run.progress,
               dynamic_ncols=True)
    last_loss = float("nan")
    model.train()
    while step < stop:
        epoch, skip = divmod(step, spe)
        loader = make_loader(data, cfg.data.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(cfg.run.seed + epoch))
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            if step >= stop:
                break
            x, y = x.to(device), y.to(device)
            if corrected and getattr(opt, "refresh_due", False):
                opt.refresh(loss_fn, mega, model=model, progress=False)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if info.closure_backward:
                    loss.backward()
                return loss

            out_loss = opt.step(closure, batch_size=len(y)) if corrected else opt.step(closure)
            sched.step()
            step += 1
            last_loss = float(torch.as_tensor(out_loss).detach())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"non-finite training loss {last_loss} at step {step}")
            bar.update(1)
            if step % cfg.run.log_every == 0:
                log.write(json.dumps({"step": step, "epoch": epoch, "loss": last_loss,
                                      "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if step % spe == 0 and cfg.eval.every_epoch:  # RNG-free: the mean weights, no sampling
                ev = evaluate(model, test_loader())
                model.train()
                log.write(json.dumps({"step": step, "epoch": step // spe, "test_accuracy": ev["accuracy"],
                                      "test_nll": ev["nll"], "seconds": time.perf_counter() - t0}) + "\n")
                log.flush()
            if step % cfg.run.checkpoint_every == 0 or step % spe == 0 or step == stop:
                _save(path, cfg, model, opt, sched, step)
    bar.close()
    log.close()
    summary: dict[str, Any] = {"step": step, "total_steps": total, "loss": last_loss,
                               "seconds": time.perf_counter() - t0, "checkpoint": str(path)}
    if step >= total:
        test = test_loader()
        summary["test"] = evaluate(model, test)
        post = _posterior(opt, model)
        if post is not None and cfg.eval.test_samples > 0:
            summary["test_bma"] = evaluate(model, test, post, cfg.eval.test_samples)
        _curves(log_path, out / "curves.png")
    write_json(out / "summary.json", summary)
    return summary


def _curves(log_path: Path, png: Path) -> None:
    """Training loss vs step and (if logged) test accuracy vs epoch, from the JSONL log."""
    rows = read_jsonl(log_path)
    loss = [r for r in rows if "loss" in r]
    test = [r for r in rows if "test_accuracy" in r]
    plot_curves([({"loss": ([r["step"] for r in loss], [r["loss"] for r in loss])} if loss else {}, "step",
                  "training loss (sampled weights)"),
                 ({"test": ([r["epoch"] for r in test], [r["test_accuracy"] for r in test])} if test else {}, "epoch",
                  "test accuracy (mean weights)")], png)
