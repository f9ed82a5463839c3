r"""Posterior correction (PoCo): anchors and the corrected isotropic learner (docs/algorithms.md §3-5).

The correction is one component, :class:`Anchor`, composed with a base learner:

* **Anchor state** (§6.1): a frozen snapshot :math:`m_{out}` of the posterior mean (plus the
  family's spread) and its mega-batch expected gradient :math:`\bar g_{out}`.
* **Refresh** (:meth:`Anchor.refresh`): a chunked pass over a mega-batch iterable at anchor
  samples :math:`\theta'=m_{out}+\sigma_{out}z'` (``z'`` from a dedicated anchor generator),
  folding a chunk-size-weighted Welford mean, RNG-neutral, with a tqdm bar; all anchor buffers
  are published together at the end (atomic swap).
* **Correction** (eq. 22): :math:`\tilde g=(\hat g_{in}-\alpha_t\hat g_{out})+\alpha_t\bar g_{out}`
  with :math:`\hat g_{out}` from the *same* batch at the anchor sample, the closure replayed with
  the same global RNG state (§6.3); at :math:`\alpha_t=0` the anchor pass is skipped.
* **α schedule** (§4 P2): ``"constant"``, or ``"linear"``
  :math:`\alpha_k=\mathrm{linspace}(\alpha_0,0,K)[k]` over the run's :math:`K` anchor intervals.

:class:`VSGDPoCo` is the isotropic, fixed-σ base learner (eq. 20) with this correction;
:class:`VSGD` (α=0), :class:`SVRG` (σ=0, α=1) and :class:`AlphaSVRG` (σ=0, α schedule) are its
named constructors.  With σ=0, α=1 and a full-data anchor its iterates are exactly SVRG's
(§4 P1, eq. 19) under the step mapping ρ = ηN of eq. (4).

**Keeping the batch identical.**  ``step(closure)`` calls ``closure`` twice: the closure must
close over one batch object (never draw from the loader inside it), so loader-side
augmentation is aligned by construction; in-forward randomness is replayed by the learner.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from .. import _dtensor as dt
from .closures import closure_loss, require_grads
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from ..functional import check_clip_grad_norm, clip_coef, poco_correct_
from ..nn.norm import RunningStatsGuard, preserved_running_stats
from ..posterior import perturbation
from .. import _runtime as ranks
from .._runtime import capture_rng, restore_rng

__all__ = ["Anchor", "CorrectionSchedule", "VSGDPoCo", "VSGD", "SVRG", "AlphaSVRG", "alpha_at", "batch_size_of"]

ALPHA_SCHEDULES = ("constant", "linear")
ANCHOR_NOISE = ("shared", "independent")


def alpha_at(alpha0: float, schedule: str, interval: int, n_intervals: Optional[int]) -> float:
    r""":math:`\alpha` in anchor interval ``interval`` (0-based), docs/algorithms.md §4 P2 / §6.2.

    ``"constant"``: :math:`\alpha_0`.  ``"linear"``: ``linspace(α0, 0, K)[k]`` (:math:`\alpha_0`
    if :math:`K=1`, exactly 0 in the last interval and after it).
    """
    if schedule == "constant":
        return alpha0
    if n_intervals is None:
        raise ValueError("alpha_schedule='linear' needs total_steps (K = ceil((total_steps - warmup) / T))")
    if interval >= n_intervals:
        return 0.0
    if n_intervals == 1:
        return alpha0
    return float(torch.linspace(alpha0, 0.0, n_intervals, dtype=torch.float64)[interval])


def batch_size_of(batch: Any) -> int:
    """Examples in a batch: the leading size of its first array (tuples, lists, dicts, tensors, arrays)."""
    shape = getattr(batch, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            return batch_size_of(v)
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size_of(batch[0])
    raise TypeError(f"cannot infer the batch size of a {type(batch).__name__}; pass batch_size=")


class Anchor:
    r"""The anchored posterior's mean snapshot and mega-batch statistics (docs/algorithms.md §6.1).

    Holds, per parameter, :math:`m_{out}` and :math:`\bar g_{out}`; ``sigma`` is the isotropic
    spread at refresh time.  ``device`` puts the buffers elsewhere (e.g. ``"cpu"`` to offload
    from a GPU: each corrected step then copies 2d numbers across, see :meth:`correct_`).
    """

    def __init__(self, params: list[Tensor], seed: int = 0, device: Optional[Union[str, torch.device]] = None):
        self.params = params
        self.device = torch.device(device) if device is not None else None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.mean: Optional[list[Tensor]] = None
        self.grad: Optional[list[Tensor]] = None
        self.hess: Optional[list[Tensor]] = None
        self.extra: dict[str, Any] = {}
        self.sigma = 0.0
        self.refreshes = 0  # k: refreshes done
        self.step = -1  # learner step t at the last refresh
        self.examples = 0  # examples in the last mega-batch

    @property
    def ready(self) -> bool:
        return self.mean is not None

    def _buf(self, t: Tensor) -> Tensor:
        return t.detach().to(self.device or t.device, copy=True)

    def noise(self, like: list[Tensor], shared: Optional[list[Tensor]], sigma: float) -> Optional[list[Tensor]]:
        """Anchor-sample noise: ``shared`` (the current z) or fresh draws from the anchor generator."""
        if sigma == 0.0:
            return None
        if shared is not None:
            return shared
        return [dt.randn_like(p, self.generator, p.dtype) for p in like]

    @torch.no_grad()
    def accumulate(
        self,
        evaluate: Callable[[Any], tuple[list[Tensor], Optional[list[Tensor]], int]],
        data: Iterable[Any],
        *,
        names: list[str],
        model: Optional[nn.Module] = None,
        batch_size: Optional[Callable[[Any], int]] = None,
        max_examples: Optional[int] = None,
        progress: bool = True,
        sync: bool = False,
    ) -> tuple[list[Tensor], Optional[list[Tensor]], int, int]:
        r"""Chunk-size-weighted means of ``evaluate(batch) -> (grads, hessians or None, passes)`` over
        ``data``: :math:`\bar x \mathrel{+}= (|C|/N)(x_C-\bar x)` (exact example means even with a
        short last chunk).  RNG-neutral; with ``model`` its buffers (BatchNorm running statistics)
        are restored.  Raises on an empty iterable or non-finite statistics.  Returns
        ``(ḡ, h̄, passes, examples)`` without publishing anything.  With ``sync`` (under
        ``torch.distributed``) each rank passes over its own shard and the means are combined,
        weighted by the ranks' example counts, so every rank publishes the same anchor."""
        size_of = batch_size or batch_size_of
        g_bar: Optional[list[Tensor]] = None
        h_bar: Optional[list[Tensor]] = None
        with preserved_running_stats(model):
            rng = capture_rng()
            seen, passes = 0, 0
            try:
                for batch in tqdm(data, desc="anchor refresh", disable=not progress, leave=False, dynamic_ncols=True):
                    n = int(size_of(batch))
                    if n <= 0:
                        continue
                    g_c, h_c, k = evaluate(batch)
                    passes += k
                    seen += n
                    w = n / seen
                    if g_bar is None:
                        g_bar = [torch.zeros_like(g) for g in g_c]
                        h_bar = None if h_c is None else [torch.zeros_like(h) for h in h_c]
                    for acc, x in zip(g_bar, g_c):
                        acc.add_(x.sub(acc), alpha=w)
                    if h_bar is not None and h_c is not None:
                        for acc, x in zip(h_bar, h_c):
                            acc.add_(x.sub(acc), alpha=w)
                    if max_examples is not None and seen >= max_examples:
                        break
            finally:
                restore_rng(rng)
        if sync and ranks.active():
            g_bar, h_bar, seen = _allreduce_means(g_bar, h_bar, seen, params=self.params)
        if g_bar is None:
            raise ValueError("anchor refresh over an empty iterable: no example was seen; the anchor was not changed")
        for label, stats in (("gradient", g_bar), ("Hessian", h_bar or [])):
            bad = [nm for nm, x in zip(names, stats) if not bool(torch.isfinite(x).all())]
            if bad:
                raise NonFiniteError(f"anchor refresh: non-finite mean {label} for {bad[0]!r}; "
                                     "the anchor was not changed")
        return g_bar, h_bar, passes, seen

    def publish(self, mean: list[Tensor], grad: list[Tensor], hess: Optional[list[Tensor]], *,
                extra: Optional[dict[str, Any]] = None, sigma: float = 0.0, step: int = 0, examples: int = 0) -> None:
        """Swap in a complete new anchor at once (refreshes are atomic)."""
        self.mean, self.grad, self.hess = mean, grad, hess
        self.extra = dict(extra or {})
        self.sigma = float(sigma)
        self.refreshes += 1
        self.step = int(step)
        self.examples = int(examples)

    @torch.no_grad()
    def refresh(
        self,
        loss_fn: Callable[[Any], Tensor],
        data: Iterable[Any],
        *,
        scale: Union[float, list[Tensor], None] = 0.0,
        hessian: bool = False,
        refresh_mc: int = 1,
        antithetic: bool = False,
        extra: Optional[dict[str, Any]] = None,
        means: Optional[list[Tensor]] = None,
        names: Optional[list[str]] = None,
        model: Optional[nn.Module] = None,
        batch_size: Optional[Callable[[Any], int]] = None,
        max_examples: Optional[int] = None,
        progress: bool = True,
        step: int = 0,
        sync: bool = False,
    ) -> int:
        r"""Refresh for the isotropic and diagonal families (eq. 21): snapshot :math:`m_{out}` and
        compute :math:`\bar g_{out}` (and the Price :math:`\bar h_{out}`) over ``data``.

        ``scale`` is the anchor's spread :math:`\sigma_{out}`: a float (isotropic), one tensor per
        parameter (diagonal), or 0/``None`` (delta method: exactly :math:`m_{out}`).  Each chunk is
        evaluated ``refresh_mc`` times at :math:`\theta'=m_{out}+\sigma_{out}\odot z'` (:math:`z'`
        from the anchor generator); with ``hessian`` the Price estimate
        :math:`\hat h'=z'\odot\hat g'/\sigma_{out}` (eq. 5) is averaged too.  ``antithetic`` evaluates
        each draw as a pair :math:`\pm z'` (2·``refresh_mc`` passes per chunk), which cancels the
        :math:`z'\odot\nabla\bar\ell_C(m_{out})/\sigma_{out}` term that dominates the Price estimate's
        variance when σ is small (the [vbpc] device of docs/algorithms.md §8, eq. 30).  ``means`` overrides
        the snapshot source (fp32 master weights).  Nothing is published unless the pass completes
        with finite statistics; then the mean, the statistics and ``extra`` (the family's snapshot,
        e.g. :math:`h_{out},\lambda_{out},\delta_{out}`) are swapped in together (:meth:`publish`).
        Returns the number of forward/backward passes.
        """
        if not (isinstance(refresh_mc, int) and not isinstance(refresh_mc, bool) and refresh_mc >= 1):
            raise ValueError(f"the anchor pass needs refresh_mc (mc_samples) >= 1 draws, got {refresh_mc!r}: with "
                             "none, the gradient and curvature would come out all zeros")
        params = self.params
        names = names or [f"params[{i}]" for i in range(len(params))]
        if isinstance(scale, (int, float)) or scale is None:
            scales: Optional[list[Any]] = None if not scale else [float(scale)] * len(params)
        else:
            scales = list(scale)
        if hessian and scales is None:
            raise ValueError("the Price Hessian needs a positive anchor spread (scale)")
        m_out = [self._buf(m) for m in (means if means is not None else params)]

        signs = (1.0, -1.0) if antithetic and scales is not None else (1.0,)
        draws = refresh_mc * len(signs)

        def evaluate(batch: Any) -> tuple[list[Tensor], Optional[list[Tensor]], int]:
            g_c = [torch.zeros_like(m) for m in m_out]
            h_c = [torch.zeros_like(m) for m in m_out] if hessian else None
            for k in range(draws):
                if k % len(signs) == 0:
                    z0 = None if scales is None else [  # a DTensor's shard of the full draw
                        dt.randn_like(m, self.generator, m.dtype) for m in m_out]
                z = None if z0 is None else [signs[k % len(signs)] * t for t in z0]

                def write(z: Optional[list[Tensor]] = z) -> None:
                    for i, (p, m) in enumerate(zip(params, m_out)):
                        p.copy_(m if z is None else torch.addcmul(m, z[i], torch.as_tensor(scales[i]).to(m)))

                with perturbation(params, names, "Anchor.refresh", write):
                    with torch.enable_grad():
                        loss = loss_fn(batch)
                        if not bool(torch.isfinite(loss.detach()).all()):
                            raise NonFiniteError("anchor refresh: non-finite loss; the anchor was not changed")
                        grads = _gradients(loss, params)
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    g = g.to(m_out[i].device, m_out[i].dtype)
                    g_c[i].add_(g, alpha=1.0 / draws)
                    if h_c is not None:
                        assert z is not None
                        h_c[i].add_(g.mul(z[i]).div_(torch.as_tensor(scales[i]).to(g)), alpha=1.0 / draws)
            return g_c, h_c, draws

        g_bar, h_bar, passes, seen = self.accumulate(evaluate, data, names=names, model=model, batch_size=batch_size,
                                                     max_examples=max_examples, progress=progress, sync=sync)
        self.publish(m_out, g_bar, h_bar, extra=extra, step=step, examples=seen,
                     sigma=float(scale) if isinstance(scale, (int, float)) else 0.0)
        return passes

    def correct_(self, g_in: list[Tensor], g_out: list[Tensor], alpha: float) -> list[Tensor]:
        r"""Eq. (22) for the gradient, in place on ``g_in`` (see :func:`vbpc.functional.poco_correct_`)."""
        if self.grad is None:
            raise SamplingError("no anchor: call refresh(loss_fn, data) before a corrected step")
        return poco_correct_(g_in, g_out, self.grad, alpha)

    # ----------------------------------------------------------------- serialization
    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": None if self.mean is None else [t.clone() for t in self.mean],
            "grad": None if self.grad is None else [t.clone() for t in self.grad],
            "hess": None if self.hess is None else [t.clone() for t in self.hess],
            "extra": {k: ([t.clone() for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v)
                      for k, v in self.extra.items()},
            "sigma": self.sigma, "refreshes": self.refreshes, "step": self.step, "examples": self.examples,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("mean", "grad", "sigma", "refreshes", "step", "generator"):
            if key not in state:
                raise StateDictMismatchError(f"anchor state lacks {key!r}")
        for key in ("mean", "grad", "hess"):
            saved = state.get(key)
            if saved is None:
                continue
            if len(saved) != len(self.params):
                raise StateDictMismatchError(
                    f"anchor {key} has {len(saved)} tensors, the learner has {len(self.params)}")
            for i, (t, p) in enumerate(zip(saved, self.params)):
                if tuple(t.shape) != tuple(p.shape):
                    raise StateDictMismatchError(f"anchor {key}[{i}] has shape {tuple(t.shape)}, "
                                                 f"parameter has {tuple(p.shape)}")
        self.mean = None if state["mean"] is None else [self._buf(t.to(p.device)) for t, p in
                                                        zip(state["mean"], self.params)]
        self.grad = None if state["grad"] is None else [self._buf(t.to(p.device)) for t, p in
                                                        zip(state["grad"], self.params)]
        self.hess = None if state.get("hess") is None else [self._buf(t.to(p.device)) for t, p in
                                                            zip(state["hess"], self.params)]
        self.extra = dict(state.get("extra", {}))
        self.sigma = float(state["sigma"])
        self.refreshes = int(state["refreshes"])
        self.step = int(state["step"])
        self.examples = int(state.get("examples", 0))
        self.generator.set_state(state["generator"])


def _gradients(loss: Tensor, params: list[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The gradients of ``loss`` with respect to ``params`` (``None`` where unused), leaving ``p.grad`` as
    it was.  Sharded (DTensor, FSDP2) parameters are not in the autograd graph (the forward uses
    all-gathered copies), so ``torch.autograd.grad`` would see none of them: the backward runs, and FSDP2
    reduce-scatters each gradient into ``p.grad``."""
    if not dt.any_dtensor(params):
        return torch.autograd.grad(loss, params, allow_unused=True)
    kept = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        loss.backward()
        return tuple(p.grad for p in params)
    finally:
        for p, g in zip(params, kept):
            p.grad = g


def _allreduce_means(g_bar: Optional[list[Tensor]], h_bar: Optional[list[Tensor]], seen: int,
                     params: list[Tensor]) -> tuple[Optional[list[Tensor]], Optional[list[Tensor]], int]:
    """Example-weighted means over ranks (a rank that saw nothing contributes zeros)."""
    n = torch.tensor([float(seen)])
    flag = torch.tensor([1.0 if h_bar is not None else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    g = g_bar if g_bar is not None else [torch.zeros_like(p) for p in params]
    h = h_bar if h_bar is not None else ([torch.zeros_like(p) for p in params] if flag.item() else None)
    total = n.clone()
    dist.all_reduce(total)
    if total.item() == 0:
        return None, None, 0
    for t in g + (h or []):
        t.mul_(n.item())
        dist.all_reduce(t)
        t.div_(total.item())
    return g, h, int(total.item())


class CorrectionSchedule:
    """When the anchor is refreshed and how strongly it corrects (docs/algorithms.md §6.2), shared by
    every corrected learner: α (constant or linear), period T, warm-up :math:`t_w`, the step
    counter ``t`` and the :class:`Anchor`."""

    alpha0: float
    alpha_schedule: str
    total_steps: Optional[int]
    anchor_period: Optional[int]
    warmup_steps: int
    t: int
    anchor: Anchor

    def _init_schedule(self, alpha: float, alpha_schedule: str, total_steps: Optional[int],
                       anchor_period: Optional[int], warmup_steps: int) -> None:
        checks = [
            ("alpha", alpha, 0.0 <= alpha <= 1.0),
            ("alpha_schedule", alpha_schedule, alpha_schedule in ALPHA_SCHEDULES),
            ("warmup_steps", warmup_steps, isinstance(warmup_steps, int) and warmup_steps >= 0),
            ("anchor_period", anchor_period,
             anchor_period is None or (isinstance(anchor_period, int) and anchor_period >= 1)),
            ("total_steps", total_steps, total_steps is None or (isinstance(total_steps, int) and total_steps >= 1)),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}")
        if alpha > 0 and anchor_period is None:
            raise ValueError("alpha > 0 needs anchor_period (steps between anchor refreshes)")
        if alpha_schedule == "linear" and total_steps is None:
            raise ValueError("alpha_schedule='linear' needs total_steps")
        self.alpha0 = float(alpha)
        self.alpha_schedule = alpha_schedule
        self.total_steps = total_steps
        self.anchor_period = anchor_period
        self.warmup_steps = warmup_steps
        self.t = 0

    @property
    def n_intervals(self) -> Optional[int]:
        """K, the number of anchor intervals of the run (needs ``total_steps``)."""
        if self.total_steps is None or self.anchor_period is None:
            return None
        return max(1, math.ceil((self.total_steps - self.warmup_steps) / self.anchor_period))

    @property
    def alpha(self) -> float:
        r""":math:`\alpha_t` for the next step (0 during warm-up and before the first refresh)."""
        if not self.anchor.ready or self.t < self.warmup_steps or self.alpha0 == 0.0:
            return 0.0
        return alpha_at(self.alpha0, self.alpha_schedule, self.anchor.refreshes - 1, self.n_intervals)

    @property
    def refresh_due(self) -> bool:
        """True at :math:`t=t_w, t_w+T, \\dots` until ``refresh`` has run for this step."""
        if self.anchor_period is None or self.t < self.warmup_steps or self.anchor.step == self.t:
            return False
        return (self.t - self.warmup_steps) % self.anchor_period == 0

    def _check_refresh(self) -> None:
        if self.refresh_due:
            raise SamplingError(f"an anchor refresh is due at step {self.t}: call opt.refresh(loss_fn, data) first")


class VSGDPoCo(CorrectionSchedule, Optimizer):
    r"""Variational SGD over an isotropic Gaussian with fixed σ, with posterior correction (§5, eq. 20).

    .. math::
        z&\sim\mathcal N(0,I)\ (\text{none if }\sigma=0),\quad \hat g_{in}=\nabla\bar\ell_B(m+\sigma z),\quad
        \hat g_{out}=\nabla\bar\ell_B(m_{out}+\sigma z_{out})\\
        \tilde g&=(\hat g_{in}-\alpha_t\hat g_{out})+\alpha_t\bar g_{out},\qquad
        v\leftarrow\beta v+(\tilde g+\delta m),\qquad m\leftarrow m-\rho v

    Args:
        lr: ρ.  sigma: σ ≥ 0 (0 = delta method).  weight_decay: δ (the prior, never corrected).
        momentum: heavy-ball β.  alpha: :math:`\alpha_0\in[0,1]`.  alpha_schedule: ``"constant"`` or
        ``"linear"`` (needs ``total_steps``).  anchor_period: T (steps between refreshes; ``None``
        with α=0).  warmup_steps: :math:`t_w` (plain VSGD before the first refresh).
        anchor_noise: ``"shared"`` (z_out = z) or ``"independent"``.  anchor_seed: the anchor
        generator's seed.  megabatch_size: examples per refresh (``None``: the whole iterable).
        force_anchor_pass: run the anchor pass even at α=0 (tests).  anchor_device: where the
        anchor buffers live.  track_stats: keep the last ĝ_in, ĝ_out, g̃ (for tests/diagnostics).
        sync: under ``torch.distributed``, average ĝ_in, ĝ_out and the refresh's mega-batch means
        over ranks (per-rank noise acts as extra samples; every rank applies the same update).
        clip_grad_norm: :math:`r`: clip the corrected gradient after the correction (and after the
        all-reduce under ``sync``), :math:`\tilde g\leftarrow\min(1,r/(\lVert\tilde g\rVert_2+10^{-6}))\tilde g`,
        one L2 norm over all trainable parameters; the anchor pass and the refresh are not clipped
        (clipping inside the closure would give the two passes different factors and break the
        correction).  ``counters["clipped_steps"]`` counts the steps where it was active.

    ``step(closure)``: ``closure`` zeroes gradients, computes the mean loss on one fixed batch,
    calls ``backward`` and returns the loss.  ``refresh(loss_fn, data)`` computes the anchor.
    ``counters`` counts forward/backward passes and examples (inner and refresh).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        sigma: float,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        *,
        alpha: float = 1.0,
        alpha_schedule: str = "constant",
        total_steps: Optional[int] = None,
        anchor_period: Optional[int] = None,
        warmup_steps: int = 0,
        anchor_noise: str = "shared",
        anchor_seed: int = 0,
        megabatch_size: Optional[int] = None,
        force_anchor_pass: bool = False,
        anchor_device: Optional[Union[str, torch.device]] = None,
        track_stats: bool = False,
        model: Optional[nn.Module] = None,
        norm_update: str = "first",
        sync: bool = False,
        clip_grad_norm: Optional[float] = None,
    ):
        checks = [
            ("lr", lr, lr >= 0 and math.isfinite(lr)), ("sigma", sigma, sigma >= 0 and math.isfinite(sigma)),
            ("weight_decay", weight_decay, weight_decay >= 0 and math.isfinite(weight_decay)),
            ("momentum", momentum, 0 <= momentum < 1),
            ("anchor_noise", anchor_noise, anchor_noise in ANCHOR_NOISE),
            ("megabatch_size", megabatch_size, megabatch_size is None or megabatch_size >= 1),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}")
        self._init_schedule(alpha, alpha_schedule, total_steps, anchor_period, warmup_steps)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.sigma = float(sigma)
        self.anchor_noise = anchor_noise
        self.megabatch_size = megabatch_size
        self.force_anchor_pass = bool(force_anchor_pass)
        self.track_stats = bool(track_stats)
        self.last_stats: Optional[dict[str, list[Tensor]]] = None
        self.counters = {"inner_passes": 0, "refresh_passes": 0, "inner_examples": 0, "refresh_examples": 0,
                         "clipped_steps": 0}
        self.anchor = Anchor(self._params(), seed=anchor_seed, device=anchor_device)
        self._norm = RunningStatsGuard(model, norm_update, type(self).__name__)
        self.sync = bool(sync)
        self.clip_grad_norm = check_clip_grad_norm(clip_grad_norm)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _names(self) -> list[str]:
        return [f"params[{i}]" for i in range(len(self._params()))]

    def refresh(
        self, loss_fn: Callable[[Any], Tensor], data: Iterable[Any], *, model: Optional[nn.Module] = None,
        batch_size: Optional[Callable[[Any], int]] = None, progress: bool = True,
    ) -> None:
        """Refresh the anchor at the current mean from a mega-batch iterable (see :meth:`Anchor.refresh`).

        ``loss_fn(batch)`` returns the mean loss of ``batch`` computed with the model.  Pass
        ``model`` to keep its buffers (BatchNorm statistics) untouched by the refresh."""
        model = self._norm.model if model is None else model
        chunks = self.anchor.refresh(loss_fn, data, scale=self.sigma, names=self._names(), model=model,
                                     batch_size=batch_size, max_examples=self.megabatch_size,
                                     progress=progress, step=self.t, sync=self.sync)
        self.counters["refresh_passes"] += chunks
        self.counters["refresh_examples"] += self.anchor.examples

    # ------------------------------------------------------------------ step
    def _grads(self, params: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,  # type: ignore[override]
             batch_size: Optional[int] = None) -> Tensor:
        """One corrected step (eq. 20); returns the loss at the current sample.

        ``batch_size`` (optional) feeds the cost counters: ``inner_examples`` counts gradient
        evaluations, i.e. examples × passes (2 per corrected step, 1 otherwise; §6.4)."""
        if closure is None:
            raise SamplingError("VSGDPoCo.step needs a closure (it evaluates the same batch twice)")
        for gi, group in enumerate(self.param_groups):  # schedulers act at once: re-check before any state change
            if not (0.0 <= group["lr"] < math.inf):
                raise ValueError(f"invalid lr={group['lr']!r} in param group {gi}: must be finite and >= 0")
        self._check_refresh()
        params, names = self._params(), self._names()
        alpha = self.alpha
        sigma = self.sigma
        with torch.no_grad():
            z = [torch.randn_like(p) for p in params] if sigma > 0 else None
        rng0 = capture_rng()

        def at(mean: Optional[list[Tensor]], noise: Optional[list[Tensor]], spread: float) -> Callable[[], None]:
            """θ = m + σz in place; ``mean=None`` means the parameters' own values (the current
            mean; ``perturbation`` already keeps the copy that restores them)."""
            def write() -> None:
                for i, p in enumerate(params):
                    if mean is not None:
                        p.copy_(mean[i])
                    if noise is not None:
                        p.add_(noise[i], alpha=spread)
            return write

        with perturbation(params, names, "VSGDPoCo.step", at(None, z, sigma)), self._norm(first=True):
            with torch.enable_grad():
                loss = closure_loss(closure(), type(self).__name__)
            require_grads(params, type(self).__name__)
            g_in = self._grads(params)
        distributed = self.sync and ranks.active()
        finite = [bool(torch.isfinite(loss).all())]
        if not distributed and not finite[0]:
            raise NonFiniteError(f"the closure returned a non-finite loss ({loss.item()}); no state changed")
        passes = 1
        g_out: Optional[list[Tensor]] = None
        if alpha != 0.0 or (self.force_anchor_pass and self.anchor.ready):
            rng1 = capture_rng()
            restore_rng(rng0)
            z_out = self.anchor.noise(params, z if self.anchor_noise == "shared" else None, self.anchor.sigma)
            assert self.anchor.mean is not None
            anchor_mean = [m.to(p.device) for m, p in zip(self.anchor.mean, params)]
            with perturbation(params, names, "VSGDPoCo.step (anchor)", at(anchor_mean, z_out, self.anchor.sigma)), \
                    self._norm(first=False, anchor=True):
                with torch.enable_grad():
                    loss_out = closure_loss(closure(), type(self).__name__)
                require_grads(params, type(self).__name__)
                g_out = self._grads(params)
            restore_rng(rng1)
            passes += 1
            finite.append(bool(torch.isfinite(torch.as_tensor(loss_out)).all()))
            if not distributed and not finite[-1]:
                raise NonFiniteError("the closure returned a non-finite loss at the anchor; no state changed")
        if distributed:  # one collective decides for every rank, then the means are averaged
            ranks.agree_finite(all(finite))
            ranks.mean_(g_in + (g_out or []))
        bad = [n for n, g in zip(names, g_in + (g_out or [])) if not bool(torch.isfinite(g).all())]
        if bad:
            raise NonFiniteError(f"non-finite gradient for {bad[0]!r}; no state changed")
        g_tilde = [g.clone() for g in g_in] if self.track_stats else g_in
        if alpha != 0.0:
            assert g_out is not None
            self.anchor.correct_(g_tilde, g_out, alpha)
        if self.track_stats:  # g̃ as corrected, before the clip
            keep = [g.clone() for g in g_tilde] if self.clip_grad_norm is not None else g_tilde
            self.last_stats = {"g_in": g_in, "g_out": g_out or [], "g_tilde": keep}
        clipped = False
        if self.clip_grad_norm is not None:  # the corrected gradient, after the all-reduce
            c = clip_coef(g_tilde, self.clip_grad_norm)
            if not bool(torch.isfinite(c)) or float(c) == 0.0:
                raise NonFiniteError("the corrected gradient's norm overflowed (clip_grad_norm); no state changed")
            if float(c) < 1.0:
                torch._foreach_mul_(g_tilde, c)
                clipped = True
        self._update(params, g_tilde)
        self.counters["clipped_steps"] += int(clipped)
        self.t += 1
        self.counters["inner_passes"] += passes
        if batch_size is not None:
            self.counters["inner_examples"] += passes * int(batch_size)
        return loss

    @torch.no_grad()
    def _update(self, params: list[Tensor], g_tilde: list[Tensor]) -> None:
        """:math:`v\\leftarrow\\beta v+(\\tilde g+\\delta m)`, :math:`m\\leftarrow m-\\rho v` (β=0: v = g̃ + δm)."""
        grads = dict(zip(map(id, params), g_tilde))
        for group in self.param_groups:
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if id(p) not in grads:
                    continue
                v = grads[id(p)].add(p, alpha=wd) if wd != 0 else grads[id(p)]
                if beta != 0.0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    v = buf.mul_(beta).add_(v)
                p.sub_(v, alpha=lr)

    # ------------------------------------------------------------------ serialization
    def __getstate__(self) -> dict[str, Any]:  # torch.optim keeps only 3 keys: keep everything (deepcopy)
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["vbpc"] = {"t": self.t, "counters": dict(self.counters), "anchor": self.anchor.state_dict(),
                      "sigma": self.sigma, "alpha": self.alpha0, "clip_grad_norm": self.clip_grad_norm}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("vbpc")
        if extra is None:
            raise StateDictMismatchError("not a VSGDPoCo state dict (no 'vbpc' section)")
        probe = Anchor(self._params())
        probe.load_state_dict(extra["anchor"])  # validates shapes before anything changes
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "vbpc"})
        self.anchor.load_state_dict(extra["anchor"])
        self.t = int(extra["t"])
        self.counters = {"clipped_steps": 0, **extra["counters"]}


