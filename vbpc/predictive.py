r"""Predictive distributions by Bayesian model averaging (docs/algorithms.md §9, eq. 33).

Given a model and a :class:`~vbpc.GaussianPosterior`, draw :math:`\theta_s\sim q`, :math:`s=1..S`,
in ``model.eval()`` without gradients, and average **probabilities**:

.. math::
    \log\bar p(y\mid x)=\operatorname{logsumexp}_s\log\operatorname{softmax}f(x;\theta_s)_y-\log S.
    \tag{33}

``n_samples=0`` (or no posterior) is the mean predictor :math:`f(x;m)`.  Sample stacks are
sample-first ``(S, B, C)``.  Two execution paths give the same draws (``posterior.sample`` with the
same generator) and the same numbers up to matmul rounding:

* ``"loop"``: one forward per sample, the weights written in place and restored bit for bit
  (:meth:`~vbpc.GaussianPosterior.sampled`); works for every model;
* ``"vmap"``: the S samples are evaluated in one batched call,
  ``torch.vmap(torch.func.functional_call(model, ...))``; ``"auto"`` uses it on CUDA (where it
  replaces S kernel launches per layer by one) and the loop on the CPU (where batched
  convolutions measured 3× slower than the loop); models vmap cannot batch fall back to the
  loop once, with a warning.

``draw="per_batch"`` (default) redraws for every batch; ``"per_pass"`` uses one set of S weight
samples for the whole pass (agreement between members is then meaningful).  Batches may be
``(x, y)`` tuples, tensors, or Hugging Face dicts (``input_ids``, ``attention_mask``, ``labels``,
...); model outputs may be tensors or objects with ``.logits``.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._enums import parse_enum
from .errors import NonFiniteError
from .posterior import GaussianPosterior

__all__ = [
    "Draw",
    "Task",
    "Predictions",
    "Vectorize",
    "log_mean_exp",
    "predict",
    "predict_batch",
    "predict_ensemble",
    "sample_logits",
]


class Vectorize(str, enum.Enum):
    """How several weight samples are evaluated: ``"auto"``, ``"vmap"`` or ``"loop"``."""

    AUTO = "auto"
    VMAP = "vmap"
    LOOP = "loop"


class Task(str, enum.Enum):
    """What the model predicts: ``"classification"`` (``(B, C)`` logits) or ``"causal_lm"``
    (``(B, T, V)`` logits; position t predicts token t+1, docs/algorithms.md §9 token-level)."""

    CLASSIFICATION = "classification"
    CAUSAL_LM = "causal_lm"


class Draw(str, enum.Enum):
    """When weight samples are drawn: ``"per_batch"`` (fresh for every batch) or ``"per_pass"``."""

    PER_BATCH = "per_batch"
    PER_PASS = "per_pass"


def log_mean_exp(log_probs: Tensor, dim: int = 0) -> Tensor:
    r""":math:`\log\frac1S\sum_s e^{x_s}` over ``dim`` (eq. 33), stable for logits of any size."""
    if log_probs.shape[dim] < 1:
        raise ValueError("log_mean_exp over an empty sample dimension")
    return torch.logsumexp(log_probs, dim=dim) - math.log(log_probs.shape[dim])


# ----------------------------------------------------------------------------- batches and outputs
def _split_batch(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """(model input, labels or None) of a tuple/list, dict (HF) or tensor batch."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("empty batch")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _lm_tokens(logp: Tensor, stack: Optional[Tensor], inputs: Any, labels: Optional[Tensor],
               ignore_index: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Causal shift and masking: ``(B, T, V)`` predictions → the kept tokens ``(N_tok, V)``.

    Targets are ``labels`` (default ``input_ids``) shifted left by one; targets equal to
    ``ignore_index`` or whose ``attention_mask`` is 0 are dropped (§9 token-level calibration)."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    target = labels if labels is not None else ids
    if not isinstance(target, Tensor) or target.dim() != 2:
        raise ValueError("task='causal_lm' needs (B, T) labels or input_ids")
    if logp.dim() != 3 or logp.shape[:2] != target.shape:
        raise ValueError(f"causal LM logits {tuple(logp.shape)} do not match labels {tuple(target.shape)} as (B, T, V)")
    tgt = target[:, 1:].to(logp.device)
    keep = tgt != ignore_index
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is not None:
        keep = keep & (mask[:, 1:].to(keep.device) != 0)
    flat = keep.reshape(-1)
    V = logp.shape[-1]
    lp = logp[:, :-1].reshape(-1, V)[flat]
    st = None if stack is None else stack[:, :, :-1].reshape(stack.shape[0], -1, V)[:, flat]
    return lp, tgt.reshape(-1)[flat], st


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def check_finite_inputs(inputs: Any) -> None:
    """Refuse floating-point inputs holding NaN or inf (a prediction from them is meaningless, and a
    NaN would otherwise flow silently into the metrics)."""
    values = inputs.values() if isinstance(inputs, Mapping) else (inputs,)
    for v in values:
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise NonFiniteError(f"the inputs to predict hold NaN or inf ({int((~torch.isfinite(v)).sum())} of "
                                 f"{v.numel()} values); clean or drop those examples first")


