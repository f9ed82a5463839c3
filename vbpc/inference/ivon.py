r"""IVON: improved variational online Newton (docs/algorithms.md §2), a ``torch.optim.Optimizer``.

.. math::
    \textbf{input}: &\ \text{lr } a,\ \text{ess }\lambda,\ h_0,\ \beta_1,\ \beta_2,\ \delta,\ S,\ \xi\\
    \textbf{sample } s=1..S: &\ z_s\sim\mathcal N(0,I),\ n_s=z_s/\sqrt{\lambda(h+\delta)},\
        \theta_s=m+n_s,\ \hat g_s=\nabla\bar\ell_B(\theta_s) \hfill (5)\\
    \textbf{collect}: &\ \hat g=\overline{\hat g_s},\quad
        \hat h=(\overline{n_s\odot\hat g_s}\odot(h+\delta))\cdot\lambda \hfill (6)\\
    \textbf{update}: &\ t\leftarrow t+1,\ g\leftarrow\beta_1g+(1-\beta_1)\hat g \hfill (7)\\
    &\ h\leftarrow\beta_2h+(1-\beta_2)\hat h+\tfrac12(1-\beta_2)^2(h-\hat h)^2/(h+\delta) \hfill (8)\\
    &\ m\leftarrow m-\eta_t\,\mathrm{clip}_\xi\big((g/(1-\beta_1^t)+\delta m)/(h+\delta)\big),\
        \eta_t=a(h_0+\delta) \hfill (9)

Drop-in compatible with ``ivon.IVON`` 0.1.3 (same constructor, defaults and
``sampled_params(train=...)`` protocol); the reference's defects listed in docs/algorithms.md
§2.2 are fixed.  ``parity=True`` follows the RNG/arithmetic contract of §2.1 so that
trajectories equal the reference's bit for bit (fp32 and fp64).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import _dtensor as dt
from .. import _runtime as ranks
from .._runtime import capture_rng, restore_rng
from ..errors import NonFiniteError, SamplingError
from ..functional import (
    check_clip_grad_norm,
    gradsq_hessian_,
    ivon_update_,
    ivon_update_fast_,
    price_hessian_,
)
from ..nn.norm import RunningStatsGuard
from ..posterior.base import Entry
from ..posterior.diagonal import DiagonalGaussian
from ..scope import warn_outside_scope
from ._ivon_sampling import WeightSampling
from ._ivon_state import IVONState, check_hparams
from .closures import closure_loss
from .gradwatch import FOREIGN_GRADS, GradWatch, is_placeholder

__all__ = ["IVON"]


def _picker(idx: list[int]) -> Callable[[list[Tensor]], list[Tensor]]:
    """Select ``idx`` from aligned per-parameter lists (no copy when ``idx`` is everything)."""

    def pick(xs: list[Tensor]) -> list[Tensor]:
        return xs if len(idx) == len(xs) else [xs[i] for i in idx]

    return pick


def _forwarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a public method on the learner itself when it is called through a wrapper that subclasses the
    learner's class and forwards attribute reads (Lightning's ``LightningOptimizer`` from
    ``self.optimizers()``): writes on the wrapper would split the learner's state in two."""
    @functools.wraps(fn)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        real = getattr(self, "_vbpc_self", self)
        if real is not self:
            return getattr(real, fn.__name__)(*args, **kwargs)
        return fn(self, *args, **kwargs)

    method.__vbpc_forwarded__ = True  # type: ignore[attr-defined]
    return method


def _forward_public(cls: type) -> None:
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(fn) and not getattr(fn, "__vbpc_forwarded__", False):
            setattr(cls, name, _forwarded(fn))


