r"""Train any Hugging Face model with :class:`vbpc.IVON` inside ``transformers.Trainer``.

:class:`VBTrainer` is a drop-in ``Trainer`` subclass.  Pass the learner through ``optimizers=``::

    opt = vbpc.IVON(model.parameters(), lr=0.3, ess=n_train_tokens, hess_init=1e-2, clip_radius=1e-3)
    trainer = VBTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0),
                        train_dataset=ds, optimizers=(opt, None))
    trainer.train()
    posterior = opt.posterior(model)          # then vbpc.predictive / vbpc.evaluation

What it changes, for a vbpc learner only (other optimizers run the stock ``training_step``):

* every micro-batch (``gradient_accumulation_steps``) runs its forward and backward inside
  ``optimizer.sampled_params(train=True)``: one fresh weight sample per micro-batch, and the
  learner averages the micro-batch gradients itself (ALGORITHMS.md §12 pitfall 9), so the loss is
  **not** divided by the accumulation count (the returned, logged loss is, as HF reports it);
* ``p.grad`` is cleared before each micro-batch (the previous sample is already collected);
* the ``Trainer`` then calls ``optimizer.step()`` at the accumulation boundary, which performs
  IVON's update from the collected samples.

Use ``max_grad_norm=0`` (IVON clips elementwise with ``clip_radius``; a norm clip after the
samples were collected would do nothing).  The posterior-corrected learners evaluate each batch
twice (current and anchor sample) through a closure, which ``Trainer``'s step-without-closure
protocol cannot express: train those with ``vbpc train`` or a plain loop.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..inference.ivon import IVON

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - transformers is a core dependency
    raise ImportError("vbpc.integrations.hf needs transformers: pip install transformers") from exc

__all__ = ["VBTrainer"]


def _unwrap(opt: Any) -> Any:
    """The learner inside accelerate's ``AcceleratedOptimizer`` wrapper (if any)."""
    while hasattr(opt, "optimizer") and not isinstance(opt, IVON):
        opt = opt.optimizer
    return opt


class VBTrainer(Trainer):
    """``transformers.Trainer`` that samples weights for every micro-batch when the optimizer is a
    :class:`vbpc.IVON` (see the module docstring)."""

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        opt = _unwrap(self.optimizer)
        if not isinstance(opt, IVON):
            return super().training_step(model, inputs, num_items_in_batch)
        if type(opt).__name__ != "IVON":
            raise TypeError(f"VBTrainer supports vbpc.IVON; {type(opt).__name__} evaluates each batch twice "
                            "through a closure: use `vbpc train` or a plain loop for it")
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            raise ValueError("VBTrainer with vbpc.IVON: set TrainingArguments(max_grad_norm=0) and use IVON's "
                             "elementwise clip_radius (the norm clip would run after the samples were collected)")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with opt.sampled_params(train=True):
            model.zero_grad(set_to_none=True)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)  # the micro-batch's mean loss: no GA division
            self.accelerator.backward(loss)
        return loss.detach() / self.current_gradient_accumulation_steps