def _call(model: nn.Module, inputs: Any) -> Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; expected logits or an object with .logits")
    return logits


# ----------------------------------------------------------------------------- sample generation
def _model_names(posterior: GaussianPosterior, model: nn.Module) -> list[str]:
    """The model's parameter name for each posterior entry (the posterior is bound to ``model``)."""
    posterior.bind(model)
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [by_id[id(e.target)] for e in posterior._entries]


def _vmapped_logits(model: nn.Module, inputs: Any, names: list[str], stacked: dict[str, Tensor],
                    entry_names: list[str], chunk: Optional[int]) -> Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    batched = {mn: stacked[en].to(params[mn].dtype) for mn, en in zip(names, entry_names)}
    fixed = {n: p for n, p in params.items() if n not in batched}

    def f(p: dict[str, Tensor], x: Any) -> Tensor:
        args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), None)
        out = torch.func.functional_call(model, {**fixed, **buffers, **p}, args, kwargs)
        return getattr(out, "logits", out)

    return torch.vmap(f, in_dims=(0, None), chunk_size=chunk)(batched, inputs)


class _Sampler:
    """Draws the S weight samples for a batch (``per_batch``) or replays them (``per_pass``)."""

    def __init__(self, posterior: GaussianPosterior, n: int, draw: Draw, generator: Optional[torch.Generator],
                 device: torch.device) -> None:
        self.posterior, self.n, self.draw = posterior, n, draw
        if draw is Draw.PER_PASS and generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self.first: Optional[Tensor] = None  # generator state at the pass's first draw

    def start(self) -> None:
        """Before each batch: for ``per_pass``, rewind to the first draw of the pass."""
        if self.draw is Draw.PER_PASS:
            assert self.generator is not None
            if self.first is None:
                self.first = self.generator.get_state()
            else:
                self.generator.set_state(self.first)

    def thetas(self) -> dict[str, Tensor]:
        """The S samples, stacked ``{name: (S, *shape)}`` (:meth:`GaussianPosterior.sample_stack`)."""
        return self.posterior.sample_stack(self.n, self.generator)


