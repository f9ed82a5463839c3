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
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from .. import _dtensor as dt
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from .closures import closure_loss, require_grads
from .gradwatch import FOREIGN_GRADS, GradWatch, is_placeholder
from .._runtime import capture_rng, restore_rng
from ..functional import (
    check_clip_grad_norm,
    clip_coef,
    default_foreach,
    gaussian_noise_,
    gradsq_hessian_,
    ivon_rsqrt_,
    ivon_update_,
    ivon_update_fast_,
    price_hessian_,
    perturb_,
    product_,
    welford_,
)
from ..nn.norm import RunningStatsGuard
from ..posterior.base import Entry, perturbation, state_dtype
from ..posterior.diagonal import DiagonalGaussian
from ..scope import warn_outside_scope
from .. import _runtime as ranks

__all__ = ["IVON"]

HESS_APPROX = ("price", "gradsq")
GRADSQ_SCALE = ("ess", "none")
_STATE_VERSION = 1
#: per-parameter state entries that are float64 scalars, not parameter-shaped (IVON-PoCo's
#: control-variate moments, ``alpha_mode="optimal"``)
SCALAR_STATE = ("cv_cov", "cv_var")


def _check_hparams(h: dict, where: str = "") -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter (NaN fails every check)."""
    at = f" in {where}" if where else ""

    def bad(name: str, rule: str) -> None:
        raise ValueError(f"invalid {name}={h[name]!r}{at}: must be {rule}")

    if not (h["lr"] >= 0.0 and math.isfinite(h["lr"])):
        bad("lr", "finite and >= 0")
    if not (h["ess"] > 0.0 and math.isfinite(h["ess"])):
        bad("ess", "finite and > 0")
    if "mc_samples" in h and not (isinstance(h["mc_samples"], int) and not isinstance(h["mc_samples"], bool)
                                  and h["mc_samples"] >= 1):
        bad("mc_samples", "an int >= 1")
    if not (h["hess_init"] > 0.0 and math.isfinite(h["hess_init"])):
        bad("hess_init", "finite and > 0")
    if not 0.0 <= h["beta1"] <= 1.0:
        bad("beta1", "in [0, 1]")
    if h["beta1"] == 1.0 and h["debias"]:
        bad("beta1", "< 1 when debias=True (1 - beta1**t would be 0)")
    if not 0.0 <= h["beta2"] <= 1.0:
        bad("beta2", "in [0, 1]")
    if not (h["weight_decay"] >= 0.0 and math.isfinite(h["weight_decay"])):
        bad("weight_decay", "finite and >= 0")
    if not h["clip_radius"] > 0.0:
        bad("clip_radius", "> 0")
    if h["hess_approx"] not in HESS_APPROX:
        bad("hess_approx", f"one of {HESS_APPROX}")
    if h["gradsq_scale"] not in GRADSQ_SCALE:
        bad("gradsq_scale", f"one of {GRADSQ_SCALE}")


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


class IVON(Optimizer):
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

    def __new__(cls, *args: Any, correction: Any = None, prior: Any = None, **kwargs: Any) -> "IVON":
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
            return super().__new__(IVONPoCo)
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
        _check_hparams(defaults, "the constructor")
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
        _check_hparams(merged, f"param group {len(self.param_groups)}")
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

    def _loc(self, ts: list[Tensor]) -> list[Tensor]:
        """The local shards of DTensors (FSDP2), the tensors themselves otherwise."""
        return dt.locals_(ts) if self._sharded else ts

    def _agree(self, flag: bool, device: torch.device) -> bool:
        """``flag`` and-ed over ranks when the parameters are sharded (each rank sees its shards)."""
        if self._sharded and ranks.active():
            return ranks.all_true(flag, device)
        return flag

    def _sdtype(self, p: Tensor) -> torch.dtype:
        return state_dtype(p.dtype, self.state_dtype)

    def _state(self, p: Tensor, group: dict) -> dict:
        """Per-parameter state, created lazily (so ``add_param_group`` works, fix 7)."""
        st = self.state[p]
        if not st:
            sd = self._sdtype(p)
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["momentum"] = torch.zeros_like(p, dtype=sd, memory_format=torch.contiguous_format)
            st["hess"] = torch.full_like(p, group["hess_init"], dtype=sd, memory_format=torch.contiguous_format)
            if self.parity:
                # The reference adds torch.as_tensor(hess_init), i.e. h0 rounded to the default
                # dtype (float32), even for float64 parameters; reproduced only under parity.
                st["hess"].zero_().add_(torch.as_tensor(group["hess_init"]))
            if p.dtype != sd:
                st["mean"] = p.detach().to(sd, copy=True)
            st["wd_checked"] = float(group["weight_decay"])
        return st

    @staticmethod
    def _trainable(group: dict) -> list[Tensor]:
        return [p for p in group["params"] if p.requires_grad]

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

    # ------------------------------------------------------------------ sampling
    def _workspace(self, gi: int, params: list[Tensor]) -> dict[str, Any]:
        """Transient buffers of group ``gi``, reused across steps so the hot loop allocates
        nothing: saved means, flat noise, two accumulators, two scratch lists and (fast path)
        the cached h+δ and σ: 8d (6d under parity) next to the persistent 3d state (§6.4)."""
        ws = self._ws.get(gi)
        locs = self._loc(params)  # DTensor parameters: the buffers are shaped like the local shards
        if ws is not None and len(ws["params"]) == len(params) and all(
                a is b and loc.shape == s.shape and loc.device == s.device
                for a, b, loc, s in zip(ws["params"], params, locs, ws["saved"])):
            return ws

        def like(p: Tensor) -> Tensor:
            return torch.empty(p.shape, dtype=self._sdtype(p), device=p.device)

        keys = ("grad", "stat", "s1", "s2") if self.parity else ("grad", "stat", "s1", "s2", "hw", "rsqrt")
        ws = {"params": list(params), "z": {}, "views": None, "sigma_key": None, "parts": self._partition(locs),
              "saved": [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in locs],
              **{k: [like(p) for p in locs] for k in keys}}
        self._ws[gi] = ws
        return ws

    #: CPU tensors below this size use the multi-tensor kernels (per-call overhead dominates);
    #: larger ones the single-tensor kernels (memory passes dominate; ``out=`` saves copies).
    FOREACH_MAX_NUMEL = 32768

    def _partition(self, params: list[Tensor]) -> list[tuple[list[int], bool]]:
        """``[(indices, foreach)]``: the kernel choice per tensor (``foreach`` overrides)."""
        every = list(range(len(params)))
        if self.foreach is not None:
            return [(every, bool(self.foreach))]
        if default_foreach(params):  # CUDA
            return [(every, True)]
        small = [i for i in every if params[i].numel() < self.FOREACH_MAX_NUMEL]
        large = [i for i in every if params[i].numel() >= self.FOREACH_MAX_NUMEL]
        return [(idx, fe) for idx, fe in ((small, True), (large, False)) if idx]

    @staticmethod
    def _parts(ws: dict, *lists: list[Tensor]) -> Iterator[tuple]:
        """Yield ``(*sublists, foreach)`` for each kernel partition of a workspace."""
        for idx, fe in ws["parts"]:
            if len(idx) == len(lists[0]):
                yield (*lists, fe)
            else:
                yield (*([xs[i] for i in idx] for xs in lists), fe)

    def _sigma(self, group: dict, hess: list[Tensor], ws: dict) -> None:
        """Refresh the cached h+δ and (h+δ)^{-1/2} (fast path) unless h and δ are unchanged."""
        key = (group["weight_decay"], [h._version for h in hess])
        if ws["sigma_key"] != key:
            for h, hw, r, fe in self._parts(ws, hess, ws["hw"], ws["rsqrt"]):
                ivon_rsqrt_(h, group["weight_decay"], hw, r, foreach=fe)
            ws["sigma_key"] = key

    def _flat(self, ws: dict, key: Any, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = ws["z"].get(key)
        if buf is None or buf.numel() != n or buf.dtype != dtype or buf.device != device:
            buf = ws["z"][key] = torch.empty(n, dtype=dtype, device=device)
            ws["views"] = None
        return buf

    def _draw_noise(self, gi: int, group: dict, params: list[Tensor], ws: dict) -> list[Tensor]:
        """Standard normals for ``params`` (views of one flat draw), following §2.1 item 2."""
        if self.parity:
            allp = group["params"]
            dtypes, devices = {p.dtype for p in allp}, {p.device for p in allp}
            if len(dtypes) > 1 or len(devices) > 1:
                raise ValueError(f"parity mode needs one dtype and device per group; group {gi} has "
                                 f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
            dtype, device = next(iter(dtypes)), next(iter(devices))
            if self._sdtype(allp[0]) != dtype:
                raise ValueError(f"parity mode needs float32/float64 parameters; group {gi} is {dtype}")
            buf = self._flat(ws, "parity", sum(p.numel() for p in allp), dtype, device)
            torch.randn(buf.numel(), out=buf)
            if ws["views"] is None:
                views, off, train = [], 0, {id(p) for p in params}
                for p in allp:
                    if id(p) in train:
                        views.append(buf[off:off + p.numel()].view_as(p))
                    off += p.numel()
                ws["views"] = views
            return ws["views"]
        # Default: one draw per (device, state dtype) bucket of trainable parameters.
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            buckets[(p.device, self._sdtype(p))].append(i)
        bufs = {}
        for key, idx in buckets.items():
            bufs[key] = self._flat(ws, key, sum(params[i].numel() for i in idx), key[1], key[0])
            torch.randn(bufs[key].numel(), out=bufs[key])
        if ws["views"] is None:
            views: list[Optional[Tensor]] = [None] * len(params)
            for key, idx in buckets.items():
                off = 0
                for i in idx:
                    views[i] = bufs[key][off:off + params[i].numel()].view_as(params[i])
                    off += params[i].numel()
            ws["views"] = views
        return ws["views"]

    def _draw_sample(self) -> list[tuple[int, list[Tensor], list[Tensor]]]:
        """Draw noise for every group: ``[(group index, params, noise)]`` (eq. 5).  The noise is
        :math:`n=\\sigma\\odot z` under parity, else the standard normals :math:`z` (the fast
        path writes θ and forms the Price statistic from z and the cached σ)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            params = self._trainable(group)
            if not params:
                if self.parity:  # the reference draws for frozen-only groups too
                    torch.randn(sum(p.numel() for p in group["params"]), dtype=group["params"][0].dtype,
                                device=group["params"][0].device)
                continue
            hess = self._loc([self._state(p, group)["hess"] for p in params])
            self._check_positivity(gi, group, params)
            ws = self._workspace(gi, params)
            z = self._draw_noise(gi, group, self._loc(params), ws)
            if self._sharded and not self._noise_checked and ranks.active():
                self._noise_checked = True
                ranks.warn_if_same_noise(z, type(self).__name__)
            if self.parity:  # exact §2.1 arithmetic: n = z / sqrt(λ(h+δ))
                for zz, h, s1, fe in self._parts(ws, z, hess, ws["s1"]):
                    gaussian_noise_(zz, h, group["ess"], group["weight_decay"], scratch=s1, foreach=fe)
            else:  # keep z; θ = m + σ⊙z is written in one pass with σ cached (see perturb_)
                self._sigma(group, hess, ws)
            out.append((gi, params, z))
        return out

    def _sample_context(self, owner: str):
        draw = self._draw_sample()
        targets = [p for _, ps, _ in draw for p in ps]
        saved = [s for gi, _, _ in draw for s in self._ws[gi]["saved"]]

        def write() -> None:
            for gi, params, noise in draw:
                if self.parity:  # θ = m + n (§2.1 item 3); parity parameters have no fp32 master
                    torch._foreach_add_(params, noise)
                    continue
                ws, ess = self._ws[gi], self.param_groups[gi]["ess"]
                masters = {i for i, p in enumerate(params) if "mean" in self.state[p]}
                locs = self._loc(params)
                if not masters:
                    for ps, zz, r, fe in self._parts(ws, locs, noise, ws["rsqrt"]):
                        perturb_(ps, zz, r, ess, foreach=fe)
                    continue
                for i, (p, loc) in enumerate(zip(params, locs)):
                    if i in masters:  # low-precision parameter: θ from the fp32 master
                        v = ws["s1"][i].copy_(dt.local(self.state[p]["mean"]))
                        perturb_([v], [noise[i]], [ws["rsqrt"][i]], ess, foreach=False)
                        loc.copy_(v)
                    else:
                        perturb_([loc], [noise[i]], [ws["rsqrt"][i]], ess, foreach=False)

        return draw, perturbation(targets, lambda: self._names(targets), owner, write, saved)

    @contextmanager
    def sampled_params(self, train: bool = False, skip_nonfinite: bool = False,
                       zero_grad: bool = False) -> Iterator[None]:
        """Load a weight sample :math:`\\theta=m+n` into the parameters (in place).

        On exit the means are restored bitwise (also after an exception, which drops the
        sample).  With ``train=True`` the gradients left in ``p.grad`` are collected as one
        MC sample (``grad is None`` counts as zero).  Inside ``step(closure)`` the step
        already owns a sample, so this context is then a no-op (reference-style closures
        keep working).

        **Gradient accumulation.**  Each ``sampled_params(train=True)`` context is one MC sample:
        with ``k`` micro-batches per step, open one context per micro-batch (``k`` samples, each
        micro-batch's mean loss undivided: the learner averages) or one context around all ``k``
        backward passes with the losses divided by ``k`` (one sample of the whole batch, equal to
        a step on the concatenated batch).  ``zero_grad=True`` clears ``p.grad`` on entry, for loops
        that skip ``zero_grad`` between micro-batches (``accelerate``'s ``accumulate``), so that a
        sample never sees the previous micro-batch's gradients; ``Accelerator.backward`` divides
        the loss by the accumulation count, so pass it ``loss * gradient_accumulation_steps``.

        ``skip_nonfinite=True`` drops a sample whose gradients are not finite instead of
        collecting it (``skipped_samples`` counts them): the fp16 ``torch.amp.GradScaler`` recipe,
        where an overflow is expected and the scaler skips the step::

            with opt.sampled_params(train=True, skip_nonfinite=True):
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)      # true gradients before IVON reads them
            scaler.step(opt)              # skipped on overflow: the posterior is untouched
            scaler.update()
        """
        if self._closure_owned:
            yield
            return
        if self._active:
            raise SamplingError("IVON.sampled_params: a weight sample is already active; contexts cannot be nested")
        draw, ctx = self._sample_context("IVON.sampled_params")
        if zero_grad and train:
            for _, params, _ in draw:
                for p in params:
                    p.grad = None
        watch = self._watch(draw) if train else None
        with ctx:
            self._active = True
            try:
                if watch is None:
                    yield
                else:
                    with watch:
                        yield
            finally:
                self._active = False
        if train:
            if skip_nonfinite and not self._finite_grads(draw):
                self.skipped_samples += 1
                return
            self._check_foreign(watch)
            self._collect(draw)

    def _collect(self, draw: list[tuple[int, list[Tensor], list[Tensor]]], alias: bool = False,
                 out: bool = False) -> None:
        """Fold the gradients of one sample into Welford means (eq. 6, §2.1 item 4).

        ``alias`` (``step(closure)`` with one sample, fast path, no ``sync``): nothing can touch
        ``p.grad`` before the update, which only reads ĝ, so ĝ is the gradients themselves
        (one memory pass saved; ``p.grad`` is left as the closure made it).  ``out`` collects an
        anchor-sample pass of IVON-PoCo into separate means (``grad_out``, ``stat_out``)."""
        try:
            require_grads((p for _, params, _ in draw for p in params), type(self).__name__)
        except SamplingError:
            self._reset_samples()
            raise
        if out:
            self._count_out += 1
            k, gk, sk = self._count_out, "grad_out", "stat_out"
        else:
            if self._count and set(self._acc) != {gi for gi, _, _ in draw}:
                self._reset_samples()
                raise SamplingError("the trainable parameters changed between MC samples of one step")
            self._count += 1
            k, gk, sk = self._count, "grad", "stat"
        collected = []
        for gi, params, noise in draw:
            ws = self._ws[gi]
            if not out:
                if k > 1 and self._acc[gi] is not ws:
                    self._reset_samples()
                    raise SamplingError(f"the trainable parameters of group {gi} changed between MC samples")
                self._acc[gi] = ws
            elif gk not in ws:
                ws[gk], ws[sk] = [torch.empty_like(t) for t in ws["grad"]], [torch.empty_like(t) for t in ws["stat"]]
            grads = []
            for i, p in enumerate(params):
                g = dt.local(p.grad) if self._sharded else p.grad
                if g is None:  # fix 3: a trainable parameter without gradient counts as zero
                    g = ws["s1"][i].zero_()
                elif g.dtype != noise[i].dtype or g.layout != torch.strided:
                    g = ws["s1"][i].copy_(g.to_dense() if g.layout != torch.strided else g)
                grads.append(g)
            collected.append((gi, noise, ws, grads))
        if not out and self._clip_mode() == "sample" and not self._synced():
            c = self._clip_factor([g for *_, grads in collected for g in grads],
                                  [p for _, params, _ in draw for p in params])
            if c is not None:
                torch._foreach_mul_([g for *_, grads in collected for g in grads], c)
        for gi, noise, ws, grads in collected:
            price = self.param_groups[gi]["hess_approx"] == "price"
            if not out:
                ws["ghat"] = grads if alias else ws["grad"]
            for acc, gs, s2, st_, nz, fe in self._parts(ws, ws[gk], grads, ws["s2"], ws[sk], noise):
                if not alias:
                    welford_(acc, gs, k, scratch=s2, foreach=fe)
                x = st_ if k == 1 else s2
                product_(x, nz if price else gs, gs, foreach=fe)
                if k > 1:
                    welford_(st_, x, k, scratch=x, foreach=fe)

    # ------------------------------------------------------------------ gradient clipping
    def _clip_mode(self) -> str:
        """``"sample"``: clip each MC sample's gradient (IVON); ``"corrected"``: clip the corrected
        gradient after the correction (the corrected learners at :math:`\alpha_t>0`)."""
        return "sample"

    def _synced(self) -> bool:
        return self.sync and ranks.active()

    def _clip_factor(self, grads: list[Tensor], params: Optional[list[Tensor]] = None) -> Optional[Tensor]:
        """The factor :math:`c<1` of ``clip_grad_norm`` for ``grads`` (one host sync), or ``None`` when the
        clip is off or inactive.  A non-finite norm is left to the finite check, which names the
        parameter; a norm that overflowed on finite gradients raises here.  ``params`` (aligned with
        ``grads``) is needed when the parameters are sharded: the norm is then taken over all shards."""
        if self.clip_grad_norm is None or not grads:
            return None
        if self._sharded:
            if params is None:
                raise RuntimeError("internal: a clip of sharded gradients needs their parameters")
            norms = torch._foreach_norm(grads, 2.0)
            sq = dt.global_sums([n.float().square() for n in norms], params)
            total = torch.stack(sq).sum().sqrt()
            c = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
        else:
            c = clip_coef(grads, self.clip_grad_norm)
        value = float(c)
        if not math.isfinite(value) or value == 0.0:
            if self._agree(all(bool(torch.isfinite(g).all()) for g in grads), grads[0].device):
                raise NonFiniteError("the gradient norm overflowed on finite gradients (clip_grad_norm); "
                                     "the step was skipped and no state changed")
            return None  # non-finite gradients: the finite check raises with the parameter's name
        if value >= 1.0:
            return None
        self._clipped = True
        return c

    def _clip_synced_samples(self) -> None:
        """``sync`` with per-sample clipping: one factor from the rank-averaged gradient, applied to
        the averaged gradient and its statistic (as if every sample were scaled by it: the Price
        statistic scales by :math:`c`, the squared gradient by :math:`c^2`)."""
        if self.clip_grad_norm is None or self._clip_mode() != "sample":
            return
        grads = [g for acc in self._acc.values() for g in acc["ghat"]]
        c = self._clip_factor(grads)
        if c is None:
            return
        torch._foreach_mul_(grads, c)
        for gi, acc in self._acc.items():
            price = self.param_groups[gi]["hess_approx"] == "price"
            torch._foreach_mul_(acc["stat"], c if price else c * c)

    def _finite_grads(self, draw: list[tuple[int, list[Tensor], list[Tensor]]]) -> bool:
        grads = self._loc([p.grad for _, params, _ in draw for p in params if p.grad is not None])
        if self._sharded:  # every rank must skip or keep the sample alike
            ok = all(bool(torch.isfinite(g).all()) for g in grads)
            return self._agree(ok, draw[0][1][0].device)
        if not grads:
            return True
        if bool(torch.isfinite(torch.stack([g.float().sum() for g in grads])).all()):
            return True  # one host sync; the exact check only when a sum is not finite
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _watch(self, draw: list[tuple[int, list[Tensor], list[Tensor]]]) -> Optional[GradWatch]:
        """A :class:`~vbpc.inference.gradwatch.GradWatch` over the sample's parameters (``None`` when
        they are sharded: FSDP2 assigns their gradients outside autograd's hooks)."""
        if self._sharded:
            return None
        targets = [p for _, ps, _ in draw for p in ps]
        return GradWatch(targets, lambda: self._names(targets))

    def _check_foreign(self, watch: Optional[GradWatch]) -> None:
        """Refuse (or, with ``foreign_grads="warn"``, report) gradients that do not belong to the sample."""
        msg = None if watch is None else watch.problem(type(self).__name__)
        if msg is None:
            return
        if self.foreign_grads == "warn":
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            return
        self._reset_samples()
        raise SamplingError(msg)

    def _reset_samples(self) -> None:
        for ws in self._acc.values():
            ws["ghat"] = None  # drop references to aliased gradients
        self._count = 0
        self._count_out = 0
        self._acc = {}
        self._clipped = False

    def _names(self, params: list[Tensor]) -> list[str]:
        lookup: dict[int, str] = {}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                lookup[id(p)] = names[j] if names else f"param_groups[{gi}].params[{j}]"
        return [lookup[id(p)] for p in params]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
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
            _check_hparams(group, f"param group {gi}")
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
            for n, p in model.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), n)
        entries = []
        for group in self.param_groups:
            for p in self._trainable(group):
                st = self._state(p, group)
                name = names.get(id(p)) or self._names([p])[0]
                entries.append(Entry(name, st.get("mean", p), st["hess"], float(group["ess"]),
                                      float(group["weight_decay"]), target=p))
        return DiagonalGaussian(entries)

    # ------------------------------------------------------------------ serialization
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the transient workspaces (torch.optim keeps only 3 keys, which breaks
        ``copy.deepcopy`` and pickling of the flags); refuses while samples are pending."""
        if self._active or self._count:
            raise SamplingError("cannot copy or pickle IVON while samples are pending: call step() first")
        return {**self.__dict__, "_ws": {}, "_acc": {}}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict plus vbpc's flags; step counters are in each state."""
        if self._active or self._count:
            raise SamplingError("IVON.state_dict() while samples are pending: call step() first "
                                "(a sampled context or collected gradients would be lost)")
        sd = super().state_dict()
        sd["vbpc"] = {"version": _STATE_VERSION, "mc_samples": self.mc_samples, "sync": self.sync,
                      "parity": self.parity, "state_dtype": str(self.state_dtype).replace("torch.", ""),
                      "clip_grad_norm": self.clip_grad_norm, "counters": dict(self.counters)}
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, moving state to each parameter's device but keeping fp32 state.

        Everything is validated first: on any mismatch a
        :class:`~vbpc.errors.StateDictMismatchError` names it and nothing changes.
        """
        if self._active or self._count:
            raise SamplingError("IVON.load_state_dict() while samples are pending")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise StateDictMismatchError(f"optimizer state dict lacks {key!r}")
        saved_groups = state_dict["param_groups"]
        if any(isinstance(sg, dict) and isinstance(sg.get("hess"), Tensor) for sg in saved_groups):
            raise StateDictMismatchError("this is a state dict of the reference IVON (ivon-opt keeps hess and momentum "
                                         "in its param groups); vbpc.IVON's layout differs and cannot load it: "
                                         "train with vbpc.IVON from the start, or copy the tensors by hand")
        if len(saved_groups) != len(self.param_groups):
            raise StateDictMismatchError(f"state dict has {len(saved_groups)} param groups, optimizer has "
                                         f"{len(self.param_groups)}")
        id_map: dict[Any, Tensor] = {}
        new_groups = []
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise StateDictMismatchError(f"param group {gi}: state dict has {len(sg['params'])} parameters, "
                                             f"optimizer has {len(g['params'])}")
            id_map.update(zip(sg["params"], g["params"]))
            ng = {**g, **{k: v for k, v in sg.items() if k != "params"}, "params": g["params"]}
            for k in self.defaults:
                ng.setdefault(k, self.defaults[k])
            _check_hparams(ng, f"saved param group {gi}")
            new_groups.append(ng)
        new_state: defaultdict = defaultdict(dict)
        wd_of = {id(q): float(ng["weight_decay"]) for ng in new_groups for q in ng["params"]}
        for idx, st in state_dict["state"].items():
            if idx not in id_map:
                raise StateDictMismatchError(f"state dict has state for unknown parameter index {idx}")
            p = id_map[idx]
            missing = {"step", "momentum", "hess"} - set(st)
            if missing:
                raise StateDictMismatchError(f"state of parameter {idx} lacks {sorted(missing)} (not an IVON state?)")
            out = {}
            for k, v in st.items():
                if isinstance(v, Tensor) and k in SCALAR_STATE:  # per-tensor float64 scalars (IVON-PoCo)
                    if v.dim() != 0:
                        raise StateDictMismatchError(f"state {k!r} of parameter {idx} must be a scalar, "
                                                     f"has shape {tuple(v.shape)}")
                    out[k] = v.to(device=p.device, dtype=torch.float64, copy=True)
                elif isinstance(v, Tensor) and k != "step":
                    if v.shape != p.shape:
                        raise StateDictMismatchError(f"state {k!r} of parameter {idx} has shape {tuple(v.shape)}, "
                                                     f"parameter has {tuple(p.shape)}")
                    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                        raise NonFiniteError(f"state {k!r} of parameter {idx} holds NaN or inf")
                    out[k] = v.to(device=p.device, dtype=self._sdtype(p), copy=True)
                elif k == "step":
                    out[k] = torch.as_tensor(v, dtype=torch.float32).detach().clone().cpu()
                else:
                    out[k] = v
            out.setdefault("wd_checked", -1.0)
            if not bool((out["hess"].double() + wd_of[id(p)] > 0).all()):
                raise StateDictMismatchError(f"state 'hess' of parameter {idx} has entries with h + weight_decay <= 0 "
                                             "(a negative or zero precision): not a valid IVON state")
            new_state[p] = out
        extra = state_dict.get("vbpc", {})
        clip = check_clip_grad_norm(extra.get("clip_grad_norm", self.clip_grad_norm))
        mc = extra.get("mc_samples", new_groups[0]["mc_samples"] if new_groups else 1)
        if not (isinstance(mc, int) and not isinstance(mc, bool) and mc >= 1):
            raise StateDictMismatchError(f"the state dict's mc_samples={mc!r} is not an int >= 1")
        state_dtype = self.state_dtype
        if "state_dtype" in extra:
            state_dtype = getattr(torch, extra["state_dtype"], None) if isinstance(extra["state_dtype"], str) else None
            if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
                raise StateDictMismatchError(f"the state dict's state_dtype={extra['state_dtype']!r} is not a "
                                             "floating torch dtype")
        if self._sharded and (extra.get("sync") or extra.get("parity")):
            raise StateDictMismatchError("the state dict was saved with sync=True or parity=True, which sharded "
                                         "(DTensor, FSDP2) parameters do not support")
        # commit
        self.state = new_state
        self.param_groups = new_groups
        self.mc_samples = mc
        self.sync = bool(extra.get("sync", self.sync))
        self.clip_grad_norm = clip
        self.counters = {**self.counters, **extra.get("counters", {})}
        self.parity = extra.get("parity", self.parity)
        self.state_dtype = state_dtype
        self._ws.clear()
        self._reset_samples()


_forward_public(IVON)
