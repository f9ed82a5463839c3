r"""Train any Hugging Face model with :class:`vbpc.IVON` or :class:`vbpc.IVONPoCo` inside
``transformers.Trainer``.

:class:`VBTrainer` is a drop-in ``Trainer`` subclass.  Pass the learner through ``optimizers=``::

    opt = vbpc.IVON(model.parameters(), lr=0.3, ess=n_train_tokens, hess_init=1e-2, clip_radius=1e-3)
    trainer = VBTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0),
                        train_dataset=ds, optimizers=(opt, None))
    trainer.train()
    posterior = opt.posterior(model)          # then vbpc.predictive / vbpc.evaluation

    # IVON-PoCo: the same, plus the anchor's mega-batch (default: the training loader)
    opt = vbpc.IVONPoCo(model.parameters(), lr=0.3, ess=n, alpha=0.75, anchor_period=100, megabatch_size=512)
    trainer = VBTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None), refresh_data=loader)

What it changes, for a vbpc learner only (other optimizers run the stock ``training_step``):

* every micro-batch (``gradient_accumulation_steps``) is one MC sample with its own weight draw,
  and the learner averages the micro-batch gradients itself (ALGORITHMS.md §12 pitfall 9), so the
  loss is **not** divided by the accumulation count (the returned, logged loss is, as HF reports it);
  ``p.grad`` is cleared before each micro-batch (the previous sample is already collected);
* IVON: the forward and backward run inside ``optimizer.sampled_params(train=True)``;
* IVON-PoCo: the micro-batch is a closure given to :meth:`vbpc.IVONPoCo.sample`, which evaluates it
  at the current sample and at the anchor sample (same batch, replayed RNG, §6.3); when a refresh
  is due (``opt.refresh_due``, at the first micro-batch of a step) the anchor is refreshed over
  ``refresh_data`` (an iterable of batches in the model's input format; default the training
  dataloader, cut at ``megabatch_size`` examples), BatchNorm statistics untouched;
* the ``Trainer`` then calls ``optimizer.step()`` at the accumulation boundary, which performs the
  (corrected) IVON update from the collected samples.

Use ``max_grad_norm=0`` (IVON clips elementwise with ``clip_radius``; a norm clip after the
samples were collected would do nothing).  :class:`vbpc.ContinualIVON` needs a memory batch
next to each batch and is not supported here (use ``vbpc continual`` or a plain loop).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..inference.continual import ContinualIVON
from ..inference.ivon import IVON
from ..inference.ivon_poco import IVONPoCo
from ._common import unwrap_learner

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - transformers is a core dependency
    raise ImportError("vbpc.integrations.hf needs transformers: pip install transformers") from exc

__all__ = ["VBTrainer"]


class VBTrainer(Trainer):
    """``transformers.Trainer`` that samples weights for every micro-batch when the optimizer is a
    :class:`vbpc.IVON` and also runs the anchor pass and refreshes for :class:`vbpc.IVONPoCo`
    (see the module docstring).  ``refresh_data``: the anchor's mega-batch (IVON-PoCo only)."""

    def __init__(self, *args: Any, refresh_data: Optional[Iterable[Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.refresh_data = refresh_data

    def _check_learner(self, opt: IVON) -> None:
        if isinstance(opt, ContinualIVON) or type(opt) not in (IVON, IVONPoCo):
            raise TypeError(f"VBTrainer supports vbpc.IVON and vbpc.IVONPoCo; {type(opt).__name__} needs its own "
                            "loop (`vbpc continual` / `vbpc train`)")
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            raise ValueError(f"VBTrainer with vbpc.{type(opt).__name__}: set TrainingArguments(max_grad_norm=0) and "
                             "use IVON's elementwise clip_radius (the norm clip would run after the samples were "
                             "collected)")

    def _refresh(self, opt: IVONPoCo, model: nn.Module) -> None:
        data = self.refresh_data if self.refresh_data is not None else self.get_train_dataloader()

        def loss_fn(batch: Any) -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, self._prepare_inputs(batch))

        def size(batch: Any) -> int:
            first = next(v for v in batch.values() if torch.is_tensor(v)) if isinstance(batch, dict) else batch[0]
            return int(first.shape[0])

        opt.refresh(loss_fn, data, model=model, batch_size=size, progress=False)

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        opt = unwrap_learner(self.optimizer)
        if not isinstance(opt, IVON):
            return super().training_step(model, inputs, num_items_in_batch)
        self._check_learner(opt)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)  # the micro-batch's mean loss: no GA division
            self.accelerator.backward(loss)
            return loss

        if isinstance(opt, IVONPoCo):
            if opt.pending_samples == 0 and opt.refresh_due:
                self._refresh(opt, model)
            loss = opt.sample(closure)
        else:
            with opt.sampled_params(train=True):
                loss = closure()
        return loss.detach() / self.current_gradient_accumulation_steps
