r"""Weight sampling for :class:`vbpc.IVON` (docs/algorithms.md §2, eq. 5): the noise draw, the in-place
sampling context, the collection of each sample's gradient and Price statistic, the gradient clip and the
foreign-gradient guard.  A mixin of the learner; the update is in :mod:`vbpc.inference.ivon`."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor

from .. import _dtensor as dt
from .. import _runtime as ranks
from ..errors import NonFiniteError, SamplingError
from ..functional import (
    clip_coef,
    default_foreach,
    gaussian_noise_,
    ivon_rsqrt_,
    perturb_,
    product_,
    welford_,
)
from ..posterior.base import perturbation
from ._ivon_state import IVONBase
from .closures import require_grads
from .gradwatch import GradWatch

__all__ = ["WeightSampling"]


class WeightSampling(IVONBase):
    """The sampling half of :class:`vbpc.IVON` (a mixin)."""

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
            slots: list[Optional[Tensor]] = [None] * len(params)
            for key, idx in buckets.items():
                off = 0
                for i in idx:
                    slots[i] = bufs[key][off:off + params[i].numel()].view_as(params[i])
                    off += params[i].numel()
            ws["views"] = slots
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
