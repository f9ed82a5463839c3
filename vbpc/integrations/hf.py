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
  and the learner averages the micro-batch gradients itself (docs/algorithms.md §12 pitfall 9), so the
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

import inspect
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..inference.continual import ContinualIVON
from ..inference.ivon import IVON
from ..inference.ivon_poco import IVONPoCo
from ..predictive import predict_batch
from ..scope import warn_outside_scope
from ._common import unwrap_learner

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - transformers is a core dependency
    raise ImportError("vbpc.integrations.hf needs transformers: pip install transformers") from exc

__all__ = ["VBTrainer"]


def _batch_size(batch: Any) -> int:
    first = next(v for v in batch.values() if torch.is_tensor(v)) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def _takes_labels(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``labels`` (HF models, which then return the loss)."""
    params = inspect.signature(model.forward).parameters
    return "labels" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class VBTrainer(Trainer):
    """``transformers.Trainer`` that samples weights for every micro-batch when the optimizer is a
    :class:`vbpc.IVON` and also runs the anchor pass and refreshes for :class:`vbpc.IVONPoCo`
    (see the module docstring).  ``refresh_data``: the anchor's mega-batch (IVON-PoCo only)."""

    def __init__(self, *args: Any, refresh_data: Optional[Iterable[Any]] = None, bma_samples: int = 0,
                 bma_seed: int = 0, **kwargs: Any):
        if not (isinstance(bma_samples, int) and not isinstance(bma_samples, bool) and bma_samples >= 0):
            raise ValueError(f"invalid bma_samples={bma_samples!r}: must be an int >= 0")
        super().__init__(*args, **kwargs)
        self.refresh_data = refresh_data
        self.bma_samples = bma_samples
        self.bma_seed = int(bma_seed)
        self._bma_state: Optional[tuple[Any, torch.Generator]] = None
        self._scope_checked = False
        self._logits_model = not _takes_labels(self.accelerator.unwrap_model(self.model))
        if self._logits_model and self.args.label_names is None:
            self.label_names = ["labels"]  # keeps the column (remove_unused_columns) and marks it as labels

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

        opt.refresh(loss_fn, data, model=model, batch_size=_batch_size, progress=False)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        """The stock loss for models that take ``labels`` (HF models); for a model that returns logits
        (vbpc's :func:`~vbpc.models.minilm_classifier`, any ``nn.Module``) the mean cross-entropy of the
        logits against ``labels`` (``-100`` ignored), as HF's sequence classifiers compute it."""
        if not self._logits_model or self.compute_loss_func is not None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        out = model(**inputs)
        logits = getattr(out, "logits", out)
        if not torch.is_tensor(logits):
            raise TypeError(f"VBTrainer: the model returned {type(out).__name__}; a model without a `labels` argument "
                            "must return logits (or an object with .logits)")
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                               ignore_index=-100)
        return (loss, {"logits": logits}) if return_outputs else loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._bma_state = None  # every evaluation draws the same weight samples (paired across checkpoints)
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self._bma_state = None

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None) -> Any:
        """With ``bma_samples=S > 0`` and a vbpc learner: the Bayesian model average of ``S`` weight samples
        (log-probabilities as the "logits" given to ``compute_metrics``, the loss its NLL), one
        generator of seed ``bma_seed`` per evaluation; otherwise the stock step at the mean weights."""
        opt = unwrap_learner(self.optimizer) if self.optimizer is not None else None
        if not self.bma_samples or not isinstance(opt, IVON):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        if labels is not None and labels.dim() != 1:
            raise ValueError("VBTrainer(bma_samples=...) evaluates sequence classification (labels of shape (B,)); "
                             "for a language model use vbpc.predictive.predict(..., task='causal_lm')")
        x = {k: v for k, v in inputs.items() if k not in self.label_names}
        if self._bma_state is None:  # once per evaluation (reset by evaluate/predict)
            dev = next(model.parameters()).device
            self._bma_state = (opt.posterior(model), torch.Generator(device=dev).manual_seed(self.bma_seed))
        posterior, gen = self._bma_state
        logp = predict_batch(model, x, posterior, self.bma_samples, generator=gen)  # HF outputs: .logits
        loss = None if labels is None else F.nll_loss(logp, labels, ignore_index=-100).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, logp.detach(), None if labels is None else labels.detach()

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        opt = unwrap_learner(self.optimizer)
        if not isinstance(opt, IVON):
            return super().training_step(model, inputs, num_items_in_batch)
        self._check_learner(opt)
        if not self._scope_checked:
            self._scope_checked = True
            warn_outside_scope(self.accelerator.unwrap_model(model), [p for g in opt.param_groups for p in g["params"]],
                               f"VBTrainer with vbpc.{type(opt).__name__}", stacklevel=2)
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
            opt.set_batch_size(_batch_size(inputs))  # per micro-batch: counters["inner_examples"]
            loss = opt.sample(closure)
        else:
            with opt.sampled_params(train=True):
                loss = closure()
        return loss.detach() / self.current_gradient_accumulation_steps