class VSGD(VSGDPoCo):
    """Plain variational SGD (isotropic, fixed σ): :class:`VSGDPoCo` with α=0 and no anchor."""

    def __init__(self, params: Iterable[Any], lr: float, sigma: float, weight_decay: float = 0.0,
                 momentum: float = 0.0):
        super().__init__(params, lr, sigma, weight_decay, momentum, alpha=0.0)


class SVRG(VSGDPoCo):
    r"""SVRG (Johnson & Zhang 2013) as VSGD-PoCo with σ=0, α=1 (docs/algorithms.md §4 P1, eq. 19).

    .. math:: \theta\leftarrow\theta-\rho\big[\nabla\bar\ell_B(\theta)-\nabla\bar\ell_B(\theta_{out})
        +\nabla\bar\ell(\theta_{out})+\delta\theta\big]

    The paper's sum-scale form with step η and unit prior is ``lr = η N``, ``weight_decay = 1/N`` (eq. 4).
    """

    def __init__(self, params: Iterable[Any], lr: float, anchor_period: int, weight_decay: float = 0.0, **kw: Any):
        super().__init__(params, lr, 0.0, weight_decay, 0.0, alpha=1.0, anchor_period=anchor_period, **kw)


class AlphaSVRG(VSGDPoCo):
    r"""α-SVRG (Yin et al., ICLR 2025) with an SGD base (docs/algorithms.md §4 P2):
    :math:`\tilde g=\nabla\bar\ell_B(\theta)-\alpha_k(\nabla\bar\ell_B(\theta_{out})-\bar g_{out})`.

    ``alpha_schedule="linear"`` (default) decays :math:`\alpha_k=\mathrm{linspace}(\alpha_0,0,K)[k]`.
    """

    def __init__(self, params: Iterable[Any], lr: float, anchor_period: int, alpha: float = 0.75,
                 alpha_schedule: str = "linear", total_steps: Optional[int] = None, weight_decay: float = 0.0,
                 momentum: float = 0.0, **kw: Any):
        super().__init__(params, lr, 0.0, weight_decay, momentum, alpha=alpha, alpha_schedule=alpha_schedule,
                         total_steps=total_steps, anchor_period=anchor_period, **kw)