# ----------------------------------------------------------------------------- one batch
@torch.no_grad()
def sample_logits(model: nn.Module, inputs: Any, posterior: GaussianPosterior, n_samples: int, *,
                  generator: Optional[torch.Generator] = None, vectorize: Union[str, Vectorize] = "auto",
                  chunk_size: Optional[int] = None) -> Tensor:
    """Logits at ``n_samples`` posterior draws, stacked sample-first ``(S, B, ...)``.

    Draws come from ``posterior.sample_stack(n_samples, generator)``, identically for both paths."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    sampler = _Sampler(posterior, n_samples, Draw.PER_BATCH, generator, _device(model))
    return _stack(model, inputs, sampler, parse_enum(Vectorize, vectorize, "vectorize"), chunk_size, _State())


@dataclass
class _State:
    vmap_ok: Optional[bool] = None


def _stack(model: nn.Module, inputs: Any, sampler: _Sampler, mode: Vectorize, chunk: Optional[int],
           state: _State) -> Tensor:
    post = sampler.posterior
    stacked = sampler.thetas()
    if mode is Vectorize.AUTO and state.vmap_ok is None and _device(model).type == "cpu":
        state.vmap_ok = False  # auto on the CPU: the loop (see the module docstring)
    if mode is Vectorize.LOOP or state.vmap_ok is False:
        return _loop_with(model, inputs, post, stacked, sampler.n)
    try:
        out = _vmapped_logits(model, inputs, _model_names(post, model), stacked, post.names, chunk)
        state.vmap_ok = True
        return out
    except Exception as exc:  # noqa: BLE001 - any failure to batch falls back to the loop
        if mode is Vectorize.VMAP:
            raise RuntimeError(f"vectorize='vmap' failed for {type(model).__name__}: {exc}") from exc
        warnings.warn(f"vbpc.predict: torch.vmap cannot batch {type(model).__name__} ({type(exc).__name__}: "
                      f"{str(exc)[:120]}); falling back to one forward per sample", RuntimeWarning, stacklevel=3)
        state.vmap_ok = False
        return _loop_with(model, inputs, post, stacked, sampler.n)


def _loop_with(model: nn.Module, inputs: Any, posterior: GaussianPosterior, stacked: dict[str, Tensor],
               n: int) -> Tensor:
    """One forward per sample ``stacked[:, s]``, written in place (and restored) by ``posterior.sampled``."""
    outs = []
    for s in range(n):
        with posterior.sampled(model, theta={k: v[s] for k, v in stacked.items()}):
            outs.append(_call(model, inputs))
    return torch.stack(outs)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
@overload
def predict_batch(model: nn.Module, inputs: Any, posterior: Optional[GaussianPosterior] = ..., n_samples: int = ...,
                  *, generator: Optional[torch.Generator] = ..., vectorize: Union[str, Vectorize] = ...,
                  return_samples: Literal[False] = ...) -> Tensor: ...


@overload
def predict_batch(model: nn.Module, inputs: Any, posterior: Optional[GaussianPosterior] = ..., n_samples: int = ...,
                  *, generator: Optional[torch.Generator] = ..., vectorize: Union[str, Vectorize] = ...,
                  return_samples: Literal[True]) -> tuple[Tensor, Optional[Tensor]]: ...


def predict_batch(model: nn.Module, inputs: Any, posterior: Optional[GaussianPosterior] = None, n_samples: int = 0,
                  *, generator: Optional[torch.Generator] = None, vectorize: Union[str, Vectorize] = "auto",
                  return_samples: bool = False) -> Union[Tensor, tuple[Tensor, Optional[Tensor]]]:
    """``log p̄`` of one batch (float32 or wider, classes last); with ``return_samples`` also the
    per-sample log-softmax stack ``(S, B, ..., C)`` (``None`` for the mean predictor)."""
    check_finite_inputs(inputs)
    was = model.training
    model.eval()
    try:
        if posterior is None or n_samples == 0:
            logp = F.log_softmax(_call(model, inputs).float(), -1)
            return (logp, None) if return_samples else logp
        stack = F.log_softmax(sample_logits(model, inputs, posterior, n_samples, generator=generator,
                                            vectorize=vectorize).float(), -1)
        logp = log_mean_exp(stack, 0)
        return (logp, stack) if return_samples else logp
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- whole loaders
@dataclass
class Predictions:
    """The predictive over a dataset: ``log_probs`` ``(N, C)`` (eq. 33), ``labels`` ``(N,)`` if the
    batches had them, and, with ``keep_samples``, the per-sample log-softmax stack ``(S, N, C)``."""

    log_probs: Tensor
    labels: Optional[Tensor] = None
    sample_log_probs: Optional[Tensor] = None

    @property
    def probs(self) -> Tensor:
        """:math:`\\bar p` in float64."""
        return self.log_probs.double().exp()

    @property
    def sample_probs(self) -> Optional[Tensor]:
        return None if self.sample_log_probs is None else self.sample_log_probs.double().exp()

    def __len__(self) -> int:
        return self.log_probs.shape[0]


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Iterable[Any],
    posterior: Optional[GaussianPosterior] = None,
    n_samples: int = 0,
    *,
    generator: Optional[torch.Generator] = None,
    draw: Union[str, Draw] = "per_batch",
    vectorize: Union[str, Vectorize] = "auto",
    chunk_size: Optional[int] = None,
    keep_samples: bool = False,
    task: Union[str, Task] = "classification",
    ignore_index: int = -100,
    keep: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    desc: str = "predict",
    on_batch: Optional[Callable[[Tensor, Optional[Tensor], Optional[Tensor]], None]] = None,
    **aliases: int,
) -> Predictions:
    """Stream ``data`` through the predictive (eq. 33) of ``posterior`` over ``model``.

    Args:
        model: the network (any device; inputs are moved to ``device`` or the parameters' device).
        data: an iterable of batches (a ``DataLoader``); see the module docstring for batch types.
        posterior: a :class:`~vbpc.GaussianPosterior` over (some of) the model's parameters.
        n_samples: S (aliases ``num_samples``, ``mc_samples``); 0 = the mean predictor.
        generator: the draws' generator (on the parameters' device) for reproducible samples.
        draw: ``"per_batch"`` or ``"per_pass"``.
        vectorize: ``"auto"``, ``"vmap"`` or ``"loop"``; ``chunk_size`` bounds vmap's memory
            (samples evaluated at once).
        keep_samples: also return the ``(S, N, C)`` per-sample stack (for entropy/MI metrics).
        task: ``"classification"`` or ``"causal_lm"``: for an LM every kept token is one example
            (``N`` = tokens after the causal shift, dropping ``ignore_index`` targets and padding),
            so the classification metrics become the token-level ones of §9.
        keep: collect ``log_probs`` (set False with ``on_batch`` to stream a large vocabulary).
        progress: a tqdm bar.
        on_batch: ``f(log_p̄, labels, sample_stack)`` per batch, for streaming metrics without
            keeping everything (the return value then still holds ``log_probs``).

    The model runs in eval mode (restored afterwards); its parameters are restored bit for bit.
    """
    for k, v in aliases.items():
        if k not in ("num_samples", "mc_samples"):
            raise TypeError(f"predict() got an unexpected keyword argument {k!r}")
        n_samples = v
    if not isinstance(n_samples, int) or n_samples < 0:
        raise ValueError(f"n_samples must be an int >= 0 (0 = mean predictor), got {n_samples!r}")
    if posterior is None and n_samples > 0:
        raise ValueError("n_samples > 0 needs a posterior to sample from")
    draw_mode = parse_enum(Draw, draw, "draw")
    lm = parse_enum(Task, task, "task") is Task.CAUSAL_LM
    mode = parse_enum(Vectorize, vectorize, "vectorize")
    dev = torch.device(device) if device is not None else _device(model)
    sampler = _Sampler(posterior, n_samples, draw_mode, generator, dev) if posterior is not None and n_samples else None
    state = _State()
    was = model.training
    model.eval()
    outs, labels, stacks = [], [], []
    seen = 0
    try:
        for batch in tqdm(data, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            inputs, y = _split_batch(batch)
            inputs = _to(inputs, dev)
            check_finite_inputs(inputs)
            seen += 1
            if sampler is None:
                stack = None
                logp = F.log_softmax(_call(model, inputs).float(), -1)
            else:
                sampler.start()
                stack = F.log_softmax(_stack(model, inputs, sampler, mode, chunk_size, state).float(), -1)
                logp = log_mean_exp(stack, 0)
            if lm:
                logp, y, stack = _lm_tokens(logp, stack, inputs, y, ignore_index)
            if on_batch is not None:
                on_batch(logp, y, stack)
            if keep:
                outs.append(logp.cpu())
            if y is not None and keep:
                labels.append(y.cpu())
            if keep_samples and stack is not None:
                stacks.append(stack.cpu())
    finally:
        model.train(was)
    if not seen:
        raise ValueError("predict: the data yielded no batch")
    if not outs:
        return Predictions(torch.empty(0), None, None)
    return Predictions(torch.cat(outs), torch.cat(labels) if labels else None,
                       torch.cat(stacks, dim=1) if stacks else None)


def predict_ensemble(members: Iterable[tuple[nn.Module, Optional[GaussianPosterior]]], data: Iterable[Any],
                     n_samples: int = 0, *, seed: int = 0, **kwargs: Any) -> Predictions:
    r"""The equal-weight mixture of several members' predictives: a deep ensemble (members without a
    posterior, at their weights) or MultiIVON (each member's posterior averaged over ``n_samples``
    draws), :math:`\bar p=\frac1K\sum_k\bar p_k`, computed as a log-mean-exp of the members' log-probabilities.

    ``members``: ``(model, posterior or None)`` pairs over the same ``data`` (iterated once per member,
    so it must yield the same batches each time: a ``DataLoader`` without shuffling).  Member ``k``
    draws from a generator seeded with ``seed + k``; ``kwargs`` go to :func:`predict` (``keep_samples``
    is not supported).  ``sample_log_probs`` of the result stacks the members' predictives ``(K, N, C)``,
    for the disagreement (mutual-information) metrics."""
    if kwargs.get("keep_samples"):
        raise ValueError("predict_ensemble: keep_samples is not supported; the members' predictives are returned "
                         "as sample_log_probs")
    members = list(members)
    if not members:
        raise ValueError("predict_ensemble: no member given")
    preds = []
    for k, (model, posterior) in enumerate(members):
        s = n_samples if posterior is not None else 0
        gen = torch.Generator(device=kwargs.get("device") or _device(model)).manual_seed(seed + k) if s else None
        preds.append(predict(model, data, posterior, s, generator=gen, **kwargs))
    labels = preds[0].labels
    for k, p in enumerate(preds[1:], 1):
        if p.log_probs.shape != preds[0].log_probs.shape or (
                labels is not None and (p.labels is None or not torch.equal(p.labels, labels))):
            raise ValueError(f"predict_ensemble: member {k} saw different data than member 0 (shapes or labels "
                             "differ); pass a loader that yields the same batches every time (shuffle=False)")
    stack = torch.stack([p.log_probs for p in preds])
    return Predictions(log_mean_exp(stack, 0), labels, stack)
