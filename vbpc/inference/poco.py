r"""Posterior correction (PoCo): the anchor (docs/algorithms.md §3, §6.1).

* **Anchor state** (§6.1): a frozen snapshot :math:`m_{out}` of the posterior mean (plus the
  family's spread) and its mega-batch expected gradient :math:`\bar g_{out}` (and curvature).
* **Refresh** (:meth:`Anchor.refresh`): a chunked pass over a mega-batch iterable at anchor
  samples :math:`\theta'=m_{out}+\sigma_{out}z'` (``z'`` from a dedicated anchor generator),
  folding a chunk-size-weighted Welford mean, RNG-neutral, with a tqdm bar; all anchor buffers
  are published together at the end (atomic swap).
* **Correction** (eq. 22): :math:`\tilde g=(\hat g_{in}-\alpha_t\hat g_{out})+\alpha_t\bar g_{out}`
  with :math:`\hat g_{out}` from the *same* batch at the anchor sample, the closure replayed with
  the same global RNG state (§6.3); at :math:`\alpha_t=0` the anchor pass is skipped.
* **α schedule** (§4 P2, :func:`alpha_at`): ``"constant"``, or ``"linear"``
  :math:`\alpha_k=\mathrm{linspace}(\alpha_0,0,K)[k]` over the run's :math:`K` anchor intervals.

The options, the schedule, the counters and the two-pass driver are the component of
:mod:`vbpc.inference.correction`; the learners are :mod:`vbpc.inference.ivon_poco` (diagonal),
:mod:`vbpc.inference.vsgd` (isotropic) and :mod:`vbpc.inference.von` (full).

**Keeping the batch identical.**  ``step(closure)`` calls ``closure`` twice: the closure must
close over one batch object (never draw from the loader inside it), so loader-side
augmentation is aligned by construction; in-forward randomness is replayed by the learner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import _dtensor as dt
from .. import _runtime as ranks
from .._runtime import capture_rng, restore_rng
from ..errors import NonFiniteError, SamplingError, StateDictMismatchError
from ..functional import poco_correct_
from ..nn.norm import preserved_running_stats
from ..posterior import perturbation

__all__ = ["Anchor", "alpha_at", "batch_size_of"]

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

        spread: list[Any] = scales or []  # indexed only when there is noise (scales given)
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
                        p.copy_(m if z is None else torch.addcmul(m, z[i], torch.as_tensor(spread[i]).to(m)))

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
                        h_c[i].add_(g.mul(z[i]).div_(torch.as_tensor(spread[i]).to(g)), alpha=1.0 / draws)
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
