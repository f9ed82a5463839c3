r"""Train with :class:`vbpc.IVON` and :class:`vbpc.IVONPoCo` inside PyTorch Lightning.

Add :class:`VBCallback` to the ``Trainer`` and return a vbpc learner from ``configure_optimizers``::

    from vbpc.integrations.lightning import VBCallback

    class Net(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return vbpc.IVON(self.parameters(), lr=0.1, ess=len(train_set))

    trainer = pl.Trainer(max_epochs=5, accumulate_grad_batches=4, callbacks=[VBCallback(bma_samples=16)])

What the callback does (see ``docs/integrations.md``):

* **Automatic optimization.**  Lightning evaluates the ``training_step`` closure inside
  ``optimizer.step(closure)``; the learner draws a weight sample for it.  With
  ``accumulate_grad_batches=k`` Lightning runs the first ``k-1`` micro-batches *outside* the closure,
  at the mean weights; the callback loads a weight sample around each of them
  (``sampled_params(train=True)``), clears ``p.grad`` before every backward pass and undoes Lightning's
  division of the loss by ``k`` (the learner averages the ``k`` samples itself).  The step is then the
  plain loop's: one weight sample per micro-batch, each micro-batch's undivided mean loss (bit for
  bit when ``k`` is a power of two; otherwise to one rounding of the ``×k``).
* **Manual optimization.**  ``self.optimizers()`` returns Lightning's wrapper; vbpc's methods called
  on it run on the learner itself, so the plain protocol works unchanged::

      opt = self.optimizers()
      with opt.sampled_params(train=True):
          opt.zero_grad()
          self.manual_backward(loss_fn(self(x), y))
      opt.step()

* **IVON-PoCo.**  The anchor is refreshed when due (``opt.refresh_due``) at the start of a step, over
  ``refresh_data`` (default: the training dataloader, cut at ``megabatch_size`` examples) with the
  loss ``refresh_loss(module, batch)`` (default: ``training_step``'s loss).  Every ``self.log`` call
  made while the closure runs at the anchor sample is dropped, so the logged loss is the current
  pass's.  The batch size of each step feeds ``opt.counters["inner_examples"]``.
* **Evaluation.**  ``bma_samples=S > 0`` logs ``bma_nll``, ``bma_acc`` and ``bma_ece`` of the Bayesian
  model average over the validation loader after every validation epoch.

Refused, with the fix in the message: Lightning's ``gradient_clip_val`` (it would clip after the sample
was collected; use the learner's ``clip_grad_norm``), IVON-PoCo with ``accumulate_grad_batches > 1``
under automatic optimization (use manual optimization with ``opt.sample(closure)`` per micro-batch),
and :class:`vbpc.ContinualIVON` (it needs a memory batch next to each batch).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import SamplingError
from ..inference.continual import ContinualIVON
from ..inference.ivon import IVON
from ..inference.ivon_poco import IVONPoCo
from ..scope import warn_outside_scope
from ._common import unwrap_learner

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.utilities.data import extract_batch_size
except ImportError as exc:  # pragma: no cover - exercised only without Lightning
    raise ImportError("vbpc.integrations.lightning needs PyTorch Lightning: pip install pytorch-lightning") from exc

__all__ = ["VBCallback", "learners"]


class _DropSample(Exception):
    """Raised into a sampling context to drop it (a micro-batch whose ``training_step`` returned ``None``)."""


def learners(trainer: pl.Trainer) -> list[IVON]:
    """The vbpc learners among the Trainer's optimizers (unwrapped)."""
    return [o for o in map(unwrap_learner, trainer.optimizers) if isinstance(o, IVON)]


def _params(opt: IVON) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not torch.is_tensor(loss):
        raise TypeError("VBCallback: training_step must return the loss (a tensor, or a dict with 'loss') for the "
                        "anchor refresh; pass refresh_loss=f(module, batch) -> loss otherwise")
    return loss