class IVON(WeightSampling, IVONState, Optimizer):
    r"""Improved Variational Online Newton (Shen et al., 2024), docs/algorithms.md §2.

    Args:
        params: parameters, parameter groups, or ``(name, parameter)`` pairs (e.g. from
            :func:`vbpc.select_parameters`).  Parameters with ``requires_grad=False`` get no
            noise, decay or state.
        lr: learning rate :math:`a` (on the SGD scale when ``rescale_lr``).
        ess: effective sample size :math:`\lambda` (usually the training-set size).
        hess_init: :math:`h_0`.  beta1, beta2: averaging of :math:`g` and :math:`h`.
        weight_decay: :math:`\delta`, the prior precision divided by ``ess`` (coupled L2).
        mc_samples: weight samples per step when ``step(closure)`` is used.
        hess_approx: ``"price"`` (reparameterisation, default) or ``"gradsq"``.
        clip_radius: elementwise clip :math:`\xi` of the preconditioned step.
        sync: average collected statistics over ``torch.distributed`` ranks before a step.
        debias: divide :math:`g` by :math:`1-\beta_1^t`.  rescale_lr: :math:`\eta=a(h_0+\delta)`.
        parity: ``True``/``"ivon"`` follows the reference's RNG contract (§2.1): one
            ``randn`` of the group's total numel (frozen parameters included) per group, in
            the parameters' dtype.  Requires float32/float64 parameters on one device.
        state_dtype: minimum dtype of ``m``, ``g``, ``h`` (default float32: bf16/fp16
            parameters get fp32 master weights, §2.2 fix 5).
        gradsq_scale: ``"ess"`` (:math:`\hat h=\lambda\overline{g^2}`) or ``"none"``.
        foreach: force (``True``) or forbid (``False``) the ``torch._foreach_*`` kernels.  The
            default uses them on CUDA, and on the CPU for tensors under
            :attr:`FOREACH_MAX_NUMEL` elements (larger ones use single-tensor ``out=`` kernels).
        model: the network, only for its BatchNorm running statistics (:mod:`vbpc.nn.norm`):
            with it, ``step(closure)`` lets only the first MC pass update them.
        norm_update: ``"first"`` (default), ``"all"`` (every MC pass) or ``"none"``.
        clip_grad_norm: :math:`r`, a global L2 clip of each MC sample's gradient before it is
            accumulated (the reference GPT-2 recipe clips at 1.0): with
            :math:`c_s=\min(1,r/(\lVert\hat g_s\rVert_2+10^{-6}))` over all trainable parameters,
            :math:`\hat g_s\leftarrow c_s\hat g_s`, so the Price statistic :math:`n_s\odot\hat g_s`
            is scaled too.  This is what ``torch.nn.utils.clip_grad_norm_`` inside the closure does,
            bit for bit.  Under ``sync`` the factor is taken once per step from the rank-averaged
            gradient (after the all-reduce), so every rank clips identically.  Steps where a factor
            was below 1 are counted in ``counters["clipped_steps"]``.  The corrected learners clip
            the corrected gradient instead (:class:`vbpc.IVONPoCo`).
        correction: a :class:`vbpc.PoCo` makes this learner :class:`vbpc.IVONPoCo` (posterior correction,
            docs/correction.md); with ``prior=``, a :class:`vbpc.ReplayCorrection` makes it :class:`vbpc.ContinualIVON`.
        prior: the old posterior :math:`q_{old}` as prior (continual learning): :class:`vbpc.ContinualIVON`.

    **Sharded parameters** (PyTorch FSDP2, ``fully_shard``: DTensor parameters).  The state is
    laid out like the parameters (DTensors: each rank holds its shard), the elementwise update runs
    on the local shards, and the noise is drawn for the local shard from the rank's global RNG, so
    **seed each rank differently** (``torch.manual_seed(seed + rank)``) after building the model
    (identical seeds would give every shard the same numbers, which biases the Price Hessian; the
    first step warns).  FSDP2 already averages the gradient over ranks: leave ``sync=False``.  The
    global gradient norm of ``clip_grad_norm`` and the non-finite check are taken over all shards,
    so every rank clips, steps or raises alike.  ``parity`` (a single-device contract) is refused.

    Arithmetic: by default the update runs the fused kernels of
    :func:`vbpc.functional.ivon_update_fast_` (10 memory passes, σ cached between steps), which
    equal eqs. (7)-(10) up to floating-point rounding.  ``parity=True`` runs the §2.1 exact
    association instead (:func:`vbpc.functional.ivon_update_`), bit for bit the reference's.

    Use ``step(closure)``: the learner samples weights ``mc_samples`` times and calls
    ``closure`` (which computes the loss and calls ``backward``) at each sample.  Or, as
    with the reference, collect samples by hand and then call ``step()``::

        for _ in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad(); loss_fn(model(x), y).backward()
        opt.step()
    """

    def __new__(cls, *args: Any, correction: Any = None, prior: Any = None, **kwargs: Any) -> IVON:
        """``IVON(..., correction=vbpc.PoCo(...))`` builds :class:`vbpc.IVONPoCo`, and ``IVON(..., prior=q_old)``
        (optionally with ``correction=vbpc.ReplayCorrection(...)``) :class:`vbpc.ContinualIVON`: the correction
        is a component of the base learner, the named classes its spellings."""
        if cls is IVON and (correction is not None or prior is not None):
            from .continual import ContinualIVON
            from .correction import PoCo, ReplayCorrection
            from .ivon_poco import IVONPoCo

            if prior is not None or isinstance(correction, ReplayCorrection):
                if prior is None:
                    raise TypeError("correction=ReplayCorrection(...) needs prior= (the old posterior q_old)")
                return super().__new__(ContinualIVON)
            if not isinstance(correction, PoCo):
                raise TypeError(f"correction must be a vbpc.PoCo or a vbpc.ReplayCorrection, got "
                                f"{type(correction).__name__}")
            obj = super().__new__(IVONPoCo)
            obj.__dict__["_beta1_default"] = 0.9  # IVON's arguments keep IVON's defaults: IVON + PoCo is IVON-PoCoMo
            return obj
        return super().__new__(cls)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = float("inf"),
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = True,
        *,
        parity: Union[bool, str] = False,
        state_dtype: torch.dtype = torch.float32,
        gradsq_scale: str = "ess",
        foreach: Optional[bool] = None,
        model: Optional[nn.Module] = None,
        norm_update: str = "first",
        clip_grad_norm: Optional[float] = None,
        foreign_grads: str = "error",
        correction: None = None,
        prior: None = None,
    ):
        if correction is not None or prior is not None:  # IVON.__new__ dispatches these to the corrected learners
            raise TypeError(f"{type(self).__name__} does not take correction=/prior=; use vbpc.IVON(...) or the "
                            "corrected learner's class")
        self._vbpc_self = self  # read through forwarding wrappers (see _forwarded)
        if foreign_grads not in FOREIGN_GRADS:
            raise ValueError(f"invalid foreign_grads={foreign_grads!r}: must be one of {FOREIGN_GRADS}")
        if not (isinstance(mc_samples, int) and not isinstance(mc_samples, bool) and mc_samples >= 1):
            raise ValueError(f"invalid mc_samples={mc_samples!r}: must be an int >= 1")
        if parity not in (False, True, None, "ivon"):
            raise ValueError(f"invalid parity={parity!r}: must be False, True or 'ivon'")
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"invalid state_dtype={state_dtype!r}: must be a floating torch.dtype")
        defaults = dict(
            lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
            clip_radius=clip_radius, mc_samples=mc_samples, hess_approx=hess_approx, debias=debias,
            rescale_lr=rescale_lr, gradsq_scale=gradsq_scale,
        )
        check_hparams(defaults, "the constructor")
        self.mc_samples = mc_samples
        self.clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
        self.foreign_grads = foreign_grads
        self.counters: dict[str, int] = {"clipped_steps": 0}
        self._clipped = False  # a clip factor below 1 was applied to the pending step
        self.sync = bool(sync)
        self._warned_drift = False
        self.skipped_samples = 0  # non-finite samples dropped by sampled_params(skip_nonfinite=True)
        self.parity = "ivon" if parity in (True, "ivon") else None
        self.state_dtype = state_dtype
        self.foreach = foreach
        self._count = 0  # samples collected since the last step
        self._count_out = 0  # anchor-sample passes collected (IVON-PoCo)
        self._acc: dict[int, dict[str, list[Tensor]]] = {}  # per group: params, grad, stat
        self._ws: dict[int, dict[str, Any]] = {}  # reusable buffers (noise, saved means)
        self._active = False  # a sampled_params context is open
        self._closure_owned = False  # step(closure) owns the current sample
        self._norm = RunningStatsGuard(model, norm_update, type(self).__name__)
        self._sharded = False  # some parameter is a DTensor (FSDP2): kernels run on local shards
        self._noise_checked = False  # the once-only check that shards draw different noise
        super().__init__(params, defaults)
        if model is not None:
            warn_outside_scope(model, [p for g in self.param_groups for p in g["params"]],
                               f"{type(self).__name__}(model=...)", stacklevel=3)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _forward_public(cls)

    # ------------------------------------------------------------------ groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``(name, tensor)`` pairs are accepted on every torch version."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        params = list(params)
        param_group = dict(param_group)
        param_group["params"] = params
        if params and all(isinstance(p, tuple) for p in params):
            param_group["param_names"] = [n for n, _ in params]
            param_group["params"] = [p for _, p in params]
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_hparams(merged, f"param group {len(self.param_groups)}")
        names = param_group.get("param_names") or [f"params[{j}]" for j in range(len(param_group["params"]))]
        for p, name in zip(param_group["params"], names):
            if p.is_meta:
                raise ValueError(f"{name!r} in param group {len(self.param_groups)} is on the meta device and holds "
                                 "no values; materialise the model first (model.to_empty(device=...) and load its "
                                 "weights), then build the learner")
            if not p.is_floating_point():
                raise TypeError(f"{type(self).__name__} needs real floating-point parameters; {name!r} in param "
                                f"group {len(self.param_groups)} has dtype {p.dtype}")
        if dt.any_dtensor(param_group["params"]):
            self._check_sharded(bool(self.sync))
            self._sharded = True
        super().add_param_group(param_group)
        self._ws.clear()

    def _check_sharded(self, sync: bool) -> None:
        """DTensor (FSDP2) parameters: refuse the options that assume replicated parameters."""
        if self.parity:
            raise ValueError(f"{type(self).__name__}(parity=True) follows the single-device reference's RNG contract; "
                             "it does not apply to sharded (DTensor) parameters")
        if sync:
            raise ValueError(f"{type(self).__name__}(sync=True) averages replicated statistics over ranks; the "
                             "parameters are sharded (DTensor, FSDP2), whose backward already averages the gradient "
                             "over ranks: use sync=False")

    @property
    def current_step(self) -> int:
        """Number of completed steps (the reference's attribute; saved in the state dict)."""
        steps = [int(st["step"]) for st in self.state.values() if "step" in st]
        return max(steps, default=0)

    @property
    def hess_approx(self) -> str:
        return self.defaults["hess_approx"]

    @property
    def debias(self) -> bool:
        return self.defaults["debias"]

    @property
    def rescale_lr(self) -> bool:
        return self.defaults["rescale_lr"]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:  # type: ignore[override]
        """One IVON step (eqs. 7-10) from the collected samples.

        With ``closure`` (computes the loss, calls ``backward``, returns the loss), the
        learner draws ``mc_samples`` weight samples itself and returns the mean loss.
        Non-finite losses or statistics raise :class:`~vbpc.errors.NonFiniteError` before any
        state changes; the collected samples are dropped.
        """
        if self._active:
            raise SamplingError("IVON.step() called inside sampled_params(); leave the context first")
        if not any(self._trainable(g) for g in self.param_groups):
            raise ValueError(f"{type(self).__name__}.step(): no parameter of the learner requires grad (a frozen "
                             "model); unfreeze what should be trained (p.requires_grad_(True)) or build the learner "
                             "over the trainable parameters only")
        losses: list[Tensor] = []
        if closure is not None:
            try:
                for k in range(self.mc_samples):
                    loss = self._closure_sample(closure, noop_ok=k == 0 and self._count > 0)
                    if loss is None:  # a framework's placeholder closure: the collected samples only
                        break
                    losses.append(loss)
            except BaseException:
                self._reset_samples()
                raise
        if self._count == 0 and any(p.grad is not None for g in self.param_groups for p in self._trainable(g)):
            raise SamplingError(
                f"{type(self).__name__}.step() called with no collected sample, but the parameters hold gradients "
                "computed outside any weight sample (at the mean weights): the training loop ran backward itself, "
                "then step(). transformers.Trainer: use vbpc.integrations.hf.VBTrainer; Lightning: add "
                "vbpc.integrations.lightning.VBCallback(); a plain loop: call backward inside `with "
                "optimizer.sampled_params(train=True):`, or pass a closure to step()")
        if self._count == 0:
            raise SamplingError(
                "IVON.step() called with no collected sample: compute the loss and call backward "
                "inside `with optimizer.sampled_params(train=True):`, or pass a closure to step()"
            )
        try:
            self._check_groups()
            if ranks.active():
                if self.sync:  # before the finite check: a NaN on one rank must stop every rank
                    self._sync_samples(losses)
                    self._clip_synced_samples()
                elif not self._warned_drift and not self._sharded:  # FSDP2 averages the gradient itself
                    self._warned_drift = True
                    warnings.warn(
                        f"{type(self).__name__} under torch.distributed (world size {dist.get_world_size()}) with "
                        "sync=False: every rank updates its own posterior from its own weight samples and the ranks "
                        "drift apart. Pass sync=True (and run the backward under DDP's no_sync(), or without a DDP "
                        "wrapper) so that the gradient and Price statistics are averaged over ranks.",
                        RuntimeWarning, stacklevel=2)
            self._check_finite(losses)
            self._update()
            if self._clipped:
                self.counters["clipped_steps"] += 1
        finally:
            self._reset_samples()
        if not losses:
            return None
        return sum(losses[1:], losses[0]) / len(losses)

    def _run_closure(self, closure: Callable[[], Tensor], ctx: Any, watch: Optional[GradWatch] = None,
                     raw: bool = False) -> Any:
        """Evaluate ``closure`` inside a sampling context it may not re-enter (§2.2: it owns it),
        watching which gradients reach the sample; ``raw`` returns what the closure returned."""
        with ctx:
            self._closure_owned = True
            try:
                with torch.enable_grad():
                    if watch is None:
                        loss = closure()
                    else:
                        with watch:
                            loss = closure()
            finally:
                self._closure_owned = False
        return loss if raw else closure_loss(loss, type(self).__name__)

    def _closure_sample(self, closure: Callable[[], Tensor], noop_ok: bool = False) -> Optional[Tensor]:
        """One MC sample of ``step(closure)``: draw, evaluate, collect; returns the loss.

        ``noop_ok`` (``step(closure)`` with samples already collected): a placeholder closure that
        returns ``None`` and runs no backward pass (what Lightning's ``LightningOptimizer.step()`` passes
        under manual optimization) is not a sample: nothing is collected, the random state is put
        back as it was, and ``None`` is returned."""
        rng = capture_rng() if noop_ok else None
        draw, ctx = self._sample_context("IVON.step")
        watch = self._watch(draw)
        params = [p for _, ps, _ in draw for p in ps]
        grads = [p.grad for p in params] if noop_ok else []
        with self._norm(first=self._count == 0):
            loss = self._run_closure(closure, ctx, watch, raw=noop_ok)
        if noop_ok:
            if is_placeholder(loss, watch, params, grads):
                assert rng is not None
                restore_rng(rng)
                return None
            loss = closure_loss(loss, type(self).__name__)
        self._check_foreign(watch)
        self._collect(draw, alias=self.mc_samples == 1 and self._count == 0 and not self.parity and not self.sync)
        return loss

    def _correct(self, gi: int, group: dict, ws: dict, hess: list[Tensor], price: bool) -> bool:
        """Hook for posterior correction (IVON-PoCo, eq. 22): may rewrite ``ws["ghat"]`` and
        ``ws["stat"]`` in place; returns whether ``stat`` still holds the Price statistic.
        Plain IVON leaves the statistics as collected."""
        return price

    def _check_finite(self, losses: list[Tensor]) -> None:
        """One reduction per tensor and one host sync; the slow path names the culprit."""
        # n⊙g (or g²) is non-finite whenever g is (n is finite and nonzero): one sum per tensor
        tensors = [t for acc in self._acc.values() for t in acc["stat"] + (acc["stat_out"] if self._count_out else [])]
        dev = tensors[0].device if tensors else losses[0].device
        sums = [t.sum().to(dev, torch.float32) for t in tensors]
        flags = torch.stack(sums + [loss.float().to(dev).reshape(()) for loss in losses])
        if self._agree(bool(torch.isfinite(flags).all()), dev):
            return
        error = self._nonfinite_error(losses)
        if not self._agree(error is None, dev) and error is None:  # sharded: another rank's shard
            error = ("non-finite loss or gradient on another rank (sharded parameters); the step was skipped on "
                     "every rank and no state changed")
        if error is not None:
            raise NonFiniteError(error)
        # only the sums overflowed: every entry is finite

    def _nonfinite_error(self, losses: list[Tensor]) -> Optional[str]:
        """The message naming the first non-finite loss or gradient, or ``None`` when all are finite."""
        bad_loss = [i for i, loss in enumerate(losses) if not bool(torch.isfinite(loss).all())]
        if bad_loss:
            return (f"the closure returned a non-finite loss ({losses[bad_loss[0]].item()}) at MC "
                    f"sample {bad_loss[0]}; the step was skipped and no state changed")
        for acc in self._acc.values():
            for p, g, s in zip(acc["params"], acc["ghat"], acc["stat"]):
                if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(s).all())):
                    return (f"non-finite gradient for parameter {self._names([p])[0]!r} (shape "
                            f"{tuple(p.shape)}); the step was skipped and no state changed")
        return None

    def _sync_samples(self, losses: list[Tensor]) -> None:
        """Average the collected means over ranks (only accumulators that exist, fix 6; the anchor
        pass's too), so every rank applies the identical update: per-rank weight samples act as
        extra MC samples.  A non-finite loss on any rank raises on every rank."""
        ranks.agree_finite(all(bool(torch.isfinite(loss).all()) for loss in losses))
        for acc in self._acc.values():
            extra = acc["grad_out"] + acc["stat_out"] if self._count_out else []
            ranks.mean_(acc["ghat"] + acc["stat"] + extra)

    def _check_groups(self) -> None:
        """Re-validate hyperparameters (schedulers act at once), before any state changes."""
        for gi, group in enumerate(self.param_groups):
            check_hparams(group, f"param group {gi}")
            self._check_positivity(gi, group, self._acc.get(gi, {}).get("params", []))

    def _check_positivity(self, gi: int, group: dict, params: list[Tensor]) -> None:
        """(11) needs δ non-decreasing: re-check ``h+δ>0`` whenever δ changed (cheap otherwise)."""
        wd = float(group["weight_decay"])
        changed = [p for p in params if self.state[p]["wd_checked"] != wd]
        for p in changed:
            if not bool((self.state[p]["hess"] + wd > 0).all()):
                raise ValueError(f"weight_decay changed to {wd} in param group {gi}: h + weight_decay "
                                 f"is not positive for {self._names([p])[0]!r}")
        for p in changed:
            self.state[p]["wd_checked"] = wd

    def _update(self) -> None:
        """Eqs. (7)-(10) for every group, in three phases: every group's statistics (and the
        correction hook), then the global clip of the corrected gradient (``"corrected"`` mode,
        which needs every group's :math:`\tilde g`), then the state updates."""
        prepared = []
        for gi, group in enumerate(self.param_groups):
            ws = self._acc.get(gi)
            if ws is None:
                continue
            hess = self._loc([self.state[p]["hess"] for p in ws["params"]])
            price = group["hess_approx"] == "price"
            if self.parity:
                for stat, h, s1, fe in self._parts(ws, ws["stat"], hess, ws["s1"]):
                    if price:
                        price_hessian_(stat, h, group["ess"], group["weight_decay"], scratch=s1, foreach=fe)
                    else:
                        gradsq_hessian_(stat, group["ess"] if group["gradsq_scale"] == "ess" else 1.0, foreach=fe)
            else:
                self._sigma(group, hess, ws)  # hw = h + δ with the current δ
                if not price:  # the kernel takes ĥ/√λ, ĥ = λ·mean(g²) ("ess") or mean(g²)
                    scale = group["ess"] if group["gradsq_scale"] == "ess" else 1.0
                    for stat, fe in self._parts(ws, ws["stat"]):
                        gradsq_hessian_(stat, scale / math.sqrt(group["ess"]), foreach=fe)
            prepared.append((gi, group, ws, hess, self._correct(gi, group, ws, hess, price)))
        if self._clip_mode() == "corrected":  # the corrected gradient g̃, after the correction
            grads = [g for _, _, ws, _, _ in prepared for g in ws["ghat"]]
            c = self._clip_factor(grads, [p for _, _, ws, _, _ in prepared for p in ws["params"]])
            if c is not None:
                torch._foreach_mul_(grads, c)
        for _, group, ws, hess, price in prepared:
            self._update_group(group, ws, hess, price)

    def _update_group(self, group: dict, ws: dict, hess: list[Tensor], price: bool) -> None:
        params = ws["params"]
        states = [self.state[p] for p in params]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        ess, wd = group["ess"], group["weight_decay"]
        lr = group["lr"]
        eta = lr * (group["hess_init"] + wd) if group["rescale_lr"] else lr
        # parameters are bucketed by kernel and by step count t (t differs only for
        # parameters that became trainable later); c_t is a host double (§2.1 item 5)
        t_all = torch.stack(steps).tolist() if len(steps) > 1 else [float(steps[0])]
        buckets: dict[tuple[float, bool], list[int]] = defaultdict(list)
        for idx, fe in ws["parts"]:
            for i in idx:
                buckets[(t_all[i], fe)].append(i)
        means = self._loc([st.get("mean", p) for st, p in zip(states, params)])
        momenta = self._loc([st["momentum"] for st in states])
        for (t, fe), idx in buckets.items():
            c_t = 1.0 - math.pow(group["beta1"], t) if group["debias"] else 1.0
            pick = _picker(idx)

            common = dict(eta=eta, beta1=group["beta1"], beta2=group["beta2"], weight_decay=wd,
                          clip_radius=group["clip_radius"], bias_correction=c_t, foreach=fe)
            if self.parity:
                ivon_update_(pick(means), pick(momenta), pick(hess), pick(ws["ghat"]), pick(ws["stat"]),
                             scratch=(pick(ws["s1"]), pick(ws["s2"])), **common)
            else:
                shift = ws.get("prior_shift")
                ivon_update_fast_(pick(means), pick(momenta), pick(hess), pick(ws["ghat"]), pick(ws["stat"]),
                                  pick(ws["hw"]), pick(ws["rsqrt"]), ess=ess, price=price,
                                  prior_shift=None if shift is None else pick(shift), **common)
        if not self.parity:
            ws["sigma_key"] = (wd, [h._version for h in hess])
        for p, st in zip(params, states):
            if "mean" in st:
                p.copy_(st["mean"])

    # ------------------------------------------------------------------ posterior view
    def posterior(self, model: Optional[nn.Module] = None) -> DiagonalGaussian:
        """The current posterior as a :class:`~vbpc.DiagonalGaussian` sharing this optimizer's
        tensors (no copy).  Names come from ``(name, param)`` groups, from ``model``, or are
        positional.  ``ess``/``weight_decay`` are the groups' values at call time."""
        names: dict[int, str] = {}
        if model is not None:
            for n, q in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(q), n)
        entries = []
        for group in self.param_groups:
            for p in self._trainable(group):
                st = self._state(p, group)
                name = names.get(id(p)) or self._names([p])[0]
                entries.append(Entry(name, st.get("mean", p), st["hess"], float(group["ess"]),
                                      float(group["weight_decay"]), target=p))
        return DiagonalGaussian(entries)

for _cls in (IVON, WeightSampling, IVONState):
    _forward_public(_cls)