class VBCallback(Callback):
    """Makes vbpc's learners correct under Lightning (see the module docstring).

    Args:
        refresh_data: IVON-PoCo's mega-batch: an iterable of batches in the ``training_step`` format
            (default: the training dataloader, cut at the learner's ``megabatch_size`` examples).
        refresh_loss: ``f(module, batch) -> mean loss`` for the refresh (default: ``training_step``'s loss).
        bma_samples: weight samples of the Bayesian model average logged after each validation epoch
            (0: off).  The validation batches must be ``(inputs, labels)``; ``module(inputs)`` gives logits.
        bma_seed: the seed of the BMA's weight draws (the same draws after every epoch: epochs compare
            paired, and the numbers equal ``vbpc.predictive.predict`` with a generator of that seed).
    """

    def __init__(self, refresh_data: Optional[Iterable[Any]] = None,
                 refresh_loss: Optional[Callable[[Any, Any], Tensor]] = None, bma_samples: int = 0,
                 bma_seed: int = 0):
        if not (isinstance(bma_samples, int) and not isinstance(bma_samples, bool) and bma_samples >= 0):
            raise ValueError(f"invalid bma_samples={bma_samples!r}: must be an int >= 0")
        self.refresh_data = refresh_data
        self.refresh_loss = refresh_loss
        self.bma_samples = bma_samples
        self.bma_seed = int(bma_seed)
        self._stack: Optional[contextlib.ExitStack] = None  # the open sample of an accumulating micro-batch
        self._backward = False  # a backward pass ran in the open sample
        self._quiet = 0  # > 0: LightningModule.log calls are dropped (anchor pass, refresh)
        self._restore: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opts = learners(trainer)
        for opt in opts:
            name = type(opt).__name__
            if isinstance(opt, ContinualIVON):
                raise TypeError("VBCallback: ContinualIVON needs a memory batch next to each batch "
                                "(step(closure, memory=...)); train it with a plain loop or `vbpc continual`")
            if trainer.gradient_clip_val:
                raise ValueError(f"VBCallback: Trainer(gradient_clip_val={trainer.gradient_clip_val}) with vbpc.{name} "
                                 "would clip after the weight sample was collected; remove it and pass "
                                 f"clip_grad_norm={trainer.gradient_clip_val} to vbpc.{name}")
            if (isinstance(opt, IVONPoCo) and pl_module.automatic_optimization
                    and trainer.accumulate_grad_batches > 1):
                raise ValueError(f"VBCallback: vbpc.{name} with accumulate_grad_batches="
                                 f"{trainer.accumulate_grad_batches} under automatic optimization is not supported "
                                 "(the anchor pass must see each micro-batch); use a larger batch, or manual "
                                 "optimization with opt.sample(closure) per micro-batch and opt.step()")
        if opts:
            warn_outside_scope(pl_module, [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]],
                               "VBCallback (the Trainer's optimizers)", stacklevel=2)
        self._install_log_filter(pl_module, opts)

    def _install_log_filter(self, pl_module: pl.LightningModule, opts: list[IVON]) -> None:
        """Drop ``log``/``log_dict`` calls made at an anchor sample or during a refresh."""
        pocos = [o for o in opts if isinstance(o, IVONPoCo)]
        if not pocos or self._restore is not None:
            return
        originals = {k: getattr(pl_module, k) for k in ("log", "log_dict")}

        def quiet() -> bool:
            return self._quiet > 0 or any(o.in_anchor_pass for o in pocos)

        def filtered(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def log(*args: Any, **kwargs: Any) -> None:
                if not quiet():
                    fn(*args, **kwargs)
            return log

        for k, fn in originals.items():
            setattr(pl_module, k, filtered(fn))

        def restore() -> None:
            for k in originals:
                pl_module.__dict__.pop(k, None)
        self._restore = restore

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(drop=True)
        if self._restore is not None:
            self._restore()
            self._restore = None

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        opts = learners(trainer)
        if not opts:
            return
        try:
            size = extract_batch_size(batch)
        except Exception:  # noqa: BLE001 - an exotic batch: the counters then lack examples
            size = None
        for opt in opts:
            if isinstance(opt, IVONPoCo):
                if opt.pending_samples == 0 and opt.refresh_due:
                    self._refresh(trainer, pl_module, opt)
                opt.set_batch_size(size)
        if not pl_module.automatic_optimization or not trainer.fit_loop._should_accumulate():
            return
        if len(opts) > 1:
            raise ValueError("VBCallback: accumulate_grad_batches with several vbpc learners is not supported")
        opt = opts[0]
        for p in _params(opt):
            p.grad = None
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(opt.sampled_params(train=True))
        self._backward = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not pl_module.automatic_optimization:
            return
        for opt in learners(trainer):  # each backward pass is one sample's own gradient
            for p in _params(opt):
                p.grad = None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            return
        self._backward = True
        k = trainer.accumulate_grad_batches
        if k > 1:  # Lightning divided the loss by k; the learner averages the k samples itself
            for opt in learners(trainer):
                grads = [p.grad for p in _params(opt) if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, float(k))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._close(drop=not self._backward)

    def _close(self, drop: bool) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if drop:  # training_step returned None: no sample for this micro-batch
            stack.__exit__(_DropSample, _DropSample(), None)
        else:
            stack.close()

    def _refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: IVONPoCo) -> None:
        data = self.refresh_data if self.refresh_data is not None else trainer.train_dataloader
        if data is None:
            raise SamplingError("VBCallback: an IVON-PoCo refresh is due but there is no training dataloader; "
                                "pass VBCallback(refresh_data=...)")

        def loss_fn(batch: Any) -> Tensor:
            batch = trainer.strategy.batch_to_device(batch)
            if self.refresh_loss is not None:
                return self.refresh_loss(pl_module, batch)
            return _loss_of(pl_module.training_step(batch, 0))

        self._quiet += 1
        try:
            opt.refresh(loss_fn, data, model=pl_module, batch_size=extract_batch_size, progress=False)
        finally:
            self._quiet -= 1

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.bma_samples or trainer.sanity_checking:
            return
        opts = learners(trainer)
        loaders = trainer.val_dataloaders
        if not opts or loaders is None:
            return
        from ..metrics import accuracy, ece, nll
        from ..predictive import predict

        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        posterior = opts[0].posterior(pl_module)
        for i, loader in enumerate(loaders):
            gen = torch.Generator(device=pl_module.device).manual_seed(self.bma_seed)
            preds = predict(pl_module, loader, posterior, self.bma_samples, generator=gen, device=pl_module.device)
            if preds.labels is None:
                raise ValueError("VBCallback(bma_samples=...): the validation batches carry no labels; they must "
                                 "be (inputs, labels)")
            suffix = f"/{i}" if len(loaders) > 1 else ""
            p, y = preds.probs, preds.labels
            for key, value in (("bma_nll", nll(p, y)), ("bma_acc", accuracy(p, y)), ("bma_ece", ece(p, y))):
                pl_module.log(key + suffix, float(value), prog_bar=key == "bma_acc")
